"""IDEFICS (v1) adapter: ``IdeficsForVisionText2Text`` with a chat or question/answer prompt, last-token pooling.

Covers ``HuggingFaceM4/idefics-9b-instruct``, ``HuggingFaceM4/idefics-80b-instruct`` and the tiny demo
stand-ins of :mod:`medprobe.demo.models`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from medprobe.models.base import (
    PROMPT_FORMATS,
    Adapter,
    continuation_loglikelihoods,
    generated_texts,
    generation_options,
    pooled_decoder_states,
    register,
)

__all__ = ["IdeficsAdapter", "as_prompt_list"]


def as_prompt_list(prompt: str | Sequence[str], n_images: int) -> list[str]:
    """One prompt per image: a single string is repeated, a sequence must match the number of images."""
    if isinstance(prompt, str):
        return [prompt] * n_images
    prompts = list(prompt)
    if len(prompts) != n_images:
        raise ValueError(f"got {len(prompts)} prompts for {n_images} images; pass one prompt or one per image")
    return prompts


@register("idefics")
class IdeficsAdapter(Adapter):
    """IDEFICS v1.  The prompt is laid out in one of two formats (``prompt_format``)::

        chat:             <s>User:<fake_token_around_image><image><fake_token_around_image>
                          {prompt}<end_of_utterance>\\nAssistant:
        question_answer:  <s><fake_token_around_image><image><fake_token_around_image>
                          Question: {prompt} Answer:

    (one line each, broken here for width).  ``chat`` is the instruct models' conversation format;
    ``question_answer`` is what the paper's code gave the model (the processor gets
    ``[image, "Question: {prompt} Answer:"]``, no turns).  Either way the sequence starts with exactly one
    BOS, written by the processor itself, and the pooled vector of each hidden state is the one at the last
    real (non-padding) token, i.e. the position from which the model would generate its answer (the
    paper's choice).

    ``hidden.i`` is transformers' ``hidden_states[i]``: ``hidden.0`` the input of decoder layer 0, recorded
    *after* the gated cross-attention block that precedes it (so it already sees the image),
    ``hidden.i`` the output of decoder layer ``i - 1``, and ``hidden.{num_hidden_layers}`` the final,
    normalised output.  When fewer layers are kept, the forward pass stops after the deepest one.
    """

    pooling = "last"
    prompt_formats = PROMPT_FORMATS
    model_class = "IdeficsForVisionText2Text"
    processor_class = "AutoProcessor"

    def prompt_text(self, prompt: str, prompt_format: str = "chat") -> str:
        self.check_prompt_format(prompt_format)
        if prompt_format == "question_answer":
            return f"Question: {prompt} Answer:"
        # transformers 5.x no longer appends <end_of_utterance> on its own, so it is written here.
        return f"{prompt}<end_of_utterance>\nAssistant:"

    def preprocess(
        self, images: Sequence[Image.Image], prompt: str | Sequence[str], prompt_format: str = "chat"
    ) -> dict[str, torch.Tensor]:
        self.check_prompt_format(prompt_format)
        prompts = as_prompt_list(prompt, len(images))
        before_image = [] if prompt_format == "question_answer" else ["User:"]
        conversations = [
            [*before_image, image, self.prompt_text(text, prompt_format)] for image, text in zip(images, prompts)
        ]
        encoded = self.processor(text=conversations, return_tensors="pt")
        self._check_one_bos(encoded["input_ids"], encoded["attention_mask"])
        return {key: value for key, value in encoded.items()}

    def _check_one_bos(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Every row must start with exactly one BOS.

        The processor writes the BOS itself and tokenises with ``add_special_tokens=False`` (transformers
        4.32 to 5.x alike), so a tokenizer that adds its own BOS does not double it.  The paper's code
        prepended a second BOS to the processor's ids, but only to build a mask it never used: the model
        was run on a fresh processor call, i.e. on one BOS, which is what this reproduces.
        """
        bos = self.processor.tokenizer.bos_token_id
        if bos is None:
            return
        first = attention_mask.long().argmax(dim=1)  # the first real token, whichever side is padded
        rows = torch.arange(input_ids.shape[0])
        n_leading = (input_ids[rows, first] == bos).long()
        has_second = first + 1 < input_ids.shape[1]
        second = input_ids[rows, torch.where(has_second, first + 1, first)]
        n_leading += (has_second & (second == bos)).long()
        if not torch.all(n_leading == 1):
            raise RuntimeError(
                f"the processor of {self.checkpoint} gave {n_leading.tolist()} leading BOS tokens per row, "
                "expected exactly 1; check the tokenizer's add_bos_token and the processor's add_special_tokens"
            )

    def _pooled_states(self, batch: dict[str, torch.Tensor], keep: Sequence[int]) -> tuple[torch.Tensor, None]:
        attention_mask = batch["attention_mask"]
        # The largest index holding a real token: right for left padding, right padding and none.
        token_index = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last_real = (attention_mask.long() * token_index).amax(dim=1)
        rows = torch.arange(last_real.shape[0], device=last_real.device)
        # The decoder alone (model.model): the language-model head's logits are not needed.  Hooks keep
        # only the last real token's vector of each kept hidden state (on the device), so full sequences
        # are never collected, and the pass stops once the deepest kept state is known.  As in
        # transformers' ``hidden_states``: hidden.0 is the input of decoder layer 0 (after the first
        # gated cross-attention block), hidden.i (0 < i < num_hidden_layers) the output of decoder layer
        # i - 1, and hidden.{num_hidden_layers} the decoder's final normed output.
        decoder = self.model.model

        def last(state: torch.Tensor) -> torch.Tensor:
            if state.device != rows.device:  # device_map: this layer lives on another GPU
                return state[rows.to(state.device), last_real.to(state.device)].to(self.device)
            return state[rows, last_real]

        def run() -> Any:
            return decoder(**batch, use_cache=False, return_dict=True)

        return pooled_decoder_states(decoder, run, keep, last), None

    # ------------------------------------------------------------------ answering (NEJM evaluation)
    # Conversations are processor lists: strings and PIL images interleaved in reading order, e.g.
    # ["User:", image, "question<end_of_utterance>", "\nAssistant:"] or [image, "Question: ...\n\nAnswer:"]
    # (see medprobe.nejm.build_prompt).

    def _encode_conversations(self, conversations: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
        """Tokenise interleaved conversations, left-padded (new tokens follow the last column), on the device."""
        tokenizer = self.processor.tokenizer
        previous = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            encoded = self.processor(text=[list(c) for c in conversations], padding=True, return_tensors="pt")
        finally:
            tokenizer.padding_side = previous
        return {
            key: value.to(self.device, dtype=self.dtype) if value.is_floating_point() else value.to(self.device)
            for key, value in encoded.items()
        }

    def _stop_and_banned_ids(self) -> tuple[list[int], list[list[int]]]:
        tokenizer = self.processor.tokenizer
        vocab = tokenizer.get_vocab()
        stop = [int(tokenizer.eos_token_id)] + [vocab[t] for t in ("<end_of_utterance>",) if t in vocab]
        banned = [[vocab[t]] for t in ("<image>", "<fake_token_around_image>") if t in vocab]
        return stop, banned

    def generate(
        self,
        conversations: Sequence[Sequence[Any]],
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 50,
        num_return_sequences: int = 1,
        seed: int | None = None,
        stop_strings: Sequence[str] = (),
    ) -> list[list[str]]:
        """Answer each conversation: greedy (default) or sampled continuations, decoded without special tokens.

        Generation stops at ``<end_of_utterance>`` or ``</s>``, and at any of ``stop_strings`` (for
        prompts that have no end-of-turn token; the stop string stays at the end of the text); image
        tokens are never generated. With
        ``do_sample`` the torch RNG is seeded with ``seed`` inside :func:`torch.random.fork_rng`, so the
        caller's RNG state is untouched and one call with one seed gives the same samples every time.

        Returns:
            One list of ``num_return_sequences`` strings per conversation.
        """
        batch = self._encode_conversations(conversations)
        tokenizer = self.processor.tokenizer
        stop, banned = self._stop_and_banned_ids()
        options = generation_options(
            tokenizer,
            stop=stop,
            banned=banned,
            pad_token_id=tokenizer.pad_token_id,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            num_return_sequences=num_return_sequences,
            stop_strings=stop_strings,
        )
        return generated_texts(self.model, tokenizer, batch, options, seed=seed, device=self.device)

    def choice_loglikelihoods(
        self, conversation: Sequence[Any], continuations: Sequence[str]
    ) -> tuple[list[float], list[int]]:
        """Log-likelihood of each continuation's tokens given the conversation, in one padded forward pass.

        Each continuation is appended to the conversation's last string; its tokens are those after the
        longest common prefix of the tokenised conversation and the tokenised conversation + continuation
        (so a merge across the boundary is scored as part of the continuation).

        Returns:
            ``(sums, n_tokens)``: the summed natural-log probability of each continuation's tokens and
            their count (``sum / n_tokens`` is the mean per token).
        """
        conversation = list(conversation)
        if not continuations:
            raise ValueError("choice_loglikelihoods needs at least one continuation")
        if not conversation or not isinstance(conversation[-1], str):
            raise ValueError("the conversation must end with a string (the turn the continuation extends)")
        prompt_ids = self.processor(text=[conversation], return_tensors="pt")["input_ids"][0].tolist()
        full = [conversation[:-1] + [conversation[-1] + text] for text in continuations]
        batch = self._encode_conversations(full)
        return continuation_loglikelihoods(self.model, batch, prompt_ids)

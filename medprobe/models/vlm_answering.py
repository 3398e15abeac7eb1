r"""Answering with any image-text-to-text model: ``generate`` and ``choice_loglikelihoods`` for ``hf_vlm``.

:class:`VlmAnswering` is a mixin of :class:`medprobe.models.vlm.VlmAdapter`. It gives the generic adapter
the two methods the NEJM evaluation (:mod:`medprobe.nejm.answering`) calls, with the signatures and the
meaning of :class:`medprobe.models.idefics.IdeficsAdapter`'s, and it takes the same conversations: the
lists of strings and PIL images, in reading order, that :func:`medprobe.nejm.build_prompt` writes in
IDEFICS markup. Two shapes occur:

* **turns** (NEJM template ``chat``): the first item is ``"User:"``; ``User:`` and ``Assistant:`` (each
  optionally after a newline) open a turn, ``<end_of_utterance>`` closes it, and the conversation ends
  with an open assistant turn, ``"\nAssistant:"``;
* **plain** (NEJM template ``figure_s2``): images and text with no turns, the last text ending where the
  model goes on (``Answer:``).

How a conversation reaches the model depends on the processor (:attr:`VlmAnswering.answer_layout`):

``chat_template``
    The processor has a chat template (SmolVLM/Idefics3, LLaVA, Qwen2-VL, Gemma 3, ...). Turns become
    messages, a user turn's images as image parts and its text as a text part, an assistant turn's text
    (the space after ``Assistant:`` taken off) as its content; the ``<end_of_utterance>`` markers are
    dropped because the template writes the model's own end of turn. A plain conversation becomes *one*
    user message holding its images and texts in order, the Figure S2 text verbatim. The messages are
    rendered with ``add_generation_prompt=True``, so the model answers in its own assistant turn, and
    tokenised as transformers' ``apply_chat_template(..., tokenize=True)`` does (no second BOS when the
    template writes one).
``images_first``
    No template, and a processor that puts every image before the text (PaliGemma: the image tokens,
    BOS, the text, a newline). The conversation's text is kept verbatim, its images moved to the front;
    so only one image fits in a prompt. A continuation is scored as PaliGemma's causal *suffix*
    (the processor's ``suffix``; its closing EOS is not scored), the prompt being the bidirectional
    prefix.
``interleaved``
    No template and no layout of the processor's own: the conversation's text verbatim with the
    processor's image placeholder where each image is, as the IDEFICS processor lays it out.

In the two raw layouts ``<end_of_utterance>`` is kept only when the tokenizer has it as a token; the
turn labels ``User:`` and ``Assistant:`` stay as text.

A continuation (likelihood mode) or an answer (generation) follows the rendered prompt. Its leading
whitespace (the NEJM continuations start with a space, written for ``Assistant:`` / ``Answer:``) is
dropped where the prompt itself ends in whitespace: a generation prompt ending in a newline
(``<|im_start|>assistant\n``, ``<start_of_turn>model\n``) and PaliGemma's closing newline.

Several images or one (:attr:`VlmAnswering.max_images`): families trained with one image per prompt
(:data:`SINGLE_IMAGE_MODEL_TYPES`: LLaVA-1.5, LLaVA-NeXT, PaliGemma, ...) take 1; every other family has
no limit here. The NEJM evaluation answers such a model zero-shot (``nejm.max_images`` overrides).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from medprobe.models.base import continuation_loglikelihoods, generated_texts, generation_options

__all__ = [
    "ANSWER_LAYOUTS",
    "END_OF_UTTERANCE",
    "SINGLE_IMAGE_MODEL_TYPES",
    "Turn",
    "VlmAnswering",
    "conversation_turns",
    "max_images_for",
]

END_OF_UTTERANCE = "<end_of_utterance>"  # medprobe.nejm.prompt.END_OF_UTTERANCE: the IDEFICS end of a turn
ANSWER_LAYOUTS = ("chat_template", "images_first", "interleaved")

#: ``model_type`` of the families trained with one image per prompt, with their names. A conversation with
#: more images still reaches LLaVA's processor, but the model never saw one; PaliGemma's processor cannot
#: interleave images with text at all.
SINGLE_IMAGE_MODEL_TYPES: dict[str, str] = {
    "llava": "LLaVA-1.5",
    "llava_next": "LLaVA-NeXT",
    "paligemma": "PaliGemma",
    "mllama": "Llama 3.2 Vision",
    "blip-2": "BLIP-2",
    "instructblip": "InstructBLIP",
}
# Processors (by class name) that put all images before the text, whatever the text says.
_IMAGES_FIRST_PROCESSORS = ("PaliGemmaProcessor",)
_TURN_MARKER = re.compile(r"(\n?User:|\n?Assistant:|<end_of_utterance>)")
# Tokens that end an assistant turn, when the tokenizer has them (besides its EOS).
_END_OF_TURN_TOKENS = ("<end_of_utterance>", "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")
# Tokens that lay out images; never generated.
_IMAGE_MARKUP = re.compile(
    r"<image>|<fake_token_around_image>|<global-img>|<row_\d+_col_\d+>|<\|vision_start\|>|<\|vision_end\|>"
    r"|<\|image_pad\|>|<\|video_pad\|>|<start_of_image>|<end_of_image>|<image_soft_token>"
)


def max_images_for(model_type: str) -> int | None:
    """1 for the families of :data:`SINGLE_IMAGE_MODEL_TYPES`, ``None`` (no limit) for every other."""
    return 1 if model_type in SINGLE_IMAGE_MODEL_TYPES else None


@dataclass
class Turn:
    """One turn of a conversation: ``role`` ``user`` or ``assistant``, its strings and images in order."""

    role: str
    parts: list[Any] = field(default_factory=list)
    closed: bool = False


def _is_text(item: Any) -> bool:
    return isinstance(item, str)


def conversation_turns(conversation: Sequence[Any]) -> list[Turn]:
    """The turns of a conversation, the last one the open assistant turn the model answers in.

    A conversation in turns (first item ``"User:"``) is split at its markers (see the module docstring);
    the space after ``Assistant:`` and the ``<end_of_utterance>`` markers are not part of any turn. A plain
    conversation is one user turn holding all its items. Raises ``ValueError`` for an image or text outside
    a turn and for a conversation that does not end with an open, empty assistant turn.
    """
    items = [item for item in conversation if not (_is_text(item) and not item)]
    if not items:
        raise ValueError("empty conversation")
    if not (_is_text(items[0]) and items[0].startswith("User:")):
        return [Turn("user", items, closed=True), Turn("assistant")]
    turns: list[Turn] = []
    for item in items:
        if not _is_text(item):
            _open_turn(turns, "an image").parts.append(item)
            continue
        for piece in _TURN_MARKER.split(item):
            _add_piece(turns, piece)
    last = turns[-1]
    if last.role != "assistant" or last.closed or last.parts:
        raise ValueError("a conversation in turns must end with an open, empty assistant turn ('\\nAssistant:')")
    return turns


def _open_turn(turns: list[Turn], what: str) -> Turn:
    if not turns or turns[-1].closed:
        raise ValueError(f"the conversation has {what} outside a User:/Assistant: turn")
    return turns[-1]


def _add_piece(turns: list[Turn], piece: str) -> None:
    """One piece of a string split at the turn markers: a marker opens or closes a turn, text joins it."""
    marker = piece.strip()
    if marker in ("User:", "Assistant:"):
        if turns:
            turns[-1].closed = True
        turns.append(Turn(marker[:-1].lower()))
    elif marker == END_OF_UTTERANCE:
        _open_turn(turns, END_OF_UTTERANCE).closed = True
    elif piece.strip() or (turns and not turns[-1].closed and piece):  # whitespace between turns is no text
        turn = _open_turn(turns, f"text ({piece!r})")
        if turn.role == "assistant" and not turn.parts and piece.startswith(" "):
            piece = piece[1:]
        if piece:
            turn.parts.append(piece)


def _chat_messages(turns: Sequence[Turn]) -> list[dict[str, Any]]:
    """The closed turns as chat-template messages (images as ``{"type": "image"}`` parts)."""
    return [
        {
            "role": turn.role,
            "content": [{"type": "text", "text": part} if _is_text(part) else {"type": "image"} for part in turn.parts],
        }
        for turn in turns[:-1]
    ]


class VlmAnswering:
    """``generate`` and ``choice_loglikelihoods`` for :class:`medprobe.models.vlm.VlmAdapter` (see the module
    docstring for how a conversation becomes the model's input).

    The host class provides ``model``, ``processor``, ``device``, ``dtype``, ``checkpoint``,
    ``image_token_ids`` and ``_image_placeholder()``.
    """

    # ------------------------------------------------------------------ description
    @property
    def max_images(self) -> int | None:
        """Most images one prompt of this model may hold (``None``: no limit), by its family."""
        if self.answer_layout == "images_first":
            return 1
        return max_images_for(str(getattr(self.model.config, "model_type", "")))

    @classmethod
    def max_images_of_config(cls, model_cfg: Mapping[str, Any]) -> int | None:
        """:attr:`max_images` of a ``models:`` entry before its model is loaded (reads only its config)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            model_cfg["checkpoint"],
            revision=model_cfg.get("revision") or None,
            trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
        )
        return max_images_for(str(config.model_type))

    @property
    def answer_layout(self) -> str:
        """How a conversation reaches the model: one of :data:`ANSWER_LAYOUTS` (module docstring)."""
        if getattr(self.processor, "chat_template", None):
            return "chat_template"
        if type(self.processor).__name__ in _IMAGES_FIRST_PROCESSORS:
            return "images_first"
        return "interleaved"

    # ------------------------------------------------------------------ the prompt
    def _raw_text(self, conversation: Sequence[Any], placeholder: str) -> str:
        keep_end = END_OF_UTTERANCE in self.processor.tokenizer.get_added_vocab()
        return "".join(
            (item if keep_end else item.replace(END_OF_UTTERANCE, "")) if _is_text(item) else placeholder
            for item in conversation
        )

    def render_conversation(self, conversation: Sequence[Any]) -> tuple[str, list[Any]]:
        """``(text, images)``: the text given to the processor (image placeholders in it) and the images."""
        turns = conversation_turns(conversation)  # checks the shape in every layout
        images = [item for item in conversation if not _is_text(item)]
        layout = self.answer_layout
        if layout == "chat_template":
            text = self.processor.apply_chat_template(_chat_messages(turns), add_generation_prompt=True, tokenize=False)
            return text, images
        if layout == "images_first":
            if len(images) > 1:
                raise ValueError(
                    f"the processor of {self.checkpoint} ({type(self.processor).__name__}) puts every image "
                    f"before the text, so a prompt holds one image, not {len(images)}; answer zero-shot "
                    "(nejm.max_images: {<model>: 1})"
                )
            return self._image_placeholder() * len(images) + self._raw_text(conversation, ""), images
        return self._raw_text(conversation, self._image_placeholder()), images

    def _continuation(self, prompt_text: str, continuation: str) -> str:
        """``continuation`` as it follows the rendered prompt (leading whitespace off after whitespace)."""
        if self.answer_layout == "images_first" or prompt_text[-1:].isspace():
            continuation = continuation.lstrip()
        if not continuation:
            raise ValueError("a continuation is empty once it follows the prompt")
        return continuation

    def _encode(
        self,
        texts: Sequence[str],
        images: Sequence[Sequence[Any]],
        *,
        padding_side: str = "left",
        suffixes: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The processor's tensors of ``texts`` (with their images), padded on ``padding_side``, on the device.

        As transformers' ``apply_chat_template(tokenize=True)``: no special tokens are added when every
        text starts with the BOS (a template that writes it). ``labels`` (PaliGemma) are dropped.
        """
        tokenizer = self.processor.tokenizer
        kwargs: dict[str, Any] = {"text": list(texts), "padding": True, "return_tensors": "pt"}
        if any(len(row) for row in images):
            kwargs["images"] = [list(row) for row in images]
        bos = tokenizer.bos_token
        if bos and all(text.startswith(bos) for text in texts):
            kwargs["add_special_tokens"] = False
        if suffixes is not None:
            kwargs["suffix"] = list(suffixes)
        previous = tokenizer.padding_side
        tokenizer.padding_side = padding_side
        try:
            encoded = self.processor(**kwargs)
        finally:
            tokenizer.padding_side = previous
        return {
            key: value.to(self.device, dtype=self.dtype) if value.is_floating_point() else value.to(self.device)
            for key, value in encoded.items()
            if isinstance(value, torch.Tensor) and key != "labels"
        }

    def encode_conversations(self, conversations: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
        """The model's inputs for ``conversations``, left-padded (new tokens follow the last column)."""
        rendered = [self.render_conversation(c) for c in conversations]
        return self._encode([text for text, _ in rendered], [images for _, images in rendered])

    def stop_and_banned_ids(self) -> tuple[list[int], list[list[int]]]:
        """Token ids that end an answer (EOS, the model's end of turn) and the image tokens never generated."""
        tokenizer = self.processor.tokenizer
        added = tokenizer.get_added_vocab()
        stop: list[int] = []
        for value in (self.model.generation_config.eos_token_id, tokenizer.eos_token_id):
            for token in value if isinstance(value, (list, tuple)) else [value]:
                if token is not None and int(token) not in stop:
                    stop.append(int(token))
        stop += [added[t] for t in _END_OF_TURN_TOKENS if t in added and added[t] not in stop]
        try:
            banned = set(self.image_token_ids)
        except ValueError:
            banned = set()
        banned |= {index for token, index in added.items() if _IMAGE_MARKUP.fullmatch(token)}
        return stop, [[index] for index in sorted(banned - set(stop))]

    # ------------------------------------------------------------------ answering
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

        As :meth:`medprobe.models.idefics.IdeficsAdapter.generate`: generation stops at the EOS, the model's
        end-of-turn token or any of ``stop_strings`` (which stay at the end of the text); image tokens are
        never generated; the conversations are left-padded into one batch. Greedy is plain argmax and
        sampling plain top-k at ``temperature`` (the model's own generation defaults - top-p, repetition
        penalty, beams - are switched off); with ``do_sample`` the torch RNG is seeded with ``seed`` inside
        :func:`torch.random.fork_rng`, so the caller's RNG state is untouched.

        Returns:
            One list of ``num_return_sequences`` strings per conversation.
        """
        batch = self.encode_conversations(conversations)
        tokenizer = self.processor.tokenizer
        stop, banned = self.stop_and_banned_ids()
        # The checkpoint's own generation defaults (beams, penalties, typical-p) are switched off.
        plain = dict(num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0)
        options = generation_options(
            tokenizer,
            stop=stop,
            banned=banned,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0],
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            num_return_sequences=num_return_sequences,
            stop_strings=stop_strings,
            overrides=plain | ({"typical_p": 1.0} if do_sample else {}),
        )
        return generated_texts(self.model, tokenizer, batch, options, seed=seed, device=self.device)

    def choice_loglikelihoods(
        self, conversation: Sequence[Any], continuations: Sequence[str]
    ) -> tuple[list[float], list[int]]:
        """Log-likelihood of each continuation's tokens given the conversation, in one padded forward pass.

        Each continuation follows the rendered prompt (the model's generation prompt under a chat
        template; leading whitespace dropped after whitespace); its tokens are those after the longest
        common prefix of the tokenised prompt and the tokenised prompt + continuation, so a merge across
        the boundary is scored as part of the continuation. PaliGemma scores it as the causal suffix.
        The rows are right-padded, so each row's positions are those it has alone.

        Returns:
            ``(sums, n_tokens)``: the summed natural-log probability of each continuation's tokens and
            their count (``sum / n_tokens`` is the mean per token).
        """
        if not continuations:
            raise ValueError("choice_loglikelihoods needs at least one continuation")
        text, images = self.render_conversation(conversation)
        texts = [self._continuation(text, c) for c in continuations]
        prompt_ids = self._encode([text], [images])["input_ids"][0].tolist()
        n = len(texts)
        if self.answer_layout == "images_first":
            batch = self._encode([text] * n, [images] * n, padding_side="right", suffixes=texts)
            self._drop_closing_eos(batch)
        else:
            batch = self._encode([text + t for t in texts], [images] * n, padding_side="right")
        return continuation_loglikelihoods(self.model, batch, prompt_ids)

    def _drop_closing_eos(self, batch: dict[str, torch.Tensor]) -> None:
        """Mask out the EOS the processor closes every right-padded suffix with: it is not the choice's."""
        mask = batch["attention_mask"]
        rows = torch.arange(mask.shape[0], device=mask.device)
        last = mask.long().sum(dim=1) - 1
        eos = self.processor.tokenizer.eos_token_id
        if not torch.all(batch["input_ids"][rows, last] == eos):
            raise RuntimeError(f"the processor of {self.checkpoint} did not end every suffix with EOS ({eos})")
        mask[rows, last] = 0

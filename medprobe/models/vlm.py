"""Generic image-text-to-text adapter ``hf_vlm``: any ``AutoModelForImageTextToText`` with its ``AutoProcessor``.

A config entry names the adapter and a hub id (or local directory), nothing else::

    models:
      smolvlm:
        adapter: hf_vlm
        checkpoint: HuggingFaceTB/SmolVLM-256M-Instruct
        pooling: mean_image      # last (default) | mean | mean_image

Tested offline on tiny random builds of Idefics3 (SmolVLM), LLaVA and PaliGemma (:mod:`medprobe.demo.vlm_models`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from medprobe.models.base import PROMPT_FORMATS, Adapter, pooled_decoder_states, register
from medprobe.models.idefics import as_prompt_list

__all__ = ["VLM_POOLINGS", "VlmAdapter"]

# ``last``: the last real token (where the answer would be generated, the paper's choice);
# ``mean``: the mean over all real (non-padding) tokens; ``mean_image``: the mean over the image's tokens.
VLM_POOLINGS = ("last", "mean", "mean_image")

# The ``chat`` prompt of processors that have no chat template but a prompt layout of their own, by class name.
# PaliGemma's processor puts BOS after the image tokens and a newline after the text itself, giving the
# model's own ``<image>...<image><bos>{prompt}\n`` prefix.
_RAW_LAYOUTS = {"PaliGemmaProcessor": "{image}{prompt}"}


@register("hf_vlm")
class VlmAdapter(Adapter):
    """Any image-text-to-text model: the processor lays out the prompt, the language model's states are pooled.

    Prompt formats (``extraction.prompt_format``):

    * ``chat``: the processor's own chat template given one user turn holding an image part and a text
      part, with the generation prompt added (``apply_chat_template(..., add_generation_prompt=True)``); for a
      processor without a template but with a layout of its own (PaliGemma) that layout, ``{image}{prompt}``
      (the processor adds BOS after the image tokens and the closing newline), and an error for any other;
    * ``question_answer``: the paper's raw ``{image}Question: {prompt} Answer:``, the image token first as
      the processor expects it (no turns, no template) - also the route for models without a template.

    Batches are left-padded (so the last real token of every row is the last column) and the processor
    pads images that give different numbers of image tokens.  ``hidden.i`` is transformers'
    ``hidden_states[i]`` of the language model: ``hidden.0`` its input embeddings (image features merged
    in), ``hidden.i`` the output of decoder layer ``i - 1`` and ``hidden.{num_hidden_layers}`` the final,
    normalised output.  Hooks on the decoder layers pool each kept state as it is produced, and the pass
    stops after the deepest kept one.
    """

    pooling = "last"
    prompt_formats = PROMPT_FORMATS
    model_class = "AutoModelForImageTextToText"
    processor_class = "AutoProcessor"

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any], device: str | torch.device | None = None) -> Adapter:
        """Load as :meth:`Adapter.from_config`; the entry's ``pooling`` (default ``last``) is kept on the adapter."""
        pooling = model_cfg.get("pooling") or "last"
        if pooling not in VLM_POOLINGS:
            raise ValueError(
                f"model config key 'pooling' is {pooling!r}, which the 'hf_vlm' adapter does not implement; "
                f"valid values: {', '.join(VLM_POOLINGS)}"
            )
        adapter = super().from_config(model_cfg, device=device)
        adapter.pooling = pooling
        return adapter

    # ------------------------------------------------------------------ description
    @property
    def layers_config(self) -> Any:
        """The language model's config (``text_config``), whose layers are pooled."""
        return self.model.config.get_text_config()

    @property
    def image_token_ids(self) -> list[int]:
        """The token id(s) that stand for image features in ``input_ids`` (the processor's, else the config's)."""
        processor, config = self.processor, self.model.config
        ids = getattr(processor, "image_token_id", None)
        if ids is None and getattr(processor, "image_token", None) is not None:
            ids = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        if ids is None:
            ids = getattr(config, "image_token_id", None)
        if ids is None:
            ids = getattr(config, "image_token_index", None)
        if ids is None:
            raise ValueError(
                f"cannot tell the image token of {self.checkpoint}: neither its processor nor config names it"
            )
        return [int(i) for i in ids] if isinstance(ids, (list, tuple)) else [int(ids)]

    # ------------------------------------------------------------------ prompt
    def _image_placeholder(self) -> str:
        """The text that marks the image for the processor (expanded by it into the image's tokens)."""
        token = getattr(self.processor, "image_token", None) or "<image>"
        vocab = self.processor.tokenizer.get_vocab()
        if "<|vision_start|>" in vocab and "<|vision_end|>" in vocab:  # Qwen2-VL family
            return f"<|vision_start|>{token}<|vision_end|>"
        return token

    def prompt_text(self, prompt: str, prompt_format: str = "chat") -> str:
        """The full text given to the processor with the image (its image placeholder included)."""
        self.check_prompt_format(prompt_format)
        if prompt_format == "question_answer":
            return f"{self._image_placeholder()}Question: {prompt} Answer:"
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if not getattr(self.processor, "chat_template", None):
            raw = _RAW_LAYOUTS.get(type(self.processor).__name__)
            if raw is None:
                raise ValueError(
                    f"the processor of {self.checkpoint} has no chat template; "
                    "use extraction.prompt_format: question_answer"
                )
            return raw.format(image=self._image_placeholder(), prompt=prompt)
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def preprocess(
        self, images: Sequence[Image.Image], prompt: str | Sequence[str], prompt_format: str = "chat"
    ) -> dict[str, torch.Tensor]:
        self.check_prompt_format(prompt_format)
        texts = [self.prompt_text(text, prompt_format) for text in as_prompt_list(prompt, len(images))]
        tokenizer = self.processor.tokenizer
        previous = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            encoded = self.processor(
                text=texts, images=[[image] for image in images], padding=True, return_tensors="pt"
            )
        finally:
            tokenizer.padding_side = previous
        # ``labels`` (PaliGemma's processor makes them for fine-tuning) are not an input of the forward pass.
        return {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor) and key != "labels"}

    # ------------------------------------------------------------------ running
    def pool_weights(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) float weights of each position in the pooled mean: real tokens, or the image's tokens."""
        real = attention_mask.bool()
        if self.pooling == "mean_image":
            image_ids = torch.as_tensor(self.image_token_ids, device=input_ids.device)
            real = real & torch.isin(input_ids, image_ids)
            if not torch.all(real.any(dim=1)):
                raise RuntimeError(f"a row of the batch has no image token ({self.image_token_ids}) to pool")
        weights = real.float()
        return weights / weights.sum(dim=1, keepdim=True)

    def _pooler(self, batch: Mapping[str, torch.Tensor]) -> Any:
        """A function (B, T, D) -> (B, D) for this adapter's pooling."""
        attention_mask = batch["attention_mask"]
        if self.pooling == "last":
            token_index = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            last_real = (attention_mask.long() * token_index).amax(dim=1)
            rows = torch.arange(last_real.shape[0], device=last_real.device)

            def last(state: torch.Tensor) -> torch.Tensor:
                return state[rows.to(state.device), last_real.to(state.device)].to(self.device)

            return last
        weights = self.pool_weights(batch["input_ids"], attention_mask)

        def mean(state: torch.Tensor) -> torch.Tensor:
            return torch.einsum("btd,bt->bd", state.float(), weights.to(state.device)).to(self.device)

        return mean

    def _pooled_states(self, batch: dict[str, torch.Tensor], keep: Sequence[int]) -> tuple[torch.Tensor, None]:
        # The model without its language-model head: the logits are not needed.
        def run() -> Any:
            return self.model.model(**batch, use_cache=False, return_dict=True)

        return pooled_decoder_states(self.model.get_decoder(), run, keep, self._pooler(batch)), None

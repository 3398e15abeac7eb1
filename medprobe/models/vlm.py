"""Generic image-text-to-text adapter ``hf_vlm``: any ``AutoModelForImageTextToText`` with its ``AutoProcessor``.

A config entry names the adapter and a hub id (or local directory), nothing else::

    models:
      smolvlm:
        adapter: hf_vlm
        checkpoint: HuggingFaceTB/SmolVLM-256M-Instruct
        pooling: mean_image      # last (default) | mean | mean_image

A dynamic-resolution processor (Qwen2-VL / Qwen2.5-VL) takes a pixel budget per image, ``min_pixels`` and
``max_pixels`` in the entry (``max_pixels: 1003520`` = 1280 of Qwen's 28 x 28 cells); the image processor is
built with them at load time, and any other processor refuses them.

Tested offline on tiny random builds of Idefics3 (SmolVLM), LLaVA, PaliGemma, Qwen2.5-VL and Gemma 3
(MedGemma's class) (:mod:`medprobe.demo.vlm_models`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from medprobe.models.base import PROMPT_FORMATS, Adapter, pooled_decoder_states, register
from medprobe.models.idefics import as_prompt_list
from medprobe.models.vlm_answering import VlmAnswering

__all__ = [
    "PIXEL_BUDGET_KEYS",
    "VLM_POOLINGS",
    "VlmAdapter",
    "pixel_budget",
    "with_pixel_budget",
    "without_video_processor",
]

# ``last``: the last real token (where the answer would be generated, the paper's choice);
# ``mean``: the mean over all real (non-padding) tokens; ``mean_image``: the mean over the image's tokens.
VLM_POOLINGS = ("last", "mean", "mean_image")

# The ``chat`` prompt of processors that have no chat template but a prompt layout of their own, by class name.
# PaliGemma's processor puts BOS after the image tokens and a newline after the text itself, giving the
# model's own ``<image>...<image><bos>{prompt}\n`` prefix.
_RAW_LAYOUTS = {"PaliGemmaProcessor": "{image}{prompt}"}

# Model config keys of a per-image pixel budget, taken by dynamic-resolution image processors (the image is
# resized to an area between them, so the number of image tokens follows): Qwen2-VL's and its successors'.
PIXEL_BUDGET_KEYS = ("min_pixels", "max_pixels")


def pixel_budget(model_cfg: Mapping[str, Any]) -> dict[str, int]:
    """The entry's ``min_pixels`` / ``max_pixels`` that are set, checked (positive integers, min <= max)."""
    budget = {key: model_cfg[key] for key in PIXEL_BUDGET_KEYS if model_cfg.get(key) is not None}
    for key, value in budget.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model config key '{key}' (models.<M>.{key}) must be a positive integer, got {value!r}")
    if budget.get("min_pixels", 0) > budget.get("max_pixels", budget.get("min_pixels", 0)):
        raise ValueError(
            f"model config key 'min_pixels' ({budget['min_pixels']}) is larger than 'max_pixels' ({budget['max_pixels']})"
        )
    return budget


def with_pixel_budget(processor: Any, budget: Mapping[str, int], checkpoint: str = "") -> Any:
    """``processor`` with its image processor rebuilt with ``budget`` (:func:`pixel_budget`) as init kwargs.

    The image processor is rebuilt as ``from_pretrained`` builds it (``from_dict`` of its settings and the
    kwargs), so the budget replaces the saved one; only image processors that declare the keys take them
    (Qwen2-VL's turns them into its ``size``). Any other is refused: a budget it silently ignored would
    leave the run at the checkpoint's resolution.
    """
    if not budget:
        return processor
    image_processor = getattr(processor, "image_processor", None)
    accepted = getattr(getattr(image_processor, "valid_kwargs", None), "__annotations__", {})
    for key in budget:
        if key not in accepted:
            raise ValueError(
                f"model config key '{key}' (models.<M>.{key}) sets a pixel budget, which the image processor of "
                f"{checkpoint or 'this checkpoint'} ({type(image_processor).__name__}, in "
                f"{type(processor).__name__}) does not take: only dynamic-resolution processors (Qwen2-VL, "
                f"Qwen2.5-VL) do; remove the key"
            )
    processor.image_processor = type(image_processor).from_dict(image_processor.to_dict(), **budget)
    return processor


def without_video_processor(processor_class: type) -> type:
    """``processor_class`` (a transformers processor) without its ``video_processor`` part.

    Qwen2-VL's processor (and other image-and-video processors) requires a video processor, and every video
    processor of transformers needs torchvision, which not every environment has (this one does not). Images
    never reach it, so the subclass - of the same name, so it saves as, and behaves as, the original - leaves it
    out: its image processor, tokenizer and chat template load and save as usual.
    """
    attributes = [name for name in processor_class.get_attributes() if name != "video_processor"]
    return type(
        processor_class.__name__,
        (processor_class,),
        {"get_attributes": classmethod(lambda cls: list(attributes)), "__module__": processor_class.__module__},
    )


@register("hf_vlm")
class VlmAdapter(VlmAnswering, Adapter):
    """Any image-text-to-text model: the processor lays out the prompt, the language model's states are pooled.

    Prompt formats (``extraction.prompt_format``):

    * ``chat``: the processor's own chat template given one user turn holding an image part and a text
      part, with the generation prompt added (``apply_chat_template(..., add_generation_prompt=True)``) and
      tokenised as ``apply_chat_template(..., tokenize=True)`` does (no second BOS after a template's own, as
      Gemma 3's); for a processor without a template but with a layout of its own (PaliGemma) that layout,
      ``{image}{prompt}`` (the processor adds BOS after the image tokens and the closing newline), and an
      error for any other;
    * ``question_answer``: the paper's raw ``{image}Question: {prompt} Answer:``, the image token first as
      the processor expects it (no turns, no template) - also the route for models without a template.

    Batches are left-padded (so the last real token of every row is the last column) and the processor
    pads images that give different numbers of image tokens (Idefics3's tiles, Qwen2-VL's dynamic
    resolution).  Every tensor of the processor goes to the model as it is, so position ids the model
    computes itself come out as in its own forward pass (Qwen2-VL's 3-D M-RoPE positions from
    ``image_grid_thw`` and ``mm_token_type_ids``, Gemma 3's bidirectional image blocks from
    ``token_type_ids``).  ``hidden.i`` is transformers'
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
        budget = pixel_budget(model_cfg)
        processor = None
        if budget:
            # Load and check the processor first, so that a processor without a pixel budget is refused before
            # the model loads (the base class then loads the processor once more, without the budget).
            processor = with_pixel_budget(
                cls.load_processor(
                    model_cfg.get("checkpoint"),
                    revision=model_cfg.get("revision") or None,
                    trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
                ),
                budget,
                str(model_cfg.get("checkpoint")),
            )
        adapter = super().from_config(model_cfg, device=device)
        adapter.pooling = pooling
        if processor is not None:
            adapter.processor = processor
        return adapter

    @classmethod
    def load_processor(cls, checkpoint: str, **kwargs: Any) -> Any:
        """``AutoProcessor.from_pretrained``; a processor whose video processor cannot load loads without it.

        Qwen2-VL-style processors hold a video processor, and transformers' video processors need torchvision:
        without it (or without a saved video processor) ``AutoProcessor`` fails although images never reach
        that part. The processor class the checkpoint's config maps to is then loaded without its video
        processor (:func:`without_video_processor`); any other failure is raised as it is.
        """
        try:
            return super().load_processor(checkpoint, **kwargs)
        except Exception as error:
            processor_class = _processor_class_of(checkpoint, **kwargs)
            if processor_class is None or "video_processor" not in processor_class.get_attributes():
                raise
            try:
                return without_video_processor(processor_class).from_pretrained(checkpoint, **kwargs)
            except Exception:
                raise error from None

    # ------------------------------------------------------------------ description
    @property
    def layers_config(self) -> Any:
        """The language model's config (``text_config``), whose layers are pooled."""
        return self.model.config.get_text_config()

    @property
    def image_token_ids(self) -> list[int]:
        """The token id(s) that stand for image features in ``input_ids``: the positions the model fills.

        The model config's ``image_token_id`` (``image_token_index``) first: it is what the model looks for when
        it puts the image features into the embeddings. The processor's id can be another token: Gemma 3's
        ``image_token_id`` is the ``<start_of_image>`` marker in front of the repeated ``<image_soft_token>``.
        Then the processor's ``image_token_ids`` (transformers' list of the repeated tokens), ``image_token_id``
        and ``image_token``.
        """
        processor, config = self.processor, self.model.config
        ids = getattr(config, "image_token_id", None)
        if ids is None:
            ids = getattr(config, "image_token_index", None)
        if ids is None:
            ids = [i for i in getattr(processor, "image_token_ids", None) or [] if i is not None] or None
        if ids is None:
            ids = getattr(processor, "image_token_id", None)
        if ids is None and getattr(processor, "image_token", None) is not None:
            ids = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
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
        kwargs: dict[str, Any] = {}
        if tokenizer.bos_token and all(text.startswith(tokenizer.bos_token) for text in texts):
            # A template that writes the BOS (Gemma 3's): as apply_chat_template(tokenize=True), none added.
            kwargs["add_special_tokens"] = False
        previous = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            encoded = self.processor(
                text=texts, images=[[image] for image in images], padding=True, return_tensors="pt", **kwargs
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


def _processor_class_of(checkpoint: str, **kwargs: Any) -> type | None:
    """The processor class transformers maps the checkpoint's model config to, else ``None``."""
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    try:
        return PROCESSOR_MAPPING[type(AutoConfig.from_pretrained(checkpoint, **kwargs))]
    except Exception:
        return None

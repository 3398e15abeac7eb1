"""Generic vision-encoder adapter: any transformers ``AutoModel`` vision model by hub id or directory.

Covers dual encoders with a projected image embedding (``CLIPModel``, ``SiglipModel``, ``Siglip2Model``:
their ``get_image_features``) and plain vision backbones (``Dinov2Model``, ``ViTModel``, the vision-only
``SiglipVisionModel`` / ``CLIPVisionModel``).  Image-only: the prompt is ignored.

Poolings (the config's ``models.<M>.pooling``), per hidden state of the vision tower:

``cls``         the class token (position 0).  Refused for models without one (SigLIP, SigLIP2).
``mean_patch``  the mean over the patch tokens only: the class token and any register tokens (DINOv2 with
                registers, DINOv3) are left out, and so are SigLIP2's padding patches.

Unset, the pooling is ``cls`` where the model has a class token and ``mean_patch`` where it has none.
Where the model has ``get_image_features`` its output (CLIP: the visual projection of the pooled output;
SigLIP: the attention-pooling head) is stored as the ``embeddings`` dataset, layer ``image_embeds``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from medprobe.models.base import Adapter, register

__all__ = ["POOLINGS", "VisionAdapter"]

POOLINGS = ("cls", "mean_patch")
# Vision towers (their config's model_type) whose token sequence is patches only, with no class token.
_NO_CLASS_TOKEN = frozenset({"siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model"})


@register("hf_vision")
class VisionAdapter(Adapter):
    """A transformers vision encoder; ``layer_names`` index its vision tower's ``hidden_states``."""

    pooling = "cls"
    model_class = "AutoModel"
    processor_class = "AutoImageProcessor"

    def __init__(self, *args: Any, pooling: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pooling = self._checked_pooling(pooling)

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any], device: str | torch.device | None = None) -> Adapter:
        """As :meth:`Adapter.from_config`, then the pooling of ``model_cfg['pooling']`` (default: see module)."""
        pooling = model_cfg.get("pooling")
        if pooling is not None and pooling not in POOLINGS:
            raise ValueError(
                f"model config key 'pooling' (models.<M>.pooling) is {pooling!r}, which the 'hf_vision' adapter "
                f"does not implement; it implements: {', '.join(POOLINGS)}"
            )
        adapter = super().from_config(model_cfg, device=device)
        assert isinstance(adapter, VisionAdapter)
        adapter.pooling = adapter._checked_pooling(pooling)
        return adapter

    def _checked_pooling(self, pooling: str | None) -> str:
        if pooling is None:
            return "cls" if self.has_class_token else "mean_patch"
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        if pooling == "cls" and not self.has_class_token:
            raise ValueError(
                f"model config key 'pooling' (models.<M>.pooling) is 'cls', but {type(self.model).__name__} "
                f"({self.checkpoint}) has no class token; set models.<M>.pooling to 'mean_patch'"
            )
        return pooling

    # ------------------------------------------------------------------ description
    @property
    def layers_config(self) -> Any:
        return getattr(self.model.config, "vision_config", None) or self.model.config

    @property
    def has_class_token(self) -> bool:
        """Whether position 0 of the vision tower's sequence is a class token."""
        return getattr(self.layers_config, "model_type", "") not in _NO_CLASS_TOKEN

    @property
    def embedding_dim(self) -> int | None:
        if not hasattr(self.model, "get_image_features"):
            return None
        if getattr(self.layers_config, "vision_use_head", True) is False:
            return None  # a SigLIP tower without its pooling head has no image embedding
        projection = getattr(self.model.config, "projection_dim", None)
        return int(projection) if projection else self.hidden_dim

    # ------------------------------------------------------------------ running
    def prompt_text(self, prompt: str, prompt_format: str = "chat") -> str:
        return ""  # the vision encoder sees no text, whatever the prompt format

    def preprocess(
        self, images: Sequence[Image.Image], prompt: str | Sequence[str] = "", prompt_format: str = "chat"
    ) -> dict[str, torch.Tensor]:
        image_processor = getattr(self.processor, "image_processor", self.processor)
        encoded = image_processor(images=list(images), return_tensors="pt")
        # pixel_values, and SigLIP2's pixel_attention_mask and spatial_shapes where present.
        return {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}

    def _run(self, batch: dict[str, torch.Tensor]) -> tuple[Sequence[torch.Tensor], torch.Tensor | None]:
        """The vision tower's hidden states and, where the model has one, its projected image embedding."""
        if self.embedding_dim is not None:
            outputs = self.model.get_image_features(**batch, output_hidden_states=True, return_dict=True)
            return outputs.hidden_states, outputs.pooler_output
        outputs = self.model(**batch, output_hidden_states=True, return_dict=True)
        return outputs.hidden_states, None

    def _patch_weights(self, batch: dict[str, torch.Tensor], sequence_length: int) -> torch.Tensor:
        """(B, S) weights that average a hidden state over its patch tokens (zero on class/register tokens)."""
        pixel_values = batch["pixel_values"]
        size = pixel_values.shape[0]
        if "pixel_attention_mask" in batch:  # SigLIP2: patches only, the padding ones masked out
            mask = batch["pixel_attention_mask"].to(torch.float32)
        else:
            patch = self.layers_config.patch_size
            height, width = (patch, patch) if isinstance(patch, int) else tuple(patch)
            n_patches = (pixel_values.shape[-2] // height) * (pixel_values.shape[-1] // width)
            prefix = sequence_length - n_patches
            if prefix < 0:
                raise RuntimeError(f"{n_patches} patches expected but the sequence has {sequence_length} tokens")
            mask = torch.zeros(size, sequence_length, device=pixel_values.device)
            mask[:, prefix:] = 1.0  # class and register tokens come first
        return mask / mask.sum(dim=1, keepdim=True)

    def _pooled_states(
        self, batch: dict[str, torch.Tensor], keep: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The whole tower runs: vision sequences are short, and the embedding needs the last layer.
        hidden_states, embeddings = self._run(batch)
        kept = [hidden_states[index] for index in keep]
        if self.pooling == "cls":
            cls_position = torch.zeros(kept[0].shape[0], dtype=torch.long, device=self.device)
            pooled = self._gather_positions(kept, cls_position)
        else:
            weights = self._patch_weights(batch, kept[0].shape[1])
            pooled = torch.stack(
                [torch.einsum("bs,bsd->bd", weights.to(state), state).to(self.device) for state in kept], dim=1
            )
        return pooled, None if embeddings is None else embeddings.to(self.device)

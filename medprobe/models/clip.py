"""CLIP adapter: the vision tower of a ``CLIPModel`` (openai/clip-vit-base-patch32, PLIP, ...).

Image-only: the pooled vector of each vision hidden state is its CLS token, and the model's own
``image_embeds`` (the visual projection of the pooled output) are returned as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from medprobe.models.base import Adapter, register

__all__ = ["ClipAdapter"]


@register("clip")
class ClipAdapter(Adapter):
    """CLIP's vision tower; ``layer_names`` index ``vision_model(...).hidden_states``."""

    pooling = "cls"
    model_class = "CLIPModel"
    # Image-only, so the image processor alone (no tokenizer needed in the checkpoint).
    processor_class = "AutoImageProcessor"

    @property
    def layers_config(self) -> Any:
        return self.model.config.vision_config

    @property
    def embedding_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def prompt_text(self, prompt: str, prompt_format: str = "chat") -> str:
        return ""  # the vision tower sees no text, whatever the prompt format

    def preprocess(
        self, images: Sequence[Image.Image], prompt: str | Sequence[str] = "", prompt_format: str = "chat"
    ) -> dict[str, torch.Tensor]:
        image_processor = getattr(self.processor, "image_processor", self.processor)
        encoded = image_processor(images=list(images), return_tensors="pt")
        return {"pixel_values": encoded["pixel_values"]}

    def _pooled_states(self, batch: dict[str, torch.Tensor], keep: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # The whole tower always runs: image_embeds come from the last layer.  Vision sequences are
        # short (50 tokens for ViT-B/32), so collecting the hidden states costs little.
        outputs = self.model.vision_model(
            pixel_values=batch["pixel_values"], output_hidden_states=True, return_dict=True
        )
        cls_position = torch.zeros(batch["pixel_values"].shape[0], dtype=torch.long, device=self.device)
        pooled = self._gather_positions([outputs.hidden_states[index] for index in keep], cls_position)
        image_embeds = self.model.visual_projection(outputs.pooler_output)
        return pooled, image_embeds.to(self.device)

"""IDEFICS (v1) adapter: ``IdeficsForVisionText2Text`` with the instruct prompt, last-token pooling.

Covers ``HuggingFaceM4/idefics-9b-instruct``, ``HuggingFaceM4/idefics-80b-instruct`` and the tiny demo
stand-ins of :mod:`medprobe.demo.models`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from medprobe.models.base import Adapter, register

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
    """IDEFICS v1.  The prompt follows the instruct models' chat format::

        <s>User:<fake_token_around_image><image><fake_token_around_image>{prompt}<end_of_utterance>\\nAssistant:

    and the pooled vector of each hidden state is the one at the last real (non-padding) token, i.e. the
    position from which the model would generate its answer (the paper's choice).

    ``hidden.i`` is ``hidden_states[i]``: the input of decoder layer ``i`` (in transformers 5.x recorded
    *after* the gated cross-attention block that precedes it, so ``hidden.0`` already sees the image),
    and ``hidden.{num_hidden_layers}`` the final, normalised output.
    """

    pooling = "last"

    @classmethod
    def load_model(cls, checkpoint: str, **kwargs: Any) -> torch.nn.Module:
        from transformers import IdeficsForVisionText2Text

        return IdeficsForVisionText2Text.from_pretrained(checkpoint, **kwargs)

    @classmethod
    def load_processor(cls, checkpoint: str, **kwargs: Any) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(checkpoint, **kwargs)

    @property
    def num_hidden_states(self) -> int:
        return int(self.model.config.num_hidden_layers) + 1

    @property
    def hidden_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def prompt_text(self, prompt: str) -> str:
        # transformers 5.x no longer appends <end_of_utterance> on its own, so it is written here.
        return f"{prompt}<end_of_utterance>\nAssistant:"

    def preprocess(self, images: Sequence[Image.Image], prompt: str | Sequence[str]) -> dict[str, torch.Tensor]:
        prompts = as_prompt_list(prompt, len(images))
        conversations = [["User:", image, self.prompt_text(text)] for image, text in zip(images, prompts)]
        encoded = self.processor(text=conversations, return_tensors="pt")
        return {key: value for key, value in encoded.items()}

    def _pooled_states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
        attention_mask = batch["attention_mask"]
        # The largest index holding a real token: right for left padding, right padding and none.
        token_index = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last_real = (attention_mask.long() * token_index).amax(dim=1)
        # The decoder alone (model.model): the language-model head's logits are not needed.
        outputs = self.model.model(**batch, output_hidden_states=True, use_cache=False, return_dict=True)
        return self._gather_positions(outputs.hidden_states, last_real), None

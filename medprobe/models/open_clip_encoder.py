"""open_clip image-encoder adapter (``adapter: open_clip``): BiomedCLIP, QuiltNet and other open_clip models.

Image-only: the vision tower of the CLIP model runs, the text tower is loaded (it is part of the model) but
never run.  open_clip is an optional dependency (``pip install 'medprobe[open_clip]'``; it needs torchvision,
and timm for timm-trunk towers such as BiomedCLIP's): it is imported when a config's model uses this adapter,
never by importing this module.

Checkpoint (``models.<M>.checkpoint``), one of:

``org/name`` or ``hf-hub:org/name``  an open_clip model on the Hugging Face hub: its ``open_clip_config.json``
                                    and weights (``open_clip_model.safetensors``, else
                                    ``open_clip_pytorch_model.bin``) are downloaded at ``revision`` and
                                    loaded as a local directory.  Write the plain ``org/name`` with
                                    ``fetch: true`` (the fetch rule downloads that repo).
a local directory                   the same files (a fetched snapshot); ``revision`` is ignored.

The preprocessing is the model's evaluation transform from ``open_clip.create_model_and_transforms`` (its
``preprocess_cfg``).  Vision towers covered: open_clip's own ``VisionTransformer`` (QuiltNet, OpenAI and LAION
ViTs; one class token, then the patches) and a ``TimmModel`` whose trunk is a ViT-style timm model
(BiomedCLIP), whose tokens are described as for the ``timm`` adapter.  ``ModifiedResNet`` towers (RN50) have
no token sequence and are refused.

Layers: ``hidden.0`` is the token sequence fed to the first block (after ``ln_pre`` for open_clip's ViT),
``hidden.i`` the output of block ``i``, read by hooks on the blocks.  The projected image embedding,
``model.encode_image(x)`` (not normalised), is stored as the ``embeddings`` dataset, layer ``image_embeds``.
Poolings ``cls`` (the class token) and ``mean_patch`` (the mean over the patch tokens, prefix tokens left
out), as for the ``timm`` adapter; unset, ``cls`` where the tower has a class token.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from medprobe.models.base import register
from medprobe.models.timm_encoder import TokenEncoderAdapter, TokenTower, import_optional, is_hub_id, timm_tower

__all__ = ["CONFIG_NAME", "WEIGHT_NAMES", "OpenClipAdapter", "open_clip_directory"]

CONFIG_NAME = "open_clip_config.json"
# The weight files open_clip's hub loader looks for, preferred first.
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _check_directory(directory: Path, checkpoint: str) -> Path:
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"model config key 'checkpoint' is {checkpoint!r}, a directory without {CONFIG_NAME} "
            "(the 'open_clip' adapter loads open_clip hub repos and their local copies)"
        )
    # open_clip loads a directory without weights as a randomly initialised model, with only a warning.
    if not any(path.suffix in (".safetensors", ".bin", ".pth") for path in directory.iterdir()):
        raise FileNotFoundError(f"model config key 'checkpoint' is {checkpoint!r}, a directory without weights")
    return directory.resolve()


def open_clip_directory(checkpoint: str, revision: str | None) -> Path:
    """The local directory holding ``checkpoint``'s config and weights (downloaded at ``revision`` for a hub id).

    Hub files go to the Hugging Face cache (``HF_HUB_OFFLINE=1`` uses it without the network); the weights
    are taken from the commit the config came from.
    """
    if checkpoint.startswith("local-dir:"):
        checkpoint = checkpoint[len("local-dir:") :]
    if Path(checkpoint).is_dir():
        return _check_directory(Path(checkpoint), checkpoint)
    repo = checkpoint[len("hf-hub:") :] if checkpoint.startswith("hf-hub:") else checkpoint
    if not is_hub_id(repo):
        raise ValueError(
            f"model config key 'checkpoint' is {checkpoint!r}: no such directory, and not a hub id (org/name); "
            "the 'open_clip' adapter loads open_clip hub repos (e.g. microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224) "
            "and local copies of them"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    config = Path(hf_hub_download(repo, CONFIG_NAME, revision=revision))
    commit = config.parent.name if _COMMIT.match(config.parent.name) else revision
    for name in WEIGHT_NAMES:
        try:
            weights = Path(hf_hub_download(repo, name, revision=commit))
        except EntryNotFoundError:
            continue
        if weights.parent != config.parent:
            raise RuntimeError(f"{repo}: {CONFIG_NAME} and {name} were not downloaded into one directory")
        return _check_directory(config.parent, checkpoint)
    raise FileNotFoundError(
        f"{repo} (revision {revision}) has none of the open_clip weight files {', '.join(WEIGHT_NAMES)}"
    )


@register("open_clip")
class OpenClipAdapter(TokenEncoderAdapter):
    """The vision tower of an open_clip model; ``layer_names`` index the inputs of its blocks and their outputs."""

    @classmethod
    def load(
        cls, checkpoint: str, revision: str | None, model_args: dict[str, Any]
    ) -> tuple[torch.nn.Module, Callable[[Image.Image], Any]]:
        if model_args:
            raise ValueError(
                "model config key 'model_args' (timm.create_model arguments) applies to the 'timm' adapter only; "
                "an open_clip model is built from its open_clip_config.json"
            )
        open_clip = import_optional("open_clip", "open_clip", "open_clip_torch", "open_clip")
        directory = open_clip_directory(checkpoint, revision)
        model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{directory}")
        return model, transform

    def find_tower(self) -> TokenTower:
        visual = self.model.visual
        trunk = getattr(visual, "trunk", None)
        if trunk is not None:  # a timm trunk (BiomedCLIP)
            return timm_tower(trunk, self.checkpoint)
        transformer = getattr(visual, "transformer", None)
        blocks = getattr(transformer, "resblocks", None)
        if blocks is None or getattr(visual, "class_embedding", None) is None:
            raise ValueError(
                f"the vision tower of {self.checkpoint} is an open_clip {type(visual).__name__}: the 'open_clip' "
                "adapter pools the token sequences of open_clip's VisionTransformer and of ViT-style timm trunks"
            )
        return TokenTower(
            blocks=list(blocks),
            prefix_tokens=1,  # open_clip's VisionTransformer: the class embedding, then the patches
            class_token=True,
            width=int(transformer.width),
            batch_first=bool(getattr(transformer, "batch_first", True)),
        )

    @property
    def architecture(self) -> str:
        visual = self.model.visual
        trunk = getattr(visual, "trunk", None)
        return f"open_clip {type(visual).__name__}" + (f" ({type(trunk).__name__} trunk)" if trunk is not None else "")

    @property
    def embedding_dim(self) -> int:
        visual = self.model.visual
        if getattr(visual, "output_dim", None):  # open_clip's VisionTransformer
            return int(visual.output_dim)
        # TimmModel: its projection head, else the trunk's own classifier (the projection) or its features.
        linears = [module for module in visual.head.modules() if isinstance(module, torch.nn.Linear)]
        if linears:
            return int(linears[-1].out_features)
        return int(visual.trunk.num_classes or visual.trunk.num_features)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

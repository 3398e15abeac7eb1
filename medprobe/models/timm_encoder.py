"""timm image-encoder adapter (``adapter: timm``): UNI, Virchow, H-optimus and any ViT-style timm model.

Image-only: the prompt is ignored.  timm is an optional dependency (``pip install 'medprobe[timm]'``; it
needs torchvision): it is imported when a config's model uses this adapter, never by importing this module.

Checkpoint (``models.<M>.checkpoint``), one of:

``org/name`` or ``hf-hub:org/name``  a timm model on the Hugging Face hub (its ``config.json`` names the
                                    architecture and its arguments), loaded with ``revision`` as
                                    ``hf-hub:org/name@revision``.  Write the plain ``org/name`` with
                                    ``fetch: true`` (the fetch rule downloads that repo).
a local directory                   the same files (``config.json`` + ``model.safetensors`` or
                                    ``pytorch_model.bin``): a fetched snapshot or ``timm.models.save_for_hf``
                                    output; ``revision`` is ignored, as for ``from_pretrained`` on a directory.
a timm model name                   e.g. ``vit_small_patch14_dinov2.lvd142m``: the architecture with timm's
                                    own pretrained weights for that tag.

``models.<M>.model_args`` are keyword arguments of ``timm.create_model`` that the checkpoint's ``config.json``
lacks but its weights need (UNI: ``init_values: 1.0e-5``; Virchow: ``mlp_layer: SwiGLUPacked``,
``act_layer: silu``); a ``*_layer`` value naming a layer class of ``timm.layers`` (a class or a partial of
one) is that class.

The model's ``pretrained_cfg`` gives the preprocessing (``timm.data.resolve_model_data_config`` and
``create_transform``, the evaluation transform).  Layers: ``hidden.0`` is the token sequence fed to block 0
(patch embedding, position embedding, class/register tokens, ``norm_pre``), ``hidden.i`` the output of block
``i`` (``model.blocks[i - 1]``), read by hooks on the blocks.  The model's own pooled, normed output,
``forward_head(forward_features(x), pre_logits=True)`` (its global pool: class token, mean or attention
pool, then ``fc_norm``; without the classifier), is stored as the ``embeddings`` dataset, layer
``image_embeds``.  A model without a global pool (``global_pool: ''``, Virchow) leaves the pooling to its
users: its final normed tokens (``forward_features``) are pooled as the layers are (``pooling``).

Poolings (``models.<M>.pooling``), per hidden state:

``cls``         the class token (position 0).  Refused for models without one (``class_token=False``).
``mean_patch``  the mean over the patch tokens only: the ``num_prefix_tokens`` leading class, register and
                distillation tokens are left out.

Unset, the pooling is ``cls`` where the model has a class token and ``mean_patch`` where it has none.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from medprobe.models.base import Adapter, register, resolve_device, resolve_torch_dtype

__all__ = [
    "POOLINGS",
    "TimmAdapter",
    "TokenEncoderAdapter",
    "TokenTower",
    "import_optional",
    "pooled_tower_states",
    "timm_model_name",
    "timm_tower",
]

POOLINGS = ("cls", "mean_patch")
# A hub repo id: one "org/name", nothing else (a path has more parts or starts with . or /).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def import_optional(module: str, adapter: str, package: str, extra: str) -> Any:
    """Import an adapter's optional package, or raise an ImportError naming the config key and the install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"model config key 'models.<M>.adapter' is {adapter!r}, which needs the {package} package (and "
            f"torchvision), but `import {module}` failed: {error}. Install it with: pip install 'medprobe[{extra}]' "
            f"(or pip install {package} with a torchvision built for the installed torch)"
        ) from error


def is_hub_id(checkpoint: str) -> bool:
    """Whether ``checkpoint`` reads as a hub repo id ``org/name`` (not a local path)."""
    return bool(_HUB_ID.match(checkpoint)) and not Path(checkpoint).exists()


def timm_model_name(checkpoint: str, revision: str | None) -> str:
    """The name ``timm.create_model`` loads ``checkpoint`` (at ``revision``) by; see the module docstring."""
    if checkpoint.startswith("local-dir:"):
        checkpoint = checkpoint[len("local-dir:") :]
    if Path(checkpoint).is_dir():
        return f"local-dir:{Path(checkpoint).resolve()}"
    repo = checkpoint[len("hf-hub:") :] if checkpoint.startswith("hf-hub:") else checkpoint
    if checkpoint.startswith("hf-hub:") or is_hub_id(repo):
        if not _HUB_ID.match(repo.split("@")[0]):
            raise ValueError(f"model config key 'checkpoint' is {checkpoint!r}, which is not a hub id org/name")
        if "@" in repo or not revision:
            return f"hf-hub:{repo}"
        return f"hf-hub:{repo}@{revision}"
    if "/" in checkpoint or checkpoint.startswith("."):
        raise ValueError(
            f"model config key 'checkpoint' is {checkpoint!r}: no such directory, and not a hub id (org/name) "
            "or a timm model name"
        )
    if revision not in (None, "main"):
        raise ValueError(
            f"model config key 'revision' is {revision!r}, but checkpoint {checkpoint!r} is a timm model name, "
            "whose weights timm's own registry chooses; to pin a revision give its hub repo "
            f"(hf-hub:timm/{checkpoint}) as the checkpoint"
        )
    return checkpoint


@dataclasses.dataclass(frozen=True)
class TokenTower:
    """The transformer blocks of a ViT-style image tower and the layout of their token sequences.

    Attributes:
        blocks: the blocks in order; hidden.0 is the input of ``blocks[0]``, hidden.i the output of
            ``blocks[i - 1]``.
        prefix_tokens: tokens before the patches (class, register, distillation tokens).
        class_token: whether position 0 is a class token.
        width: the width of the token states.
        batch_first: whether a block's states are (B, S, D); else (S, B, D).
    """

    blocks: Sequence[torch.nn.Module]
    prefix_tokens: int
    class_token: bool
    width: int
    batch_first: bool = True


def timm_tower(model: torch.nn.Module, checkpoint: str) -> TokenTower:
    """The :class:`TokenTower` of a ViT-style timm model (``blocks``, ``num_prefix_tokens``, ``embed_dim``)."""
    blocks = getattr(model, "blocks", None)
    prefix = getattr(model, "num_prefix_tokens", None)
    width = getattr(model, "embed_dim", None)
    if not isinstance(blocks, (torch.nn.ModuleList, torch.nn.Sequential)) or not len(blocks) or prefix is None:
        raise ValueError(
            f"{type(model).__name__} ({checkpoint}) is not a ViT-style timm model: the 'timm' and 'open_clip' "
            "adapters pool the token sequences of models with `blocks` and `num_prefix_tokens` (VisionTransformer, "
            "Eva, Beit, DeiT, ...), not hierarchical or convolutional stages"
        )
    return TokenTower(
        blocks=list(blocks),
        prefix_tokens=int(prefix),
        class_token=getattr(model, "cls_token", None) is not None,
        width=int(width if width is not None else model.num_features),
    )


def pooled_tower_states(
    tower: TokenTower,
    run: Callable[[], Any],
    keep: Sequence[int],
    pool_state: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, Any]:
    """``((B, len(keep), D), run())``: each kept hidden state of ``tower``, pooled by ``pool_state`` as it is made.

    Hooks on the blocks see the states: a pre-hook on ``blocks[0]`` the embedding output (hidden.0), a hook
    on ``blocks[i - 1]`` its output (hidden.i); full sequences are never collected.
    """
    pooled: dict[int, torch.Tensor] = {}

    def record(index: int, state: Any) -> None:
        if isinstance(state, (tuple, list)):
            state = state[0]
        if not tower.batch_first:
            state = state.transpose(0, 1)
        if state.dim() != 3:
            raise RuntimeError(f"hidden.{index} has shape {tuple(state.shape)}, not (batch, tokens, width)")
        pooled[index] = pool_state(state)

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        record(0, args[0] if args else next(iter(kwargs.values())))

    def make_hook(index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            record(index, output)

        return hook

    handles = [tower.blocks[index - 1].register_forward_hook(make_hook(index)) for index in keep if index > 0]
    if 0 in keep:
        handles.append(tower.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    missing = [index for index in keep if index not in pooled]
    if missing:
        raise RuntimeError(f"the forward pass never ran the blocks of hidden states {missing}")
    return torch.stack([pooled[index] for index in keep], dim=1), result


class TokenEncoderAdapter(Adapter):
    """An image encoder outside transformers whose layers are the blocks of a :class:`TokenTower`.

    Subclasses load the model and its evaluation transform (:meth:`load`), describe the tower
    (:meth:`find_tower`) and compute the model's own image embedding (:meth:`embed`).  The transform (the
    ``processor``) maps one RGB PIL image to a (3, H, W) tensor.
    """

    pooling = "cls"

    def __init__(self, *args: Any, pooling: str | None = None, **kwargs: Any) -> None:
        self._tower: TokenTower | None = None
        super().__init__(*args, **kwargs)
        self.pooling = self._checked_pooling(pooling)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any], device: str | torch.device | None = None) -> Adapter:
        """Load ``model_cfg['checkpoint']`` (see the module) on ``device``, in ``torch_dtype``, with ``pooling``.

        ``revision`` pins a hub checkpoint; ``model_args`` (a mapping) goes to the loader (``timm.create_model``
        keyword arguments); ``trust_remote_code`` does not apply (no code is downloaded).
        ``device_map``, ``quantization`` and ``attn_implementation: eager`` are transformers options and are
        refused.
        """
        checkpoint = model_cfg.get("checkpoint")
        if not isinstance(checkpoint, str) or not checkpoint:
            raise ValueError(f"model config key 'checkpoint' must be a hub id or directory, got {checkpoint!r}")
        pooling = model_cfg.get("pooling")
        if pooling is not None and pooling not in POOLINGS:
            raise ValueError(
                f"model config key 'pooling' (models.<M>.pooling) is {pooling!r}, which the {cls.name!r} adapter "
                f"does not implement; it implements: {', '.join(POOLINGS)}"
            )
        if model_cfg.get("device_map") is not None:
            raise ValueError(
                f"model config key 'device_map' is {model_cfg['device_map']!r}, which the {cls.name!r} adapter does "
                "not support (a transformers loading option, set to 'auto' for a job with several GPUs): leave it "
                "unset and give the model one GPU (models.<M>.gpus: 1)"
            )
        if model_cfg.get("quantization") not in (None, "none"):
            raise ValueError(
                f"model config key 'quantization' is {model_cfg['quantization']!r}, which the {cls.name!r} adapter "
                "does not support (bitsandbytes through transformers); leave it unset"
            )
        model_args = model_cfg.get("model_args") or {}
        if not isinstance(model_args, Mapping):
            raise ValueError(f"model config key 'model_args' must be a mapping, got {model_args!r}")
        attn_implementation = model_cfg.get("attn_implementation")
        if attn_implementation not in (None, "sdpa"):
            raise ValueError(
                f"model config key 'attn_implementation' is {attn_implementation!r}, which the {cls.name!r} adapter "
                f"does not support: the model chooses its own attention kernel; leave it unset"
            )
        revision = model_cfg.get("revision") or None
        target = resolve_device(device)
        dtype = resolve_torch_dtype(model_cfg.get("torch_dtype"), target)
        model, transform = cls.load(checkpoint, revision, dict(model_args))
        model = model.to(device=target, dtype=dtype)
        return cls(
            model, transform, checkpoint=checkpoint, revision=revision, device=target, dtype=dtype, pooling=pooling
        )

    @classmethod
    @abc.abstractmethod
    def load(
        cls, checkpoint: str, revision: str | None, model_args: dict[str, Any]
    ) -> tuple[torch.nn.Module, Callable[[Image.Image], Any]]:
        """The model (float32, CPU) and its evaluation transform; ``model_args`` from the config's ``model_args``."""

    def _checked_pooling(self, pooling: str | None) -> str:
        if pooling is None:
            return "cls" if self.tower.class_token else "mean_patch"
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        if pooling == "cls" and not self.tower.class_token:
            raise ValueError(
                f"model config key 'pooling' (models.<M>.pooling) is 'cls', but {self.architecture} "
                f"({self.checkpoint}) has no class token; set models.<M>.pooling to 'mean_patch'"
            )
        return pooling

    # ------------------------------------------------------------------ description
    @abc.abstractmethod
    def find_tower(self) -> TokenTower:
        """Describe the model's token tower (called once)."""

    @property
    def tower(self) -> TokenTower:
        if self._tower is None:
            self._tower = self.find_tower()
        return self._tower

    @property
    def architecture(self) -> str:
        """The model's class name, for messages."""
        return type(self.model).__name__

    @property
    def layers_config(self) -> Any:
        return self.tower

    @property
    def num_hidden_states(self) -> int:
        return len(self.tower.blocks) + 1

    @property
    def hidden_dim(self) -> int:
        return self.tower.width

    # ------------------------------------------------------------------ running
    def prompt_text(self, prompt: str, prompt_format: str = "chat") -> str:
        return ""  # the image encoder sees no text, whatever the prompt format

    def preprocess(
        self, images: Sequence[Image.Image], prompt: str | Sequence[str] = "", prompt_format: str = "chat"
    ) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack([self.processor(image.convert("RGB")) for image in images])}

    @abc.abstractmethod
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's own image embedding (B, E) of a batch; runs the whole tower."""

    def _pool_state(self, state: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return state[:, 0].to(self.device)
        prefix = self.tower.prefix_tokens
        if state.shape[1] <= prefix:
            raise RuntimeError(f"a sequence of {state.shape[1]} tokens has no patches after {prefix} prefix tokens")
        return state[:, prefix:].mean(dim=1).to(self.device)

    def _pooled_states(self, batch: dict[str, torch.Tensor], keep: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # The whole tower runs: the embedding needs the last block, and image sequences are short.
        pooled, embeddings = pooled_tower_states(
            self.tower, lambda: self.embed(batch["pixel_values"]), keep, self._pool_state
        )
        return pooled, embeddings.to(self.device)


@register("timm")
class TimmAdapter(TokenEncoderAdapter):
    """A ViT-style timm model; ``layer_names`` index the inputs of its blocks and their outputs."""

    @classmethod
    def load(
        cls, checkpoint: str, revision: str | None, model_args: dict[str, Any]
    ) -> tuple[torch.nn.Module, Callable[[Image.Image], Any]]:
        name = timm_model_name(checkpoint, revision)
        timm = import_optional("timm", "timm", "timm", "timm")
        data = importlib.import_module("timm.data")
        layers = importlib.import_module("timm.layers")
        # A `*_layer` argument naming a layer class of timm.layers (a class or a partial of one) is that layer
        # (Virchow's mlp_layer: SwiGLUPacked); other strings, e.g. act_layer: silu or gelu (also a function
        # there), are names timm resolves itself.
        kwargs = {
            key: getattr(layers, value)
            if key.endswith("_layer")
            and isinstance(value, str)
            and isinstance(getattr(layers, value, None), (type, functools.partial))
            else value
            for key, value in model_args.items()
        }
        model = timm.create_model(name, pretrained=True, **kwargs)
        return model, data.create_transform(**data.resolve_model_data_config(model), is_training=False)

    def find_tower(self) -> TokenTower:
        return timm_tower(self.model, self.checkpoint)

    @property
    def embedding_dim(self) -> int:
        if not self.has_global_pool:
            return self.hidden_dim
        return int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)

    @property
    def has_global_pool(self) -> bool:
        """Whether the model pools its final tokens itself (``global_pool`` token, avg, map, ...; not ``''``)."""
        return getattr(self.model, "global_pool", None) != ""

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(pixel_values)
        if not self.has_global_pool:  # Virchow: the final normed tokens, pooled as the layers are
            return self._pool_state(features)
        return self.model.forward_head(features, pre_logits=True)

"""Model adapters: a registry of model families and :func:`load_adapter`.

A model in the config names an ``adapter`` (a registry key) and a ``checkpoint`` (hub id or local
directory; both go through the same ``from_pretrained`` path).  Adding a model family is one module in
this package that subclasses :class:`medprobe.models.base.Adapter`, decorates it with ``@register(name)``,
and adds ``name`` to :data:`ADAPTER_NAMES`.

Importing this package does not import torch: :data:`ADAPTER_NAMES` and :data:`PROMPT_FORMATS` are what
config checks read, and the adapter modules (torch, transformers) are imported on the registry's first
lookup.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from medprobe.registry import Registry

if TYPE_CHECKING:
    from medprobe.models.base import Adapter

__all__ = ["ADAPTERS", "ADAPTER_NAMES", "PROMPT_FORMATS", "load_adapter"]

# The names a config may give as `adapter`. register() refuses any other name, and the tests check that
# every name here is registered, so the two cannot drift apart.
ADAPTER_NAMES = ("clip", "hf_vision", "hf_vlm", "idefics", "open_clip", "timm")
# How an instruct VLM is given the task prompt (the config's ``extraction.prompt_format``):
# ``chat``            the instruct models' User/Assistant turns around the image and the prompt;
# ``question_answer`` the authors' protocol: the image, then "Question: {prompt} Answer:", no turns.
PROMPT_FORMATS = ("chat", "question_answer")


def _import_adapter_modules() -> None:
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda module: module.name):
        importlib.import_module(f"{__name__}.{module.name}")


ADAPTERS: Registry[type[Adapter]] = Registry("model adapter", loader=_import_adapter_modules)


def load_adapter(model_cfg: Mapping[str, Any], device: str | None = None) -> Adapter:
    """Load the model and processor described by one ``models:`` entry of the config.

    Jobs that run on GPUs load through :class:`medprobe.gpu_job.GpuJob`, which claims the job's devices and
    chooses ``device`` and ``device_map``; this is the loading itself.

    Args:
        model_cfg: keys ``adapter`` (a registered name, e.g. ``idefics`` or ``clip``), ``checkpoint``
            (hub id or local directory), and optionally ``revision``, ``torch_dtype`` (``float32`` |
            ``bfloat16`` | ``float16``; default float32 on CPU, bfloat16 on CUDA), ``trust_remote_code``
            (default false) and ``device_map`` (passed to ``from_pretrained``; the model is then not moved).
            Other keys (``label``, ``layer``, ...) are ignored.
        device: where the model runs (``cpu``, ``cuda``, ``cuda:1``); default the first CUDA device if
            any, else the CPU.

    Raises:
        ValueError: unknown adapter, missing checkpoint or invalid ``torch_dtype``.
    """
    name = model_cfg.get("adapter")
    if name not in ADAPTERS:
        raise ValueError(f"unknown model adapter {name!r}; registered adapters: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS.get(name).from_config(model_cfg, device=device)

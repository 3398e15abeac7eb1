"""Model adapters: a registry of model families and :func:`load_adapter`.

A model in the config names an ``adapter`` (a registry key) and a ``checkpoint`` (hub id or local
directory; both go through the same ``from_pretrained`` path).  Every module in this package is imported
here, so a new model family is one module that subclasses :class:`Adapter` and uses ``@register``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

import torch

from medprobe.models.base import ADAPTERS, Adapter, register

__all__ = ["ADAPTERS", "Adapter", "load_adapter", "register"]

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda module: module.name):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def load_adapter(model_cfg: Mapping[str, Any], device: str | torch.device | None = None) -> Adapter:
    """Load the model and processor described by one ``models:`` entry of the config.

    Args:
        model_cfg: keys ``adapter`` (a registered name, e.g. ``idefics`` or ``clip``), ``checkpoint``
            (hub id or local directory), and optionally ``revision``, ``torch_dtype`` (``float32`` |
            ``bfloat16`` | ``float16``; default float32 on CPU, bfloat16 on CUDA), ``trust_remote_code``
            (default false) and ``device_map`` (passed to ``from_pretrained``; the model is then not moved).
            Other keys (``label``, ``layer``, ...) are ignored.
        device: where the model runs; default the first CUDA device if any, else the CPU.

    Raises:
        ValueError: unknown adapter, missing checkpoint or invalid ``torch_dtype``.
    """
    name = model_cfg.get("adapter")
    if name not in ADAPTERS:
        raise ValueError(f"unknown model adapter {name!r}; registered adapters: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name].from_config(model_cfg, device=device)

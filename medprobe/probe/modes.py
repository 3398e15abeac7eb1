"""One probe of a given ``probe.mode``: the regularised probe at a chosen C, or one of the authors' probes."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from medprobe.probe.paper import fit_adam, fit_sgd
from medprobe.probe.problem import ArrayLike
from medprobe.probe.solver import fit
from medprobe.settings import ProbeSettings

PROBE_MODES = ("regularised", "adam", "sgd")


def _check_mode(mode: str) -> None:
    if mode not in PROBE_MODES:
        raise ValueError(f"probe.mode must be one of {list(PROBE_MODES)}, got {mode!r}")


def _labels(kind: str, classes: Sequence[str]) -> dict[str, Any]:
    """What every fitting function is told of the classes: their number (a binary probe needs none) and names."""
    return {"n_classes": len(classes) if kind != "binary" else None, "class_names": list(classes)}


def _regularised_options(
    probe: ProbeSettings, kind: str, classes: Sequence[str], device: str | torch.device | None
) -> dict[str, Any]:
    """The regularised probe's options under ``probe`` (fields of :class:`~medprobe.probe.problem.FitOptions`)."""
    return {
        "max_iter": probe.max_iter,
        "tol": probe.tol,
        "class_weight": probe.class_weight,
        "dtype": probe.dtype,
        "device": device,
        **_labels(kind, classes),
    }


def fit_mode(
    probe: ProbeSettings,
    X: ArrayLike,
    y: ArrayLike,
    kind: str,
    classes: Sequence[str],
    *,
    C: float = math.inf,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> Any:
    """One probe of ``probe.mode`` on ``X`` for a task with ``classes``: ``regularised`` at ``C``
    (:func:`_regularised_options`), ``adam`` (:func:`medprobe.probe.fit_adam` with ``probe.adam``, seeded by ``seed``)
    or ``sgd`` (:func:`medprobe.probe.fit_sgd` with ``probe.sgd``). The settings sections name the keyword
    arguments of their fitting functions."""
    _check_mode(probe.mode)
    if probe.mode == "adam":
        return fit_adam(
            X, y, kind, **dataclasses.asdict(probe.adam), seed=seed, device=device, **_labels(kind, classes)
        )
    if probe.mode == "sgd":
        return fit_sgd(X, y, kind, **dataclasses.asdict(probe.sgd), **_labels(kind, classes))
    if not math.isfinite(C):
        raise ValueError(f"the regularised probe needs a finite C, got {C}")
    return fit(X, y, kind, C, **_regularised_options(probe, kind, classes, device))

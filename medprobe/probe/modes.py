"""One probe of a given ``probe.mode``: the regularised probe at a chosen C, or one of the authors' probes."""

from __future__ import annotations

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


def fit_mode(
    probe: ProbeSettings,
    X: ArrayLike,
    y: ArrayLike,
    kind: str,
    *,
    C: float = math.inf,
    seed: int = 0,
    n_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    device: str | torch.device | None = None,
) -> Any:
    """One probe of ``probe.mode`` on ``X``: ``regularised`` at ``C`` (``probe``'s max_iter, tol, class_weight
    and dtype), ``adam`` (:func:`medprobe.probe.fit_adam` with ``probe.adam``, seeded by ``seed``) or ``sgd``
    (:func:`medprobe.probe.fit_sgd` with ``probe.sgd``)."""
    _check_mode(probe.mode)
    if probe.mode == "adam":
        adam = probe.adam
        return fit_adam(
            X,
            y,
            kind,
            epochs=adam.epochs,
            lr=adam.lr,
            batch_size=adam.batch_size,
            standardise=adam.standardise,
            seed=seed,
            n_classes=n_classes,
            class_names=class_names,
            device=device,
        )
    if probe.mode == "sgd":
        sgd = probe.sgd
        return fit_sgd(
            X,
            y,
            kind,
            alpha=sgd.alpha,
            max_iter=sgd.max_iter,
            class_weight=sgd.class_weight,
            random_state=sgd.random_state,
            n_classes=n_classes,
            class_names=class_names,
        )
    if not math.isfinite(C):
        raise ValueError(f"the regularised probe needs a finite C, got {C}")
    return fit(
        X,
        y,
        kind,
        C,
        max_iter=probe.max_iter,
        tol=probe.tol,
        class_weight=probe.class_weight,
        n_classes=n_classes,
        class_names=class_names,
        dtype=probe.dtype,
        device=device,
    )


def _n_outputs(kind: str, classes: Sequence[str]) -> int | None:
    """``n_classes`` for the fitting functions: a binary probe needs none."""
    return len(classes) if kind != "binary" else None

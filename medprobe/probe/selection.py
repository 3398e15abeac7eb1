"""Validation metrics and the choice of C on the validation split."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medprobe.probe.problem import (
    ArrayLike,
    FitOptions,
    _check_kind,
    _normalise_class_weight,
    _prepare,
    _prepare_targets,
    _Problem,
    _warn_absent,
)
from medprobe.probe.solver import LogisticProbe, _fit_prepared
from medprobe.stats.metrics import auc_per_class


def log_loss(probe: LogisticProbe, X: ArrayLike, y: ArrayLike, *, class_weight: str | None = None) -> float:
    """Mean negative log-likelihood of ``y`` under the probe, computed from logits (no clipping).

    Binary/multiclass: mean over samples (as ``sklearn.metrics.log_loss``). Multilabel: the mean over
    findings of each finding's binary log-loss. With ``class_weight='balanced'`` every sample is
    weighted by the balanced weights of ``y`` itself, mirroring the training objective.
    """
    class_weight = _normalise_class_weight(class_weight)
    logits = probe.decision_function(X)
    n_outputs = probe.coef.shape[0] if probe.kind == "multiclass" else None
    targets = _prepare_targets(
        y, logits.shape[0], probe.kind, n_outputs, class_weight, None, torch.float64, logits.device
    )
    if probe.kind == "multiclass":
        nll = -torch.log_softmax(logits, dim=1).gather(1, targets.values[:, None]).squeeze(1)
        return float((nll * targets.weights).sum() / targets.weight_sum)
    nll = F.binary_cross_entropy_with_logits(logits, targets.values, reduction="none")
    per_output = (nll * targets.weights).sum(0) / targets.weight_sum
    return float(per_output.mean())


def macro_auc(y: np.ndarray, probabilities: np.ndarray, kind: str) -> float:
    """Validation macro AUC: binary -> the positive class's AUC; multiclass -> mean one-vs-rest AUC;
    multilabel -> mean per-finding AUC. Classes without both positives and negatives in ``y`` are
    skipped; NaN when none is left."""
    _check_kind(kind)
    y = np.asarray(y)
    if kind == "binary":
        indicator, scores = (y == 1)[:, None].astype(int), probabilities[:, 1:2]
    elif kind == "multiclass":
        indicator = (y[:, None] == np.arange(probabilities.shape[1])[None, :]).astype(int)
        scores = probabilities
    else:
        indicator, scores = y.astype(int), probabilities
    # medprobe.stats' rank AUC (equal to sklearn's roc_auc_score, ties included; tested): probe jobs then do
    # not import scikit-learn, ~1 s of every job's start.
    aucs = auc_per_class(indicator, scores)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def _proba_log_loss(y: np.ndarray, probabilities: np.ndarray, kind: str) -> float:
    """Mean negative log-likelihood from probabilities (binary/multiclass; multilabel: mean over findings)."""
    eps = np.finfo(np.float64).eps
    p = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1 - eps)
    if kind == "multilabel":
        y = np.asarray(y, dtype=np.float64)
        return float(np.mean(-(y * np.log(p) + (1 - y) * np.log1p(-p))))
    return float(np.mean(-np.log(p[np.arange(len(y)), np.asarray(y, dtype=np.int64)])))


# Values tried between the best grid value's neighbours when the search is refined.
REFINE_POINTS = 5


@dataclass
class _Selection:
    C: float
    val_auc: float
    val_log_loss: float
    probe: LogisticProbe
    table: list[tuple[float, float]]  # (C, validation log-loss) for every C tried, in order tried


def _check_grid(grid: Sequence[float]) -> np.ndarray:
    values = np.asarray(list(grid), dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"C grid must be a non-empty list of positive numbers, got {list(grid)!r}")
    return np.unique(values)  # sorted ascending: strong to weak regularisation


def _search_C(
    problem: _Problem,
    X_val: ArrayLike,
    y_val: ArrayLike,
    grid: Sequence[float],
    *,
    refine: bool,
    options: FitOptions,
    refine_points: int = REFINE_POINTS,
) -> _Selection:
    """C search on one layer's training ``problem`` (the arguments of :func:`select_C`): :func:`_search_C_layers`
    for a single layer."""
    return _search_C_layers(problem, [X_val], y_val, grid, refine=refine, options=options, refine_points=refine_points)[
        0
    ]


def _search_C_layers(
    problem: _Problem,
    X_vals: Sequence[ArrayLike],
    y_val: ArrayLike,
    grid: Sequence[float],
    *,
    refine: bool,
    options: FitOptions,
    refine_points: int = REFINE_POINTS,
) -> list[_Selection]:
    """C search on every layer of the training ``problem`` (``problem.Z`` is ``(L, n, d)``), each layer scored
    on its own validation features ``X_vals[layer]``; one :class:`_Selection` per layer.

    All layers' grid values are fitted in one lockstep solve (:func:`_drive`), sharing each layer's passes
    over its features; then every layer's refinement values, each warm-started from that layer's fit at the
    nearest smaller grid value. Each fit keeps its own L-BFGS state and stopping rule, so a layer's result
    is the same whether it is searched alone or with others (the GPU path batches layers to fill the device).
    """
    grid_values = _check_grid(grid)
    n_layers = problem.Z.shape[0]
    if len(X_vals) != n_layers:
        raise ValueError(f"{len(X_vals)} validation feature sets for {n_layers} layers")
    y_val = y_val.cpu().numpy() if isinstance(y_val, torch.Tensor) else np.asarray(y_val)
    tried: list[dict[float, tuple[float, LogisticProbe]]] = [{} for _ in range(n_layers)]

    def evaluate(fits: Sequence[tuple[int, float, LogisticProbe | None]]) -> None:
        probes = _fit_prepared(problem, fits, max_iter=options.max_iter, tol=options.tol)
        for (layer, C, _), probe in zip(fits, probes):
            loss = log_loss(probe, X_vals[layer], y_val, class_weight=options.class_weight)
            tried[layer][C] = (loss, probe)

    def best_of(layer: int, candidates: Sequence[float]) -> float:
        # Lowest validation log-loss; ties go to the smaller C (the more regularised model).
        return min(candidates, key=lambda c: (tried[layer][c][0], c))

    grid_list = [float(C) for C in grid_values]
    evaluate([(layer, C, None) for layer in range(n_layers) for C in grid_list])
    best = [best_of(layer, grid_list) for layer in range(n_layers)]
    if refine and refine_points > 0 and grid_values.size > 1:
        fine_fits = []
        for layer in range(n_layers):
            position = int(np.searchsorted(grid_values, best[layer]))
            low = grid_values[max(position - 1, 0)]
            high = grid_values[min(position + 1, grid_values.size - 1)]
            fine = [float(C) for C in np.geomspace(low, high, refine_points + 2)[1:-1]]
            fine = [C for C in fine if not any(math.isclose(C, done, rel_tol=1e-9) for done in tried[layer])]
            fine_fits += [(layer, C, tried[layer][float(low)][1]) for C in fine]
        if fine_fits:
            evaluate(fine_fits)
        best = [best_of(layer, list(tried[layer])) for layer in range(n_layers)]
    selections = []
    for layer, C in enumerate(best):
        loss, probe = tried[layer][C]
        auc = macro_auc(y_val, probe.predict_proba(X_vals[layer]), probe.kind)
        table = [(c, tried[layer][c][0]) for c in tried[layer]]
        selections.append(_Selection(C, auc, loss, probe, table))
    return selections


def select_C(
    X_train: ArrayLike,
    y_train: ArrayLike,
    X_val: ArrayLike,
    y_val: ArrayLike,
    kind: str,
    grid: Sequence[float],
    *,
    refine: bool = True,
    refine_points: int = REFINE_POINTS,
    **options: Any,
) -> tuple[float, float]:
    """Pick C by validation log-loss (lower is better) over the log ``grid``; ``options`` are the fields of
    :class:`~medprobe.probe.problem.FitOptions`.

    With ``refine``, ``refine_points`` log-spaced values strictly between the best grid point's
    neighbours are tried as well. Returns ``(C, validation macro AUC at that C)``.
    """
    settings = FitOptions(**options)
    X3 = X_train[None] if isinstance(X_train, torch.Tensor) else np.asarray(X_train)[None]
    problem = _prepare(X3, y_train, kind, settings)
    selection = _search_C(problem, X_val, y_val, grid, refine=refine, refine_points=refine_points, options=settings)
    _warn_absent(kind, selection.probe.absent_classes, settings.class_names)
    return selection.C, selection.val_auc

"""The regularised probe: L2-regularised logistic regression in torch, one layer or many at once.

The objective is scikit-learn's ``LogisticRegression(C=C, l2, fit_intercept=True)`` so that the same C
means the same model::

    sum_i w_i * loss_i  +  0.5 / C * ||W||^2          (intercept unpenalised)

with ``w_i`` = sample weight x class weight. Like scikit-learn's lbfgs solver we minimise it divided by
``sum_i w_i`` (same minimiser) and stop when the largest absolute gradient entry of that scaled
objective is <= ``tol``, so ``tol`` also means the same thing in both.

* ``multiclass``: softmax over all C classes (the over-parametrised multinomial scikit-learn uses);
* ``binary``: one logit with a sigmoid (``classes[1]`` is the positive class);
* ``multilabel``: independent binary problems, one per finding, solved together (sum of losses).

Features are standardised with the training mean and (population) standard deviation; the stored
``coef`` acts on standardised features.

Solver: full-batch L-BFGS (20 pairs) written for this objective, several problems in one lockstep solve
(:mod:`medprobe.probe.lbfgs`).

Precision: ``dtype="float64"`` (default) holds the standardised features in float64 and reproduces
scikit-learn to ~1e-6. ``dtype="float32"`` holds them in float32 (half the memory, ~2.5x faster on CPU)
while parameters, logits, loss and line search stay float64; probabilities then differ from the float64
solution by ~1e-4, test log-loss within 1e-4 of scikit-learn's at paper-like sizes (docs/benchmarks.md,
"Probes"); the workflow chooses through ``probe.dtype``. In float32 the gradient's rounding
noise can exceed a tight ``tol``; the run then stops when the objective stops decreasing (as scipy
does), and counts as converged. Tensors on a CUDA device (or ``device="cuda"``) are solved there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medprobe.probe.lbfgs import _drive, _LayerFeatures, _LayerObjective, _lbfgs
from medprobe.probe.problem import (
    _PARAM_DTYPE,
    ArrayLike,
    FitOptions,
    _initial_parameters,
    _prepare,
    _Problem,
    _warn_absent,
)

logger = logging.getLogger(__name__)


@dataclass
class LinearModel:
    """Logits ``(x - mean) / std @ coef.T + intercept`` with ``coef`` ``(K, d)``: what every probe of this
    package computes; the probes differ in how they are trained and how logits become probabilities."""

    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    kind: str

    def decision_function(self, X: ArrayLike) -> torch.Tensor:
        """Logits ``(n, K)`` as a float64 tensor on the device of ``X`` (CPU for numpy input)."""
        device = X.device if isinstance(X, torch.Tensor) else torch.device("cpu")
        features = torch.as_tensor(X, device=device).to(torch.float64)
        if features.ndim != 2 or features.shape[1] != self.coef.shape[1]:
            raise ValueError(f"X has shape {tuple(features.shape)}; this probe expects (n, {self.coef.shape[1]})")
        mean, std, coef, intercept = (
            torch.as_tensor(a, device=device, dtype=torch.float64)
            for a in (self.mean, self.std, self.coef, self.intercept)
        )
        return torch.addmm(intercept, (features - mean) / std, coef.T)


@dataclass
class LogisticProbe(LinearModel):
    """A fitted regularised probe; ``coef`` acts on standardised features ``(x - mean) / std``.

    ``K`` is 1 for binary tasks (the positive class's logit), the number of classes for multiclass
    and the number of findings for multilabel tasks.
    """

    C: float
    n_iter: int
    converged: bool
    absent_classes: tuple[int, ...] = field(default=())

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Class probabilities as float64 numpy: binary ``(n, 2)`` = ``[1 - p, p]``; multiclass
        ``(n, C)``; multilabel ``(n, F)`` (one independent probability per finding)."""
        logits = self.decision_function(X)
        if self.kind == "multiclass":
            proba = torch.softmax(logits, dim=1)
        elif self.kind == "binary":
            # sigmoid(-z) rather than 1 - sigmoid(z) keeps small P(negative) accurate.
            proba = torch.cat([torch.sigmoid(-logits), torch.sigmoid(logits)], dim=1)
        else:
            proba = torch.sigmoid(logits)
        return proba.cpu().numpy()


def _as_C_vector(C: float | Sequence[float], L: int) -> np.ndarray:
    values = np.atleast_1d(np.asarray(C, dtype=np.float64))
    if values.size == 1:
        values = np.repeat(values, L)
    if values.shape != (L,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"C must be a positive finite number or a sequence of {L} of them, got {C!r}")
    return values


def _fit_prepared(
    problem: _Problem, fits: Sequence[tuple[int, float, LogisticProbe | None]], *, max_iter: int, tol: float
) -> list[LogisticProbe]:
    """One probe per fit ``(layer index, C, warm start or None)`` of ``problem``, all solved in one lockstep run
    (:func:`_drive`): the fits of a layer share their feature products, and each stops on its own."""
    Z, targets = problem.Z, problem.targets
    d = Z.shape[2]
    solvers = []
    for layer, C, init in fits:
        if init is None:
            W0, b0 = (value[0] for value in _initial_parameters(targets, 1, d, _PARAM_DTYPE, Z.device))
        else:
            W0 = torch.as_tensor(init.coef, dtype=_PARAM_DTYPE, device=Z.device)
            b0 = torch.as_tensor(init.intercept, dtype=_PARAM_DTYPE, device=Z.device)
        objective = _LayerObjective(targets, torch.tensor(1.0 / C, dtype=_PARAM_DTYPE, device=Z.device))
        solvers.append((layer, _lbfgs(objective, W0, b0, max_iter, tol)))
    solutions = _drive([_LayerFeatures(Z[layer]) for layer in range(Z.shape[0])], solvers)
    probes = []
    for (layer, C, _), solution in zip(fits, solutions):
        b = solution.b - solution.b.mean() if targets.kind == "multiclass" else solution.b
        # Like scipy's L-BFGS-B (scikit-learn's solver), an objective that stops decreasing at the
        # dtype's resolution counts as converged; only an exhausted budget with a large gradient does not.
        converged = solution.grad_max <= tol or not solution.budget_spent
        if not converged:
            logger.warning(
                "L-BFGS did not converge in %d iterations (layer %d, C=%g, max |gradient| %.3g > tol %g)",
                solution.n_iter,
                layer,
                C,
                solution.grad_max,
                tol,
            )
        probes.append(
            LogisticProbe(
                mean=problem.mean[layer].double().cpu().numpy(),
                std=problem.std[layer].double().cpu().numpy(),
                coef=solution.W.double().cpu().numpy().copy(),
                intercept=b.double().cpu().numpy().copy(),
                kind=targets.kind,
                C=float(C),
                n_iter=solution.n_iter,
                converged=converged,
                absent_classes=targets.absent,
            )
        )
    return probes


def fit_layers(
    Xs: ArrayLike, y: ArrayLike, kind: str, C: float | Sequence[float], **options: Any
) -> list[LogisticProbe]:
    """Fit one probe per layer of ``Xs`` ``(L, n, d)`` in one batched, lockstep solve (:func:`_drive`).

    Each layer keeps its own L-BFGS state and stops on its own, so the result equals L separate :func:`fit`
    calls (same iterations). ``C`` is one value or one per layer; ``options`` are the fields of
    :class:`FitOptions`. Memory: one copy of ``Xs`` in ``dtype``.
    """
    settings = FitOptions(**options)
    problem = _prepare(Xs, y, kind, settings)
    _warn_absent(kind, problem.targets.absent, settings.class_names)
    Cs = _as_C_vector(C, problem.Z.shape[0])
    fits = [(layer, float(layer_C), None) for layer, layer_C in enumerate(Cs)]
    return _fit_prepared(problem, fits, max_iter=settings.max_iter, tol=settings.tol)


def fit(X: ArrayLike, y: ArrayLike, kind: str, C: float, **options: Any) -> LogisticProbe:
    """Fit one probe on ``X`` ``(n, d)``; ``options`` are the fields of :class:`FitOptions`.

    ``y``: binary/multiclass ``(n,)`` class indices (binary: 1 = positive); multilabel ``(n, F)`` 0/1.
    Same objective and stopping rule as ``sklearn.linear_model.LogisticRegression(C=C, tol=tol)``
    on standardised features. ``converged`` is False only when ``max_iter`` ran out with the gradient
    still above ``tol``.
    """
    X3 = X[None] if isinstance(X, torch.Tensor) else np.asarray(X)[None]
    if X3.ndim != 3:
        raise ValueError(f"X must be (n, d), got shape {tuple(X3.shape[1:])}")
    return fit_layers(X3, y, kind, C, **options)[0]

"""Linear probes: L2-regularised logistic regression in torch, C and layer selection, label efficiency.

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

Solver: full-batch L-BFGS (20 pairs) written for this objective. The logits are carried along with the
parameters, so the line search (strong Wolfe, safeguarded Newton steps on the convex 1-D function) costs
O(n K) per trial and every iteration costs exactly two passes over the features: ``X D`` for the new
direction and ``G X`` for the gradient at the accepted step (torch's generic LBFGS needed ~1.35 function
evaluations of two passes each per iteration). On CPU both K x d by d x n products run as a batch of row
blocks, which spreads them over all threads (MKL runs a single such product at about one core's
throughput). Several problems (the C values of a search, the layers of :func:`fit_layers`) run in one
lockstep solve, each with its own L-BFGS state, line search and stopping rule (a single block-diagonal
L-BFGS run would keep every problem iterating until the slowest converged); the products of the problems
on the same layer are stacked into one, since 9 x J output rows cost far less than J products of 9
(:func:`_drive`, docs/benchmarks.md, "Probes").

Precision: ``dtype="float64"`` (default) holds the standardised features in float64 and reproduces
scikit-learn to ~1e-6. ``dtype="float32"`` holds them in float32 (half the memory, ~2.5x faster on CPU)
while parameters, logits, loss and line search stay float64; probabilities then differ from the float64
solution by ~1e-4, test log-loss within 1e-4 of scikit-learn's at paper-like sizes; it is the workflow's
default (``probe.dtype``, measured in docs/benchmarks.md, "Probes"). In float32 the gradient's rounding
noise can exceed a tight ``tol``; the run then stops when the objective stops decreasing (as scipy
does), and counts as converged. Tensors on a CUDA device (or ``device="cuda"``) are solved there.

File contracts (``layers.h5``, ``predictions.h5``, ``probe.json``, ``efficiency.h5``) are in
docs/architecture.md, section "Probes".
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from medprobe.checks import check_finite
from medprobe.labels import KINDS, load_manifest, task_targets
from medprobe.layers import resolve_layer
from medprobe.paper_probes import fit_adam, fit_sgd

logger = logging.getLogger(__name__)

EMBEDDINGS_LAYER = "image_embeds"
ArrayLike = np.ndarray | torch.Tensor

# L-BFGS memory: scikit-learn/scipy keep 10 pairs; a few more cost nothing next to the n x d products
# and cut iterations on the ill-conditioned large-C problems.
_HISTORY_SIZE = 20
# Strong Wolfe constants (scipy's and torch's) and the most trial steps of one line search.
_WOLFE_C1, _WOLFE_C2 = 1e-4, 0.9
_LINE_SEARCH_TRIALS = 40
# Stalled objective: relative decrease <= 64 float64 eps, scipy's ftol under scikit-learn. The loss is
# float64 even for float32 features; a float32-level threshold would stop far too early.
_FTOL = 64 * torch.finfo(torch.float64).eps
# Fewest rows per block of the blocked products on CPU (see _LayerFeatures).
_MIN_BLOCK_ROWS = 256
# Parameters, targets, loss and residuals are always float64; only the features may be float32.
_PARAM_DTYPE = torch.float64
# Rows per block when standardising: a float64 block of 256 x 4096 features (8 MB) stays in cache.
_STATS_BLOCK = 256


# --------------------------------------------------------------------------------------------------
# The fitted model
# --------------------------------------------------------------------------------------------------


@dataclass
class LogisticProbe:
    """A fitted probe. ``coef`` is ``(K, d)`` and acts on standardised features ``(x - mean) / std``.

    ``K`` is 1 for binary tasks (the positive class's logit), the number of classes for multiclass
    and the number of findings for multilabel tasks.
    """

    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    kind: str
    C: float
    n_iter: int
    converged: bool
    absent_classes: tuple[int, ...] = field(default=())

    def decision_function(self, X: ArrayLike) -> torch.Tensor:
        """Logits ``(n, K)`` as a float64 tensor on the device of ``X`` (CPU for numpy input)."""
        device = X.device if isinstance(X, torch.Tensor) else torch.device("cpu")
        features = torch.as_tensor(X, device=device).to(torch.float64)
        if features.ndim != 2 or features.shape[1] != self.coef.shape[1]:
            raise ValueError(
                f"X has shape {tuple(features.shape)}; this probe expects (n, {self.coef.shape[1]})"
            )
        mean = torch.as_tensor(self.mean, device=device)
        std = torch.as_tensor(self.std, device=device)
        coef = torch.as_tensor(self.coef, device=device)
        intercept = torch.as_tensor(self.intercept, device=device)
        return torch.addmm(intercept, (features - mean) / std, coef.T)

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


# --------------------------------------------------------------------------------------------------
# Problem preparation
# --------------------------------------------------------------------------------------------------


@dataclass
class _Targets:
    """Targets and per-sample weights in the layout the loss needs.

    multiclass: ``values`` (n,) int64, ``weights`` (n,), ``weight_sum`` scalar.
    binary / multilabel: ``values`` (n, K) float, ``weights`` (n, K), ``weight_sum`` (K,) — each
    column is its own binary problem with its own normalisation, as K separate scikit-learn fits.
    """

    kind: str
    n_outputs: int
    values: torch.Tensor
    weights: torch.Tensor
    weight_sum: torch.Tensor
    absent: tuple[int, ...]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {list(KINDS)}")


def _normalise_class_weight(class_weight: str | None) -> str | None:
    if class_weight is None or class_weight == "none":
        return None
    if class_weight == "balanced":
        return "balanced"
    raise ValueError(f"class_weight must be None, 'none' or 'balanced', got {class_weight!r}")


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        resolved = {"float64": torch.float64, "float32": torch.float32}.get(str(dtype))
    if resolved not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be float64 or float32, got {dtype!r}")
    return resolved


def _resolve_device(X: ArrayLike, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return X.device if isinstance(X, torch.Tensor) else torch.device("cpu")


def _balanced_factors(counts: torch.Tensor) -> torch.Tensor:
    """scikit-learn's 'balanced' class weights, total / (n_present * count), over present classes."""
    present = counts > 0
    factors = torch.zeros_like(counts)
    factors[present] = counts.sum() / (present.sum() * counts[present])
    return factors


def _prepare_targets(
    y: ArrayLike,
    n_samples: int,
    kind: str,
    n_classes: int | None,
    class_weight: str | None,
    sample_weight: ArrayLike | None,
    dtype: torch.dtype,
    device: torch.device,
) -> _Targets:
    y_np = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if y_np.shape[0] != n_samples:
        raise ValueError(f"y has {y_np.shape[0]} rows but X has {n_samples}")
    if sample_weight is None:
        base = torch.ones(n_samples, dtype=dtype, device=device)
    else:
        base = torch.as_tensor(np.asarray(sample_weight, dtype=np.float64), device=device).to(dtype)
        if base.shape != (n_samples,) or bool((base < 0).any()):
            raise ValueError(f"sample_weight must be (n,) = ({n_samples},) and non-negative")

    if kind in ("binary", "multiclass"):
        if y_np.ndim != 1 or not np.issubdtype(y_np.dtype, np.integer):
            raise ValueError(f"{kind} y must be a 1-d integer array of class indices, got {y_np.dtype} {y_np.shape}")
        K = 2 if kind == "binary" else (int(y_np.max()) + 1 if n_classes is None else int(n_classes))
        if kind == "binary" and n_classes not in (None, 2):
            raise ValueError(f"binary task has 2 classes, got n_classes={n_classes}")
        if y_np.size and (y_np.min() < 0 or y_np.max() >= K):
            raise ValueError(f"{kind} y holds class indices outside [0, {K - 1}]: {sorted(set(y_np.tolist()) - set(range(K)))[:10]}")
        labels = torch.as_tensor(y_np.astype(np.int64), device=device)
        counts = torch.zeros(K, dtype=dtype, device=device).index_add_(0, labels, base)
        absent = tuple(int(k) for k in torch.nonzero(counts == 0).flatten().tolist())
        weights = base * _balanced_factors(counts)[labels] if class_weight == "balanced" else base
        if kind == "multiclass":
            return _Targets(kind, K, labels, weights, weights.sum(), absent)
        values = (labels == 1).to(dtype)[:, None]
        return _Targets(kind, 1, values, weights[:, None], weights.sum()[None], absent)

    if y_np.ndim != 2 or not np.isin(y_np, (0, 1)).all():
        raise ValueError(f"multilabel y must be an (n, F) array of 0/1, got {y_np.dtype} {y_np.shape}")
    values = torch.as_tensor(y_np.astype(np.float64), device=device).to(dtype)
    if n_classes is not None and values.shape[1] != n_classes:
        raise ValueError(f"multilabel y has {values.shape[1]} columns but n_classes={n_classes}")
    positives = (base[:, None] * values).sum(0)
    negatives = (base[:, None] * (1 - values)).sum(0)
    # A finding with no positive (or no negative) example cannot be learnt; its intercept alone
    # carries the (near-0 or near-1) probability.
    absent = tuple(int(k) for k in torch.nonzero((positives == 0) | (negatives == 0)).flatten().tolist())
    weights = base[:, None].expand_as(values).clone()
    if class_weight == "balanced":
        for k in range(values.shape[1]):
            factors = _balanced_factors(torch.stack([negatives[k], positives[k]]))
            weights[:, k] = base * torch.where(values[:, k] > 0, factors[1], factors[0])
    return _Targets(kind, values.shape[1], values, weights, weights.sum(0), absent)


def _standardise(X: ArrayLike, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised copy of ``X`` (L, n, d) in ``dtype`` on ``device``, with its own mean and population
    std (zero std -> 1, as scikit-learn's StandardScaler).

    Two passes over ``X`` in row blocks small enough to stay in cache: the first accumulates float64
    means and squared deviations (Chan et al.'s pairwise update, stable), the second writes
    ``(x - mean) / std`` computed in float64 and rounded once to ``dtype``. ``X`` is never copied whole
    and never modified. Returns (Z, mean, std), the latter two float64 (L, d).
    """
    if isinstance(X, torch.Tensor):
        source = X.detach()
    else:
        array = np.asarray(X)
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"features must be numbers, got dtype {array.dtype}")
        source = torch.from_numpy(np.ascontiguousarray(array))
    if source.ndim != 3:
        raise ValueError(f"expected features of shape (L, n, d), got {tuple(source.shape)}")
    L, n, d = source.shape
    if n == 0:
        raise ValueError("no training samples")
    # Blocks move to the device in their own dtype and are widened there (half the transfer for float32).
    mean = torch.zeros(L, d, dtype=_PARAM_DTYPE, device=device)
    squares = torch.zeros_like(mean)
    seen = 0
    for start in range(0, n, _STATS_BLOCK):
        block = source[:, start : start + _STATS_BLOCK].to(device).to(_PARAM_DTYPE, copy=True)
        rows = block.shape[1]
        block_mean = block.mean(1)
        block_squares = block.sub_(block_mean[:, None, :]).square_().sum(1)
        delta = block_mean - mean
        mean += delta * (rows / (seen + rows))
        squares += block_squares + delta.square_() * (seen * rows / (seen + rows))
        seen += rows
    # NaN or inf anywhere makes these non-finite, so no separate pass looks for them.
    if not bool(torch.isfinite(mean).all() and torch.isfinite(squares).all()):
        raise ValueError("features contain NaN or infinite values")
    std = (squares / n).sqrt_()
    # A constant column's computed std is round-off, not signal: treat it as exactly constant.
    constant = std <= 1e3 * torch.finfo(_PARAM_DTYPE).eps * mean.abs()
    std = torch.where(constant | (std == 0), torch.ones_like(std), std)
    Z = torch.empty(L, n, d, dtype=dtype, device=device)
    for start in range(0, n, _STATS_BLOCK):
        block = source[:, start : start + _STATS_BLOCK].to(device).to(_PARAM_DTYPE, copy=True)
        Z[:, start : start + _STATS_BLOCK] = block.sub_(mean[:, None, :]).div_(std[:, None, :])
    return Z, mean, std


def _initial_parameters(targets: _Targets, L: int, d: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero weights ``(L, K, d)`` and intercepts ``(L, K)`` at the smoothed log prior odds (saves iterations).

    Multiclass intercepts are centred: the softmax gradient never changes their sum, so centring puts
    the solution in scikit-learn's (zero-initialised) parametrisation.
    """
    W = torch.zeros(L, targets.n_outputs, d, dtype=dtype, device=device)
    if targets.kind == "multiclass":
        counts = torch.zeros(targets.n_outputs, dtype=dtype, device=device).index_add_(0, targets.values, targets.weights)
        b = torch.log((counts + 0.5) / (counts.sum() + 0.5 * targets.n_outputs))
        b = b - b.mean()
    else:
        positives = (targets.weights * targets.values).sum(0)
        b = torch.log((positives + 0.5) / (targets.weight_sum - positives + 0.5))
    return W, b.expand(L, -1).clone()


class _LayerFeatures:
    """One layer's standardised features ``(n, d)`` and the two products the solver needs.

    Both products are ``K x d`` by ``d x n`` with ``K << d``. MKL runs one such product at about one
    core's throughput; cut into a batch of row blocks (a view, no copy) the same product spreads over
    every thread: ~2x faster on 2 cores in float32 (docs/benchmarks.md, "Probes"). Results are float64;
    only the products run in the features' dtype.
    """

    def __init__(self, Z: torch.Tensor) -> None:
        self.Z = Z
        n, d = Z.shape
        blocks = 1 if Z.device.type != "cpu" else max(1, min(2 * torch.get_num_threads(), n // _MIN_BLOCK_ROWS))
        self.rows_per_block = n // blocks
        self.blocked_rows = blocks * self.rows_per_block
        self.blocks = Z[: self.blocked_rows].view(blocks, self.rows_per_block, d)
        self.rest = Z[self.blocked_rows :]

    def logits(self, M: torch.Tensor) -> torch.Tensor:
        """``M Z^T``: ``(K, d)`` -> ``(K, n)``."""
        M = M.to(self.Z.dtype)
        blocks = self.blocks.shape[0]
        out = torch.bmm(M.expand(blocks, *M.shape), self.blocks.transpose(1, 2))  # (blocks, K, rows)
        out = out.transpose(0, 1).reshape(M.shape[0], self.blocked_rows)
        if self.rest.shape[0]:
            out = torch.cat([out, M @ self.rest.T], dim=1)
        return out.to(_PARAM_DTYPE)

    def gradient(self, R: torch.Tensor) -> torch.Tensor:
        """``R Z``: ``(K, n)`` -> ``(K, d)``."""
        R = R.to(self.Z.dtype)
        K, blocks = R.shape[0], self.blocks.shape[0]
        head = R[:, : self.blocked_rows].reshape(K, blocks, self.rows_per_block).transpose(0, 1)
        out = torch.bmm(head, self.blocks).sum(0)
        if self.rest.shape[0]:
            out += R[:, self.blocked_rows :] @ self.rest
        return out.to(_PARAM_DTYPE)


class _LayerObjective:
    """The scaled objective of one problem (one layer at one C), ``data(logits) + 0.5 * sum_k reg_k
    ||W_k||^2``, and what the line search needs along a direction, all from the logits ``(K, n)``: no pass
    over the features."""

    def __init__(self, targets: _Targets, inv_C: torch.Tensor) -> None:
        self.kind = targets.kind
        if self.kind == "multiclass":
            self.labels = targets.values
            self.columns = torch.arange(targets.values.shape[0], device=targets.values.device)
            self.scale = targets.weights / targets.weight_sum  # (n,)
            self.reg = (inv_C / targets.weight_sum).reshape(1).expand(targets.n_outputs)  # (K,)
        else:
            self.values = targets.values.T  # (K, n): each finding is its own problem
            self.scale = (targets.weights / targets.weight_sum).T
            self.reg = inv_C / targets.weight_sum  # (K,)

    def data(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Data term, residual ``dloss/dlogits`` ``(K, n)`` and the probabilities."""
        if self.kind == "multiclass":
            log_norm = torch.logsumexp(logits, dim=0)  # (n,)
            value = ((log_norm - logits[self.labels, self.columns]) * self.scale).sum()
            probabilities = (logits - log_norm).exp_()
            residual = probabilities.clone()
            residual[self.labels, self.columns] -= 1.0
            return value, residual.mul_(self.scale), probabilities
        value = (F.binary_cross_entropy_with_logits(logits, self.values, reduction="none") * self.scale).sum()
        probabilities = logits.sigmoid()
        return value, (probabilities - self.values).mul_(self.scale), probabilities

    def curvature(self, probabilities: torch.Tensor, direction_logits: torch.Tensor) -> torch.Tensor:
        """Second derivative of the data term along a direction whose logits change by ``direction_logits``."""
        if self.kind == "multiclass":
            weighted = probabilities * direction_logits
            spread = (weighted * direction_logits).sum(0) - weighted.sum(0).square()
            return (spread * self.scale).sum()
        return (probabilities * (1 - probabilities) * direction_logits.square() * self.scale).sum()

    def penalty(self, W: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.reg * W.square().sum(1)).sum()


def _line_search(
    objective: _LayerObjective,
    logits: torch.Tensor,
    direction_logits: torch.Tensor,
    W: torch.Tensor,
    DW: torch.Tensor,
    value: torch.Tensor,
    slope: float,
    step: float,
) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A step satisfying the strong Wolfe conditions along a descent direction, or None.

    The objective is convex along the line, and its value, slope and curvature at any step come from
    ``logits + step * direction_logits`` and three inner products of W and DW: each trial costs O(K n),
    not a pass over the features. Trials: ``step`` first (1 after the first iteration, accepted most of
    the time), then safeguarded Newton steps inside the bracket, bisection when Newton leaves it.
    Returns (step, value, residual, logits) at the accepted step.
    """
    WW, WD, DD = W.square().sum(1), (W * DW).sum(1), DW.square().sum(1)
    penalty_curvature = float((objective.reg * DD).sum())
    low, high = 0.0, math.inf
    for _ in range(_LINE_SEARCH_TRIALS):
        trial_logits = torch.add(logits, direction_logits, alpha=step)
        data, residual, probabilities = objective.data(trial_logits)
        trial_value = data + 0.5 * (objective.reg * (WW + 2 * step * WD + step * step * DD)).sum()
        trial_slope = float((residual * direction_logits).sum() + (objective.reg * (WD + step * DD)).sum())
        sufficient = bool(trial_value <= value + _WOLFE_C1 * step * slope)
        if sufficient and abs(trial_slope) <= _WOLFE_C2 * abs(slope):
            return step, trial_value, residual, trial_logits
        if sufficient and trial_slope < 0:
            low = step
        else:
            high = step
        curvature = float(objective.curvature(probabilities, direction_logits)) + penalty_curvature
        newton = step - trial_slope / curvature if curvature > 0 else math.nan
        if math.isinf(high):
            step = newton if math.isfinite(newton) and step < newton <= 16 * step else 4 * step
        else:
            step = newton if math.isfinite(newton) and low < newton < high else 0.5 * (low + high)
        if high - low <= 1e-12 * max(high, 1.0) and not math.isinf(high):
            break
    return None


# A solver asks for products over the features by yielding one of these; _drive answers them.
_LOGITS, _GRADIENT = "logits", "gradient"


@dataclass
class _Solution:
    W: torch.Tensor
    b: torch.Tensor
    n_iter: int
    grad_max: float  # largest absolute gradient entry, recomputed from scratch at the end
    budget_spent: bool  # max_iter ran out (rather than the gradient or a stalled objective stopping the run)


@torch.no_grad()
def _lbfgs(objective: _LayerObjective, W0: torch.Tensor, b0: torch.Tensor, max_iter: int, tol: float):
    """Full-batch L-BFGS on one problem, written as a generator so that several problems on the same
    features share their passes (:func:`_drive`): it yields ``(_LOGITS, M)`` for ``M X^T`` and
    ``(_GRADIENT, R)`` for ``R X`` and is sent the product; it returns a :class:`_Solution`.

    The logits are carried along (``logits += step * X D``), so an iteration costs exactly two passes
    over the features, one for the direction's logits and one for the gradient at the accepted step;
    the line search itself is free (see :func:`_line_search`). Stops when the largest absolute gradient
    entry is <= ``tol``, when the objective stalls at float64 resolution (scipy's ``ftol`` under
    scikit-learn: relative decrease <= 64 eps) or no step decreases it.
    """
    W, b = W0.clone(), b0.clone()
    K, d = W.shape
    logits = (yield _LOGITS, W).add_(b[:, None])
    data, residual, _ = objective.data(logits)
    value = data + objective.penalty(W)
    grad = torch.cat([(yield _GRADIENT, residual).add_(objective.reg[:, None] * W).flatten(), residual.sum(1)])
    pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1 / y.s), oldest first
    n_iter, budget_spent = 0, False
    while float(grad.abs().max()) > tol:
        if n_iter >= max_iter:
            budget_spent = True
            break
        # Two-loop recursion: direction = -H grad with H the L-BFGS inverse-Hessian estimate.
        q = grad.clone()
        alphas = []
        for s, y, rho in reversed(pairs):
            alpha = rho * float(s @ q)
            q.sub_(y, alpha=alpha)
            alphas.append(alpha)
        if pairs:
            s, y, rho = pairs[-1]
            q.mul_(1.0 / (rho * float(y @ y)))  # gamma = s.y / y.y
        for (s, y, rho), alpha in zip(pairs, reversed(alphas)):
            q.add_(s, alpha=alpha - rho * float(y @ q))
        direction = q.neg_()
        slope = float(grad @ direction)
        if not slope < 0:  # lost descent (round-off): restart from steepest descent
            pairs.clear()
            direction, slope = -grad, -float(grad @ grad)
        DW, Db = direction[: K * d].view(K, d), direction[K * d :]
        direction_logits = (yield _LOGITS, DW).add_(Db[:, None])
        first_step = 1.0 if pairs else min(1.0, 1.0 / float(grad.abs().sum()))
        found = _line_search(objective, logits, direction_logits, W, DW, value, slope, first_step)
        if found is None:
            break
        step, new_value, residual, logits = found
        W.add_(DW, alpha=step)
        b.add_(Db, alpha=step)
        grad_W = (yield _GRADIENT, residual).add_(objective.reg[:, None] * W)
        new_grad = torch.cat([grad_W.flatten(), residual.sum(1)])
        s, y = direction.mul_(step), new_grad - grad
        ys = float(y @ s)
        if ys > 1e-10:
            pairs.append((s, y, 1.0 / ys))
            if len(pairs) > _HISTORY_SIZE:
                pairs.pop(0)
        n_iter += 1
        stalled = float(value - new_value) <= _FTOL * max(abs(float(value)), abs(float(new_value)), 1.0)
        value, grad = new_value, new_grad
        if stalled:
            break
    # The verdict uses a fresh gradient, not the one carried along with the logits.
    residual = objective.data((yield _LOGITS, W).add_(b[:, None]))[1]
    grad_W = (yield _GRADIENT, residual).add_(objective.reg[:, None] * W)
    grad_max = max(float(grad_W.abs().max()), float(residual.sum(1).abs().max()))
    return _Solution(W, b, n_iter, grad_max, budget_spent)


@torch.no_grad()
def _drive(features: Sequence[_LayerFeatures], solvers: Sequence[tuple[int, Any]]) -> list[_Solution]:
    """Run :func:`_lbfgs` generators ``(index into features, generator)`` in lockstep: at each round, the
    requests of the solvers still running on the same features are stacked into one ``logits`` and one
    ``gradient`` product. A product with 9 x J output rows costs far less than J products with 9 (16 rows
    cost about as much as 9 on CPU, docs/benchmarks.md), which is what makes a C search on one layer
    cheap; solvers on different layers (:func:`fit_layers`) simply advance together."""
    results: list[_Solution | None] = [None] * len(solvers)
    requests = {index: next(solver) for index, (_, solver) in enumerate(solvers)}
    while requests:
        answers = {}
        for layer, layer_features in enumerate(features):
            for kind, product in ((_LOGITS, layer_features.logits), (_GRADIENT, layer_features.gradient)):
                asking = [i for i, (wanted, _) in requests.items() if wanted == kind and solvers[i][0] == layer]
                if asking:
                    stacked = product(torch.cat([requests[i][1] for i in asking]))
                    answers.update(zip(asking, stacked.split([requests[i][1].shape[0] for i in asking])))
        for index in list(requests):
            try:
                requests[index] = solvers[index][1].send(answers[index].clone())
            except StopIteration as finished:
                results[index] = finished.value
                del requests[index]
    return results


def _as_C_vector(C: float | Sequence[float], L: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    values = np.atleast_1d(np.asarray(C, dtype=np.float64))
    if values.size == 1:
        values = np.repeat(values, L)
    if values.shape != (L,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"C must be a positive finite number or a sequence of {L} of them, got {C!r}")
    return torch.as_tensor(values, dtype=dtype, device=device)


def _warn_absent(targets: _Targets, class_names: Sequence[str] | None) -> None:
    if not targets.absent:
        return
    names = [class_names[k] if class_names is not None else str(k) for k in targets.absent]
    if targets.kind == "multilabel":
        logger.warning(
            "finding(s) %s have no positive (or no negative) training example; their probability "
            "comes from the intercept alone",
            ", ".join(names),
        )
    else:
        logger.warning(
            "class(es) %s have no training example; the regulariser pushes their logit towards -inf",
            ", ".join(names),
        )


def _fit_prepared(
    Z: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    targets: _Targets,
    problems: Sequence[tuple[int, float, LogisticProbe | None]],
    *,
    max_iter: int,
    tol: float,
) -> list[LogisticProbe]:
    """One probe per problem ``(layer index, C, warm start or None)``, all solved in one lockstep run
    (:func:`_drive`): the problems of a layer share their feature products, and each stops on its own."""
    d = Z.shape[2]
    solvers = []
    for layer, C, init in problems:
        if init is None:
            W0, b0 = (value[0] for value in _initial_parameters(targets, 1, d, _PARAM_DTYPE, Z.device))
        else:
            W0 = torch.as_tensor(init.coef, dtype=_PARAM_DTYPE, device=Z.device)
            b0 = torch.as_tensor(init.intercept, dtype=_PARAM_DTYPE, device=Z.device)
        objective = _LayerObjective(targets, torch.tensor(1.0 / C, dtype=_PARAM_DTYPE, device=Z.device))
        solvers.append((layer, _lbfgs(objective, W0, b0, max_iter, tol)))
    solutions = _drive([_LayerFeatures(Z[layer]) for layer in range(Z.shape[0])], solvers)
    probes = []
    for (layer, C, _), solution in zip(problems, solutions):
        b = solution.b - solution.b.mean() if targets.kind == "multiclass" else solution.b
        # Like scipy's L-BFGS-B (scikit-learn's solver), an objective that stops decreasing at the
        # dtype's resolution counts as converged; only an exhausted budget with a large gradient does not.
        converged = solution.grad_max <= tol or not solution.budget_spent
        if not converged:
            logger.warning(
                "L-BFGS did not converge in %d iterations (layer %d, C=%g, max |gradient| %.3g > tol %g)",
                solution.n_iter, layer, C, solution.grad_max, tol,
            )
        probes.append(
            LogisticProbe(
                mean=mean[layer].double().cpu().numpy(),
                std=std[layer].double().cpu().numpy(),
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


# --------------------------------------------------------------------------------------------------
# Public fitting API
# --------------------------------------------------------------------------------------------------


def fit_layers(
    Xs: ArrayLike,
    y: ArrayLike,
    kind: str,
    C: float | Sequence[float],
    *,
    max_iter: int = 200,
    tol: float = 1e-6,
    class_weight: str | None = None,
    sample_weight: ArrayLike | None = None,
    n_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    dtype: torch.dtype | str = torch.float64,
    device: str | torch.device | None = None,
) -> list[LogisticProbe]:
    """Fit one probe per layer of ``Xs`` ``(L, n, d)`` in one batched, lockstep solve (:func:`_drive`).

    Each layer keeps its own L-BFGS state and stops on its own, so the result equals L separate :func:`fit`
    calls (same iterations). ``C`` is one value or one per layer. Memory: one copy of ``Xs`` in ``dtype``.
    ``n_classes`` is needed for multiclass tasks whose training labels miss the last class(es);
    ``class_names`` only makes warnings readable.
    """
    _check_kind(kind)
    class_weight = _normalise_class_weight(class_weight)
    dtype = _resolve_dtype(dtype)
    device = _resolve_device(Xs, device)
    if max_iter < 0 or not tol > 0:
        raise ValueError(f"max_iter must be >= 0 and tol > 0, got max_iter={max_iter}, tol={tol}")
    Z, mean, std = _standardise(Xs, dtype, device)
    targets = _prepare_targets(y, Z.shape[1], kind, n_classes, class_weight, sample_weight, _PARAM_DTYPE, device)
    _warn_absent(targets, class_names)
    Cs = _as_C_vector(C, Z.shape[0], _PARAM_DTYPE, device)
    problems = [(layer, float(Cs[layer]), None) for layer in range(Z.shape[0])]
    return _fit_prepared(Z, mean, std, targets, problems, max_iter=max_iter, tol=tol)


def fit(
    X: ArrayLike,
    y: ArrayLike,
    kind: str,
    C: float,
    *,
    max_iter: int = 200,
    tol: float = 1e-6,
    class_weight: str | None = None,
    sample_weight: ArrayLike | None = None,
    n_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    dtype: torch.dtype | str = torch.float64,
    device: str | torch.device | None = None,
) -> LogisticProbe:
    """Fit one probe on ``X`` ``(n, d)``.

    ``y``: binary/multiclass ``(n,)`` class indices (binary: 1 = positive); multilabel ``(n, F)`` 0/1.
    Same objective and stopping rule as ``sklearn.linear_model.LogisticRegression(C=C, tol=tol)``
    on standardised features. ``class_weight``: None/"none" or "balanced" (scikit-learn's
    definition, per finding for multilabel); ``dtype``: feature precision, see the module docstring.
    ``converged`` is False only when ``max_iter`` ran out with the gradient still above ``tol``.
    """
    X3 = X[None] if isinstance(X, torch.Tensor) else np.asarray(X)[None]
    if X3.ndim != 3:
        raise ValueError(f"X must be (n, d), got shape {tuple(X3.shape[1:])}")
    return fit_layers(
        X3, y, kind, C, max_iter=max_iter, tol=tol, class_weight=class_weight, sample_weight=sample_weight,
        n_classes=n_classes, class_names=class_names, dtype=dtype, device=device,
    )[0]


PROBE_MODES = ("regularised", "adam", "sgd")


def _check_mode(mode: str) -> None:
    if mode not in PROBE_MODES:
        raise ValueError(f"probe.mode must be one of {list(PROBE_MODES)}, got {mode!r}")


def _settings(section: dict | None, defaults: dict, name: str) -> dict:
    unknown = set(section or {}) - set(defaults)
    if unknown:
        raise ValueError(f"probe.{name}: unknown key(s) {sorted(unknown)}; expected {sorted(defaults)}")
    return {**defaults, **(section or {})}


ADAM_DEFAULTS = {"epochs": 80, "lr": 1e-4, "batch_size": 512, "standardise": False}
SGD_DEFAULTS = {"alpha": 0.001, "max_iter": 10000, "class_weight": "balanced", "random_state": 1}


def fit_mode(
    mode: str,
    X: ArrayLike,
    y: ArrayLike,
    kind: str,
    *,
    C: float = math.inf,
    regularised: dict | None = None,
    adam: dict | None = None,
    sgd: dict | None = None,
    seed: int = 0,
    n_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    dtype: torch.dtype | str = torch.float64,
    device: str | torch.device | None = None,
) -> Any:
    """One probe of ``mode`` on ``X``: ``regularised`` at ``C`` (settings max_iter, tol, class_weight),
    ``adam`` (:func:`medprobe.paper_probes.fit_adam`, seeded by ``seed``) or ``sgd``."""
    _check_mode(mode)
    if mode == "adam":
        return fit_adam(X, y, kind, seed=seed, n_classes=n_classes, class_names=class_names, device=device,
                        **_settings(adam, ADAM_DEFAULTS, "adam"))
    if mode == "sgd":
        return fit_sgd(X, y, kind, n_classes=n_classes, class_names=class_names, **_settings(sgd, SGD_DEFAULTS, "sgd"))
    if not math.isfinite(C):
        raise ValueError(f"the regularised probe needs a finite C, got {C}")
    settings = regularised or {}
    return fit(X, y, kind, C, max_iter=settings.get("max_iter", 200), tol=settings.get("tol", 1e-6),
               class_weight=settings.get("class_weight"), n_classes=n_classes, class_names=class_names,
               dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------
# Validation metrics and C selection
# --------------------------------------------------------------------------------------------------


def log_loss(probe: LogisticProbe, X: ArrayLike, y: ArrayLike, *, class_weight: str | None = None) -> float:
    """Mean negative log-likelihood of ``y`` under the probe, computed from logits (no clipping).

    Binary/multiclass: mean over samples (as ``sklearn.metrics.log_loss``). Multilabel: the mean over
    findings of each finding's binary log-loss. With ``class_weight='balanced'`` every sample is
    weighted by the balanced weights of ``y`` itself, mirroring the training objective.
    """
    class_weight = _normalise_class_weight(class_weight)
    logits = probe.decision_function(X)
    n_outputs = probe.coef.shape[0] if probe.kind == "multiclass" else None
    targets = _prepare_targets(y, logits.shape[0], probe.kind, n_outputs, class_weight, None, torch.float64, logits.device)
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
    aucs = [
        roc_auc_score(indicator[:, k], scores[:, k])
        for k in range(indicator.shape[1])
        if 0 < indicator[:, k].sum() < indicator.shape[0]
    ]
    return float(np.mean(aucs)) if aucs else float("nan")


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


def _select(
    Z: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    targets: _Targets,
    X_val: ArrayLike,
    y_val: np.ndarray,
    grid: Sequence[float],
    *,
    refine: bool,
    refine_points: int,
    max_iter: int,
    tol: float,
    class_weight: str | None,
) -> _Selection:
    """C search on prepared training data (one layer). The grid's values are fitted together, sharing
    their passes over the features (:func:`_drive`); the refinement's values likewise, each warm-started
    from the fit at the nearest smaller grid value."""
    grid_values = _check_grid(grid)
    tried: dict[float, tuple[float, LogisticProbe]] = {}

    def evaluate(Cs: Sequence[float], init: LogisticProbe | None) -> None:
        problems = [(0, C, init) for C in Cs]
        for C, probe in zip(Cs, _fit_prepared(Z, mean, std, targets, problems, max_iter=max_iter, tol=tol)):
            tried[C] = (log_loss(probe, X_val, y_val, class_weight=class_weight), probe)

    def best_of(candidates: Sequence[float]) -> float:
        # Lowest validation log-loss; ties go to the smaller C (the more regularised model).
        return min(candidates, key=lambda c: (tried[c][0], c))

    evaluate([float(C) for C in grid_values], None)
    best = best_of([float(c) for c in grid_values])
    if refine and refine_points > 0 and grid_values.size > 1:
        position = int(np.searchsorted(grid_values, best))
        low = grid_values[max(position - 1, 0)]
        high = grid_values[min(position + 1, grid_values.size - 1)]
        fine = [float(C) for C in np.geomspace(low, high, refine_points + 2)[1:-1]]
        fine = [C for C in fine if not any(math.isclose(C, done, rel_tol=1e-9) for done in tried)]
        if fine:
            evaluate(fine, tried[float(low)][1])
        best = best_of(list(tried))
    loss, probe = tried[best]
    auc = macro_auc(y_val, probe.predict_proba(X_val), probe.kind)
    return _Selection(best, auc, loss, probe, [(c, tried[c][0]) for c in tried])


def select_C(
    X_train: ArrayLike,
    y_train: ArrayLike,
    X_val: ArrayLike,
    y_val: ArrayLike,
    kind: str,
    grid: Sequence[float],
    *,
    refine: bool = True,
    refine_points: int = 5,
    max_iter: int = 200,
    tol: float = 1e-6,
    class_weight: str | None = None,
    sample_weight: ArrayLike | None = None,
    n_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    dtype: torch.dtype | str = torch.float64,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Pick C by validation log-loss (lower is better) over the log ``grid``.

    With ``refine``, ``refine_points`` log-spaced values strictly between the best grid point's
    neighbours are tried as well. Returns ``(C, validation macro AUC at that C)``.
    """
    _check_kind(kind)
    class_weight = _normalise_class_weight(class_weight)
    dtype = _resolve_dtype(dtype)
    device = _resolve_device(X_train, device)
    X3 = X_train[None] if isinstance(X_train, torch.Tensor) else np.asarray(X_train)[None]
    Z, mean, std = _standardise(X3, dtype, device)
    targets = _prepare_targets(y_train, Z.shape[1], kind, n_classes, class_weight, sample_weight, _PARAM_DTYPE, device)
    _warn_absent(targets, class_names)
    y_val_np = y_val.cpu().numpy() if isinstance(y_val, torch.Tensor) else np.asarray(y_val)
    selection = _select(
        Z, mean, std, targets, X_val, y_val_np, grid, refine=refine, refine_points=refine_points,
        max_iter=max_iter, tol=tol, class_weight=class_weight,
    )
    return selection.C, selection.val_auc


# --------------------------------------------------------------------------------------------------
# Files: activations in, probes out
# --------------------------------------------------------------------------------------------------


def _decode_strings(values: Any) -> list[str]:
    if isinstance(values, (str, bytes)):
        values = [values]
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(values).tolist()]


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open_checked(activations_h5: str | os.PathLike, manifest_csv: str | os.PathLike):
    """Open the activations file, check it against the manifest, return (h5 file, manifest, layer names)."""
    manifest = load_manifest(manifest_csv)
    handle = h5py.File(activations_h5, "r")
    try:
        for key in ("ids", "activations"):
            if key not in handle:
                raise ValueError(f"activations file {activations_h5}: missing dataset {key!r}")
        ids = _decode_strings(handle["ids"][:])
        if ids != manifest["image_id"].tolist():
            mismatch = next(
                (i for i, (a, b) in enumerate(zip(ids, manifest["image_id"])) if a != b),
                min(len(ids), len(manifest)),
            )
            raise ValueError(
                f"activations file {activations_h5} ids do not match manifest {manifest_csv} image_id "
                f"({len(ids)} vs {len(manifest)} rows; first difference at row {mismatch})"
            )
        stored_hash = handle.attrs.get("manifest_sha256")
        stored_hash = _decode_strings(stored_hash)[0] if stored_hash is not None else None
        actual_hash = _sha256(manifest_csv)
        if stored_hash != actual_hash:
            raise ValueError(
                f"activations file {activations_h5} was extracted from a different manifest: its "
                f"manifest_sha256 is {stored_hash!r} but {manifest_csv} hashes to {actual_hash!r}"
            )
        shape = handle["activations"].shape
        if "layer_names" not in handle.attrs:
            raise ValueError(f"activations file {activations_h5}: missing attribute 'layer_names'")
        layer_names = _decode_strings(handle.attrs["layer_names"])
        if len(shape) != 3 or shape[0] != len(ids) or shape[1] != len(layer_names):
            raise ValueError(
                f"activations file {activations_h5}: 'activations' has shape {shape}, expected "
                f"({len(ids)}, {len(layer_names)}, D) for {len(layer_names)} layer_names"
            )
        if "embeddings" in handle:
            if handle["embeddings"].shape[0] != len(ids):
                raise ValueError(f"activations file {activations_h5}: 'embeddings' has {handle['embeddings'].shape[0]} rows, ids {len(ids)}")
            layer_names = layer_names + [EMBEDDINGS_LAYER]
    except BaseException:
        handle.close()
        raise
    return handle, manifest, layer_names


def _read_layer(handle: h5py.File, layer_names: list[str], name: str) -> np.ndarray:
    """One layer's features (N, D) — never the whole activations array."""
    if name == EMBEDDINGS_LAYER and "embeddings" in handle:
        return handle["embeddings"][:]
    return handle["activations"][:, layer_names.index(name), :]


def _split_masks(manifest, manifest_csv: Any, need_val: bool = True) -> dict[str, np.ndarray]:
    masks = {split: (manifest["split"] == split).to_numpy() for split in ("train", "val", "test")}
    for split in ("train", "val", "test") if need_val else ("train", "test"):
        if not masks[split].any():
            raise ValueError(f"manifest {manifest_csv} has no rows with split == {split!r}")
    return masks


def _atomic_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _write_strings(group: h5py.Group, name: str, values: Sequence[str]) -> None:
    group.create_dataset(name, data=np.array(list(values), dtype=object), dtype=h5py.string_dtype("utf-8"))


def _json_number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _n_outputs(kind: str, classes: Sequence[str]) -> int | None:
    return len(classes) if kind != "binary" else None


def _proba_log_loss(y: np.ndarray, probabilities: np.ndarray, kind: str) -> float:
    """Mean negative log-likelihood from probabilities (binary/multiclass; multilabel: mean over findings)."""
    eps = np.finfo(np.float64).eps
    p = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1 - eps)
    if kind == "multilabel":
        y = np.asarray(y, dtype=np.float64)
        return float(np.mean(-(y * np.log(p) + (1 - y) * np.log1p(-p))))
    return float(np.mean(-np.log(p[np.arange(len(y)), np.asarray(y, dtype=np.int64)])))


@dataclass
class _LayerResult:
    """One layer's probe: what chose it on validation and the probe that predicts the test split."""

    C: float
    val_score: float
    val_log_loss: float
    table: list[tuple[float, float]]
    final: Any


def _probe_layer(
    X: dict[str, np.ndarray], y: dict[str, np.ndarray], kind: str, n_classes: int | None, classes: list[str], *,
    mode: str, need_val: bool, refit: bool, grid: np.ndarray, refine: bool, regularised: dict, adam: dict | None,
    sgd: dict | None, seed: int, dtype: torch.dtype, device: torch.device, warn_absent: bool = False,
) -> _LayerResult:
    """Fit one layer: ``X``/``y`` hold the ``train``, ``val``, ``test`` and ``fit`` (the final probe's) rows."""
    if mode == "regularised":
        Z, mean, std = _standardise(X["train"][None], dtype, device)
        targets = _prepare_targets(y["train"], Z.shape[1], kind, n_classes, regularised["class_weight"], None,
                                   _PARAM_DTYPE, device)
        selection = _select(Z, mean, std, targets, X["val"], y["val"], grid, refine=refine, refine_points=5,
                            max_iter=regularised["max_iter"], tol=regularised["tol"],
                            class_weight=regularised["class_weight"])
        del Z
        if warn_absent:
            _warn_absent(targets, classes)
        final = selection.probe
        if refit:
            final = fit_mode("regularised", X["fit"], y["fit"], kind, C=selection.C, regularised=regularised,
                             n_classes=n_classes, class_names=classes, dtype=dtype, device=device)
        return _LayerResult(selection.C, selection.val_auc, selection.val_log_loss, selection.table, final)
    options = dict(adam=adam, sgd=sgd, seed=seed, n_classes=n_classes, class_names=classes, dtype=dtype, device=device)
    val_score = val_loss = math.nan
    if need_val:
        trial = fit_mode(mode, X["train"], y["train"], kind, **options)
        val_probabilities = trial.predict_proba(X["val"])
        val_score = macro_auc(y["val"], val_probabilities, kind)
        val_loss = _proba_log_loss(y["val"], val_probabilities, kind)
    return _LayerResult(math.inf, val_score, val_loss, [], fit_mode(mode, X["fit"], y["fit"], kind, **options))


def _validation_layer(per_layer: list[dict], layer_names: list[str], source: Any) -> tuple[str | None, str | None]:
    """The best validation macro AUC (ties -> the shallower layer); by log-loss when no AUC is defined."""
    val_scores = np.array([np.nan if r["val_score"] is None else r["val_score"] for r in per_layer])
    if np.isfinite(val_scores).any():
        return layer_names[int(np.argmax(np.where(np.isfinite(val_scores), val_scores, -np.inf)))], None
    losses = np.array([np.inf if r["val_log_loss"] is None else r["val_log_loss"] for r in per_layer])
    if not np.isfinite(losses).any():
        return None, None  # nothing was scored on validation (fixed layer, adam/sgd)
    note = ("validation macro AUC undefined on every layer (a class lacks val positives or negatives); "
            "selected by validation log-loss")
    logger.warning("%s: %s", source, note)
    return layer_names[int(np.argmin(losses))], note


def probe_task(
    activations_h5: str | os.PathLike,
    manifest_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    kind: str,
    classes: Sequence[str] | str,
    C_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0),
    refine: bool = True,
    max_iter: int = 200,
    tol: float = 1e-6,
    class_weight: str | None = None,
    layer: int | str = "validation",
    seed: int = 0,
    dtype: torch.dtype | str = torch.float64,
    device: str | torch.device | None = None,
    mode: str = "regularised",
    refit: bool = False,
    adam: dict | None = None,
    sgd: dict | None = None,
    min_test_positives: int = 0,
    protocol: str | None = None,
) -> dict:
    """Probe every layer of an activations file and write ``layers.h5``, ``predictions.h5`` and
    ``probe.json`` into ``out_dir`` (contract: docs/architecture.md, "Probes").

    ``mode="regularised"``: per layer (read one at a time) C is selected on the val split by a probe fitted
    on train; that probe predicts the test split, or with ``refit`` a probe refitted at that C on train + val.
    ``mode="adam"`` / ``"sgd"`` (the authors' probes, :mod:`medprobe.paper_probes`): each layer's probe is
    trained on every non-test row (train + val); with ``layer="validation"`` a second probe per layer, on
    train alone, scores the val split to choose the layer. The headline layer is the best validation macro
    AUC (ties go to the shallower layer) when ``layer == "validation"``, otherwise the fixed layer (``i`` or
    ``hidden.i``, ``image_embeds``, ``authors:k``; :func:`medprobe.layers.resolve_layer`). ``classes`` may be
    ``"all"`` (multilabel), and ``min_test_positives`` keeps findings with more test positives
    (:func:`medprobe.labels.task_targets`). Returns the probe.json content.
    """
    _check_kind(kind)
    _check_mode(mode)
    task = {"kind": kind, "classes": classes if classes == "all" else [str(c) for c in classes],
            "min_test_positives": min_test_positives}
    regularised = {"max_iter": max_iter, "tol": tol, "class_weight": _normalise_class_weight(class_weight)}
    grid = _check_grid(C_grid)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved_dtype = _resolve_dtype(dtype)
    target_device = torch.device(device) if device is not None else torch.device("cpu")

    handle, manifest, layer_names = _open_checked(activations_h5, manifest_csv)
    with handle:
        num_hidden_states = handle.attrs.get("num_hidden_states")
        fixed_layer = None if layer == "validation" else resolve_layer(
            layer, layer_names, os.fspath(activations_h5), num_hidden_states)
        targets_all, classes, dropped = task_targets(manifest, task, os.fspath(manifest_csv))
        if dropped:
            logger.info("%d finding(s) with at most %d positive test images left out: %s", len(dropped),
                        min_test_positives, dropped)
        masks = _split_masks(manifest, manifest_csv)
        masks["fit"] = masks["train"] | masks["val"] if (mode != "regularised" or refit) else masks["train"]
        need_val = mode == "regularised" or fixed_layer is None
        ids_test = manifest["image_id"][masks["test"]].tolist()
        y = {split: targets_all[mask] for split, mask in masks.items()}
        test_probabilities = np.empty((len(layer_names), len(ids_test), len(classes)), dtype=np.float32)
        per_layer: list[dict] = []
        for index, name in enumerate(layer_names):
            features = _read_layer(handle, layer_names, name)
            check_finite(features, manifest["image_id"].tolist(), f"{activations_h5} layer {name}", "activations")
            X = {split: features[mask] for split, mask in masks.items()}
            del features
            result = _probe_layer(
                X, y, kind, _n_outputs(kind, classes), classes, mode=mode, need_val=need_val, refit=refit,
                grid=grid, refine=refine, regularised=regularised, adam=adam, sgd=sgd, seed=seed,
                dtype=resolved_dtype, device=target_device, warn_absent=index == 0,
            )
            test_probabilities[index] = result.final.predict_proba(X["test"])
            per_layer.append({
                "name": name,
                "C": _json_number(result.C),
                "val_score": _json_number(result.val_score),
                "val_log_loss": _json_number(result.val_log_loss),
                "n_iter": int(result.final.n_iter),
                "converged": bool(result.final.converged),
                "C_tried": [[c, _json_number(v)] for c, v in result.table],
            })
            logger.info("layer %s: C=%g val macro AUC=%.4f", name, result.C, result.val_score)
        absent = [classes[k] for k in result.final.absent_classes]

    validation_layer, note = _validation_layer(per_layer, layer_names, activations_h5)
    selected = fixed_layer if fixed_layer is not None else validation_layer
    selected_index = layer_names.index(selected)
    selected_C = per_layer[selected_index]["C"]
    val_scores = np.array([np.nan if r["val_score"] is None else r["val_score"] for r in per_layer])

    with h5py.File(tmp := _atomic_path(out_dir / "layers.h5"), "w") as out:
        _write_strings(out, "ids", ids_test)
        out.create_dataset("probabilities", data=test_probabilities, dtype=np.float32)
        out.create_dataset("val_score", data=val_scores.astype(np.float64))
        out.create_dataset("C", data=np.array([np.inf if r["C"] is None else r["C"] for r in per_layer], dtype=np.float64))
        out.attrs["layer_names"] = layer_names
        out.attrs["classes"] = classes
        out.attrs["kind"] = kind
        if num_hidden_states is not None:
            out.attrs["num_hidden_states"] = int(num_hidden_states)
    os.replace(tmp, out_dir / "layers.h5")

    with h5py.File(tmp := _atomic_path(out_dir / "predictions.h5"), "w") as out:
        _write_strings(out, "ids", ids_test)
        out.create_dataset("probabilities", data=test_probabilities[selected_index], dtype=np.float32)
        out.attrs["classes"] = classes
        out.attrs["layer"] = selected
        out.attrs["kind"] = kind
        out.attrs["C"] = np.inf if selected_C is None else float(selected_C)
    os.replace(tmp, out_dir / "predictions.h5")

    settings = {
        "mode": mode,
        "seed": int(seed),
        "dtype": str(resolved_dtype).replace("torch.", ""),
        "min_test_positives": int(min_test_positives),
    }
    if mode == "regularised":
        settings.update({"C_grid": [float(c) for c in grid], "refine": bool(refine), "refit": bool(refit),
                         "max_iter": int(max_iter), "tol": float(tol), "class_weight": class_weight or "none"})
    else:
        settings[mode] = _settings(adam if mode == "adam" else sgd, ADAM_DEFAULTS if mode == "adam" else SGD_DEFAULTS, mode)
    result = {
        "layer": selected,
        "selection": "fixed" if fixed_layer is not None else "validation",
        "requested_layer": layer if isinstance(layer, str) else int(layer),
        "validation_layer": validation_layer,
        "C": selected_C,
        "val_score": per_layer[selected_index]["val_score"],
        "val_metric": "macro_auc",
        "protocol": protocol,
        "kind": kind,
        "classes": classes,
        "dropped_classes": dropped,
        "layers": per_layer,
        "n_train": int(masks["fit"].sum()),
        "n_val": int(masks["val"].sum()),
        "n_test": int(masks["test"].sum()),
        "fit_rows": "train+val" if (mode != "regularised" or refit) else "train",
        "absent_train_classes": absent,
        "activations": os.fspath(activations_h5),
        "manifest": os.fspath(manifest_csv),
        "manifest_sha256": _sha256(manifest_csv),
        "settings": settings,
    }
    if note:
        result["note"] = note
    tmp = _atomic_path(out_dir / "probe.json")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out_dir / "probe.json")
    return result


# --------------------------------------------------------------------------------------------------
# Label efficiency
# --------------------------------------------------------------------------------------------------


def nested_subsets(
    patient_ids: Sequence[str] | np.ndarray,
    strata: Sequence[Any] | np.ndarray,
    fractions: Sequence[float],
    seed: int,
) -> list[np.ndarray]:
    """Nested, patient-grouped, stratified training subsets.

    ``patient_ids`` and ``strata`` are per sample; a patient's stratum is its most frequent value
    (ties -> the smallest). Returns one boolean sample mask per fraction (in the given order) that
    keeps ``round(f * n_patients)`` whole patients, at least one patient per stratum (so tiny fractions
    may exceed ``f``). A larger fraction's subset always contains a smaller one's: patients are put in
    one random order (interleaved across strata so that every prefix is stratified) and each fraction
    takes a prefix. Deterministic given ``seed``.
    """
    patient_ids = np.asarray(patient_ids).astype(str)
    strata = np.asarray(strata)
    if patient_ids.ndim != 1 or strata.shape != patient_ids.shape:
        raise ValueError(f"patient_ids and strata must be 1-d of equal length, got {patient_ids.shape} and {strata.shape}")
    fractions_arr = np.asarray(list(fractions), dtype=np.float64)
    if fractions_arr.ndim != 1 or fractions_arr.size == 0 or np.any(~(fractions_arr > 0)) or np.any(fractions_arr > 1):
        raise ValueError(f"fractions must be in (0, 1], got {list(fractions)!r}")
    if patient_ids.size == 0:
        return [np.zeros(0, dtype=bool) for _ in fractions_arr]

    patients, patient_of_sample = np.unique(patient_ids, return_inverse=True)
    _, stratum_of_sample = np.unique(strata.astype(str), return_inverse=True)
    counts = np.zeros((patients.size, stratum_of_sample.max() + 1), dtype=np.int64)
    np.add.at(counts, (patient_of_sample, stratum_of_sample), 1)
    patient_stratum = counts.argmax(axis=1)  # first maximum: ties -> smallest stratum

    rng = np.random.default_rng(seed)
    # Systematic stratified ordering: the r-th of n_s shuffled patients of a stratum gets the key
    # (r + u) / n_s, so sorting by key interleaves strata in proportion at every prefix length.
    key = np.empty(patients.size)
    leads_stratum = np.zeros(patients.size, dtype=bool)
    present_strata = np.unique(patient_stratum)
    for stratum in present_strata:
        members = rng.permutation(np.flatnonzero(patient_stratum == stratum))
        key[members] = (np.arange(members.size) + rng.random(members.size)) / members.size
        leads_stratum[members[0]] = True
    # One patient of every stratum first, so even the smallest subset represents every stratum.
    order = np.lexsort((key, ~leads_stratum))

    masks = []
    for fraction in fractions_arr:
        n_keep = patients.size if fraction >= 1 else int(np.floor(fraction * patients.size + 0.5))
        n_keep = min(patients.size, max(n_keep, present_strata.size, 1))
        keep_patient = np.zeros(patients.size, dtype=bool)
        keep_patient[order[:n_keep]] = True
        masks.append(keep_patient[patient_of_sample])
    return masks


def _efficiency_strata(targets: np.ndarray, kind: str) -> np.ndarray:
    """Per-sample stratum: the class index; for multilabel the rarest finding present (-1 = none),
    so that patients carrying rare findings are spread over the subsets."""
    if kind != "multilabel":
        return targets
    prevalence = targets.sum(0).astype(np.float64)
    rarity = np.where(targets > 0, prevalence[None, :], np.inf)
    return np.where(targets.any(1), rarity.argmin(1), -1)


def image_subsets(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """The authors' subsets: ``np.random.seed(seed); np.random.choice(n, int(f * n), replace=False)`` per
    fraction, as boolean masks over the ``n`` training images (image-level, not nested, no stratification)."""
    masks = []
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"fractions must be in (0, 1], got {fraction!r}")
        if int(fraction * n) == 0:
            raise ValueError(f"efficiency fraction {fraction:g} of {n} training images is int({fraction:g} * {n}) = 0 "
                             "images; raise the smallest of efficiency.fractions")
        chosen = np.random.RandomState(seed).choice(n, int(fraction * n), replace=False)
        mask = np.zeros(n, dtype=bool)
        mask[chosen] = True
        masks.append(mask)
    return masks


def efficiency_seeds(seeds: int | Sequence[int], seed: int) -> list[int]:
    """``efficiency.seeds`` as a list: a count n means ``seed, ..., seed + n - 1``; a list is taken as it is."""
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        return [int(seed) + offset for offset in range(int(seeds))]
    return [int(s) for s in seeds]


def efficiency_task(
    activations_h5: str | os.PathLike,
    manifest_csv: str | os.PathLike,
    probe_json: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    kind: str,
    classes: Sequence[str] | str,
    fractions: Sequence[float],
    seeds: int | Sequence[int],
    max_iter: int = 200,
    tol: float = 1e-6,
    class_weight: str | None = None,
    dtype: torch.dtype | str = torch.float64,
    device: str | torch.device | None = None,
    mode: str = "regularised",
    refit: bool = False,
    adam: dict | None = None,
    sgd: dict | None = None,
    sampling: str = "patients",
    seed: int = 0,
    min_test_positives: int = 0,
) -> dict:
    """Label-efficiency sweep at probe.json's selected layer (and C); writes ``efficiency.h5``.

    The pool is the rows the headline probe was trained on (train, or train + val for ``refit`` and the
    adam/sgd probes). For every subset seed, ``sampling="patients"`` draws nested patient subsets
    (:func:`nested_subsets`, stratified by each patient's majority class); ``"images"`` the authors'
    image-level subsets (:func:`image_subsets`). A probe of ``mode`` is refitted on each and predicts the test
    split; the adam probe keeps ``seed`` (the headline probe's), so fraction 1.0 reproduces the headline
    probe. ``seeds`` is a list of seeds or a count (``n`` -> ``0..n-1``). Classes missing from a subset are
    logged and recorded in the ``missing_classes`` attribute (JSON). Returns a summary.
    """
    _check_kind(kind)
    _check_mode(mode)
    if sampling not in ("patients", "images"):
        raise ValueError(f"efficiency.sampling must be 'patients' or 'images', got {sampling!r}")
    seed_list = efficiency_seeds(seeds, 0)
    if not seed_list:
        raise ValueError("seeds must name at least one seed")
    fraction_list = [float(f) for f in fractions]
    probe_info = json.loads(Path(probe_json).read_text())
    for key in ("layer", "C"):
        if key not in probe_info:
            raise ValueError(f"probe file {probe_json} lacks key {key!r}")
    C = math.inf if probe_info["C"] is None else float(probe_info["C"])
    if mode == "regularised" and not math.isfinite(C):
        raise ValueError(f"probe file {probe_json} has no finite C (written by the adam or sgd probe?) but probe.mode "
                         f"is {mode!r}")
    task = {"kind": kind, "classes": classes if classes == "all" else [str(c) for c in classes],
            "min_test_positives": min_test_positives}

    handle, manifest, layer_names = _open_checked(activations_h5, manifest_csv)
    with handle:
        layer = resolve_layer(probe_info["layer"], layer_names, os.fspath(activations_h5),
                              handle.attrs.get("num_hidden_states"))
        features = _read_layer(handle, layer_names, layer)
        check_finite(features, manifest["image_id"].tolist(), f"{activations_h5} layer {layer}", "activations")
    targets, classes, _ = task_targets(manifest, task, os.fspath(manifest_csv))
    masks = _split_masks(manifest, manifest_csv, need_val=False)
    pool = masks["train"] | masks["val"] if (mode != "regularised" or refit) else masks["train"]
    train_rows = np.flatnonzero(pool)
    X_train, y_train = features[train_rows], targets[train_rows]
    X_test = features[masks["test"]]
    ids_test = manifest["image_id"][masks["test"]].tolist()
    del features

    # A sample without patient_id is its own patient.
    patients = manifest["patient_id"].to_numpy()[train_rows].astype(object)
    no_patient = patients == ""
    patients[no_patient] = ["\x00image:" + i for i in manifest["image_id"].to_numpy()[train_rows][no_patient]]
    strata = _efficiency_strata(y_train, kind)
    present_in_train = set(np.flatnonzero(y_train.sum(0) > 0) if kind == "multilabel" else np.unique(y_train))
    regularised = {"max_iter": max_iter, "tol": tol, "class_weight": _normalise_class_weight(class_weight)}

    probabilities = np.empty((len(fraction_list), len(seed_list), len(ids_test), len(classes)), dtype=np.float32)
    n_train = np.zeros((len(fraction_list), len(seed_list)), dtype=np.int64)
    missing: dict[str, list[str]] = {}
    cache: dict[bytes, np.ndarray] = {}  # identical subsets (e.g. fraction 1.0) are fitted once
    for s, subset_seed in enumerate(seed_list):
        if sampling == "patients":
            subsets = nested_subsets(patients, strata, fraction_list, subset_seed)
        else:
            subsets = image_subsets(len(train_rows), fraction_list, subset_seed)
        for f, subset in enumerate(subsets):
            n_train[f, s] = int(subset.sum())
            y_subset = y_train[subset]
            present = set(np.flatnonzero(y_subset.sum(0) > 0) if kind == "multilabel" else np.unique(y_subset))
            lost = sorted(present_in_train - present)
            if lost:
                names = [classes[k] for k in lost]
                missing[f"fraction={fraction_list[f]:g},seed={subset_seed}"] = names
                logger.warning("efficiency subset fraction=%g seed=%d has no sample of %s", fraction_list[f],
                               subset_seed, names)
            key = np.packbits(subset).tobytes()
            if key not in cache:
                probe = fit_mode(
                    mode, X_train[subset], y_subset, kind, C=C, regularised=regularised, adam=adam, sgd=sgd,
                    seed=seed, n_classes=_n_outputs(kind, classes), class_names=classes, dtype=dtype, device=device,
                )
                cache[key] = probe.predict_proba(X_test).astype(np.float32)
            probabilities[f, s] = cache[key]

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(tmp := _atomic_path(out_path), "w") as out:
        out.create_dataset("probabilities", data=probabilities, dtype=np.float32)
        out.create_dataset("n_train", data=n_train)
        _write_strings(out, "ids", ids_test)
        out.attrs["fractions"] = np.asarray(fraction_list, dtype=np.float64)
        out.attrs["seeds"] = np.asarray(seed_list, dtype=np.int64)
        out.attrs["classes"] = classes
        out.attrs["kind"] = kind
        out.attrs["layer"] = layer
        out.attrs["C"] = C
        out.attrs["sampling"] = sampling
        out.attrs["missing_classes"] = json.dumps(missing)
    os.replace(tmp, out_path)
    return {"layer": layer, "C": C, "fractions": fraction_list, "seeds": seed_list, "n_train": n_train.tolist(),
            "sampling": sampling, "missing_classes": missing}

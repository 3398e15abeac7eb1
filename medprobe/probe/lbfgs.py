"""The solver: full-batch L-BFGS written for the probe objective, several problems in lockstep.

The logits are carried along with the parameters, so the line search (strong Wolfe, safeguarded Newton
steps on the convex 1-D function) costs O(n K) per trial and every iteration costs exactly two passes over
the features: ``X D`` for the new direction and ``G X`` for the gradient at the accepted step. Several
problems (the C values of a search, the layers of :func:`medprobe.probe.fit_layers`) run in one lockstep
solve, each with its own L-BFGS state, line search and stopping rule (a single block-diagonal run would
keep every problem iterating until the slowest converged); the products of the problems on the same
layer are stacked into one (:func:`_drive`, docs/benchmarks.md, "Probes").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from medprobe.probe.problem import _PARAM_DTYPE, _Targets

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


_Pairs = list[tuple[torch.Tensor, torch.Tensor, float]]  # (s, y, 1 / y.s), oldest first


def _two_loop(grad: torch.Tensor, pairs: _Pairs) -> torch.Tensor:
    """The two-loop recursion: ``-H grad`` with ``H`` the L-BFGS inverse-Hessian estimate from ``pairs``."""
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
    return q.neg_()


def _remember(pairs: _Pairs, s: torch.Tensor, y: torch.Tensor) -> None:
    """Keep the newest curvature pair (skipped when ``y.s`` is not clearly positive), at most _HISTORY_SIZE."""
    ys = float(y @ s)
    if ys > 1e-10:
        pairs.append((s, y, 1.0 / ys))
        if len(pairs) > _HISTORY_SIZE:
            pairs.pop(0)


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
    pairs: _Pairs = []
    n_iter, budget_spent = 0, False
    while float(grad.abs().max()) > tol:
        if n_iter >= max_iter:
            budget_spent = True
            break
        direction = _two_loop(grad, pairs)
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
        _remember(pairs, s, y)
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

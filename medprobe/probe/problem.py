"""One probing problem made ready for the solver: targets and weights, standardised features, a start.

Parameters, targets, loss and residuals are always float64 (``_PARAM_DTYPE``); only the standardised
features may be float32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medprobe.labels import KINDS

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

_PARAM_DTYPE = torch.float64
# Rows per block when standardising: a float64 block of 256 x 4096 features (8 MB) stays in cache.
_STATS_BLOCK = 256


@dataclass(frozen=True)
class FitOptions:
    """How the regularised probe is fitted: the keyword arguments of :func:`~medprobe.probe.fit`,
    :func:`~medprobe.probe.fit_layers` and :func:`~medprobe.probe.select_C`.

    ``class_weight``: None/"none" or "balanced" (scikit-learn's definition, per finding for multilabel);
    ``sample_weight``: ``(n,)``, non-negative; ``n_classes`` is needed for multiclass tasks whose training
    labels miss the last class(es); ``class_names`` only make warnings readable; ``dtype``: feature precision
    (:mod:`medprobe.probe.solver`); ``device``: where to solve (None: the device of the features, CPU for numpy).
    """

    max_iter: int = 200
    tol: float = 1e-6
    class_weight: str | None = None
    sample_weight: ArrayLike | None = None
    n_classes: int | None = None
    class_names: Sequence[str] | None = None
    dtype: torch.dtype | str = torch.float64
    device: str | torch.device | None = None

    def __post_init__(self) -> None:
        if self.max_iter < 0 or not self.tol > 0:
            raise ValueError(f"max_iter must be >= 0 and tol > 0, got max_iter={self.max_iter}, tol={self.tol}")


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


@dataclass
class _Problem:
    """Standardised training features ``Z`` (L, n, d) with their float64 ``mean`` and ``std`` (L, d), and
    the targets: what the solver needs of a training set."""

    Z: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    targets: _Targets


def _prepare(X: ArrayLike, y: ArrayLike, kind: str, options: FitOptions) -> _Problem:
    """The problem of fitting ``y`` on the features ``X`` (L, n, d) with ``options``, every argument checked."""
    _check_kind(kind)
    class_weight = _normalise_class_weight(options.class_weight)
    dtype = _resolve_dtype(options.dtype)
    device = _resolve_device(X, options.device)
    Z, mean, std = _standardise(X, dtype, device)
    targets = _prepare_targets(
        y, Z.shape[1], kind, options.n_classes, class_weight, options.sample_weight, _PARAM_DTYPE, device
    )
    return _Problem(Z, mean, std, targets)


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
    base = _base_weights(sample_weight, n_samples, dtype, device)
    if kind in ("binary", "multiclass"):
        return _class_targets(y_np, kind, n_classes, class_weight, base)
    return _multilabel_targets(y_np, n_classes, class_weight, base)


def _base_weights(
    sample_weight: ArrayLike | None, n_samples: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    if sample_weight is None:
        return torch.ones(n_samples, dtype=dtype, device=device)
    base = torch.as_tensor(np.asarray(sample_weight, dtype=np.float64), device=device).to(dtype)
    if base.shape != (n_samples,) or bool((base < 0).any()):
        raise ValueError(f"sample_weight must be (n,) = ({n_samples},) and non-negative")
    return base


def _class_targets(
    y_np: np.ndarray, kind: str, n_classes: int | None, class_weight: str | None, base: torch.Tensor
) -> _Targets:
    """Binary or multiclass targets from class indices, in the dtype and on the device of the ``base`` weights."""
    dtype, device = base.dtype, base.device
    if y_np.ndim != 1 or not np.issubdtype(y_np.dtype, np.integer):
        raise ValueError(f"{kind} y must be a 1-d integer array of class indices, got {y_np.dtype} {y_np.shape}")
    K = 2 if kind == "binary" else (int(y_np.max()) + 1 if n_classes is None else int(n_classes))
    if kind == "binary" and n_classes not in (None, 2):
        raise ValueError(f"binary task has 2 classes, got n_classes={n_classes}")
    if y_np.size and (y_np.min() < 0 or y_np.max() >= K):
        raise ValueError(
            f"{kind} y holds class indices outside [0, {K - 1}]: {sorted(set(y_np.tolist()) - set(range(K)))[:10]}"
        )
    labels = torch.as_tensor(y_np.astype(np.int64), device=device)
    counts = torch.zeros(K, dtype=dtype, device=device).index_add_(0, labels, base)
    absent = tuple(int(k) for k in torch.nonzero(counts == 0).flatten().tolist())
    weights = base * _balanced_factors(counts)[labels] if class_weight == "balanced" else base
    if kind == "multiclass":
        return _Targets(kind, K, labels, weights, weights.sum(), absent)
    values = (labels == 1).to(dtype)[:, None]
    return _Targets(kind, 1, values, weights[:, None], weights.sum()[None], absent)


def _multilabel_targets(
    y_np: np.ndarray, n_classes: int | None, class_weight: str | None, base: torch.Tensor
) -> _Targets:
    """Multilabel targets from an ``(n, F)`` 0/1 array: one binary problem per finding (dtype and device of
    ``base``)."""
    if y_np.ndim != 2 or not np.isin(y_np, (0, 1)).all():
        raise ValueError(f"multilabel y must be an (n, F) array of 0/1, got {y_np.dtype} {y_np.shape}")
    values = torch.as_tensor(y_np.astype(np.float64), device=base.device).to(base.dtype)
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
    return _Targets("multilabel", values.shape[1], values, weights, weights.sum(0), absent)


def _standardise(
    X: ArrayLike, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _initial_parameters(
    targets: _Targets, L: int, d: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero weights ``(L, K, d)`` and intercepts ``(L, K)`` at the smoothed log prior odds (saves iterations).

    Multiclass intercepts are centred: the softmax gradient never changes their sum, so centring puts
    the solution in scikit-learn's (zero-initialised) parametrisation.
    """
    W = torch.zeros(L, targets.n_outputs, d, dtype=dtype, device=device)
    if targets.kind == "multiclass":
        counts = torch.zeros(targets.n_outputs, dtype=dtype, device=device).index_add_(
            0, targets.values, targets.weights
        )
        b = torch.log((counts + 0.5) / (counts.sum() + 0.5 * targets.n_outputs))
        b = b - b.mean()
    else:
        positives = (targets.weights * targets.values).sum(0)
        b = torch.log((positives + 0.5) / (targets.weight_sum - positives + 0.5))
    return W, b.expand(L, -1).clone()


def _warn_absent(kind: str, absent: Sequence[int], class_names: Sequence[str] | None) -> None:
    """Log the classes (multilabel: findings) of ``absent`` that the training labels lack."""
    if not absent:
        return
    names = [class_names[k] if class_names is not None else str(k) for k in absent]
    if kind == "multilabel":
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

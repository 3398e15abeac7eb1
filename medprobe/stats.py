"""Classification metrics, a vectorised (patient-clustered) bootstrap and paired model comparisons.

Everything here is numpy/scipy. The bootstrap is the expensive part of evaluation (1000 replicates for every
model x task x layer x fraction), so it never loops over replicates in Python: a block of resamples is turned
into a matrix of per-sample *counts* (how often each test sample was drawn in each replicate) and every
metric is written as a weighted sum over the test set. For AUC and AUPRC the samples are sorted by score once
per class; a replicate then only needs cumulative sums of its counts in that order. F1, balanced accuracy and
quadratic kappa come from count-weighted confusion matrices, i.e. one matrix product per block.

Conventions (each mirrors scikit-learn, see the tests):

- AUC is the Mann-Whitney statistic with midranks (ties count 1/2), identical to ``roc_auc_score``; it is
  undefined (NaN) when the (re)sample has no positives or no negatives of the class.
- AUPRC is ``average_precision_score`` (step-wise, not trapezoidal); undefined (NaN) without positives.
- F1 follows ``f1_score(zero_division=0)``: 0 when ``tp + fp + fn == 0``. Such a (re)sample is still counted
  in ``n_degenerate`` because the 0 is a convention, not a measurement.
- Macro means skip the classes whose metric is undefined in that (re)sample (for F1: classes that are neither
  present nor predicted, which is what ``f1_score(average="macro")`` does with its default labels, those in
  the truth or the predictions).
- Binary tasks: AUC and AUPRC are those of the positive class (second column), and their ``macro`` rows repeat
  it. F1 is scored for both classes and ``macro`` F1 is their mean, ``f1_score(average="macro")`` as in the
  paper; the positive class's F1 is kept as ``macro`` ``f1_positive``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as scipy_stats

KINDS = ("binary", "multiclass", "multilabel")

# Elements of the (replicates x samples) count matrix processed at once: large enough that numpy's per-call
# overhead vanishes, small enough (8 MiB of float64) to stay in cache and keep memory flat for big test sets.
_BLOCK_ELEMENTS = 1 << 20


# --------------------------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------------------------

def bootstrap_indices(n: int, n_boot: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Bootstrap resample indices, shape ``(n_boot, n)``, dtype int64.

    Without ``groups`` every row is ``n`` draws with replacement from ``range(n)``.

    With ``groups`` (one patient id per sample, any dtype) the bootstrap is clustered: each replicate draws
    patients with replacement and takes all rows of each drawn patient (in their original order), until at
    least ``n`` rows are collected; the row is then cut to exactly ``n`` entries. Every drawn patient is
    therefore whole except possibly the last one of each replicate, which is truncated so that all
    replicates share one fixed shape (this keeps the metric code vectorised). Samples whose group is missing
    (None, NaN or the empty string) are treated as patients of their own.

    The result depends only on ``(n, n_boot, seed, groups)``: scoring two models with the same arguments
    gives them the very same resamples, which is what makes paired comparisons valid.
    """
    n, n_boot = _positive_int(n, "n"), _positive_int(n_boot, "n_boot")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer so that resamples are reproducible; got {seed!r}")
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.integers(0, n, size=(n_boot, n), dtype=np.int64)

    codes = _group_codes(groups, n)
    n_clusters = int(codes.max()) + 1
    rows_by_cluster = np.argsort(codes, kind="stable")  # rows of cluster k are contiguous, in original order
    sizes = np.bincount(codes, minlength=n_clusters)
    cluster_start = np.concatenate(([0], np.cumsum(sizes)[:-1]))

    # Draw clusters in blocks until every replicate has collected n rows; the RNG stream (and so the result)
    # is a deterministic function of the seed.
    block = int(np.ceil(1.2 * n_clusters)) + 8
    draws = rng.integers(0, n_clusters, size=(n_boot, block))
    while (sizes[draws].sum(axis=1) < n).any():
        draws = np.concatenate([draws, rng.integers(0, n_clusters, size=(n_boot, block))], axis=1)

    # Expand draws into rows: each draw contributes its cluster's rows, the draw that crosses n rows is cut
    # and later draws contribute none. Over the flattened (n_boot * n) output, a marker at the first position
    # of every contributing draw and a cumulative sum tell each position its draw: no loop over replicates.
    ends = np.minimum(np.cumsum(sizes[draws], axis=1), n)
    starts = np.concatenate([np.zeros((n_boot, 1), dtype=ends.dtype), ends[:, :-1]], axis=1)
    used = (ends > starts).ravel()
    draw_cluster = draws.ravel()[used]
    draw_start = (starts + (np.arange(n_boot, dtype=np.int64) * n)[:, None]).ravel()[used]
    marker = np.zeros(n_boot * n, dtype=np.int64)
    marker[draw_start] = 1
    draw_of_position = np.cumsum(marker) - 1
    offset = np.arange(n_boot * n, dtype=np.int64) - draw_start[draw_of_position]
    rows = rows_by_cluster[cluster_start[draw_cluster[draw_of_position]] + offset]
    return rows.reshape(n_boot, n).astype(np.int64, copy=False)


def _group_codes(groups: np.ndarray, n: int) -> np.ndarray:
    """Integer cluster codes 0..K-1 for patient ids; missing ids become singleton clusters."""
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) != n:
        raise ValueError(f"groups must be a 1-D array with one patient id per sample (n={n}); got shape {groups.shape}")
    if groups.dtype.kind == "f":
        missing = np.isnan(groups)
    elif groups.dtype.kind in "OUS":
        missing = np.array([g is None or (isinstance(g, float) and g != g) or (isinstance(g, (str, bytes)) and len(g) == 0)
                            for g in groups.tolist()], dtype=bool)
        if groups.dtype.kind == "O":
            groups = np.array([str(g) for g in groups.tolist()])
    else:
        missing = np.zeros(n, dtype=bool)
    codes = np.empty(n, dtype=np.int64)
    if (~missing).any():
        _, present_codes = np.unique(groups[~missing], return_inverse=True)
        codes[~missing] = present_codes
        next_code = int(present_codes.max()) + 1
    else:
        next_code = 0
    codes[missing] = next_code + np.arange(int(missing.sum()))
    return codes


def _check_indices(indices: np.ndarray, n: int) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 2 or indices.shape[1] == 0 or indices.dtype.kind not in "iu":
        raise ValueError(f"indices must be an integer array of shape (n_boot, m) with m >= 1; got {indices.dtype} {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(f"indices must lie in [0, {n}) (the number of samples); got range "
                         f"[{indices.min()}, {indices.max()}]")
    return indices.astype(np.int64, copy=False)


def _count_blocks(indices: np.ndarray, n: int, *, by_sample: bool = False, block_elements: int = _BLOCK_ELEMENTS):
    """Yield ``(slice, counts)``: how often each sample was drawn in each replicate of a block of replicates.

    ``counts`` is float64 ``(block, n)`` (ready for matrix products), or with ``by_sample`` int32 ``(n, block)``:
    sample-major so that gathering samples and cumulating over them touch contiguous rows, and int32 because
    counts are small integers and halving the bytes roughly halves the time of the memory-bound passes.
    """
    block = max(1, block_elements // max(n, indices.shape[1]))
    for start in range(0, indices.shape[0], block):
        rows = indices[start:start + block]
        replicate = np.arange(rows.shape[0], dtype=np.int64)[:, None]
        if by_sample:
            counts = np.bincount((rows * rows.shape[0] + replicate).ravel(), minlength=n * rows.shape[0])
            yield slice(start, start + rows.shape[0]), counts.reshape(n, rows.shape[0]).astype(np.int32)
        else:
            counts = np.bincount((rows + replicate * n).ravel(), minlength=rows.shape[0] * n)
            yield slice(start, start + rows.shape[0]), counts.reshape(rows.shape[0], n).astype(np.float64)


# --------------------------------------------------------------------------------------------------------------
# Point metrics
# --------------------------------------------------------------------------------------------------------------

def auc_per_class(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC per column, shape ``(C,)``.

    ``targets`` is an ``(n, C)`` 0/1 indicator matrix and ``scores`` ``(n, C)``. Computed as the Mann-Whitney U
    statistic with midranks, which equals ``sklearn.metrics.roc_auc_score`` including ties. NaN for a class
    without positives or without negatives.
    """
    targets, scores = _indicator_and_scores(targets, scores, "scores")
    ranks = scipy_stats.rankdata(scores, axis=0)  # midranks for ties
    n_pos = targets.sum(axis=0)
    n_neg = targets.shape[0] - n_pos
    rank_sum = (ranks * targets).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def auprc_per_class(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Average precision per column as ``sklearn.metrics.average_precision_score``; NaN without positives."""
    targets, scores = _indicator_and_scores(targets, scores, "scores")
    identity = np.arange(targets.shape[0], dtype=np.int64)[None, :]
    return _bootstrap_ranked(targets, scores, identity, want_auc=False, want_auprc=True)[1][0]


def f1_per_class(targets: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Per-column F1 of 0/1 indicator matrices ``(n, C)``; 0 where ``tp + fp + fn == 0`` (sklearn zero_division=0)."""
    targets, predicted = _indicator_and_scores(targets, predicted, "predicted")
    if not np.isin(predicted, (0, 1)).all():
        raise ValueError("predicted must be a 0/1 indicator matrix")
    predicted = predicted.astype(bool)
    truth = targets.astype(bool)
    tp = (truth & predicted).sum(axis=0)
    fp = (~truth & predicted).sum(axis=0)
    fn = (truth & ~predicted).sum(axis=0)
    return _f1_from_counts(tp, fp, fn)


def _f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denominator = 2 * tp + fp + fn
    return np.divide(2.0 * tp, denominator, out=np.zeros(np.shape(denominator)), where=denominator > 0)


def _f1_with_replicates(truth: np.ndarray, flagged: np.ndarray, indices: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class F1 on the test set, its bootstrap replicates ``(B, C)``, and where each replicate is defined."""
    tp, fp, fn = bootstrap_f1_counts(truth, flagged, indices)
    return f1_per_class(truth, flagged), _f1_from_counts(tp, fp, fn), (tp + fp + fn) > 0


def confusion_matrix(true_class: np.ndarray, predicted_class: np.ndarray, n_classes: int) -> np.ndarray:
    """``(K, K)`` confusion counts, rows = true class index, columns = predicted class index."""
    return np.bincount(np.asarray(true_class) * n_classes + np.asarray(predicted_class),
                       minlength=n_classes * n_classes).reshape(n_classes, n_classes).astype(np.float64)


def balanced_accuracy_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Mean recall over classes present in the truth (sklearn ``balanced_accuracy_score``); works on ``(..., K, K)``."""
    support = confusion.sum(axis=-1)
    hits = np.diagonal(confusion, axis1=-2, axis2=-1)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    present = (support > 0).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(present > 0, recall.sum(axis=-1) / present, np.nan)


def quadratic_kappa_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Cohen's kappa with quadratic weights on ``(..., K, K)`` confusion counts.

    Weights use the class *index* distance over all K classes, i.e. ``cohen_kappa_score(..., weights="quadratic",
    labels=range(K))``; NaN where expected disagreement is 0 (e.g. every sample in one grade).
    """
    k = confusion.shape[-1]
    grades = np.arange(k, dtype=np.float64)
    weights = (grades[:, None] - grades[None, :]) ** 2
    total = confusion.sum(axis=(-2, -1))
    rows = confusion.sum(axis=-1)
    cols = confusion.sum(axis=-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = rows[..., :, None] * cols[..., None, :] / total[..., None, None]
        observed_disagreement = (weights * confusion).sum(axis=(-2, -1))
        expected_disagreement = (weights * expected).sum(axis=(-2, -1))
        kappa = 1.0 - observed_disagreement / expected_disagreement
    return np.where((total > 0) & (expected_disagreement > 0), kappa, np.nan)


# --------------------------------------------------------------------------------------------------------------
# Vectorised bootstrap
# --------------------------------------------------------------------------------------------------------------

def bootstrap_auc(targets: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Per-class AUC of every resample, shape ``(B, C)``; NaN where a resample lacks positives or negatives.

    ``indices`` is ``(B, m)`` (e.g. from :func:`bootstrap_indices`); replicate b is the sample
    ``targets[indices[b]], scores[indices[b]]``. Vectorised over replicates.
    """
    targets, scores = _indicator_and_scores(targets, scores, "scores")
    indices = _check_indices(indices, targets.shape[0])
    return _bootstrap_ranked(targets, scores, indices, want_auc=True, want_auprc=False)[0]


def bootstrap_auprc(targets: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Per-class average precision of every resample, ``(B, C)``; NaN where a resample has no positives."""
    targets, scores = _indicator_and_scores(targets, scores, "scores")
    indices = _check_indices(indices, targets.shape[0])
    return _bootstrap_ranked(targets, scores, indices, want_auc=False, want_auprc=True)[1]


def _bootstrap_ranked(targets: np.ndarray, scores: np.ndarray, indices: np.ndarray, *, want_auc: bool,
                      want_auprc: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """AUC and/or AUPRC for every resample, from cumulative draw counts in score order.

    For one class, let ``neg_cum[k]`` be the number of negative draws among the k lowest-scored negatives of a
    replicate. A positive sample i (drawn ``w_i`` times) with ``lo_i`` negatives scored strictly below it and
    ``hi_i`` scored at or below it contributes
      to AUC:   w_i * (neg_cum[lo_i] + neg_cum[hi_i]) / 2        (Mann-Whitney: ties count 1/2)
      to AUPRC: w_i * precision at threshold s_i, with the positives and negatives scored >= s_i
    and the sums are divided by P * N (AUC) or P (AUPRC). ``lo_i``/``hi_i`` depend only on the scores, so each
    replicate costs a few gathers and one cumulative sum; nothing loops over replicates.
    """
    n, n_classes = targets.shape
    n_boot = indices.shape[0]
    auc = np.full((n_boot, n_classes), np.nan) if want_auc else None
    auprc = np.full((n_boot, n_classes), np.nan) if want_auprc else None
    plans = []
    for c in range(n_classes):
        order = np.argsort(scores[:, c], kind="stable")
        positive = targets[order, c].astype(bool)
        pos_columns, neg_columns = order[positive], order[~positive]
        pos_scores, neg_scores = scores[pos_columns, c], scores[neg_columns, c]
        below = np.searchsorted(neg_scores, pos_scores, side="left")
        at_or_below = np.searchsorted(neg_scores, pos_scores, side="right")
        # positives scored strictly below each positive: tied positives share one threshold
        pos_below = np.searchsorted(pos_scores, pos_scores, side="left")
        plans.append((pos_columns, neg_columns, below, at_or_below, pos_below))

    # Small blocks keep the int32 working set of one class in cache; the cumulative sum dominates the cost.
    for rows, counts in _count_blocks(indices, n, by_sample=True, block_elements=_BLOCK_ELEMENTS // 4):
        block = counts.shape[1]
        for c, (pos_columns, neg_columns, below, at_or_below, pos_below) in enumerate(plans):
            pos = counts[pos_columns]
            neg_cum = np.zeros((len(neg_columns) + 1, block), dtype=np.int32)
            np.cumsum(counts[neg_columns], axis=0, dtype=np.int32, out=neg_cum[1:])
            # totals and products in float64: sums over positives of count x count can exceed int32
            pos_weight = pos.astype(np.float64)
            n_pos = pos_weight.sum(axis=0)
            n_neg = neg_cum[-1].astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                if want_auc:
                    twice_below = (neg_cum[below] + neg_cum[at_or_below]).astype(np.float64)
                    numerator = np.einsum("ib,ib->b", pos_weight, twice_below)
                    auc[rows, c] = np.where((n_pos > 0) & (n_neg > 0), numerator / (2.0 * n_pos * n_neg), np.nan)
                if want_auprc:
                    pos_cum = np.zeros((len(pos_columns) + 1, block))
                    np.cumsum(pos_weight, axis=0, out=pos_cum[1:])
                    true_flagged = n_pos - pos_cum[pos_below]
                    flagged = true_flagged + (n_neg - neg_cum[below])
                    precision = np.divide(true_flagged, flagged, out=np.zeros_like(flagged), where=flagged > 0)
                    auprc[rows, c] = np.where(n_pos > 0, np.einsum("ib,ib->b", pos_weight, precision) / n_pos, np.nan)
    return auc, auprc


def bootstrap_f1(targets: np.ndarray, predicted: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Per-class F1 of every resample, shape ``(B, C)`` (0 where ``tp + fp + fn == 0``, as sklearn)."""
    tp, fp, fn = bootstrap_f1_counts(targets, predicted, indices)
    return _f1_from_counts(tp, fp, fn)


def bootstrap_f1_counts(targets: np.ndarray, predicted: np.ndarray,
                        indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(tp, fp, fn)``, each ``(B, C)``, of every resample: three matrix products per block of replicates."""
    targets, predicted = _indicator_and_scores(targets, predicted, "predicted")
    if not np.isin(predicted, (0, 1)).all():
        raise ValueError("predicted must be a 0/1 indicator matrix")
    indices = _check_indices(indices, targets.shape[0])
    truth, flagged = targets.astype(np.float64), predicted.astype(np.float64)
    n_boot, n_classes = indices.shape[0], targets.shape[1]
    # one matrix product per block gives hits, true and flagged counts for every class at once
    columns = np.concatenate([truth * flagged, truth, flagged], axis=1)
    sums = np.empty((n_boot, 3 * n_classes))
    for rows, counts in _count_blocks(indices, targets.shape[0]):
        sums[rows] = counts @ columns
    tp, n_true, n_flagged = np.split(sums, 3, axis=1)
    return tp, n_flagged - tp, n_true - tp


def bootstrap_confusion(true_class: np.ndarray, predicted_class: np.ndarray, n_classes: int,
                        indices: np.ndarray) -> np.ndarray:
    """``(B, K, K)`` confusion counts of every resample (rows = truth)."""
    true_class, predicted_class = np.asarray(true_class), np.asarray(predicted_class)
    indices = _check_indices(indices, len(true_class))
    cell = np.zeros((len(true_class), n_classes * n_classes))
    cell[np.arange(len(true_class)), true_class * n_classes + predicted_class] = 1.0
    confusion = np.empty((indices.shape[0], n_classes * n_classes))
    for rows, counts in _count_blocks(indices, len(true_class)):
        confusion[rows] = counts @ cell
    return confusion.reshape(-1, n_classes, n_classes)


def percentile_ci(replicates: np.ndarray, ci: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the non-NaN replicates (NaN, NaN when there are none)."""
    valid = np.asarray(replicates, dtype=np.float64)
    valid = valid[~np.isnan(valid)]
    if valid.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(valid, [50.0 * (1.0 - ci), 50.0 * (1.0 + ci)])
    return float(low), float(high)


def _nan_sd(replicates: np.ndarray) -> float:
    valid = replicates[~np.isnan(replicates)]
    return float(np.std(valid, ddof=1)) if valid.size >= 2 else float("nan")


def _skipping_mean(values: np.ndarray, defined: np.ndarray) -> np.ndarray:
    """Row-wise mean over the defined entries of ``(B, C)`` values; NaN for rows with none defined."""
    n_defined = defined.sum(axis=-1)
    total = np.where(defined, values, 0.0).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n_defined > 0, total / n_defined, np.nan)


# --------------------------------------------------------------------------------------------------------------
# Scoring a set of predictions
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Scores:
    """Point estimates and bootstrap replicates of every (class, metric) of one set of predictions.

    Keys are ``(class, metric)`` with class a class/finding name or ``"macro"``. ``support`` has a point value
    (number of test positives) and no replicates. ``n_degenerate`` counts replicates in which the metric was
    undefined: NaN for AUC/AUPRC/kappa, set to 0 by convention for per-class F1, and for macro metrics any
    replicate where at least one class had to be skipped.
    """

    kind: str
    classes: list[str]
    point: dict[tuple[str, str], float]
    replicates: dict[tuple[str, str], np.ndarray]
    n_degenerate: dict[tuple[str, str], int]
    n: int
    n_boot: int
    ci: float = 0.95
    resample_digest: str = field(default="", repr=False)  # fingerprint of the resamples, checked by compare()

    def rows(self) -> list[dict]:
        """One dict per (class, metric): ``class, metric, value, sd, ci_low, ci_high, n_degenerate``."""
        out = []
        for (name, metric), value in self.point.items():
            if metric == "support" or (name, metric) not in self.replicates:
                sd = low = high = float("nan")
            else:
                replicates = self.replicates[(name, metric)]
                sd = _nan_sd(replicates)
                low, high = percentile_ci(replicates, self.ci)
            out.append({"class": name, "metric": metric, "value": float(value), "sd": sd, "ci_low": low,
                        "ci_high": high, "n_degenerate": int(self.n_degenerate.get((name, metric), 0))})
        return out


def score_predictions(kind: str, classes: list[str], targets: np.ndarray, probabilities: np.ndarray, *,
                      n_boot: int = 1000, seed: int = 0, groups: np.ndarray | None = None, ci: float = 0.95,
                      graded: bool = False) -> Scores:
    """Metrics with bootstrap replicates for one model's test predictions.

    - ``binary``/``multiclass``: ``targets`` ``(n,)`` class indices into ``classes``; ``probabilities`` ``(n, C)``
      (binary: C = 2, column 1 the positive class). Prediction = argmax.
    - ``multilabel``: ``targets`` ``(n, C)`` 0/1; ``probabilities`` ``(n, C)`` per finding. Prediction = p >= 0.5.

    Metrics: multiclass - per class ``auc`` (one-vs-rest), ``f1``, ``support``; macro ``auc``, ``f1``,
    ``balanced_accuracy`` and, if ``graded``, ``kappa_quadratic``. Binary - negative class ``f1``, ``support``;
    positive class ``auc``, ``f1``, ``auprc``, ``support``; macro ``f1`` is the mean of both classes' F1
    (``f1_score(average="macro")``, the paper's binary F1), macro ``f1_positive`` the positive class's F1, macro
    ``auc``/``auprc`` repeat the positive class's, plus ``balanced_accuracy`` (and ``kappa_quadratic`` if
    graded). Multilabel - per finding ``auc``, ``f1``, ``auprc``, ``support``; macro means of ``auc``, ``f1``,
    ``auprc``.

    Resamples come from :func:`bootstrap_indices` ``(n, n_boot, seed, groups)``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie strictly between 0 and 1; got {ci!r}")
    if graded and kind == "multilabel":
        raise ValueError("graded=True (quadratic kappa) needs ordered classes; it is not defined for kind 'multilabel'")
    classes = [str(name) for name in classes]
    if "macro" in classes:
        raise ValueError(f"classes must not contain the reserved name 'macro'; got {classes}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be unique; got {classes}")
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(classes):
        raise ValueError(f"probabilities must have shape (n, {len(classes)}) for classes {classes}; "
                         f"got {probabilities.shape}")
    if not np.isfinite(probabilities).all():
        raise ValueError("probabilities contain NaN or infinite values")
    n = probabilities.shape[0]
    if n == 0:
        raise ValueError("probabilities is empty: no test samples to score")

    if kind == "multilabel":
        truth = _indicator(targets, (n, len(classes)), "targets")
        class_index = None
    else:
        if kind == "binary" and len(classes) != 2:
            raise ValueError(f"kind 'binary' needs exactly 2 classes (negative, positive); got {classes}")
        class_index = np.asarray(targets)
        if class_index.shape != (n,) or class_index.dtype.kind not in "iu":
            raise ValueError(f"targets must be an integer class-index array of shape ({n},) for kind {kind!r}; "
                             f"got {class_index.dtype} {class_index.shape}")
        if class_index.size and (class_index.min() < 0 or class_index.max() >= len(classes)):
            bad = class_index[(class_index < 0) | (class_index >= len(classes))][0]
            raise ValueError(f"targets contain class index {bad}, outside [0, {len(classes)}) for classes {classes}")
        class_index = class_index.astype(np.int64)
        truth = np.eye(len(classes), dtype=np.int64)[class_index]

    indices = bootstrap_indices(n, n_boot, seed, groups)
    # the resamples are a function of (n, n_boot, seed, patient clusters): fingerprint those, not 8*B*n bytes
    digest = hashlib.sha1(f"{n}/{n_boot}/{int(seed)}/".encode()
                          + (b"-" if groups is None else _group_codes(groups, n).tobytes())).hexdigest()
    point: dict[tuple[str, str], float] = {}
    replicates: dict[tuple[str, str], np.ndarray] = {}
    degenerate: dict[tuple[str, str], int] = {}

    def put(key: tuple[str, str], value: float, reps: np.ndarray | None, undefined: np.ndarray | None = None) -> None:
        point[key] = float(value)
        if reps is not None:
            replicates[key] = reps
            degenerate[key] = int(np.isnan(reps).sum() if undefined is None else undefined.sum())

    if kind == "binary":
        positive = truth[:, 1:2]
        score = probabilities[:, 1:2]
        predicted_class = np.argmax(probabilities, axis=1)
        flagged = np.eye(2, dtype=np.int64)[predicted_class]
        auc_boot, auprc_boot = _bootstrap_ranked(positive, score, indices, want_auc=True, want_auprc=True)
        # F1 of both classes: the paper's binary F1 is f1_score(average="macro"), the mean of the two
        f1_point, f1_boot, f1_defined = _f1_with_replicates(truth, flagged, indices)
        negative_name, name = classes
        put((negative_name, "f1"), f1_point[0], f1_boot[:, 0], ~f1_defined[:, 0])
        put((negative_name, "support"), truth[:, 0].sum(), None)
        ranked = {"auc": (auc_per_class(positive, score)[0], auc_boot[:, 0]),
                  "auprc": (auprc_per_class(positive, score)[0], auprc_boot[:, 0])}
        put((name, "auc"), *ranked["auc"])
        put((name, "f1"), f1_point[1], f1_boot[:, 1], ~f1_defined[:, 1])
        put((name, "auprc"), *ranked["auprc"])
        put((name, "support"), positive.sum(), None)
        # AUC and AUPRC have one positive class, so macro repeats it; F1 is averaged like multiclass F1
        put(("macro", "auc"), *ranked["auc"])
        point_defined = (truth.astype(bool) | flagged.astype(bool)).any(axis=0)
        _put_macro(put, "f1", f1_point, point_defined, f1_boot, f1_defined)
        put(("macro", "f1_positive"), f1_point[1], f1_boot[:, 1], ~f1_defined[:, 1])
        put(("macro", "auprc"), *ranked["auprc"])
        _put_confusion_metrics(put, class_index, predicted_class, len(classes), indices, graded)

    elif kind == "multiclass":
        predicted_class = np.argmax(probabilities, axis=1)
        flagged = np.eye(len(classes), dtype=np.int64)[predicted_class]
        auc_point = auc_per_class(truth, probabilities)
        auc_boot = bootstrap_auc(truth, probabilities, indices)
        f1_point, f1_boot, f1_defined = _f1_with_replicates(truth, flagged, indices)
        for c, name in enumerate(classes):
            put((name, "auc"), auc_point[c], auc_boot[:, c])
            put((name, "f1"), f1_point[c], f1_boot[:, c], ~f1_defined[:, c])
            put((name, "support"), truth[:, c].sum(), None)
        _put_macro(put, "auc", auc_point, ~np.isnan(auc_point), auc_boot, ~np.isnan(auc_boot))
        point_defined = (truth.astype(bool) | flagged.astype(bool)).any(axis=0)
        _put_macro(put, "f1", f1_point, point_defined, f1_boot, f1_defined)
        _put_confusion_metrics(put, class_index, predicted_class, len(classes), indices, graded)

    else:  # multilabel
        flagged = (probabilities >= 0.5).astype(np.int64)
        auc_point, auprc_point = auc_per_class(truth, probabilities), auprc_per_class(truth, probabilities)
        auc_boot, auprc_boot = _bootstrap_ranked(truth, probabilities, indices, want_auc=True, want_auprc=True)
        f1_point, f1_boot, f1_defined = _f1_with_replicates(truth, flagged, indices)
        for c, name in enumerate(classes):
            put((name, "auc"), auc_point[c], auc_boot[:, c])
            put((name, "f1"), f1_point[c], f1_boot[:, c], ~f1_defined[:, c])
            put((name, "auprc"), auprc_point[c], auprc_boot[:, c])
            put((name, "support"), truth[:, c].sum(), None)
        _put_macro(put, "auc", auc_point, ~np.isnan(auc_point), auc_boot, ~np.isnan(auc_boot))
        point_defined = (truth.astype(bool) | flagged.astype(bool)).any(axis=0)
        _put_macro(put, "f1", f1_point, point_defined, f1_boot, f1_defined)
        _put_macro(put, "auprc", auprc_point, ~np.isnan(auprc_point), auprc_boot, ~np.isnan(auprc_boot))

    return Scores(kind=kind, classes=classes, point=point, replicates=replicates, n_degenerate=degenerate, n=n,
                  n_boot=n_boot, ci=ci, resample_digest=digest)


def _put_macro(put, metric: str, point_values: np.ndarray, point_defined: np.ndarray, boot_values: np.ndarray,
               boot_defined: np.ndarray) -> None:
    """Macro mean over defined classes; replicates skipping any class are counted as degenerate."""
    put(("macro", metric), _skipping_mean(point_values, point_defined), _skipping_mean(boot_values, boot_defined),
        (~boot_defined).any(axis=1))


def _put_confusion_metrics(put, class_index: np.ndarray, predicted_class: np.ndarray, n_classes: int,
                           indices: np.ndarray, graded: bool) -> None:
    point_confusion = confusion_matrix(class_index, predicted_class, n_classes)
    boot_confusion = bootstrap_confusion(class_index, predicted_class, n_classes, indices)
    class_missing = (boot_confusion.sum(axis=2) == 0).any(axis=1)
    put(("macro", "balanced_accuracy"), balanced_accuracy_from_confusion(point_confusion),
        balanced_accuracy_from_confusion(boot_confusion), class_missing)
    if graded:
        put(("macro", "kappa_quadratic"), quadratic_kappa_from_confusion(point_confusion),
            quadratic_kappa_from_confusion(boot_confusion))


# --------------------------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------------------------

def compare(a: Scores, b: Scores, ci: float = 0.95) -> list[dict]:
    """Paired comparison of model ``a`` against model ``b`` on shared bootstrap resamples.

    For every (class, metric) in both (except ``support``) two rows, keys ``class, metric, difference,
    ci_low, ci_high, p_value, test``:

    - ``test="bootstrap"``: ``difference`` = a.point - b.point; percentile CI of the replicate differences;
      two-sided p = 2 * min(share of differences <= 0, share >= 0), floored at 1/B and capped at 1.
    - ``test="paired_t"``: ``scipy.stats.ttest_rel`` over the replicate pairs with its t-based CI of the mean
      replicate difference, as in the paper. This overstates significance: bootstrap replicates are not
      independent samples, and their count B is a free choice, so p shrinks as B grows. Prefer the bootstrap
      row. When every replicate difference is exactly 0 the t statistic is 0/0; p is reported as 1.

    Replicates that are NaN in either model are left out of both tests. Raises ValueError unless both
    Scores come from the same resamples (same n, B, seed and groups).
    """
    if a.n != b.n:
        raise ValueError(f"compare: the Scores have different test set sizes (n={a.n} vs n={b.n})")
    if a.n_boot != b.n_boot:
        raise ValueError(f"compare: the Scores have different numbers of bootstrap replicates "
                         f"(n_boot={a.n_boot} vs n_boot={b.n_boot})")
    if a.resample_digest and b.resample_digest and a.resample_digest != b.resample_digest:
        raise ValueError("compare: the Scores were computed on different bootstrap resamples "
                         "(seed or groups differ); paired comparison needs shared resamples")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie strictly between 0 and 1; got {ci!r}")
    out = []
    for key in a.point:
        name, metric = key
        if metric == "support" or key not in b.point or key not in a.replicates or key not in b.replicates:
            continue
        difference = a.point[key] - b.point[key]
        deltas = a.replicates[key] - b.replicates[key]
        deltas = deltas[~np.isnan(deltas)]
        low, high = percentile_ci(deltas, ci)
        if deltas.size:
            share = 2.0 * min(np.mean(deltas <= 0), np.mean(deltas >= 0))
            p_boot = float(min(1.0, max(share, 1.0 / deltas.size)))
        else:
            p_boot = float("nan")
        out.append({"class": name, "metric": metric, "difference": difference, "ci_low": low, "ci_high": high,
                    "p_value": p_boot, "test": "bootstrap"})

        valid = ~(np.isnan(a.replicates[key]) | np.isnan(b.replicates[key]))
        t_low = t_high = p_t = float("nan")
        if valid.sum() >= 2:
            if np.all(deltas == 0):
                t_low = t_high = 0.0
                p_t = 1.0
            else:
                result = scipy_stats.ttest_rel(a.replicates[key][valid], b.replicates[key][valid])
                interval = result.confidence_interval(confidence_level=ci)
                t_low, t_high, p_t = float(interval.low), float(interval.high), float(result.pvalue)
        out.append({"class": name, "metric": metric, "difference": difference, "ci_low": t_low, "ci_high": t_high,
                    "p_value": p_t, "test": "paired_t"})
    return out


def delong_components(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and DeLong's structural components of several score columns against one binary truth.

    ``truth`` ``(n,)`` 0/1 with m positives and k = n - m negatives; ``scores`` ``(n, R)``, one column per model.
    Returns ``(auc (R,), v10 (m, R), v01 (k, R))`` where ``v10[i]`` is the share of negatives that positive i
    outranks (ties 1/2) and ``v01[j]`` the share of positives that outrank negative j (DeLong, DeLong &
    Clarke-Pearson 1988). They come from midranks in O(n log n), as in Sun & Xu (2014): with ``rank_all`` the
    midrank of a sample among all samples and ``rank_pos``/``rank_neg`` its midrank within its own class,
    ``v10 = (rank_all - rank_pos) / k`` over positives and ``v01 = 1 - (rank_all - rank_neg) / m`` over negatives.
    Raises ValueError without both positives and negatives.
    """
    truth = np.asarray(truth)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    if truth.ndim != 1 or scores.ndim != 2 or scores.shape[0] != truth.shape[0]:
        raise ValueError(f"delong: truth must be (n,) and scores (n, R); got {truth.shape} and {scores.shape}")
    if not np.isin(truth, (0, 1)).all():
        raise ValueError(f"delong: truth must be 0/1; found values {np.unique(truth)[:5]}")
    if not np.isfinite(scores).all():
        raise ValueError("delong: scores contain NaN or infinite values")
    positive = truth.astype(bool)
    m, k = int(positive.sum()), int((~positive).sum())
    if m == 0 or k == 0:
        raise ValueError(f"delong: AUC is undefined with {m} positives and {k} negatives")
    rank_all = scipy_stats.rankdata(scores, axis=0)  # midranks: ties share the mean rank
    rank_pos = scipy_stats.rankdata(scores[positive], axis=0)
    rank_neg = scipy_stats.rankdata(scores[~positive], axis=0)
    v10 = (rank_all[positive] - rank_pos) / k
    v01 = 1.0 - (rank_all[~positive] - rank_neg) / m
    auc = v10.mean(axis=0)
    return auc, v10, v01


def delong_test(truth: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, ci: float = 0.95) -> dict:
    """DeLong's test for two correlated AUCs (two models scored on the same samples).

    The covariance of the two AUC estimates is ``S10 / m + S01 / k`` with ``S10``/``S01`` the sample covariances
    (ddof 1) of the structural components (:func:`delong_components`); the difference ``auc_a - auc_b`` has
    variance ``var_a + var_b - 2 cov_ab`` and ``z = difference / sd`` is referred to the standard normal.
    Returns ``auc_a, auc_b, difference, sd, z, p_value`` (two-sided) and the Wald interval ``ci_low, ci_high``.
    Identical scores give difference 0, sd 0 and p = 1. Samples are assumed independent (no patient clusters).
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie strictly between 0 and 1; got {ci!r}")
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"delong: scores_a and scores_b must be 1-D of equal length; got {a.shape} and {b.shape}")
    auc, v10, v01 = delong_components(truth, np.column_stack([a, b]))
    m, k = v10.shape[0], v01.shape[0]
    s10 = np.cov(v10, rowvar=False, ddof=1) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(v01, rowvar=False, ddof=1) if k > 1 else np.zeros((2, 2))
    covariance = s10 / m + s01 / k
    difference = float(auc[0] - auc[1])
    variance = float(covariance[0, 0] + covariance[1, 1] - 2.0 * covariance[0, 1])
    sd = float(np.sqrt(max(variance, 0.0)))
    if sd <= 1e-15 * max(1.0, abs(difference)):
        # no sampling variability in the difference: equal models (p = 1) or a degenerate sample
        z, p = (0.0, 1.0) if difference == 0 else (float(np.sign(difference) * np.inf), 0.0)
        sd = 0.0
    else:
        z = difference / sd
        p = float(2.0 * scipy_stats.norm.sf(abs(z)))
    half = float(scipy_stats.norm.ppf(0.5 + ci / 2.0)) * sd
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "difference": difference, "sd": sd, "z": float(z),
            "p_value": p, "ci_low": difference - half, "ci_high": difference + half}


def delong_rows(kind: str, classes: list[str], targets: np.ndarray, probabilities_a: np.ndarray,
                probabilities_b: np.ndarray, ci: float = 0.95) -> list[dict]:
    """DeLong comparison rows (``test="delong"``, metric ``auc``) of model a against model b, per class.

    Same row keys as :func:`compare`. Multiclass: one-vs-rest AUC of each class; binary: the positive class,
    repeated as ``macro`` (the paper's convention for binary macro rows); multilabel: each finding. A class
    without test positives or negatives gets a row with NaN statistics (undefined, not dropped). Macro AUC of
    multiclass/multilabel tasks has no DeLong row: it averages AUCs over different positive sets.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    a = np.asarray(probabilities_a, dtype=np.float64)
    b = np.asarray(probabilities_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != len(classes):
        raise ValueError(f"delong_rows: probabilities must both be (n, {len(classes)}); got {a.shape} and {b.shape}")
    if kind == "multilabel":
        truth = _indicator(targets, a.shape, "targets")
    else:
        class_index = np.asarray(targets)
        if class_index.shape != (a.shape[0],):
            raise ValueError(f"delong_rows: targets must be ({a.shape[0]},) class indices; got {class_index.shape}")
        truth = (class_index[:, None] == np.arange(len(classes))[None, :]).astype(np.int64)
    columns = [1] if kind == "binary" else range(len(classes))
    rows = []
    for c in columns:
        positives = int(truth[:, c].sum())
        if 0 < positives < truth.shape[0]:
            result = delong_test(truth[:, c], a[:, c], b[:, c], ci=ci)
            values = {key: result[key] for key in ("difference", "ci_low", "ci_high", "p_value")}
        else:
            values = dict.fromkeys(("difference", "ci_low", "ci_high", "p_value"), float("nan"))
        rows.append({"class": str(classes[c]), "metric": "auc", **values, "test": "delong"})
    if kind == "binary":
        rows.append({**rows[0], "class": "macro"})
    return rows


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order.

    Sorted ascending, ``p_(i)`` becomes ``max_{j<=i} min(1, (m - j + 1) p_(j))``. NaN entries stay NaN and do
    not count towards m.
    """
    p_values = np.asarray(p_values, dtype=np.float64)
    if p_values.ndim != 1:
        raise ValueError(f"p_values must be 1-D; got shape {p_values.shape}")
    finite = ~np.isnan(p_values)
    if ((p_values[finite] < 0) | (p_values[finite] > 1)).any():
        raise ValueError(f"p_values must lie in [0, 1]; got {p_values[finite & ((p_values < 0) | (p_values > 1))]}")
    adjusted = np.full_like(p_values, np.nan)
    present = np.flatnonzero(finite)
    order = present[np.argsort(p_values[present], kind="stable")]
    m = len(order)
    stepped = np.minimum(1.0, (m - np.arange(m)) * p_values[order])
    adjusted[order] = np.maximum.accumulate(stepped)
    return adjusted


# --------------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------------

def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def _indicator(values: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != shape:
        raise ValueError(f"{name} must have shape {shape}; got {values.shape}")
    if not np.isin(values, (0, 1)).all():
        raise ValueError(f"{name} must be a 0/1 indicator matrix; found values {np.unique(values)[:5]}")
    return values.astype(np.int64)


def _indicator_and_scores(targets: np.ndarray, other: np.ndarray, other_name: str) -> tuple[np.ndarray, np.ndarray]:
    other = np.asarray(other)
    if other.ndim != 2:
        raise ValueError(f"{other_name} must be a 2-D (n, C) array; got shape {other.shape}")
    targets = _indicator(targets, other.shape, "targets")
    if other.dtype.kind == "f" and not np.isfinite(other).all():
        raise ValueError(f"{other_name} contain NaN or infinite values")
    return targets, other

"""Per-class metrics (AUC, AUPRC, F1, confusion-based) and their bootstrap replicates, vectorised over replicates."""

from __future__ import annotations

import numpy as np

from medprobe.stats._checks import _indicator_and_scores
from medprobe.stats.bootstrap import _BLOCK_ELEMENTS, _check_indices, _count_blocks, _packed_count_blocks


def midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks down each column, ties sharing their mean rank: ``scipy.stats.rankdata(values, axis=0)``
    in numpy alone (the probes' validation AUC then needs no scipy.stats, ~0.5 s of every probe job's start)."""
    values = np.asarray(values)
    n = values.shape[0]
    order = np.argsort(values, axis=0, kind="stable")
    ordered = np.take_along_axis(values, order, axis=0)
    ranks = np.empty(values.shape, dtype=np.float64)
    for column in range(values.shape[1]):
        column_values = ordered[:, column]
        starts = np.flatnonzero(np.r_[True, column_values[1:] != column_values[:-1]])
        stops = np.r_[starts[1:], n]
        ranks[order[:, column], column] = np.repeat((starts + stops + 1) / 2.0, stops - starts)
    return ranks


def auc_per_class(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC per column, shape ``(C,)``.

    ``targets`` is an ``(n, C)`` 0/1 indicator matrix and ``scores`` ``(n, C)``. Computed as the Mann-Whitney U
    statistic with midranks, which equals ``sklearn.metrics.roc_auc_score`` including ties. NaN for a class
    without positives or without negatives.
    """
    targets, scores = _indicator_and_scores(targets, scores, "scores")
    ranks = midranks(scores)
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


def _f1_with_replicates(
    truth: np.ndarray, flagged: np.ndarray, indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class F1 on the test set, its bootstrap replicates ``(B, C)``, and where each replicate is defined."""
    tp, fp, fn = bootstrap_f1_counts(truth, flagged, indices)
    return f1_per_class(truth, flagged), _f1_from_counts(tp, fp, fn), (tp + fp + fn) > 0


def confusion_matrix(true_class: np.ndarray, predicted_class: np.ndarray, n_classes: int) -> np.ndarray:
    """``(K, K)`` confusion counts, rows = true class index, columns = predicted class index."""
    return (
        np.bincount(np.asarray(true_class) * n_classes + np.asarray(predicted_class), minlength=n_classes * n_classes)
        .reshape(n_classes, n_classes)
        .astype(np.float64)
    )


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


def _bootstrap_ranked(
    targets: np.ndarray, scores: np.ndarray, indices: np.ndarray, *, want_auc: bool, want_auprc: bool
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """AUC and/or AUPRC for every resample, from cumulative draw counts in score order.

    For one class, let ``neg_cum[k]`` be the number of negative draws among the k lowest-scored negatives of a
    replicate. A positive sample i (drawn ``w_i`` times) with ``lo_i`` negatives scored strictly below it and
    ``hi_i`` scored at or below it contributes
      to AUC:   w_i * (neg_cum[lo_i] + neg_cum[hi_i]) / 2        (Mann-Whitney: ties count 1/2)
      to AUPRC: w_i * precision at threshold s_i, with the positives and negatives scored >= s_i
    and the sums are divided by P * N (AUC) or P (AUPRC). ``lo_i``/``hi_i`` depend only on the scores, so each
    replicate costs a few gathers and one cumulative sum; nothing loops over replicates.

    The counts come packed, 4 (or 2) replicates per uint64 word (:func:`_packed_count_blocks`), laid out one
    row of n words per group of replicates: the permutations into score order are element gathers along a row
    and the cumulative sums run along it, so the cost per sample is the same for any n (a block's rows are
    never gathered one by one) and every word operation serves 4 replicates. Draw counts, their cumulative
    sums and the AUPRC's flagged counts stay below a replicate's number of draws, so they are summed and
    subtracted packed; products are taken lane by lane. The AUC's numerator is an exact integer; the AUPRC's
    sum over positives runs in score order (one rounding per positive, as a sequential sum).
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

    for rows, packed, lane in _packed_count_blocks(indices, n, block_elements=_BLOCK_ELEMENTS // 2):
        replicates, groups = rows.stop - rows.start, packed.shape[0]
        for c, (pos_columns, neg_columns, below, at_or_below, pos_below) in enumerate(plans):
            pos = np.take(packed, pos_columns, axis=1)
            neg_cum = np.zeros((groups, len(neg_columns) + 1), dtype=np.uint64)
            np.cumsum(np.take(packed, neg_columns, axis=1), axis=1, out=neg_cum[:, 1:])
            pos_total, neg_total = pos.sum(axis=1), neg_cum[:, -1].copy()
            n_pos, n_neg = _lanes(pos_total, lane).astype(np.float64), _lanes(neg_total, lane).astype(np.float64)
            pos_weight = _lanes(pos, lane)
            lo = np.take(neg_cum, below, axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                if want_auc:
                    # twice the Mann-Whitney numerator, an integer below draws**2 / 2: exact in the wider type
                    twice_below = np.add(
                        _lanes(lo, lane),
                        _lanes(np.take(neg_cum, at_or_below, axis=1), lane),
                        dtype=np.uint32 if lane is np.uint16 else np.uint64,
                    )
                    numerator = np.einsum("gil,gil->gl", pos_weight, twice_below)
                    value = np.where((n_pos > 0) & (n_neg > 0), numerator / (2.0 * n_pos * n_neg), np.nan)
                    auc[rows, c] = value.reshape(-1)[:replicates]
                if want_auprc:
                    pos_cum = np.zeros((groups, len(pos_columns) + 1), dtype=np.uint64)
                    np.cumsum(pos, axis=1, out=pos_cum[:, 1:])
                    # lane by lane: flagged positives <= P and flagged samples <= P + N, so nothing borrows or carries
                    true_flagged = pos_total[:, None] - np.take(pos_cum, pos_below, axis=1)
                    flagged = true_flagged + (neg_total[:, None] - lo)
                    true_flagged, flagged = _lanes(true_flagged, lane), _lanes(flagged, lane)
                    precision = np.divide(
                        true_flagged, flagged, out=np.zeros(flagged.shape), where=flagged > 0, dtype=np.float64
                    )
                    value = np.where(
                        n_pos > 0, _positive_sum(pos_weight, precision, single=n_boot == 1) / n_pos, np.nan
                    )
                    auprc[rows, c] = value.reshape(-1)[:replicates]
    return auc, auprc


def _lanes(packed: np.ndarray, lane: type) -> np.ndarray:
    """Unpack ``(..., k)`` uint64 words into ``(..., k, lanes)`` counts (a view when ``packed`` is contiguous)."""
    packed = np.ascontiguousarray(packed)
    return packed.view(lane).reshape(*packed.shape, 8 // np.dtype(lane).itemsize)


def _positive_sum(weight: np.ndarray, precision: np.ndarray, *, single: bool) -> np.ndarray:
    """``sum_i weight_i * precision_i`` over the positives (axis 1 of ``(groups, P, lanes)``), in score order.

    A sequential sum, as numpy's ``einsum("ib,ib->b")`` over several replicates, so that no result depends on
    how the replicates are blocked; a ``single`` replicate (the point estimate) is summed as ``einsum`` sums one
    contiguous column, so that :func:`auprc_per_class` gives the very value it gave before the counts were packed.
    """
    if weight.shape[1] == 0:
        return np.zeros((weight.shape[0], weight.shape[2]))
    if single:
        total = np.zeros((1, weight.shape[2]))
        total[0, 0] = np.einsum("i,i->", weight[0, :, 0].astype(np.float64), np.ascontiguousarray(precision[0, :, 0]))
        return total
    return np.cumsum(weight * precision, axis=1)[:, -1]


def bootstrap_f1(targets: np.ndarray, predicted: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Per-class F1 of every resample, shape ``(B, C)`` (0 where ``tp + fp + fn == 0``, as sklearn)."""
    tp, fp, fn = bootstrap_f1_counts(targets, predicted, indices)
    return _f1_from_counts(tp, fp, fn)


def bootstrap_f1_counts(
    targets: np.ndarray, predicted: np.ndarray, indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def bootstrap_confusion(
    true_class: np.ndarray, predicted_class: np.ndarray, n_classes: int, indices: np.ndarray
) -> np.ndarray:
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

"""Paired comparisons of two models on shared resamples (bootstrap, paired t-test, DeLong) and Holm's adjustment."""

from __future__ import annotations

import numpy as np
from scipy import stats as scipy_stats

from medprobe.stats._checks import _check_ci, _indicator
from medprobe.stats.metrics import percentile_ci
from medprobe.stats.scores import KINDS, Scores


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
    _check_shared_resamples(a, b)
    _check_ci(ci)
    out = []
    for key in a.point:
        name, metric = key
        if metric == "support" or key not in b.point or key not in a.replicates or key not in b.replicates:
            continue
        row = {"class": name, "metric": metric, "difference": a.point[key] - b.point[key]}
        out.append({**row, **_bootstrap_test(a.replicates[key], b.replicates[key], ci)})
        out.append({**row, **_paired_t_test(a.replicates[key], b.replicates[key], ci)})
    return out


def _check_shared_resamples(a: Scores, b: Scores) -> None:
    if a.n != b.n:
        raise ValueError(f"compare: the Scores have different test set sizes (n={a.n} vs n={b.n})")
    if a.n_boot != b.n_boot:
        raise ValueError(
            f"compare: the Scores have different numbers of bootstrap replicates "
            f"(n_boot={a.n_boot} vs n_boot={b.n_boot})"
        )
    if a.resample_digest and b.resample_digest and a.resample_digest != b.resample_digest:
        raise ValueError(
            "compare: the Scores were computed on different bootstrap resamples "
            "(seed or groups differ); paired comparison needs shared resamples"
        )


def _bootstrap_test(replicates_a: np.ndarray, replicates_b: np.ndarray, ci: float) -> dict:
    """Percentile CI of the replicate differences and the two-sided bootstrap p-value (:func:`compare`)."""
    deltas = replicates_a - replicates_b
    deltas = deltas[~np.isnan(deltas)]
    low, high = percentile_ci(deltas, ci)
    p_value = float("nan")
    if deltas.size:
        share = 2.0 * min(np.mean(deltas <= 0), np.mean(deltas >= 0))
        p_value = float(min(1.0, max(share, 1.0 / deltas.size)))
    return {"ci_low": low, "ci_high": high, "p_value": p_value, "test": "bootstrap"}


def _paired_t_test(replicates_a: np.ndarray, replicates_b: np.ndarray, ci: float) -> dict:
    """``scipy.stats.ttest_rel`` over the replicate pairs defined in both models, with its CI (:func:`compare`)."""
    valid = ~(np.isnan(replicates_a) | np.isnan(replicates_b))
    low = high = p_value = float("nan")
    if valid.sum() >= 2:
        if np.all(replicates_a[valid] == replicates_b[valid]):
            low = high = 0.0  # t is 0/0
            p_value = 1.0
        else:
            result = scipy_stats.ttest_rel(replicates_a[valid], replicates_b[valid])
            interval = result.confidence_interval(confidence_level=ci)
            low, high, p_value = float(interval.low), float(interval.high), float(result.pvalue)
    return {"ci_low": low, "ci_high": high, "p_value": p_value, "test": "paired_t"}


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
    _check_ci(ci)
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
    return {
        "auc_a": float(auc[0]),
        "auc_b": float(auc[1]),
        "difference": difference,
        "sd": sd,
        "z": float(z),
        "p_value": p,
        "ci_low": difference - half,
        "ci_high": difference + half,
    }


def delong_rows(
    kind: str,
    classes: list[str],
    targets: np.ndarray,
    probabilities_a: np.ndarray,
    probabilities_b: np.ndarray,
    ci: float = 0.95,
) -> list[dict]:
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

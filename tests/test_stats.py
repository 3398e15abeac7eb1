"""medprobe.stats against independent computations: scikit-learn, scipy and plain loops over the same resamples."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    f1_score,
    roc_auc_score,
)

from medprobe import stats


def _multiclass_case(n: int, n_classes: int, seed: int, signal: float = 1.5, decimals: int | None = 2):
    """Targets (n,) and softmax probabilities (n, C); rounding makes many ties on purpose."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), targets] += signal
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if decimals is not None:
        probabilities = np.round(probabilities, decimals)
    return targets, probabilities


def _loop_auc(truth: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    out = np.full((len(indices), truth.shape[1]), np.nan)
    for b, rows in enumerate(indices):
        for c in range(truth.shape[1]):
            y = truth[rows, c]
            if 0 < y.sum() < len(y):
                out[b, c] = roc_auc_score(y, scores[rows, c])
    return out


# ---------------------------------------------------------------------------------------------- point metrics


def test_auc_per_class_matches_sklearn_with_ties():
    targets, probabilities = _multiclass_case(300, 4, seed=1, decimals=1)  # decimals=1: heavy ties
    truth = np.eye(4, dtype=int)[targets]
    expected = [roc_auc_score(truth[:, c], probabilities[:, c]) for c in range(4)]
    np.testing.assert_allclose(stats.auc_per_class(truth, probabilities), expected, rtol=0, atol=1e-12)


def test_auc_per_class_is_nan_without_positives_or_negatives():
    truth = np.array([[1, 0, 1], [1, 0, 0], [1, 0, 1]])
    scores = np.array([[0.2, 0.1, 0.9], [0.4, 0.5, 0.1], [0.3, 0.2, 0.8]])
    auc = stats.auc_per_class(truth, scores)
    assert np.isnan(auc[0]) and np.isnan(auc[1])
    assert auc[2] == roc_auc_score(truth[:, 2], scores[:, 2]) == 1.0


def test_auprc_per_class_matches_sklearn_with_ties():
    targets, probabilities = _multiclass_case(250, 3, seed=2, decimals=1)
    truth = np.eye(3, dtype=int)[targets]
    expected = [average_precision_score(truth[:, c], probabilities[:, c]) for c in range(3)]
    np.testing.assert_allclose(stats.auprc_per_class(truth, probabilities), expected, rtol=0, atol=1e-12)


def test_f1_per_class_matches_sklearn_including_zero_division():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, (80, 5))
    predicted = rng.integers(0, 2, (80, 5))
    truth[:, 4] = 0
    predicted[:, 4] = 0  # tp + fp + fn == 0: sklearn's zero_division=0 gives 0
    expected = f1_score(truth, predicted, average=None, zero_division=0)
    np.testing.assert_allclose(stats.f1_per_class(truth, predicted), expected, rtol=0, atol=1e-12)
    assert stats.f1_per_class(truth, predicted)[4] == 0.0


def test_confusion_metrics_match_sklearn():
    targets, probabilities = _multiclass_case(200, 5, seed=4, signal=1.0)
    predicted = probabilities.argmax(axis=1)
    confusion = stats.confusion_matrix(targets, predicted, 5)
    assert stats.balanced_accuracy_from_confusion(confusion) == pytest.approx(
        balanced_accuracy_score(targets, predicted), abs=1e-12
    )
    assert stats.quadratic_kappa_from_confusion(confusion) == pytest.approx(
        cohen_kappa_score(targets, predicted, weights="quadratic", labels=list(range(5))), abs=1e-12
    )


# ---------------------------------------------------------------------------------------------- bootstrap engine


def test_bootstrap_auc_matches_sklearn_loop_on_same_indices():
    targets, probabilities = _multiclass_case(120, 4, seed=5, decimals=1)
    truth = np.eye(4, dtype=int)[targets]
    indices = stats.bootstrap_indices(120, 40, seed=9)
    np.testing.assert_allclose(
        stats.bootstrap_auc(truth, probabilities, indices), _loop_auc(truth, probabilities, indices), rtol=0, atol=1e-12
    )


def test_bootstrap_auc_marks_degenerate_resamples_nan():
    # one positive in 15 samples: about a third of resamples miss it entirely
    truth = np.zeros((15, 1), dtype=int)
    truth[3] = 1
    scores = np.linspace(0, 1, 15)[:, None]
    indices = stats.bootstrap_indices(15, 200, seed=1)
    boot = stats.bootstrap_auc(truth, scores, indices)
    expected = _loop_auc(truth, scores, indices)
    np.testing.assert_array_equal(np.isnan(boot), np.isnan(expected))
    np.testing.assert_allclose(boot[~np.isnan(boot)], expected[~np.isnan(expected)], atol=1e-12)
    assert 0 < np.isnan(boot).sum() == int((truth[indices, 0].sum(axis=1) == 0).sum())


def test_bootstrap_auprc_matches_sklearn_loop():
    targets, probabilities = _multiclass_case(100, 3, seed=6, decimals=1)
    truth = np.eye(3, dtype=int)[targets]
    indices = stats.bootstrap_indices(100, 30, seed=2)
    expected = np.array(
        [[average_precision_score(truth[rows, c], probabilities[rows, c]) for c in range(3)] for rows in indices]
    )
    np.testing.assert_allclose(stats.bootstrap_auprc(truth, probabilities, indices), expected, rtol=0, atol=1e-12)


def test_bootstrap_f1_matches_sklearn_loop():
    rng = np.random.default_rng(7)
    truth = rng.integers(0, 2, (60, 4))
    predicted = np.where(rng.random((60, 4)) < 0.8, truth, 1 - truth)
    truth[:, 3] = (np.arange(60) == 0).astype(int)  # rare class: some resamples have tp + fp + fn == 0
    predicted[:, 3] = 0
    indices = stats.bootstrap_indices(60, 50, seed=3)
    expected = np.array([f1_score(truth[rows], predicted[rows], average=None, zero_division=0) for rows in indices])
    np.testing.assert_allclose(stats.bootstrap_f1(truth, predicted, indices), expected, rtol=0, atol=1e-12)


def test_bootstrap_indices_are_deterministic_and_seeded():
    a = stats.bootstrap_indices(50, 20, seed=11)
    assert a.shape == (20, 50) and a.dtype == np.int64
    np.testing.assert_array_equal(a, stats.bootstrap_indices(50, 20, seed=11))
    assert not np.array_equal(a, stats.bootstrap_indices(50, 20, seed=12))
    assert a.min() >= 0 and a.max() < 50
    groups = np.repeat(np.arange(10), 5)
    np.testing.assert_array_equal(
        stats.bootstrap_indices(50, 20, 11, groups), stats.bootstrap_indices(50, 20, 11, groups)
    )
    with pytest.raises(ValueError, match="seed must be an integer"):
        stats.bootstrap_indices(50, 20, None)


def test_clustered_bootstrap_keeps_patients_whole():
    rng = np.random.default_rng(8)
    sizes = rng.integers(1, 6, 40)
    patients = np.array([f"p{i:02d}" for i in rng.permutation(np.repeat(np.arange(40), sizes))])  # interleaved rows
    n = len(patients)
    rows_of = {p: list(np.flatnonzero(patients == p)) for p in np.unique(patients)}
    indices = stats.bootstrap_indices(n, 100, seed=4, groups=patients)
    assert indices.shape == (100, n)
    for replicate in indices:
        position = 0
        while position < n:
            patient_rows = rows_of[patients[replicate[position]]]
            run = list(replicate[position : position + len(patient_rows)])
            if position + len(patient_rows) <= n:
                assert run == patient_rows  # a drawn patient brings all of its rows
            else:
                assert run == patient_rows[: len(run)]  # only the last draw may be cut to keep n rows
            position += len(patient_rows)


def test_clustered_bootstrap_with_equal_patients_resamples_whole_patients_only():
    patients = np.repeat(np.arange(12), 3)
    indices = stats.bootstrap_indices(36, 50, seed=0, groups=patients)
    for replicate in indices:
        counts = np.bincount(replicate, minlength=36).reshape(12, 3)
        assert (counts == counts[:, :1]).all()  # all three rows of a patient drawn equally often
        assert counts[:, 0].sum() == 12


def test_clustered_bootstrap_treats_missing_patient_ids_as_singletons():
    patients = np.array(["a", "a", "", "", None, "b", "b"], dtype=object)
    codes = stats._group_codes(patients, 7)
    assert codes[0] == codes[1] and codes[5] == codes[6]
    assert len({codes[2], codes[3], codes[4], codes[0], codes[5]}) == 5


def _reference_clustered_indices(n: int, n_boot: int, seed: int, groups: np.ndarray) -> np.ndarray:
    """bootstrap_indices' specification as a plain loop: rounds of (n_boot, 1.2 K + 8) int64 patient draws until
    every replicate has n rows, then each replicate's drawn patients' rows concatenated and cut to n."""
    codes = stats._group_codes(groups, n)
    rows_of = [np.flatnonzero(codes == k) for k in range(codes.max() + 1)]
    rng = np.random.default_rng(seed)
    size = int(np.ceil(1.2 * len(rows_of))) + 8
    draws = rng.integers(0, len(rows_of), size=(n_boot, size))
    while any(sum(len(rows_of[k]) for k in row) < n for row in draws):
        draws = np.concatenate([draws, rng.integers(0, len(rows_of), size=(n_boot, size))], axis=1)
    out = np.empty((n_boot, n), dtype=np.int64)
    for b, row in enumerate(draws):
        collected = []
        for k in row:
            collected.extend(rows_of[k])
            if len(collected) >= n:
                break
        out[b] = collected[:n]
    return out


@pytest.mark.parametrize("block_elements", [None, 64])
def test_clustered_bootstrap_indices_equal_the_plain_loop(monkeypatch, block_elements):
    """The blockwise expansion (int32 draws, one block of replicates at a time) draws exactly the resamples of
    the specification, whatever the block size: results stored from earlier runs stay valid."""
    from medprobe.stats import bootstrap

    if block_elements is not None:
        monkeypatch.setattr(bootstrap, "_BLOCK_ELEMENTS", block_elements)
    rng = np.random.default_rng(12)
    sizes = rng.integers(1, 9, 30)  # uneven patients: replicates need more than one round of draws
    patients = rng.permutation(np.repeat(np.arange(30), sizes)).astype(object)
    patients[rng.random(len(patients)) < 0.1] = None  # missing ids: singletons
    n = len(patients)
    for seed, n_boot in ((0, 1), (1, 37), (2, 200)):
        indices = stats.bootstrap_indices(n, n_boot, seed, patients)
        assert indices.dtype == np.int64
        np.testing.assert_array_equal(indices, _reference_clustered_indices(n, n_boot, seed, patients))
    # one patient: one draw fills every replicate
    np.testing.assert_array_equal(stats.bootstrap_indices(5, 3, 0, np.zeros(5)), np.tile(np.arange(5), (3, 1)))


def test_bootstrap_auc_and_auprc_match_sklearn_per_replicate_on_clustered_resamples(monkeypatch):
    """The packed, replicate-major engine against roc_auc_score / average_precision_score replicate by
    replicate: heavy ties, patient-clustered resamples, a rare class (resamples without positives), resamples of
    another length than the test set, and blocks so small that most hold one group of 4 replicates (the last
    one padded); the results must not depend on the block size at all."""
    from medprobe.stats import metrics

    targets, probabilities = _multiclass_case(150, 4, seed=21, decimals=1)
    truth = np.eye(4, dtype=int)[targets]
    truth[:, 3] = 0
    truth[[5, 77], 3] = 1  # rare class
    patients = np.arange(150) // 4
    indices = stats.bootstrap_indices(150, 45, seed=5, groups=patients)
    for rows in (indices, indices[:, :97]):
        auc, auprc = metrics._bootstrap_ranked(truth, probabilities, rows, want_auc=True, want_auprc=True)
        expected_auprc = np.full(auprc.shape, np.nan)
        for b, sample in enumerate(rows):
            for c in range(4):
                if truth[sample, c].any():
                    expected_auprc[b, c] = average_precision_score(truth[sample, c], probabilities[sample, c])
        np.testing.assert_allclose(auc, _loop_auc(truth, probabilities, rows), rtol=0, atol=1e-12)
        np.testing.assert_allclose(auprc, expected_auprc, rtol=0, atol=1e-12)
        assert np.isnan(auc[:, 3]).any() and not np.isnan(auc[:, 3]).all()
        np.testing.assert_array_equal(stats.bootstrap_auc(truth, probabilities, rows), auc)
        np.testing.assert_array_equal(stats.bootstrap_auprc(truth, probabilities, rows), auprc)
        monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 2 * 150)  # one group of 4 replicates per block
        small = metrics._bootstrap_ranked(truth, probabilities, rows, want_auc=True, want_auprc=True)
        monkeypatch.undo()
        np.testing.assert_array_equal(small[0], auc)
        np.testing.assert_array_equal(small[1], auprc)


def test_bootstrap_auc_with_two_lanes_per_word():
    """Resamples of 2**16 draws or more count in uint32 lanes (2 replicates per word) instead of uint16 ones."""
    rng = np.random.default_rng(4)
    truth = np.eye(2, dtype=int)[rng.integers(0, 2, 40)]
    scores = np.round(rng.random((40, 2)), 1)
    indices = rng.integers(0, 40, size=(3, 1 << 16))
    expected = [[average_precision_score(truth[rows, c], scores[rows, c]) for c in range(2)] for rows in indices]
    np.testing.assert_allclose(
        stats.bootstrap_auc(truth, scores, indices), _loop_auc(truth, scores, indices), atol=1e-12
    )
    np.testing.assert_allclose(stats.bootstrap_auprc(truth, scores, indices), expected, rtol=0, atol=1e-12)


def test_percentile_ci_matches_numpy_and_skips_nan():
    values = np.random.default_rng(9).normal(size=500)
    values[::50] = np.nan
    low, high = stats.percentile_ci(values, 0.9)
    expected = np.percentile(values[~np.isnan(values)], [5, 95])
    assert (low, high) == pytest.approx(tuple(expected), abs=1e-15)


# ---------------------------------------------------------------------------------------------- score_predictions


def test_score_predictions_multiclass_matches_sklearn():
    targets, probabilities = _multiclass_case(150, 5, seed=10, signal=1.0)
    classes = ["0", "1", "2", "3", "4"]
    scores = stats.score_predictions("multiclass", classes, targets, probabilities, n_boot=60, seed=3, graded=True)
    predicted = probabilities.argmax(axis=1)
    truth = np.eye(5, dtype=int)[targets]
    for c, name in enumerate(classes):
        assert scores.point[(name, "auc")] == pytest.approx(roc_auc_score(truth[:, c], probabilities[:, c]), abs=1e-12)
        assert scores.point[(name, "support")] == truth[:, c].sum()
    assert scores.point[("macro", "auc")] == pytest.approx(
        np.mean([roc_auc_score(truth[:, c], probabilities[:, c]) for c in range(5)]), abs=1e-12
    )
    assert scores.point[("macro", "f1")] == pytest.approx(f1_score(targets, predicted, average="macro"), abs=1e-12)
    assert scores.point[("macro", "balanced_accuracy")] == pytest.approx(
        balanced_accuracy_score(targets, predicted), abs=1e-12
    )
    assert scores.point[("macro", "kappa_quadratic")] == pytest.approx(
        cohen_kappa_score(targets, predicted, weights="quadratic", labels=list(range(5))), abs=1e-12
    )

    # replicates of the macro metrics vs sklearn on the same resamples
    indices = stats.bootstrap_indices(150, 60, seed=3)
    for b in (0, 17, 59):
        rows = indices[b]
        assert scores.replicates[("macro", "f1")][b] == pytest.approx(
            f1_score(targets[rows], predicted[rows], average="macro"), abs=1e-12
        )
        assert scores.replicates[("macro", "balanced_accuracy")][b] == pytest.approx(
            balanced_accuracy_score(targets[rows], predicted[rows]), abs=1e-12
        )
        assert scores.replicates[("macro", "kappa_quadratic")][b] == pytest.approx(
            cohen_kappa_score(targets[rows], predicted[rows], weights="quadratic", labels=list(range(5))), abs=1e-12
        )
        assert scores.replicates[("2", "f1")][b] == pytest.approx(
            f1_score(targets[rows] == 2, predicted[rows] == 2, zero_division=0), abs=1e-12
        )


def _binary_case(n: int, seed: int, prevalence: float = 0.5, signal: float = 0.3):
    """Targets (n,) 0/1 and two-column probabilities; rounding makes ties on purpose."""
    rng = np.random.default_rng(seed)
    targets = (rng.random(n) < prevalence).astype(int)
    positive = np.clip(signal * targets + rng.random(n) * (1 - signal), 0, 1).round(2)
    return targets, np.column_stack([1 - positive, positive])


def test_score_predictions_binary_uses_positive_class_and_paper_convention():
    targets, probabilities = _binary_case(120, seed=11)
    positive = probabilities[:, 1]
    scores = stats.score_predictions("binary", ["benign", "malignant"], targets, probabilities, n_boot=50, seed=0)
    predicted = probabilities.argmax(axis=1)
    assert scores.point[("malignant", "auc")] == pytest.approx(roc_auc_score(targets, positive), abs=1e-12)
    assert scores.point[("malignant", "f1")] == pytest.approx(f1_score(targets, predicted), abs=1e-12)
    assert scores.point[("malignant", "auprc")] == pytest.approx(average_precision_score(targets, positive), abs=1e-12)
    assert scores.point[("malignant", "support")] == targets.sum()
    assert scores.point[("benign", "f1")] == pytest.approx(f1_score(targets, predicted, pos_label=0), abs=1e-12)
    assert scores.point[("benign", "support")] == (targets == 0).sum()
    assert scores.point[("macro", "balanced_accuracy")] == pytest.approx(
        balanced_accuracy_score(targets, predicted), abs=1e-12
    )
    # AUC and AUPRC rank one class: only the positive class has them, and the macro rows repeat it
    assert set(scores.point) == {
        ("benign", "f1"),
        ("benign", "support"),
        ("malignant", "auc"),
        ("malignant", "f1"),
        ("malignant", "auprc"),
        ("malignant", "support"),
        ("macro", "auc"),
        ("macro", "f1"),
        ("macro", "f1_positive"),
        ("macro", "auprc"),
        ("macro", "balanced_accuracy"),
    }
    for metric in ("auc", "auprc"):
        assert scores.point[("macro", metric)] == scores.point[("malignant", metric)]
        np.testing.assert_array_equal(scores.replicates[("macro", metric)], scores.replicates[("malignant", metric)])
    np.testing.assert_array_equal(scores.replicates[("macro", "f1_positive")], scores.replicates[("malignant", "f1")])


@pytest.mark.parametrize("n, prevalence, seed", [(200, 0.5, 21), (150, 0.15, 22), (14, 0.1, 23)])
def test_binary_macro_f1_is_sklearn_macro_mean_of_both_classes(n, prevalence, seed):
    targets, probabilities = _binary_case(n, seed=seed, prevalence=prevalence)
    predicted = probabilities.argmax(axis=1)
    assert 0 < predicted.sum() < n and 0 < targets.sum() < n  # both classes present and predicted
    scores = stats.score_predictions("binary", ["benign", "malignant"], targets, probabilities, n_boot=300, seed=seed)
    expected = f1_score(targets, predicted, average="macro")
    assert scores.point[("macro", "f1")] == pytest.approx(expected, abs=1e-12)
    assert scores.point[("macro", "f1")] == pytest.approx(
        (scores.point[("benign", "f1")] + scores.point[("malignant", "f1")]) / 2, abs=1e-12
    )

    # every replicate against scikit-learn's default labels (those in the truth or the predictions)
    indices = stats.bootstrap_indices(n, 300, seed=seed)
    loop = np.array([f1_score(targets[rows], predicted[rows], average="macro") for rows in indices])
    np.testing.assert_allclose(scores.replicates[("macro", "f1")], loop, rtol=0, atol=1e-12)
    # a replicate in which one class is neither present nor predicted averages the other class alone
    one_class = np.array([len(np.union1d(targets[rows], predicted[rows])) == 1 for rows in indices])
    assert scores.n_degenerate[("macro", "f1")] == one_class.sum()
    if n == 14:
        assert one_class.any()  # the small case does exercise the skipped class


def test_binary_macro_f1_with_only_negatives_in_the_test_set():
    # an organ with only benign patches: the positive class's F1 is 0, the macro F1 is not
    targets = np.zeros(30, dtype=int)
    positive = np.linspace(0.05, 0.7, 30).round(2)  # the last ten are predicted malignant
    probabilities = np.column_stack([1 - positive, positive])
    predicted = probabilities.argmax(axis=1)
    assert 0 < predicted.sum() < 30
    scores = stats.score_predictions("binary", ["benign", "malignant"], targets, probabilities, n_boot=40, seed=1)
    f1_negative = f1_score(targets, predicted, pos_label=0)
    assert scores.point[("macro", "f1")] == pytest.approx(f1_score(targets, predicted, average="macro"), abs=1e-12)
    assert scores.point[("macro", "f1")] == pytest.approx(
        f1_score(targets, predicted, average="macro", labels=[0, 1], zero_division=0), abs=1e-12
    )
    assert scores.point[("macro", "f1")] == pytest.approx(np.mean([f1_negative, 0.0]), abs=1e-12)
    assert scores.point[("macro", "f1")] > 0
    assert scores.point[("macro", "f1_positive")] == 0.0 == scores.point[("malignant", "f1")]
    assert np.isnan(scores.point[("malignant", "auc")])

    # nothing predicted malignant either: the positive class is absent, so the macro F1 is the benign F1
    # (scikit-learn's default labels; an explicit labels=[0, 1] would average in a 0 by zero_division)
    confident = np.column_stack([np.full(30, 0.9), np.full(30, 0.1)])
    scores = stats.score_predictions("binary", ["benign", "malignant"], targets, confident, n_boot=40, seed=1)
    assert scores.point[("macro", "f1")] == f1_score(targets, np.zeros(30, dtype=int), average="macro") == 1.0
    assert scores.point[("macro", "f1_positive")] == 0.0
    np.testing.assert_array_equal(scores.replicates[("macro", "f1")], 1.0)
    assert scores.n_degenerate[("macro", "f1")] == 40


def test_binary_f1_positive_is_sklearn_binary_f1():
    targets, probabilities = _binary_case(90, seed=24, prevalence=0.3)
    predicted = probabilities.argmax(axis=1)
    scores = stats.score_predictions("binary", ["no", "yes"], targets, probabilities, n_boot=120, seed=6)
    assert scores.point[("macro", "f1_positive")] == pytest.approx(
        f1_score(targets, predicted, average="binary"), abs=1e-12
    )
    indices = stats.bootstrap_indices(90, 120, seed=6)
    loop = np.array([f1_score(targets[rows], predicted[rows], average="binary", zero_division=0) for rows in indices])
    np.testing.assert_allclose(scores.replicates[("macro", "f1_positive")], loop, rtol=0, atol=1e-12)
    assert scores.n_degenerate[("macro", "f1_positive")] == scores.n_degenerate[("yes", "f1")]


def test_binary_macro_f1_replicates_match_sklearn_under_patient_clusters():
    targets, probabilities = _binary_case(80, seed=25, prevalence=0.4)
    predicted = probabilities.argmax(axis=1)
    groups = np.repeat(np.arange(20), 4)
    scores = stats.score_predictions("binary", ["n", "p"], targets, probabilities, n_boot=100, seed=2, groups=groups)
    indices = stats.bootstrap_indices(80, 100, seed=2, groups=groups)
    loop = np.array([f1_score(targets[rows], predicted[rows], average="macro") for rows in indices])
    np.testing.assert_allclose(scores.replicates[("macro", "f1")], loop, rtol=0, atol=1e-12)
    row = next(r for r in scores.rows() if (r["class"], r["metric"]) == ("macro", "f1"))
    assert row["value"] == pytest.approx(f1_score(targets, predicted, average="macro"), abs=1e-12)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(np.percentile(loop, [2.5, 97.5])), abs=1e-12)


def test_score_predictions_multilabel_matches_sklearn():
    rng = np.random.default_rng(12)
    truth = (rng.random((140, 4)) < [0.5, 0.3, 0.1, 0.2]).astype(int)
    probabilities = np.clip(0.4 * truth + 0.6 * rng.random((140, 4)), 0, 1).round(2)
    findings = ["effusion", "nodule", "fracture", "scoliosis"]
    scores = stats.score_predictions("multilabel", findings, truth, probabilities, n_boot=40, seed=5)
    flagged = (probabilities >= 0.5).astype(int)
    for c, name in enumerate(findings):
        assert scores.point[(name, "auc")] == pytest.approx(roc_auc_score(truth[:, c], probabilities[:, c]), abs=1e-12)
        assert scores.point[(name, "auprc")] == pytest.approx(
            average_precision_score(truth[:, c], probabilities[:, c]), abs=1e-12
        )
    assert scores.point[("macro", "auc")] == pytest.approx(
        roc_auc_score(truth, probabilities, average="macro"), abs=1e-12
    )
    assert scores.point[("macro", "f1")] == pytest.approx(
        f1_score(truth, flagged, average="macro", zero_division=0), abs=1e-12
    )
    assert scores.point[("macro", "auprc")] == pytest.approx(
        average_precision_score(truth, probabilities, average="macro"), abs=1e-12
    )


def test_rows_report_nan_sd_and_percentile_ci():
    targets, probabilities = _multiclass_case(90, 3, seed=13)
    scores = stats.score_predictions("multiclass", ["a", "b", "c"], targets, probabilities, n_boot=80, seed=1, ci=0.9)
    rows = {(row["class"], row["metric"]): row for row in scores.rows()}
    assert set(rows) == set(scores.point)
    row = rows[("b", "auc")]
    replicates = scores.replicates[("b", "auc")]
    assert row["sd"] == pytest.approx(np.nanstd(replicates, ddof=1), abs=1e-15)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(np.percentile(replicates, [5, 95])), abs=1e-15)
    assert np.isnan(rows[("a", "support")]["sd"]) and np.isnan(rows[("a", "support")]["ci_low"])
    assert list(rows[("a", "auc")]) == ["class", "metric", "value", "sd", "ci_low", "ci_high", "n_degenerate"]


def test_degenerate_replicates_are_counted_not_dropped():
    # class "rare" has two positives in 20 samples, so many resamples contain none of them
    targets = np.zeros(20, dtype=int)
    targets[[4, 11]] = 1
    targets[10:] = np.where(targets[10:] == 1, 1, 2)
    probabilities = np.full((20, 3), 0.2)
    probabilities[np.arange(20), targets] = 0.6
    scores = stats.score_predictions(
        "multiclass", ["common", "rare", "other"], targets, probabilities, n_boot=300, seed=2
    )
    indices = stats.bootstrap_indices(20, 300, seed=2)
    missing_rare = (targets[indices] == 1).sum(axis=1) == 0
    assert missing_rare.sum() > 0
    assert scores.n_degenerate[("rare", "auc")] == missing_rare.sum()
    assert np.isnan(scores.replicates[("rare", "auc")]).sum() == missing_rare.sum()
    assert len(scores.replicates[("rare", "auc")]) == 300  # kept as NaN, not removed
    # perfect predictions: F1 is undefined (0 by convention) exactly where the class is absent
    assert scores.n_degenerate[("rare", "f1")] == missing_rare.sum()
    assert scores.n_degenerate[("macro", "auc")] == missing_rare.sum()
    row = next(r for r in scores.rows() if (r["class"], r["metric"]) == ("rare", "auc"))
    assert row["n_degenerate"] == missing_rare.sum()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="ordinal"), "kind must be one of"),
        (dict(targets=np.array([0, 1, 5, 0])), "class index 5"),
        (dict(probabilities=np.ones((4, 2))), r"shape \(n, 3\)"),
        (dict(ci=1.5), "ci must lie"),
        (dict(n_boot=0), "n_boot must be a positive integer"),
        (dict(groups=np.array(["a", "b"])), "groups must be a 1-D array"),
    ],
)
def test_score_predictions_rejects_bad_input_with_named_value(kwargs, message):
    arguments = dict(
        kind="multiclass", classes=["x", "y", "z"], targets=np.array([0, 1, 2, 0]), probabilities=np.full((4, 3), 1 / 3)
    )
    arguments.update(kwargs)
    options = {key: arguments.pop(key) for key in ("n_boot", "ci", "groups") if key in arguments}
    with pytest.raises(ValueError, match=message):
        stats.score_predictions(
            arguments["kind"], arguments["classes"], arguments["targets"], arguments["probabilities"], **options
        )


# ---------------------------------------------------------------------------------------------- comparisons


def test_compare_identical_predictions_gives_zero_difference_and_p_one():
    targets, probabilities = _multiclass_case(100, 3, seed=14)
    a = stats.score_predictions("multiclass", ["a", "b", "c"], targets, probabilities, n_boot=100, seed=0)
    b = stats.score_predictions("multiclass", ["a", "b", "c"], targets, probabilities, n_boot=100, seed=0)
    rows = stats.compare(a, b)
    assert {row["test"] for row in rows} == {"bootstrap", "paired_t"}
    assert not any(row["metric"] == "support" for row in rows)
    assert len(rows) == 2 * sum(metric != "support" for _, metric in a.point)
    for row in rows:
        assert row["difference"] == 0.0 and row["p_value"] == 1.0
        assert row["ci_low"] == 0.0 and row["ci_high"] == 0.0


def test_compare_detects_clearly_better_model():
    rng = np.random.default_rng(15)
    targets = rng.integers(0, 2, 300)
    good = np.clip(0.5 * targets + 0.5 * rng.random(300), 0, 1)
    weak = np.clip(0.1 * targets + 0.9 * rng.random(300), 0, 1)
    groups = np.repeat(np.arange(100), 3)
    better = stats.score_predictions(
        "binary", ["no", "yes"], targets, np.column_stack([1 - good, good]), n_boot=200, seed=1, groups=groups
    )
    worse = stats.score_predictions(
        "binary", ["no", "yes"], targets, np.column_stack([1 - weak, weak]), n_boot=200, seed=1, groups=groups
    )
    rows = {(r["class"], r["metric"], r["test"]): r for r in stats.compare(better, worse)}
    boot = rows[("macro", "auc", "bootstrap")]
    assert boot["difference"] == pytest.approx(better.point[("macro", "auc")] - worse.point[("macro", "auc")])
    assert boot["difference"] > 0.2 and boot["ci_low"] > 0
    assert boot["p_value"] == pytest.approx(1 / 200)  # every replicate difference > 0: floored at 1/B
    deltas = better.replicates[("macro", "auc")] - worse.replicates[("macro", "auc")]
    assert (boot["ci_low"], boot["ci_high"]) == pytest.approx(tuple(np.percentile(deltas, [2.5, 97.5])))
    t_row = rows[("macro", "auc", "paired_t")]
    expected_t = scipy_stats.ttest_rel(better.replicates[("macro", "auc")], worse.replicates[("macro", "auc")])
    assert t_row["p_value"] == pytest.approx(expected_t.pvalue) and t_row["p_value"] < 1e-10


def test_compare_binary_covers_both_f1_conventions():
    targets, probabilities = _binary_case(120, seed=26, prevalence=0.3)
    other = np.round(np.clip(probabilities + np.random.default_rng(2).normal(0, 0.2, probabilities.shape), 0, 1), 2)
    a = stats.score_predictions("binary", ["benign", "malignant"], targets, probabilities, n_boot=150, seed=3)
    b = stats.score_predictions("binary", ["benign", "malignant"], targets, other, n_boot=150, seed=3)
    rows = {(r["class"], r["metric"], r["test"]): r for r in stats.compare(a, b)}
    for test in ("bootstrap", "paired_t"):
        assert {(name, metric) for name, metric, kind in rows if kind == test} == {
            key for key in a.point if key[1] != "support"
        }
    for metric in ("f1", "f1_positive"):
        key = ("macro", metric)
        boot = rows[("macro", metric, "bootstrap")]
        assert boot["difference"] == pytest.approx(a.point[key] - b.point[key], abs=1e-12)
        deltas = a.replicates[key] - b.replicates[key]
        assert (boot["ci_low"], boot["ci_high"]) == pytest.approx(tuple(np.percentile(deltas, [2.5, 97.5])), abs=1e-12)
        expected_t = scipy_stats.ttest_rel(a.replicates[key], b.replicates[key])
        assert rows[("macro", metric, "paired_t")]["p_value"] == pytest.approx(expected_t.pvalue)
    # the macro F1 difference is the difference of the class means, replicate by replicate
    np.testing.assert_allclose(
        a.replicates[("macro", "f1")] - b.replicates[("macro", "f1")],
        (
            a.replicates[("benign", "f1")]
            + a.replicates[("malignant", "f1")]
            - b.replicates[("benign", "f1")]
            - b.replicates[("malignant", "f1")]
        )
        / 2,
        rtol=0,
        atol=1e-12,
    )


def test_compare_bootstrap_p_value_is_two_sided_share():
    targets, probabilities = _multiclass_case(60, 2, seed=16, signal=0.3)
    other = np.round(np.clip(probabilities + np.random.default_rng(1).normal(0, 0.15, probabilities.shape), 0, 1), 2)
    a = stats.score_predictions("binary", ["n", "p"], targets, probabilities, n_boot=150, seed=4)
    b = stats.score_predictions("binary", ["n", "p"], targets, other, n_boot=150, seed=4)
    row = next(r for r in stats.compare(a, b) if (r["class"], r["metric"], r["test"]) == ("p", "auc", "bootstrap"))
    deltas = a.replicates[("p", "auc")] - b.replicates[("p", "auc")]
    deltas = deltas[~np.isnan(deltas)]
    expected = min(1.0, max(2 * min(np.mean(deltas <= 0), np.mean(deltas >= 0)), 1 / len(deltas)))
    assert row["p_value"] == pytest.approx(expected)


def test_compare_rejects_unpaired_scores():
    targets, probabilities = _multiclass_case(40, 2, seed=17)
    base = stats.score_predictions("binary", ["n", "p"], targets, probabilities, n_boot=30, seed=0)
    with pytest.raises(ValueError, match="n=39"):
        stats.compare(base, stats.score_predictions("binary", ["n", "p"], targets[:39], probabilities[:39], n_boot=30))
    with pytest.raises(ValueError, match="n_boot=31"):
        stats.compare(base, stats.score_predictions("binary", ["n", "p"], targets, probabilities, n_boot=31))
    with pytest.raises(ValueError, match="different bootstrap resamples"):
        stats.compare(base, stats.score_predictions("binary", ["n", "p"], targets, probabilities, n_boot=30, seed=1))


def test_holm_matches_hand_computation():
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan])
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(stats.holm(p), [0.03, 0.06, 0.06, 0.02, np.nan])
    np.testing.assert_allclose(stats.holm(np.array([0.5, 0.9])), [1.0, 1.0])
    with pytest.raises(ValueError, match="p_values must lie in"):
        stats.holm(np.array([0.2, 1.3]))


# ---------------------------------------------------------------------------------------------- DeLong


def _delong_direct(truth: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """DeLong et al. (1988) written out: O(m k) kernel psi, structural components V10/V01, covariance S."""
    out = []
    for scores in (a, b):
        x, y = scores[truth == 1], scores[truth == 0]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        out.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    (auc_a, v10_a, v01_a), (auc_b, v10_b, v01_b) = out
    m, k = len(v10_a), len(v01_a)
    s10 = np.cov(np.vstack([v10_a, v10_b]))
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    s = s10 / m + s01 / k
    variance = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    z = (auc_a - auc_b) / np.sqrt(variance)
    return auc_a - auc_b, 2 * scipy_stats.norm.sf(abs(z))


@pytest.mark.parametrize("decimals", [None, 1])  # 1 decimal: heavy ties within and across classes
def test_fast_delong_equals_direct_structural_components(decimals):
    rng = np.random.default_rng(21)
    truth = rng.integers(0, 2, 250)
    a = truth * 0.8 + rng.normal(size=250)
    b = truth * 0.4 + rng.normal(size=250) + 0.3 * a
    if decimals is not None:
        a, b = np.round(a, decimals), np.round(b, decimals)
    auc, v10, v01 = stats.delong_components(truth, np.column_stack([a, b]))
    assert auc == pytest.approx([roc_auc_score(truth, a), roc_auc_score(truth, b)], abs=1e-12)
    for column, scores in enumerate((a, b)):
        x, y = scores[truth == 1], scores[truth == 0]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        np.testing.assert_allclose(v10[:, column], psi.mean(axis=1), atol=1e-12)
        np.testing.assert_allclose(v01[:, column], psi.mean(axis=0), atol=1e-12)
    result = stats.delong_test(truth, a, b)
    difference, p = _delong_direct(truth, a, b)
    assert result["difference"] == pytest.approx(difference, abs=1e-12)
    assert result["p_value"] == pytest.approx(p, rel=1e-9)
    assert 0 < result["p_value"] < 1
    half = 1.959963984540054 * result["sd"]
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((difference - half, difference + half))


def test_delong_identical_models_and_undefined_auc():
    truth = np.array([0, 1, 0, 1, 1, 0])
    scores = np.array([0.1, 0.9, 0.4, 0.35, 0.8, 0.2])
    result = stats.delong_test(truth, scores, scores)
    assert result["difference"] == 0 and result["p_value"] == 1.0 and result["sd"] == 0
    with pytest.raises(ValueError, match="0 positives"):
        stats.delong_test(np.zeros(6, dtype=int), scores, scores)


def test_delong_rows_per_class_and_degenerate_class():
    targets, probabilities = _multiclass_case(200, 3, seed=22, decimals=None)
    other = np.random.default_rng(2).dirichlet(np.ones(3), 200)
    rows = stats.delong_rows("multiclass", ["a", "b", "c"], targets, probabilities, other)
    assert [r["class"] for r in rows] == ["a", "b", "c"] and {r["test"] for r in rows} == {"delong"}
    for c, row in enumerate(rows):
        expected = stats.delong_test((targets == c).astype(int), probabilities[:, c], other[:, c])
        assert row["p_value"] == pytest.approx(expected["p_value"]) and row["p_value"] < 0.01
    targets_missing = np.where(targets == 2, 1, targets)  # no test sample of class "c": undefined, still a row
    rows = stats.delong_rows("multiclass", ["a", "b", "c"], targets_missing, probabilities, other)
    assert rows[2]["class"] == "c" and np.isnan(rows[2]["p_value"])
    binary = stats.delong_rows(
        "binary", ["n", "p"], (targets == 1).astype(int), probabilities[:, [0, 1]], other[:, [0, 1]]
    )
    assert [r["class"] for r in binary] == ["p", "macro"] and binary[0]["p_value"] == binary[1]["p_value"]


def test_midranks_are_scipys_rankdata_with_ties():
    import scipy.stats

    from medprobe.stats.metrics import midranks

    rng = np.random.default_rng(3)
    for values in (np.round(rng.normal(size=(300, 5)), 1), rng.integers(0, 3, size=(50, 2)), np.zeros((7, 1))):
        np.testing.assert_array_equal(midranks(values), scipy.stats.rankdata(values, axis=0))


def test_probe_jobs_start_without_scikit_learn_or_scipy_stats():
    """Every probe and efficiency job imports medprobe.probe: neither scikit-learn nor scipy.stats (about 1 s
    of each job's start on 2 cores) is imported by it; the SGD probe and the comparisons load them when used."""
    import subprocess
    import sys

    code = "import sys, medprobe.probe; print(sorted(m for m in ('sklearn', 'scipy.stats') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"

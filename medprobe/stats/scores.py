"""All metrics of one model's test predictions, with bootstrap replicates (the ``Scores`` of a model x task)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from medprobe.stats._checks import _check_ci, _indicator
from medprobe.stats.bootstrap import _group_codes, bootstrap_indices
from medprobe.stats.metrics import (
    _bootstrap_ranked,
    _f1_with_replicates,
    _nan_sd,
    _skipping_mean,
    auc_per_class,
    auprc_per_class,
    balanced_accuracy_from_confusion,
    bootstrap_confusion,
    confusion_matrix,
    percentile_ci,
    quadratic_kappa_from_confusion,
)

KINDS = ("binary", "multiclass", "multilabel")


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
            out.append(
                {
                    "class": name,
                    "metric": metric,
                    "value": float(value),
                    "sd": sd,
                    "ci_low": low,
                    "ci_high": high,
                    "n_degenerate": int(self.n_degenerate.get((name, metric), 0)),
                }
            )
        return out


class _Collector:
    """Point values, replicates and degenerate-replicate counts, filled metric by metric."""

    def __init__(self) -> None:
        self.point: dict[tuple[str, str], float] = {}
        self.replicates: dict[tuple[str, str], np.ndarray] = {}
        self.degenerate: dict[tuple[str, str], int] = {}

    def __call__(
        self, key: tuple[str, str], value: float, reps: np.ndarray | None, undefined: np.ndarray | None = None
    ) -> None:
        self.point[key] = float(value)
        if reps is not None:
            self.replicates[key] = reps
            self.degenerate[key] = int(np.isnan(reps).sum() if undefined is None else undefined.sum())


def score_predictions(
    kind: str,
    classes: list[str],
    targets: np.ndarray,
    probabilities: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
    ci: float = 0.95,
    graded: bool = False,
) -> Scores:
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
    classes, probabilities = _check_predictions(kind, classes, probabilities, ci, graded)
    n = probabilities.shape[0]
    truth, class_index = _truth(kind, classes, targets, n)
    indices = bootstrap_indices(n, n_boot, seed, groups)
    # the resamples are a function of (n, n_boot, seed, patient clusters): fingerprint those, not 8*B*n bytes
    digest = hashlib.sha1(
        f"{n}/{n_boot}/{int(seed)}/".encode() + (b"-" if groups is None else _group_codes(groups, n).tobytes())
    ).hexdigest()
    put = _Collector()
    test = _Test(classes, truth, class_index, probabilities, indices)
    if kind == "binary":
        _score_binary(put, test, graded)
    elif kind == "multiclass":
        _score_multiclass(put, test, graded)
    else:
        _score_multilabel(put, test)
    return Scores(
        kind=kind,
        classes=classes,
        point=put.point,
        replicates=put.replicates,
        n_degenerate=put.degenerate,
        n=n,
        n_boot=n_boot,
        ci=ci,
        resample_digest=digest,
    )


def _check_predictions(
    kind: str, classes: list[str], probabilities: np.ndarray, ci: float, graded: bool
) -> tuple[list[str], np.ndarray]:
    """The class names as strings and the probabilities as float64, after every argument check."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    _check_ci(ci)
    if graded and kind == "multilabel":
        raise ValueError("graded=True (quadratic kappa) needs ordered classes; it is not defined for kind 'multilabel'")
    classes = [str(name) for name in classes]
    if "macro" in classes:
        raise ValueError(f"classes must not contain the reserved name 'macro'; got {classes}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be unique; got {classes}")
    if kind == "binary" and len(classes) != 2:
        raise ValueError(f"kind 'binary' needs exactly 2 classes (negative, positive); got {classes}")
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(classes):
        raise ValueError(
            f"probabilities must have shape (n, {len(classes)}) for classes {classes}; got {probabilities.shape}"
        )
    if not np.isfinite(probabilities).all():
        raise ValueError("probabilities contain NaN or infinite values")
    if probabilities.shape[0] == 0:
        raise ValueError("probabilities is empty: no test samples to score")
    return classes, probabilities


def _truth(kind: str, classes: list[str], targets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The (n, C) 0/1 truth matrix and, for single-label tasks, the (n,) class indices."""
    if kind == "multilabel":
        return _indicator(targets, (n, len(classes)), "targets"), None
    class_index = np.asarray(targets)
    if class_index.shape != (n,) or class_index.dtype.kind not in "iu":
        raise ValueError(
            f"targets must be an integer class-index array of shape ({n},) for kind {kind!r}; "
            f"got {class_index.dtype} {class_index.shape}"
        )
    if class_index.size and (class_index.min() < 0 or class_index.max() >= len(classes)):
        bad = class_index[(class_index < 0) | (class_index >= len(classes))][0]
        raise ValueError(f"targets contain class index {bad}, outside [0, {len(classes)}) for classes {classes}")
    class_index = class_index.astype(np.int64)
    return np.eye(len(classes), dtype=np.int64)[class_index], class_index


@dataclass
class _Test:
    """One test set ready to score: class names, the ``(n, C)`` 0/1 truth, the class indices (single-label
    tasks), the probabilities and the bootstrap resamples."""

    classes: list[str]
    truth: np.ndarray
    class_index: np.ndarray | None
    probabilities: np.ndarray
    indices: np.ndarray


def _score_binary(put: _Collector, test: _Test, graded: bool) -> None:
    truth, probabilities, indices = test.truth, test.probabilities, test.indices
    positive = truth[:, 1:2]
    score = probabilities[:, 1:2]
    predicted_class = np.argmax(probabilities, axis=1)
    flagged = np.eye(2, dtype=np.int64)[predicted_class]
    auc_boot, auprc_boot = _bootstrap_ranked(positive, score, indices, want_auc=True, want_auprc=True)
    # F1 of both classes: the paper's binary F1 is f1_score(average="macro"), the mean of the two
    f1_point, f1_boot, f1_defined = _f1_with_replicates(truth, flagged, indices)
    negative_name, name = test.classes
    put((negative_name, "f1"), f1_point[0], f1_boot[:, 0], ~f1_defined[:, 0])
    put((negative_name, "support"), truth[:, 0].sum(), None)
    ranked = {
        "auc": (auc_per_class(positive, score)[0], auc_boot[:, 0]),
        "auprc": (auprc_per_class(positive, score)[0], auprc_boot[:, 0]),
    }
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
    _put_confusion_metrics(put, test, predicted_class, graded)


def _score_multiclass(put: _Collector, test: _Test, graded: bool) -> None:
    predicted_class = np.argmax(test.probabilities, axis=1)
    _score_per_class(put, test, np.eye(len(test.classes), dtype=np.int64)[predicted_class], with_auprc=False)
    _put_confusion_metrics(put, test, predicted_class, graded)


def _score_multilabel(put: _Collector, test: _Test) -> None:
    _score_per_class(put, test, (test.probabilities >= 0.5).astype(np.int64), with_auprc=True)


def _score_per_class(put: _Collector, test: _Test, flagged: np.ndarray, *, with_auprc: bool) -> None:
    """Each class's ``auc``, ``f1``, ``auprc`` (``with_auprc``) and ``support``, then their macro means: the
    metrics of a task with one score column per class (multiclass one-vs-rest, multilabel)."""
    truth, probabilities, indices = test.truth, test.probabilities, test.indices
    auc_point, auprc_point = auc_per_class(truth, probabilities), None
    auc_boot, auprc_boot = _bootstrap_ranked(truth, probabilities, indices, want_auc=True, want_auprc=with_auprc)
    if with_auprc:
        auprc_point = auprc_per_class(truth, probabilities)
    f1_point, f1_boot, f1_defined = _f1_with_replicates(truth, flagged, indices)
    for c, name in enumerate(test.classes):
        put((name, "auc"), auc_point[c], auc_boot[:, c])
        put((name, "f1"), f1_point[c], f1_boot[:, c], ~f1_defined[:, c])
        if with_auprc:
            put((name, "auprc"), auprc_point[c], auprc_boot[:, c])
        put((name, "support"), truth[:, c].sum(), None)
    _put_macro(put, "auc", auc_point, ~np.isnan(auc_point), auc_boot, ~np.isnan(auc_boot))
    point_defined = (truth.astype(bool) | flagged.astype(bool)).any(axis=0)
    _put_macro(put, "f1", f1_point, point_defined, f1_boot, f1_defined)
    if with_auprc:
        _put_macro(put, "auprc", auprc_point, ~np.isnan(auprc_point), auprc_boot, ~np.isnan(auprc_boot))


def _put_macro(
    put: _Collector,
    metric: str,
    point_values: np.ndarray,
    point_defined: np.ndarray,
    boot_values: np.ndarray,
    boot_defined: np.ndarray,
) -> None:
    """Macro mean over defined classes; replicates skipping any class are counted as degenerate."""
    put(
        ("macro", metric),
        _skipping_mean(point_values, point_defined),
        _skipping_mean(boot_values, boot_defined),
        (~boot_defined).any(axis=1),
    )


def _put_confusion_metrics(put: _Collector, test: _Test, predicted_class: np.ndarray, graded: bool) -> None:
    n_classes = len(test.classes)
    point_confusion = confusion_matrix(test.class_index, predicted_class, n_classes)
    boot_confusion = bootstrap_confusion(test.class_index, predicted_class, n_classes, test.indices)
    class_missing = (boot_confusion.sum(axis=2) == 0).any(axis=1)
    put(
        ("macro", "balanced_accuracy"),
        balanced_accuracy_from_confusion(point_confusion),
        balanced_accuracy_from_confusion(boot_confusion),
        class_missing,
    )
    if graded:
        put(
            ("macro", "kappa_quadratic"),
            quadratic_kappa_from_confusion(point_confusion),
            quadratic_kappa_from_confusion(boot_confusion),
        )

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

from medprobe.stats._checks import _indicator, _indicator_and_scores, _positive_int  # noqa: F401
from medprobe.stats.bootstrap import _BLOCK_ELEMENTS, _count_blocks, _group_codes, bootstrap_indices  # noqa: F401
from medprobe.stats.metrics import *  # noqa: F401,F403
from medprobe.stats.metrics import _bootstrap_ranked, _f1_from_counts, _f1_with_replicates  # noqa: F401
from medprobe.stats.scores import KINDS, Scores, score_predictions  # noqa: F401

# The paired comparisons need scipy.stats (~0.5 s to import): loaded on first use, so that the probes, which
# only score AUCs, start without it.
_COMPARE = ("compare", "delong_components", "delong_rows", "delong_test", "holm")


def __getattr__(name: str):
    if name in _COMPARE:
        import importlib

        return getattr(importlib.import_module("medprobe.stats.comparisons"), name)
    raise AttributeError(f"module 'medprobe.stats' has no attribute {name!r}")

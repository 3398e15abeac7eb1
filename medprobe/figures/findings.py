"""Figure 5: the headline metric per finding of a multilabel task (T7), findings with enough test positives."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from medprobe.figures.common import (
    Models,
    Tasks,
    bar_legend,
    grouped_bars,
    headline_metric,
    metric_label,
    new_figure,
    no_data,
    panel_title,
)
from medprobe.figures.performance import bar_table, class_order
from medprobe.figures.tables import MACRO, prepare
from medprobe.settings import FiguresSettings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


def support_filter(metrics: pd.DataFrame, task: str, models: Models, min_positives: int) -> pd.Series | None:
    """Findings with more than ``min_positives`` test positives, sorted by support (descending).

    Strictly more, as the authors' ``label_counts > 50``. Support comes from the ``support`` rows of
    the table (value = number of test positives). All models share the test set, so their counts
    agree; if they do not (a model skipped images), the smallest count is used, so that a finding is
    kept only where every model's AUC rests on enough positives.

    Returns:
        Series finding -> support, sorted by support descending, then finding name; None when the
        table has no ``support`` rows for the task (nothing to filter on).
    """
    rows = metrics[
        (metrics["task"] == task)
        & (metrics["metric"] == "support")
        & (metrics["class"] != MACRO)
        & metrics["model"].isin(list(models))
    ]
    if rows.empty:
        return None
    support = rows.groupby("class")["value"].min()
    kept = support[support > min_positives]
    order = sorted(kept.index, key=lambda finding: (-kept[finding], finding))
    return kept.reindex(order).rename("support")


def min_test_positives(tasks: Tasks, task: str) -> int:
    """``tasks.<task>.min_test_positives`` (0 when absent): findings need strictly more test positives."""
    value = tasks[task].get("min_test_positives", 0)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"tasks.{task}.min_test_positives is {value!r}; expected an integer >= 0")
    return int(value)


def figure5_findings(
    metrics: pd.DataFrame, tasks: Tasks, models: Models, task: str
) -> tuple[list[str], pd.Series | None]:
    """The findings Figure 5 draws, in order, and their test positives (None without support rows).

    The probe stage already probes only findings with more than ``tasks.<task>.min_test_positives``
    test positives; the same strict rule is applied here again to the ``support`` rows, where the
    table has them, so that a table from a run with a lower threshold still gives the paper's figure.
    With support rows the findings are sorted by support (descending), else they keep the order of
    :func:`~medprobe.figures.performance.class_order`.
    """
    threshold = min_test_positives(tasks, task)
    support = support_filter(metrics, task, models, threshold)
    if support is None:
        log.info("figure5: no 'support' rows for task %s; every finding in the table is drawn", task)
        return class_order(metrics, task, tasks[task]), None
    if support.empty:
        raise ValueError(
            f"figure5: no finding of task {task} has more than {threshold} test positives "
            f"(tasks.{task}.min_test_positives); lower the threshold or use more test data"
        )
    return list(support.index), support


def figure5(tables: Mapping[str, pd.DataFrame], tasks: Tasks, models: Models, options: FiguresSettings) -> Figure:
    """Figure 5: per-finding headline metric of the multilabel task ``figures.figure5_task``, in two
    side-by-side panels.

    Findings as in :func:`figure5_findings` (strictly more than ``tasks.<task>.min_test_positives``
    test positives, most frequent first); the first half of them in the left panel, the rest in the
    right one (the paper's 54 findings: 27 and 27). Horizontal bars, one per model, with SD error bars.
    """
    task = options.figure5_task
    metrics = prepare(tables["metrics"], "figure5: metrics table")
    metric = headline_metric(tasks, task, "figure5")
    findings, support = figure5_findings(metrics, tasks, models, task)
    values, sds = bar_table(metrics, task, metric, models, findings)
    values = values.dropna(how="all")
    sds = sds.reindex(index=values.index)
    if values.empty:
        raise no_data("figure5", [task], "metrics", f" (metric {metric})")
    findings = list(values.index)
    half = math.ceil(len(findings) / 2)
    halves = [findings[:half], findings[half:]] if len(findings) > 1 else [findings]

    row_height = 0.1 * values.shape[1] + 0.15
    figure = new_figure(width=6.0 * len(halves), height=max(4.0, 1.6 + half * row_height))
    axes = figure.subplots(1, len(halves), squeeze=False)[0]
    threshold = min_test_positives(tasks, task)
    rule = f" (findings with > {threshold} test positives)" if threshold else ""
    for ax, letter, part in zip(axes, "ab", halves):
        labels = [finding if support is None else f"{finding} (n={int(support[finding])})" for finding in part]
        # Keep bar heights equal in both panels: pad the shorter half with empty slots.
        padded = list(part) + [f"__pad{i}" for i in range(half - len(part))]
        grouped_bars(
            ax, values.reindex(padded), sds.reindex(padded), models, labels + [""] * (half - len(part)), horizontal=True
        )
        ax.set_title(panel_title(letter, task, tasks[task], rule), fontsize=9)
        ax.set_xlabel(metric_label(metric))
    bar_legend(figure, models, [values])
    return figure

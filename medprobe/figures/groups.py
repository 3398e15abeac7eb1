"""Figure S6: a task's metric within its sub-groups (T2: organ types), grouped bars per model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import pandas as pd

from medprobe.figures.common import (
    PANEL_LETTERS,
    Models,
    Tasks,
    bar_legend,
    grouped_bars,
    headline_metric,
    metric_label,
    new_figure,
    no_data,
    positive_class,
)
from medprobe.figures.performance import bar_table
from medprobe.figures.tables import MACRO, prepare
from medprobe.settings import FiguresSettings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: A panel: its y label, and bar heights and SDs with rows = groups, columns = models.
Panel = tuple[str, pd.DataFrame, pd.DataFrame]


def figureS6_panels(groups: pd.DataFrame, tasks: Tasks, models: Models, task: str) -> list[Panel]:
    """The panels of Figure S6: ``(y label, values, sds)``, values and SDs with rows = groups, columns = models.

    For an F1 task two panels: the paper's macro F1 (for a binary task the mean of both classes' F1)
    and the positive class's F1 (``f1_positive`` rows, or the positive class's own ``f1`` rows in
    tables without them). Otherwise one panel of the task's headline metric. Panels without any row
    are left out; all panels share the groups of the first, in sorted order.
    """
    metric = headline_metric(tasks, task, "figureS6")
    # Rows without a group (empty after :func:`~medprobe.figures.tables.prepare`) belong to no bar.
    rows = groups[groups["group"].str.strip() != ""]

    def table(metric_name: str, class_name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        return bar_table(rows, task, metric_name, models, None, category_column="group", class_name=class_name)

    panels = []
    if metric == "f1":
        positive = positive_class(tasks[task], task)
        macro_label = "macro F1 (mean of both classes)" if positive else "macro F1"
        panels.append((macro_label, *table("f1", MACRO)))
        if positive:
            values, sds = table("f1_positive", MACRO)
            if values.empty:
                values, sds = table("f1", positive)
            panels.append((f"F1 of {positive} (positive class)", values, sds))
    else:
        panels.append((metric_label(metric), *table(metric, MACRO)))
    panels = [(label, values, sds) for label, values, sds in panels if not values.isna().all().all()]
    if not panels:
        raise no_data("figureS6", [task], "groups", f" (class 'macro', metric {metric})")
    order = list(panels[0][1].index)
    return [(label, values.reindex(order), sds.reindex(order)) for label, values, sds in panels]


def figureS6(tables: Mapping[str, pd.DataFrame], tasks: Tasks, models: Models, options: FiguresSettings) -> Figure:
    """Figure S6: the task ``figures.figureS6_task`` per sub-group (organ), grouped bars per model with SD
    error bars, one panel per metric of :func:`figureS6_panels` (T2: macro F1 and the positive class's F1),
    stacked."""
    task = options.figureS6_task
    groups = prepare(tables["groups"], "figureS6: groups table", extra=("group",))
    panels = figureS6_panels(groups, tasks, models, task)
    n_groups, n_models = panels[0][1].shape
    figure = new_figure(width=min(max(6.0, 3.0 + 0.45 * n_groups * n_models), 18.0), height=3.8 * len(panels) + 0.6)
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    what = "organ" if task == "T2" else "group"
    for ax, letter, (label, values, sds) in zip(axes, PANEL_LETTERS, panels):
        grouped_bars(ax, values, sds, models, list(values.index))
        ax.set_title(f"({letter}) {task}: {tasks[task].get('name', task)}, by {what}", fontsize=10)
        ax.set_ylabel(label)
        ax.set_xlabel(what)
    bar_legend(figure, models, [values for _, values, _ in panels])
    return figure

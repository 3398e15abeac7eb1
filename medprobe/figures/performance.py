"""Figures 3 and 4: the headline metric of each task at its headline layer, grouped bars per model."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import pandas as pd

from medprobe.figures.common import (
    Models,
    Tasks,
    bar_legend,
    class_axis_label,
    configured_classes,
    grouped_bars,
    headline_metric,
    macro_tick_label,
    metric_label,
    new_figure,
    no_data,
    panel_title,
)
from medprobe.figures.tables import MACRO, prepare
from medprobe.settings import FiguresSettings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


def bar_table(
    table: pd.DataFrame,
    task: str,
    metric: str,
    models: Models,
    categories: Sequence[str] | None,
    category_column: str = "class",
    class_name: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Bar heights and SDs of one panel: rows = categories, columns = models (dict order).

    Args:
        table: a result table (already checked).
        task: task id.
        metric: metric to plot.
        models: models config; only models in it are plotted, in its order.
        categories: the x-axis categories in order (values of ``category_column``); ``None``
            takes the categories present in the table, sorted.
        category_column: ``class`` for per-class panels, ``group`` for Figure S6.
        class_name: when grouping by something other than class, keep only rows of this class.

    Returns:
        ``(values, sds)``, two DataFrames of the same shape; NaN where a model lacks a category.
        Categories and models with no row at all are dropped.

    Raises:
        ValueError: more than one row for the same task, model, category and metric (e.g. an
            efficiency table handed to a headline figure).
    """
    rows = table[(table["task"] == task) & (table["metric"] == metric)]
    if class_name is not None:
        rows = rows[rows["class"] == class_name]
    rows = rows[rows["model"].isin(list(models))]
    duplicated = rows.duplicated(["model", category_column], keep=False)
    if duplicated.any():
        first = rows[duplicated].iloc[0]
        count = int(((rows["model"] == first["model"]) & (rows[category_column] == first[category_column])).sum())
        raise ValueError(
            f"task {task}, model {first['model']}, {category_column} {first[category_column]!r}, "
            f"metric {metric}: {count} rows where one is expected "
            "(is this a layers or efficiency table instead of metrics?)"
        )
    if categories is None:
        categories = sorted(rows[category_column].unique())
    values = rows.pivot(index=category_column, columns="model", values="value")
    sds = rows.pivot(index=category_column, columns="model", values="sd")
    present_categories = [c for c in categories if c in values.index]
    present_models = [m for m in models if m in values.columns]
    values = values.reindex(index=present_categories, columns=present_models)
    sds = sds.reindex(index=present_categories, columns=present_models)
    values.index.name = sds.index.name = category_column
    values.columns.name = sds.columns.name = "model"
    return values, sds


def class_order(table: pd.DataFrame, task: str, task_conf: Mapping[str, Any]) -> list[str]:
    """Classes of a task in config order, then any extra classes found in the table (sorted).

    With ``classes: all`` there is no configured order: the classes come in the order they first
    appear in the table (the probe stage writes them in the data's finding order).
    """
    in_table = list(dict.fromkeys(table.loc[table["task"] == task, "class"]))
    in_table = [c for c in in_table if c != MACRO]
    configured = configured_classes(task_conf, task)
    if configured is None:
        return in_table
    extra = sorted(set(in_table) - set(configured))
    return configured + extra


class _BarPanel(NamedTuple):
    """One panel: a task's headline metric per class (``per_class``) or its macro value alone."""

    letter: str
    task: str
    per_class: bool


class _DrawnPanel(NamedTuple):
    panel: _BarPanel
    metric: str
    values: pd.DataFrame
    sds: pd.DataFrame
    tick_labels: list[str]


def _panel_bars(
    figure_name: str, metrics: pd.DataFrame, tasks: Tasks, models: Models, panel: _BarPanel
) -> _DrawnPanel | None:
    """The bars of ``panel``; None (logged) when its task is not configured or has no rows."""
    letter, task, per_class = panel
    if task not in tasks:
        log.warning("%s: task %s is not in the tasks config; panel (%s) skipped", figure_name, task, letter)
        return None
    metric = headline_metric(tasks, task)
    if per_class:
        values, sds = bar_table(metrics, task, metric, models, class_order(metrics, task, tasks[task]))
        tick_labels = list(values.index)
    else:
        values, sds = bar_table(metrics, task, metric, models, [MACRO])
        tick_labels = [macro_tick_label(task, tasks[task], metric)] * len(values.index)
    if values.empty or values.isna().all().all():
        log.warning("%s: no %s rows for task %s; panel (%s) skipped", figure_name, metric, task, letter)
        return None
    return _DrawnPanel(panel, metric, values, sds, tick_labels)


def _bar_figure(
    figure_name: str, metrics: pd.DataFrame, tasks: Tasks, models: Models, panels: Sequence[_BarPanel]
) -> Figure:
    """One row of bar panels, each in its task's headline metric; tasks without rows are left out."""
    metrics = prepare(metrics, f"{figure_name}: metrics table")
    drawn = [bars for panel in panels if (bars := _panel_bars(figure_name, metrics, tasks, models, panel))]
    if not drawn:
        raise no_data(figure_name, [panel.task for panel in panels], "metrics")
    # Per-class panels get width in proportion to their number of classes.
    widths = [max(len(bars.values.index), 1) if bars.panel.per_class else 1.4 for bars in drawn]
    figure = new_figure(width=min(max(6.0, 2.0 + 0.55 * sum(widths) + 0.9 * len(drawn)), 18.0), height=4.2)
    axes = figure.subplots(1, len(drawn), gridspec_kw={"width_ratios": widths}, squeeze=False)[0]
    for ax, bars in zip(axes, drawn):
        letter, task, per_class = bars.panel
        grouped_bars(ax, bars.values, bars.sds, models, bars.tick_labels)
        ax.set_title(panel_title(letter, task, tasks[task]), fontsize=9)
        ax.set_ylabel(metric_label(bars.metric))
        if per_class:
            ax.set_xlabel(class_axis_label(tasks[task]))
    bar_legend(figure, models, [bars.values for bars in drawn])
    return figure


def figure3(tables: Mapping[str, pd.DataFrame], tasks: Tasks, models: Models, options: FiguresSettings) -> Figure:
    """Figure 3 (pathology and dermatology): (a) T1 per class, (b) T2 overall, (c) T3 per class, (d) T4
    overall, each in the task's headline metric, with bootstrap-SD error bars."""
    panels = [
        _BarPanel("a", "T1", True),
        _BarPanel("b", "T2", False),
        _BarPanel("c", "T3", True),
        _BarPanel("d", "T4", False),
    ]
    return _bar_figure("figure3", tables["metrics"], tasks, models, panels)


def figure4(tables: Mapping[str, pd.DataFrame], tasks: Tasks, models: Models, options: FiguresSettings) -> Figure:
    """Figure 4 (ophthalmology, knee): (a) T5 per grade, (b) T6 overall, (c) T8 per grade."""
    panels = [_BarPanel("a", "T5", True), _BarPanel("b", "T6", False), _BarPanel("c", "T8", True)]
    return _bar_figure("figure4", tables["metrics"], tasks, models, panels)

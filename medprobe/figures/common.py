"""What every figure shares: the config lookups behind labels, colours and styles, grouped bars, the
legend, panels per discipline, and the one way a figure is written.

Figures are :class:`matplotlib.figure.Figure` objects rendered by the Agg canvas, never through
``pyplot``: the global backend stays untouched (the workflow and notebooks may import this package) and
nothing is registered in pyplot's figure manager, so a figure is released as soon as :func:`save` has
written and cleared it. matplotlib itself is imported when a figure is drawn, not with the package:
Snakemake reads the figure registry every time it starts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from medprobe.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

#: The config's ``tasks`` and ``models`` sections (figures read names, labels, metrics and classes of them).
Tasks = Mapping[str, Mapping[str, Any]]
Models = Mapping[str, Mapping[str, Any]]

DISCIPLINES: tuple[str, ...] = ("pathology", "dermatology", "ophthalmology", "radiology")
METRIC_LABELS: dict[str, str] = {
    "auc": "AUC",
    "f1": "F1",
    "balanced_accuracy": "Balanced accuracy",
    "auprc": "AUPRC",
    "kappa_quadratic": "Quadratic kappa",
}
PNG_DPI = 200
#: y limits for metrics in [0, 1]; a little headroom so a bar at 1.0 keeps its error bar visible.
UNIT_YLIM = (0.0, 1.05)
PANEL_LETTERS = "abcdefghij"

# Fixed palettes so that a model keeps its colour in every figure (models dict order = colour order).
MODEL_COLOURS = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


# --------------------------------------------------------------------------------------------
# Config lookups
# --------------------------------------------------------------------------------------------


def headline_metric(tasks: Tasks, task: str, figure_name: str = "") -> str:
    """The task's headline metric (``f1`` or ``auc``) from the tasks config; a ValueError (naming
    ``figure_name`` when given) if the task is not configured or has none."""
    where = f"{figure_name}: " if figure_name else ""
    if task not in tasks:
        raise ValueError(f"{where}task {task!r} is not in the tasks config (known: {', '.join(tasks)})")
    metric = tasks[task].get("metric")
    if not metric:
        raise ValueError(f"{where}tasks.{task}: key 'metric' is missing")
    return str(metric)


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def model_label(models: Models, model: str) -> str:
    return str(models[model].get("label", model))


def model_colour(models: Models, model: str) -> str:
    return MODEL_COLOURS[list(models).index(model) % len(MODEL_COLOURS)]


def class_axis_label(task_conf: Mapping[str, Any]) -> str:
    if task_conf.get("kind") == "multilabel":
        return "finding"
    if task_conf.get("graded"):
        return "grade"
    return "class"


def configured_classes(task_conf: Mapping[str, Any], task: str = "<task>") -> list[str] | None:
    """The task's configured class names, or None when ``classes`` is ``all`` (every finding of the data)."""
    classes = task_conf.get("classes", [])
    if isinstance(classes, str):
        if classes != "all":
            raise ValueError(f"tasks.{task}.classes is {classes!r}; expected a list of class names or 'all'")
        return None
    return [str(c) for c in classes]


def positive_class(task_conf: Mapping[str, Any], task: str = "<task>") -> str | None:
    """The positive (second) class of a binary task; None for any other task."""
    classes = configured_classes(task_conf, task) or []
    return classes[1] if task_conf.get("kind") == "binary" and len(classes) == 2 else None


def macro_tick_label(task: str, task_conf: Mapping[str, Any], metric: str) -> str:
    """The tick under a task's ``macro`` bar, saying what the number averages."""
    # Binary tasks: macro F1 is the mean of both classes' F1 (the paper's); macro AUC is the positive class's.
    classes = configured_classes(task_conf, task) or []
    if task_conf.get("kind") == "binary" and len(classes) == 2:
        if metric == "f1":
            return f"macro F1\n({classes[0]}, {classes[1]})"
        return f"{classes[1]} vs {classes[0]}"
    return "macro average"


def panel_title(letter: str, task: str, task_conf: Mapping[str, Any], suffix: str = "") -> str:
    return f"({letter}) {task}: {task_conf.get('name', task)}{suffix}"


def no_data(figure_name: str, tasks_wanted: Sequence[str], table_name: str, detail: str = "") -> ValueError:
    """The error of a figure with nothing at all to draw (a missing task or model alone is only skipped:
    users rerun subsets of tasks and models, so partial tables are normal)."""
    return ValueError(
        f"{figure_name}: nothing to draw: the {table_name} table has no rows for task(s) "
        f"{', '.join(tasks_wanted)} with the configured models{detail}"
    )


# --------------------------------------------------------------------------------------------
# Figures and their files
# --------------------------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Figure:
    """An empty figure on its own Agg canvas (no pyplot: no global backend switch, no figure registry)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def legend_line(**style: Any) -> Line2D:
    """A legend handle that is drawn nowhere else."""
    from matplotlib.lines import Line2D

    return Line2D([], [], **style)


def save(figure: Figure, out_pdf: str | os.PathLike, out_png: str | os.PathLike) -> None:
    """Write ``figure`` to ``out_pdf`` and to ``out_png`` (:data:`PNG_DPI`), each atomically, and free it."""
    try:
        with atomic_path(out_pdf) as tmp:
            # No creation date in the PDF, so that reruns write identical files.
            figure.savefig(tmp, format="pdf", metadata={"CreationDate": None})
        with atomic_path(out_png) as tmp:
            figure.savefig(tmp, format="png", dpi=PNG_DPI)
    finally:
        figure.clear()


# --------------------------------------------------------------------------------------------
# Grouped bars and the legend above them
# --------------------------------------------------------------------------------------------


def grouped_bars(
    ax: Any,
    values: pd.DataFrame,
    sds: pd.DataFrame,
    models: Models,
    tick_labels: Sequence[str],
    horizontal: bool = False,
) -> None:
    """Grouped bars: one group per row of ``values``, one bar per model, SD error bars.

    ``horizontal`` draws the groups top to bottom (long lists of findings), first group on top.
    """
    n_models = values.shape[1]
    width = 0.8 / max(n_models, 1)
    centres = np.arange(values.shape[0], dtype=float)
    for position, model in enumerate(values.columns):
        x = centres + (position - (n_models - 1) / 2) * width
        _model_bars(ax, x, values[model], sds[model], width, models, model, horizontal)
    if horizontal:
        _horizontal_axes(ax, centres, tick_labels, values.shape[0])
    else:
        _vertical_axes(ax, centres, tick_labels, values.shape[0])


def _model_bars(
    ax: Any,
    x: np.ndarray,
    values: pd.Series,
    sds: pd.Series,
    width: float,
    models: Models,
    model: str,
    horizontal: bool,
) -> None:
    heights = values.to_numpy(dtype=float)
    errors = sds.to_numpy(dtype=float)
    drawn = np.isfinite(heights)
    if not drawn.any():
        return
    style = dict(color=model_colour(models, model), label=model_label(models, model), gid=model)
    if horizontal:
        ax.barh(x[drawn], heights[drawn], height=width, **style)
    else:
        ax.bar(x[drawn], heights[drawn], width=width, **style)
    with_error = drawn & np.isfinite(errors)
    if with_error.any():
        spread = {"xerr" if horizontal else "yerr": errors[with_error]}
        at = (heights[with_error], x[with_error]) if horizontal else (x[with_error], heights[with_error])
        ax.errorbar(*at, **spread, fmt="none", ecolor="black", elinewidth=0.8, capsize=2)


def _horizontal_axes(ax: Any, centres: np.ndarray, tick_labels: Sequence[str], n_groups: int) -> None:
    ax.set_yticks(centres)
    ax.set_yticklabels(tick_labels, fontsize=7)
    ax.set_ylim(n_groups - 0.4, -0.6)  # inverted: the first group on top
    ax.set_xlim(*UNIT_YLIM)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.grid(axis="x", linewidth=0.4, alpha=0.5)
    ax.set_axisbelow(True)


def _vertical_axes(ax: Any, centres: np.ndarray, tick_labels: Sequence[str], n_groups: int) -> None:
    ax.set_xticks(centres)
    longest_line = max((len(line) for label in tick_labels for line in label.split("\n")), default=0)
    rotate = longest_line > 8 and len(tick_labels) > 4
    ax.set_xticklabels(tick_labels, rotation=35 if rotate else 0, ha="right" if rotate else "center")
    ax.set_xlim(-0.6, n_groups - 0.4)
    ax.set_ylim(*UNIT_YLIM)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.grid(axis="y", linewidth=0.4, alpha=0.5)
    ax.set_axisbelow(True)


def bar_legend(figure: Figure, models: Models, bars: Iterable[pd.DataFrame]) -> None:
    """One legend above all panels, of the models with a bar in any of the ``bars`` tables (columns =
    models), and the panels laid out below it."""
    present = {model for values in bars for model in values.columns[values.notna().any()]}
    figure.tight_layout(rect=(0, 0, 1, _model_legend(figure, models, present)))


def _model_legend(figure: Figure, models: Models, present: Collection[str]) -> float:
    """The legend of the ``present`` models; returns the top of the panel area below it (figure fraction)."""
    handles = [
        legend_line(color=model_colour(models, m), linewidth=8, label=model_label(models, m))
        for m in models
        if m in present
    ]
    # As many columns as fit the figure width (about 0.075 in per character at 8 pt, plus the key).
    entry_width = 0.9 + 0.075 * max((len(h.get_label()) for h in handles), default=1)
    columns = max(1, min(len(handles), int(figure.get_figwidth() // entry_width)))
    rows = math.ceil(len(handles) / columns)
    figure.legend(handles=handles, loc="upper center", ncol=columns, frameon=False, fontsize=8)
    height_in = figure.get_figheight()
    return 1.0 - (0.12 + 0.22 * rows) / height_in


# --------------------------------------------------------------------------------------------
# One panel per discipline (Figures 6 and S5)
# --------------------------------------------------------------------------------------------


def discipline_of(tasks: Tasks, task: str) -> str:
    return str(tasks[task].get("discipline", "other"))


def disciplines(tasks: Tasks, present_tasks: Sequence[str]) -> list[str]:
    """Disciplines of the tasks drawn: the paper's four in its order, then any others as configured."""
    found = [discipline_of(tasks, t) for t in tasks if t in present_tasks]
    known = [d for d in DISCIPLINES if d in found]
    return known + [d for d in dict.fromkeys(found) if d not in DISCIPLINES]


def discipline_panels(
    tasks: Tasks, present_tasks: Sequence[str]
) -> tuple[Figure, list[tuple[str, Any, str, list[str]]]]:
    """A figure with one panel per discipline of ``present_tasks``: ``(letter, ax, discipline, its tasks)``."""
    names = disciplines(tasks, present_tasks)
    figure = new_figure(width=11.0 if len(names) > 1 else 6.0, height=4.2 * math.ceil(len(names) / 2) + 0.3)
    n_panels = len(names)
    rows, columns = (1, n_panels) if n_panels <= 2 else (2, 2) if n_panels <= 4 else (math.ceil(n_panels / 3), 3)
    axes = list(figure.subplots(rows, columns, squeeze=False).ravel())
    for spare in axes[n_panels:]:
        spare.remove()
    panels = [
        (letter, ax, discipline, [t for t in present_tasks if discipline_of(tasks, t) == discipline])
        for letter, ax, discipline in zip(PANEL_LETTERS, axes, names)
    ]
    return figure, panels


def position_in_discipline(tasks: Tasks, task: str) -> int:
    """The task's place among the configured tasks of its discipline (its style within the panel)."""
    discipline = discipline_of(tasks, task)
    return [t for t in tasks if discipline_of(tasks, t) == discipline].index(task)

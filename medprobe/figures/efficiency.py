"""Figure 6: label efficiency, the headline metric against the fraction of training labels used."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from medprobe.figures.common import (
    UNIT_YLIM,
    Models,
    Tasks,
    discipline_panels,
    headline_metric,
    metric_label,
    model_colour,
    model_label,
    no_data,
    position_in_discipline,
)
from medprobe.figures.tables import MACRO, prepare
from medprobe.settings import FiguresSettings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Colour = model; line style and marker = task within its discipline panel.
_TASK_LINESTYLES = ("-", "--", ":", "-.")
_TASK_MARKERS = ("o", "s", "^", "D", "v", "P")
CURVE_COLUMNS = ["task", "model", "fraction", "mean", "band_sd", "sd_seeds", "sd_bootstrap", "n_seeds"]


def efficiency_curves(efficiency: pd.DataFrame, tasks: Tasks, models: Models) -> pd.DataFrame:
    """Label-efficiency curves: headline metric (class ``macro``) per task, model and fraction.

    The band half-width combines both sources of spread by the law of total variance:
    ``band_sd = sqrt(var_seeds + mean(sd_bootstrap**2))``, where ``var_seeds`` is the variance of
    the metric across training-subset seeds (ddof=1; 0 with a single seed) and ``sd_bootstrap``
    is each seed's bootstrap SD over the test set (NaN SDs are ignored).

    Returns:
        Columns ``task, model, fraction, mean, band_sd, sd_seeds, sd_bootstrap, n_seeds``, one
        row per task x model x fraction, tasks and models in config order, fractions ascending.
    """
    frames = [curves for task in tasks if not (curves := _task_curves(efficiency, tasks, models, task)).empty]
    if not frames:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    curves = pd.concat(frames, ignore_index=True)[CURVE_COLUMNS]
    # Config order for tasks and models (the plotting order), numeric order for fractions.
    curves["_task_rank"] = curves["task"].map({t: i for i, t in enumerate(tasks)})
    curves["_model_rank"] = curves["model"].map({m: i for i, m in enumerate(models)})
    curves = curves.sort_values(["_task_rank", "_model_rank", "fraction"], kind="stable")
    return curves[CURVE_COLUMNS].reset_index(drop=True)


def _task_curves(efficiency: pd.DataFrame, tasks: Tasks, models: Models, task: str) -> pd.DataFrame:
    """The rows of :func:`efficiency_curves` for one task (empty when the table has none)."""
    rows = efficiency[
        (efficiency["task"] == task)
        & (efficiency["class"] == MACRO)
        & (efficiency["metric"] == headline_metric(tasks, task))
        & efficiency["model"].isin(list(models))
        & efficiency["value"].notna()
    ]
    if rows.empty:
        return rows
    summary = (
        rows.groupby(["model", "fraction"])
        .agg(
            mean=("value", "mean"),
            sd_seeds=("value", lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0),
            sd_bootstrap=("sd", lambda s: float(np.sqrt(np.nanmean(s**2))) if s.notna().any() else 0.0),
            n_seeds=("value", "size"),
        )
        .reset_index()
    )
    summary["band_sd"] = np.sqrt(summary["sd_seeds"] ** 2 + summary["sd_bootstrap"] ** 2)
    summary.insert(0, "task", task)
    return summary


def _panel_metric_label(tasks: Tasks, panel_tasks: Sequence[str]) -> str:
    metrics = dict.fromkeys(metric_label(headline_metric(tasks, t)) for t in panel_tasks)
    return " / ".join(metrics)


def _efficiency_panel(ax: Any, curves: pd.DataFrame, tasks: Tasks, models: Models, panel_tasks: Sequence[str]) -> None:
    """The mean line and SD band of every task x model of one discipline."""
    for task in panel_tasks:
        position = position_in_discipline(tasks, task)
        linestyle = _TASK_LINESTYLES[position % len(_TASK_LINESTYLES)]
        marker = _TASK_MARKERS[position % len(_TASK_MARKERS)]
        for model in models:
            line = curves[(curves["task"] == task) & (curves["model"] == model)]
            if line.empty:
                continue
            x = line["fraction"].to_numpy(float)
            mean = line["mean"].to_numpy(float)
            band = line["band_sd"].to_numpy(float)
            colour = model_colour(models, model)
            ax.plot(
                x,
                mean,
                color=colour,
                linestyle=linestyle,
                marker=marker,
                markersize=4,
                label=f"{task} · {model_label(models, model)}",
            )
            ax.fill_between(x, mean - band, mean + band, color=colour, alpha=0.15, linewidth=0)


def figure6(tables: Mapping[str, pd.DataFrame], tasks: Tasks, models: Models, options: FiguresSettings) -> Figure:
    """Figure 6: label efficiency, one panel per discipline, a line per task and model.

    Mean over seeds of the headline metric (class ``macro``) against the training fraction (log
    axis); the band is mean +- ``band_sd`` of :func:`efficiency_curves` (seed spread and bootstrap
    SD combined).
    """
    efficiency = prepare(tables["efficiency"], "figure6: efficiency table")
    curves = efficiency_curves(efficiency, tasks, models)
    if curves.empty:
        raise no_data("figure6", list(tasks), "efficiency", " (class 'macro', headline metric)")
    figure, panels = discipline_panels(tasks, list(dict.fromkeys(curves["task"])))
    fractions = sorted(curves["fraction"].unique())
    for letter, ax, discipline, panel_tasks in panels:
        _efficiency_panel(ax, curves, tasks, models, panel_tasks)
        ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.set_xticklabels([f"{f:g}" for f in fractions])
        ax.minorticks_off()
        ax.set_ylim(*UNIT_YLIM)
        ax.set_xlabel("fraction of training data (log scale)")
        ax.set_ylabel(f"{_panel_metric_label(tasks, panel_tasks)} (mean ± SD)")
        ax.set_title(f"({letter}) {discipline}", fontsize=10)
        ax.grid(linewidth=0.4, alpha=0.5)
        ax.legend(fontsize=7, loc="best", frameon=True, framealpha=0.8)
    figure.tight_layout()
    return figure

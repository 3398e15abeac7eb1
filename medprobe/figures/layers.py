"""Figure S5: the macro metric of a probe on each layer, one panel per discipline, headline layers marked."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from medprobe.figures.common import (
    MODEL_COLOURS,
    UNIT_YLIM,
    Models,
    Tasks,
    discipline_panels,
    legend_line,
    metric_label,
    model_label,
    no_data,
    position_in_discipline,
)
from medprobe.figures.tables import MACRO, prepare
from medprobe.layers import EMBEDDINGS_LAYER, authors_labels
from medprobe.settings import FiguresSettings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

#: x axes of Figure S5 (config ``figures.figureS5_order``).
LAYER_ORDERS: tuple[str, ...] = ("depth", "authors")
_LAYER_AXIS_LABELS = {
    "depth": "layer (hidden_states index, true depth)",
    "authors": "layer, authors' index (position in their text-sorted files x.0, x.1, x.10, ...)",
}
CURVE_COLUMNS = ["task", "model", "layer", "index", "x", "value", "sd", "ci_low", "ci_high"]
_LAYER_INDEX = re.compile(r"(\d+)$")
# Black dashed lines mark the headline layer, so model line styles avoid plain dashes.
_MODEL_LINESTYLES = ("-", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))


def layer_index(name: str) -> int:
    """Integer index of a layer name such as ``hidden.12`` (the trailing number).

    Raises:
        ValueError: the name ends in no number and is not ``image_embeds``.
    """
    match = _LAYER_INDEX.search(str(name))
    if match is None:
        raise ValueError(
            f"layer name {name!r} has no trailing layer index (expected e.g. 'hidden.3' or '{EMBEDDINGS_LAYER}')"
        )
    return int(match.group(1))


def order_layers(names: Sequence[str]) -> list[str]:
    """Layer names ordered by integer index (``hidden.9`` before ``hidden.10``), ``image_embeds`` last."""
    unique = list(dict.fromkeys(str(n) for n in names))
    hidden = [n for n in unique if n != EMBEDDINGS_LAYER]
    ordered = sorted(hidden, key=lambda n: (layer_index(n), n))
    if EMBEDDINGS_LAYER in unique:
        ordered.append(EMBEDDINGS_LAYER)
    return ordered


def check_layer_order(order: str) -> str:
    """``order`` itself if it is one of :data:`LAYER_ORDERS` (config ``figures.figureS5_order``)."""
    if order not in LAYER_ORDERS:
        raise ValueError(f"figures.figureS5_order is {order!r}; expected one of {', '.join(LAYER_ORDERS)}")
    return order


def _authors_positions(rows: pd.DataFrame, names: Sequence[str]) -> list[int | None]:
    """The authors' layer index of each layer in ``names`` (rows indexed by layer name).

    The ``authors_layer`` column, where the table has one, was computed from the activations file's
    own number of hidden states, so it is right even when only some layers were stored; without it
    the index follows from the layer names, assuming every layer was stored.
    """
    if "authors_layer" in rows.columns:
        stored = pd.to_numeric(rows["authors_layer"].astype(str).str.strip(), errors="coerce")
        if stored.notna().any():
            return [None if pd.isna(stored[name]) else int(stored[name]) for name in names]
    return authors_labels(list(names))


def _positions(rows: pd.DataFrame, names: Sequence[str], order: str, where: str) -> dict[str, int]:
    """x of each layer in ``names`` (rows indexed by layer name); layers without a place are left out."""
    hidden = [n for n in names if n != EMBEDDINGS_LAYER]
    if order == "depth":
        positions = {n: layer_index(n) for n in hidden}
    else:
        labels = dict(zip(hidden, _authors_positions(rows.loc[hidden], hidden)))
        positions = {n: x for n, x in labels.items() if x is not None}
        if len(positions) < len(hidden):
            log.info(
                "figureS5: %s: %s left out of the authors' order (no authors' index)",
                where,
                ", ".join(n for n in hidden if n not in positions),
            )
    if EMBEDDINGS_LAYER in names:
        positions[EMBEDDINGS_LAYER] = max(positions.values(), default=-1) + 1
    return positions


def _curve(layers: pd.DataFrame, task: str, model: str, metric: str, order: str) -> pd.DataFrame | None:
    """The rows of :func:`layer_curves` for one task x model; None when the table has none."""
    rows = layers[
        (layers["task"] == task)
        & (layers["model"] == model)
        & (layers["class"] == MACRO)
        & (layers["metric"] == metric)
    ]
    if rows.empty:
        return None
    if rows["layer"].duplicated().any():
        layer = rows.loc[rows["layer"].duplicated(), "layer"].iloc[0]
        raise ValueError(
            f"layers table: task {task}, model {model}, layer {layer!r}, metric {metric} appears more than once"
        )
    names = order_layers(rows["layer"].tolist())
    rows = rows.set_index("layer").loc[names]
    positions = _positions(rows, names, order, f"task {task}, model {model}")
    drawn = sorted(positions, key=lambda n: positions[n])
    return pd.DataFrame(
        {
            "task": task,
            "model": model,
            "layer": drawn,
            "index": [-1 if n == EMBEDDINGS_LAYER else layer_index(n) for n in drawn],
            "x": [positions[n] for n in drawn],
            **{column: rows.loc[drawn, column].to_numpy(float) for column in ("value", "sd", "ci_low", "ci_high")},
        },
        columns=CURVE_COLUMNS,
    )


def layer_curves(
    layers: pd.DataFrame, tasks: Tasks, models: Models, metric: str = "auc", order: str = "depth"
) -> pd.DataFrame:
    """Per-layer ``metric`` (class ``macro``) with its bootstrap SD and CI, in the order of the x axis.

    Args:
        layers: the layers table (already checked).
        tasks, models: config sections; tasks and models come out in their order.
        metric: the metric drawn (``figures.figureS5_metric``), the same for every task.
        order: ``depth``: x is the ``hidden_states`` index; ``authors``: x is the authors' layer
            index, the position of the layer file in their text-sorted list (``x.0, x.1, x.10, ...``;
            see :mod:`medprobe.layers`). ``hidden.0`` has no authors' index (they never saved it) and
            is left out of that order.

    ``image_embeds`` (a projection after the last hidden layer) is placed one step right of the
    rightmost layer in either order.

    Returns:
        Columns ``task, model, layer, index, x, value, sd, ci_low, ci_high`` (``index`` = the layer
        name's number, -1 for ``image_embeds``), rows of one task x model sorted by ``x``.
    """
    check_layer_order(order)
    curves = [_curve(layers, task, model, metric, order) for task in tasks for model in models]
    frames = [curve for curve in curves if curve is not None]
    if not frames:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    return pd.concat(frames, ignore_index=True)[CURVE_COLUMNS]


def headline_layers(metrics: pd.DataFrame, tasks: Tasks, models: Models) -> dict[tuple[str, str], str]:
    """The headline layer (fixed or chosen on validation) of each task x model: the ``layer`` column of
    the metrics table.

    Raises:
        ValueError: the rows of one task x model name more than one layer.
    """
    rows = metrics[metrics["task"].isin(list(tasks)) & metrics["model"].isin(list(models))]
    headline = {}
    for (task, model), group in rows.groupby(["task", "model"], sort=False):
        names = sorted(set(group["layer"].astype(str).str.strip()) - {"", "nan"})
        if len(names) > 1:
            raise ValueError(
                f"metrics table: task {task}, model {model} names more than one headline layer "
                f"({', '.join(names)}); metrics.csv holds one layer per model and task"
            )
        if names:
            headline[(task, model)] = names[0]
    return headline


def _curve_ylim(curves: pd.DataFrame) -> tuple[float, float]:
    """y range of the drawn bands with a margin, within :data:`UNIT_YLIM`: fluctuations across layers of a
    few hundredths must stay visible, which a full 0-1 axis would flatten."""
    sd = curves["sd"].fillna(0.0)
    low, high = float((curves["value"] - sd).min()), float((curves["value"] + sd).max())
    margin = max(0.05 * (high - low), 0.02)
    return max(UNIT_YLIM[0], low - margin), min(UNIT_YLIM[1], high + margin)


def _layer_line(ax: Any, line: pd.DataFrame, colour: str, linestyle: Any, label: str) -> bool:
    """One task x model: mean line and SD band over the hidden layers, ``image_embeds`` as a star; returns
    whether the star was drawn."""
    hidden = line[line["layer"] != EMBEDDINGS_LAYER]
    x = hidden["x"].to_numpy(float)
    mean = hidden["value"].to_numpy(float)
    sd = hidden["sd"].to_numpy(float)
    ax.plot(x, mean, color=colour, linestyle=linestyle, linewidth=1.2, label=label)
    ax.fill_between(x, mean - sd, mean + sd, color=colour, alpha=0.15, linewidth=0)
    embeds = line[line["layer"] == EMBEDDINGS_LAYER]
    if embeds.empty:
        return False
    ax.errorbar(
        embeds["x"],
        embeds["value"],
        yerr=embeds["sd"],
        color=colour,
        marker="*",
        markersize=9,
        linestyle="none",
        label="_nolegend_",
    )
    return True


def _ring_headline(ax: Any, line: pd.DataFrame, chosen: str) -> float | None:
    """A black ring on the curve at the headline layer ``chosen``; its x, or None when it is not drawn."""
    at = line[line["layer"] == chosen]
    if at.empty:
        return None
    ax.plot(
        at["x"],
        at["value"],
        linestyle="none",
        marker="o",
        markersize=6,
        markerfacecolor="none",
        markeredgecolor="black",
        label="_nolegend_",
    )
    return float(at["x"].iloc[0])


def _layers_panel(
    ax: Any,
    curves: pd.DataFrame,
    headline: Mapping[tuple[str, str], str],
    tasks: Tasks,
    models: Models,
    panel_tasks: Sequence[str],
    options: FiguresSettings,
) -> None:
    """Every task x model of one discipline (colour = task, line style = model), headline layers marked."""
    has_embeddings = False
    headline_x: list[float] = []
    for task in panel_tasks:
        colour = MODEL_COLOURS[position_in_discipline(tasks, task) % len(MODEL_COLOURS)]
        for position, model in enumerate(models):
            line = curves[(curves["task"] == task) & (curves["model"] == model)]
            if line.empty:
                continue
            label = f"{task} · {model_label(models, model)}"
            linestyle = _MODEL_LINESTYLES[position % len(_MODEL_LINESTYLES)]
            has_embeddings |= _layer_line(ax, line, colour, linestyle, label)
            chosen = headline.get((task, model))
            if chosen is None:
                continue
            x = _ring_headline(ax, line, chosen)
            if x is None:
                log.warning(
                    "figureS5: headline layer %s of task %s, model %s is not drawn (not in the layers table "
                    "for metric %s, or without a place in the %s order)",
                    chosen,
                    task,
                    model,
                    options.figureS5_metric,
                    options.figureS5_order,
                )
                continue
            headline_x.append(x)
    for x in sorted(set(headline_x)):
        ax.axvline(x, color="black", linestyle="--", linewidth=1.0, gid="headline", label="_nolegend_")
    _layers_legend(ax, bool(headline_x), has_embeddings)


def _layers_legend(ax: Any, has_headline: bool, has_embeddings: bool) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if has_headline:
        handles.append(legend_line(color="black", linestyle="--", linewidth=1.0))
        labels.append("headline layer")
    if has_embeddings:
        handles.append(legend_line(color="black", marker="*", markersize=9, linestyle="none"))
        labels.append(f"{EMBEDDINGS_LAYER} (projection)")
    ax.legend(handles, labels, fontsize=7, loc="best", frameon=True, framealpha=0.8)


def figureS5(tables: Mapping[str, pd.DataFrame], tasks: Tasks, models: Models, options: FiguresSettings) -> Figure:
    """Figure S5: ``figures.figureS5_metric`` (class ``macro``) of a probe on each layer, one panel per
    discipline.

    Every task of a discipline is drawn in its panel against the layer, as the mean line with the
    bootstrap SD as a band around it; the paper shows AUC for every discipline, F1 tasks included,
    hence one metric for all.

    x axis (``figures.figureS5_order``): ``depth`` is the ``hidden_states`` index; ``authors`` the
    authors' layer index, the position in their text-sorted list of layer files, in which the
    paper's curves run (its "layer 32" of the 80B model is ``hidden.39``); see :func:`layer_curves`.
    ``image_embeds`` is a star one step right of the last layer.

    The paper draws IDEFICS-80B alone; here every configured model with rows in the layers table is
    drawn, so that the models can be compared: colour = task, line style = model. The headline layer
    of each task x model (``layer`` of the metrics table, fixed or chosen on validation) is marked by
    a black dashed vertical line and a black ring on its curve (the ring tells which curve a line
    belongs to when models or tasks differ in their headline layer).
    """
    from matplotlib.ticker import MaxNLocator

    order, metric = check_layer_order(options.figureS5_order), options.figureS5_metric
    layers = prepare(tables["layers"], "figureS5: layers table")
    headline = headline_layers(prepare(tables["metrics"], "figureS5: metrics table"), tasks, models)
    curves = layer_curves(layers, tasks, models, metric=metric, order=order)
    if curves.empty:
        raise no_data("figureS5", list(tasks), "layers", f" (class 'macro', metric {metric} = figures.figureS5_metric)")
    figure, panels = discipline_panels(tasks, list(dict.fromkeys(curves["task"])))
    for letter, ax, discipline, panel_tasks in panels:
        _layers_panel(ax, curves, headline, tasks, models, panel_tasks, options)
        ax.set_ylim(*_curve_ylim(curves[curves["task"].isin(panel_tasks)]))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(_LAYER_AXIS_LABELS[order], fontsize=8)
        ax.set_ylabel(f"{metric_label(metric)} (mean ± bootstrap SD)")
        ax.set_title(f"({letter}) {discipline}", fontsize=10)
        ax.grid(linewidth=0.4, alpha=0.5)
    figure.tight_layout()
    return figure

"""Figures 3, 4, 5, 6, S5 and S6 of Han et al. (2023), drawn from the result tables alone.

Every figure reads only the long-format result tables (``results/tables/*.csv``, see
docs/architecture.md, "Result tables"), so figures can be redrawn without touching activations or
probes. Each figure is saved as ``<out_stem>.pdf`` and ``<out_stem>.png`` (200 dpi).

Figures are built as :class:`matplotlib.figure.Figure` objects rendered by the Agg canvas, never
through ``pyplot``: that keeps the global backend untouched (the workflow and notebooks may import
this module) and nothing is registered in pyplot's figure manager, so a figure is released as soon
as it has been saved and :func:`_save` has cleared it.

Missing data is tolerated: a task or model absent from a table is skipped (logged), and only a
figure with nothing at all to draw raises :class:`ValueError`, naming the figure and the tasks it
looked for. Users rerun subsets of tasks and models, so partial tables are normal.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from medprobe.layers import EMBEDDINGS_LAYER, authors_labels

log = logging.getLogger(__name__)

#: Columns every result table has (groups.csv adds ``group``).
REQUIRED_COLUMNS: tuple[str, ...] = (
    "task",
    "model",
    "layer",
    "fraction",
    "seed",
    "class",
    "metric",
    "value",
    "sd",
    "ci_low",
    "ci_high",
    "n_train",
    "n_test",
)
#: Identifier columns, read as text so that class names such as "0" or "NA" survive unchanged.
TEXT_COLUMNS: tuple[str, ...] = ("task", "model", "layer", "class", "metric", "group")
NUMERIC_COLUMNS: tuple[str, ...] = (
    "fraction",
    "seed",
    "value",
    "sd",
    "ci_low",
    "ci_high",
    "n_train",
    "n_test",
)
#: Spellings of "no value" accepted in numeric columns (support rows have no CI, metrics.csv no seed).
_MISSING_SPELLINGS = {"", "nan", "NaN", "NA", "N/A", "None", "null"}

DISCIPLINES: tuple[str, ...] = ("pathology", "dermatology", "ophthalmology", "radiology")
METRIC_LABELS: dict[str, str] = {
    "auc": "AUC",
    "f1": "F1",
    "balanced_accuracy": "Balanced accuracy",
    "auprc": "AUPRC",
    "kappa_quadratic": "Quadratic kappa",
}
MACRO = "macro"
#: x axes of Figure S5 (config ``figures.figureS5_order``).
LAYER_ORDERS: tuple[str, ...] = ("depth", "authors")
PNG_DPI = 200
#: y limits for metrics in [0, 1]; a little headroom so a bar at 1.0 keeps its error bar visible.
UNIT_YLIM = (0.0, 1.05)

_LAYER_INDEX = re.compile(r"(\d+)$")
# Fixed palettes so that a model keeps its colour in every figure (models dict order = colour order).
_MODEL_COLOURS = (
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
_TASK_LINESTYLES = ("-", "--", ":", "-.")
_TASK_MARKERS = ("o", "s", "^", "D", "v", "P")
# Figure S5 keeps black dashed lines for the headline layer, so model line styles avoid plain dashes.
_MODEL_LINESTYLES = ("-", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def load_table(path: str | Path, extra_columns: Sequence[str] = ()) -> pd.DataFrame:
    """Read a long-format result table and check its columns.

    Args:
        path: CSV file (``metrics.csv``, ``layers.csv``, ``efficiency.csv``, ``groups.csv``).
        extra_columns: columns required on top of :data:`REQUIRED_COLUMNS`. ``group`` is
            required automatically for a file named ``groups.csv``.

    Returns:
        The table with identifier columns as strings and metric columns as floats (missing = NaN).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a required column is missing or a numeric column holds text; the message
            names the file and the column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"result table {path} does not exist")
    # keep_default_na=False: a class called "NA" or "None" must stay a class name, not NaN.
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    required = list(REQUIRED_COLUMNS) + list(extra_columns)
    if path.name == "groups.csv" and "group" not in required:
        required.append("group")
    _require_columns(table, required, f"result table {path}")
    for column in NUMERIC_COLUMNS:
        table[column] = _to_float(table[column], f"result table {path}", column)
    return table


def _to_float(column: pd.Series, where: str, name: str) -> pd.Series:
    text = column.astype(str).str.strip()
    text = text.where(~text.isin(_MISSING_SPELLINGS), "nan")
    numbers = pd.to_numeric(text, errors="coerce")
    bad = numbers.isna() & (text != "nan")
    if bad.any():
        examples = ", ".join(repr(v) for v in text[bad].unique()[:3])
        raise ValueError(f"{where}: column {name!r} must be numeric, found {examples}")
    return numbers.astype(float)


def _require_columns(table: pd.DataFrame, required: Sequence[str], where: str) -> None:
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ValueError(
            f"{where} lacks required column(s) {', '.join(repr(c) for c in missing)}; "
            f"it has {', '.join(map(str, table.columns))}"
        )


def _prepare(table: pd.DataFrame, where: str, extra: Sequence[str] = ()) -> pd.DataFrame:
    """Check columns and normalise dtypes of a table handed in as a DataFrame.

    Tables built in memory may carry integer class names (0..4) or integer seeds; figures compare
    identifiers as strings and numbers as floats, whichever way the table was made.
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"{where} must be a pandas DataFrame, got {type(table).__name__}")
    _require_columns(table, list(REQUIRED_COLUMNS) + list(extra), where)
    table = table.copy()
    for column in TEXT_COLUMNS:
        if column in table.columns:
            table[column] = table[column].astype(str)
    for column in NUMERIC_COLUMNS:
        if not pd.api.types.is_float_dtype(table[column]):
            table[column] = _to_float(table[column], where, column)
    return table


# --------------------------------------------------------------------------------------------
# Config lookups
# --------------------------------------------------------------------------------------------


def headline_metric(tasks: Mapping[str, Mapping[str, Any]], task: str) -> str:
    """The task's headline metric (``f1`` or ``auc``) from the tasks config."""
    if task not in tasks:
        raise ValueError(f"task {task!r} is not in the tasks config (known: {', '.join(tasks)})")
    metric = tasks[task].get("metric")
    if not metric:
        raise ValueError(f"tasks.{task}: key 'metric' is missing")
    return str(metric)


def _metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _model_label(models: Mapping[str, Mapping[str, Any]], model: str) -> str:
    return str(models[model].get("label", model))


def _model_colour(models: Mapping[str, Mapping[str, Any]], model: str) -> str:
    return _MODEL_COLOURS[list(models).index(model) % len(_MODEL_COLOURS)]


def _class_axis_label(task_conf: Mapping[str, Any]) -> str:
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


def _positive_class(task_conf: Mapping[str, Any], task: str = "<task>") -> str | None:
    classes = configured_classes(task_conf, task) or []
    return classes[1] if task_conf.get("kind") == "binary" and len(classes) == 2 else None


def _macro_tick_label(task: str, task_conf: Mapping[str, Any], metric: str) -> str:
    # Binary tasks: macro F1 is the mean of both classes' F1 (the paper's); macro AUC is the positive class's.
    classes = configured_classes(task_conf, task) or []
    if task_conf.get("kind") == "binary" and len(classes) == 2:
        if metric == "f1":
            return f"macro F1\n({classes[0]}, {classes[1]})"
        return f"{classes[1]} vs {classes[0]}"
    return "macro average"


def _panel_title(letter: str, task: str, task_conf: Mapping[str, Any], suffix: str = "") -> str:
    name = task_conf.get("name", task)
    title = f"({letter}) {task}: {name}"
    return f"{title}{suffix}"


# --------------------------------------------------------------------------------------------
# Data behind the plots (public so tests and notebooks can check what is drawn)
# --------------------------------------------------------------------------------------------


def bar_table(
    table: pd.DataFrame,
    task: str,
    metric: str,
    models: Mapping[str, Mapping[str, Any]],
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


def support_filter(
    metrics: pd.DataFrame, task: str, models: Mapping[str, Mapping[str, Any]], min_positives: int
) -> pd.Series | None:
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


def min_test_positives(tasks: Mapping[str, Mapping[str, Any]], task: str) -> int:
    """``tasks.<task>.min_test_positives`` (0 when absent): findings need strictly more test positives."""
    value = tasks[task].get("min_test_positives", 0)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"tasks.{task}.min_test_positives is {value!r}; expected an integer >= 0")
    return int(value)


def efficiency_curves(
    efficiency: pd.DataFrame,
    tasks: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
) -> pd.DataFrame:
    """Label-efficiency curves: headline metric (class ``macro``) per task, model and fraction.

    The band half-width combines both sources of spread by the law of total variance:
    ``band_sd = sqrt(var_seeds + mean(sd_bootstrap**2))``, where ``var_seeds`` is the variance of
    the metric across training-subset seeds (ddof=1; 0 with a single seed) and ``sd_bootstrap``
    is each seed's bootstrap SD over the test set (NaN SDs are ignored).

    Returns:
        Columns ``task, model, fraction, mean, band_sd, sd_seeds, sd_bootstrap, n_seeds``, one
        row per task x model x fraction, tasks and models in config order, fractions ascending.
    """
    frames = []
    for task in tasks:
        metric = headline_metric(tasks, task)
        rows = efficiency[
            (efficiency["task"] == task)
            & (efficiency["class"] == MACRO)
            & (efficiency["metric"] == metric)
            & efficiency["model"].isin(list(models))
            & efficiency["value"].notna()
        ]
        if rows.empty:
            continue
        grouped = rows.groupby(["model", "fraction"])
        summary = grouped.agg(
            mean=("value", "mean"),
            sd_seeds=("value", lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0),
            sd_bootstrap=("sd", lambda s: float(np.sqrt(np.nanmean(s**2))) if s.notna().any() else 0.0),
            n_seeds=("value", "size"),
        ).reset_index()
        summary["band_sd"] = np.sqrt(summary["sd_seeds"] ** 2 + summary["sd_bootstrap"] ** 2)
        summary.insert(0, "task", task)
        frames.append(summary)
    columns = ["task", "model", "fraction", "mean", "band_sd", "sd_seeds", "sd_bootstrap", "n_seeds"]
    if not frames:
        return pd.DataFrame(columns=columns)
    curves = pd.concat(frames, ignore_index=True)[columns]
    # Config order for tasks and models (the plotting order), numeric order for fractions.
    curves["_task_rank"] = curves["task"].map({t: i for i, t in enumerate(tasks)})
    curves["_model_rank"] = curves["model"].map({m: i for i, m in enumerate(models)})
    curves = curves.sort_values(["_task_rank", "_model_rank", "fraction"], kind="stable")
    return curves[columns].reset_index(drop=True)


def layer_index(name: str) -> int:
    """Integer index of a layer name such as ``hidden.12`` (the trailing number).

    Raises:
        ValueError: the name ends in no number and is not ``image_embeds``.
    """
    match = _LAYER_INDEX.search(str(name))
    if match is None:
        raise ValueError(
            f"layer name {name!r} has no trailing layer index (expected e.g. 'hidden.3' or "
            f"'{EMBEDDINGS_LAYER}')"
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


def layer_curves(
    layers: pd.DataFrame,
    tasks: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    metric: str = "auc",
    order: str = "depth",
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
    columns = ["task", "model", "layer", "index", "x", "value", "sd", "ci_low", "ci_high"]
    frames = []
    for task in tasks:
        for model in models:
            rows = layers[
                (layers["task"] == task)
                & (layers["model"] == model)
                & (layers["class"] == MACRO)
                & (layers["metric"] == metric)
            ]
            if rows.empty:
                continue
            if rows["layer"].duplicated().any():
                layer = rows.loc[rows["layer"].duplicated(), "layer"].iloc[0]
                raise ValueError(
                    f"layers table: task {task}, model {model}, layer {layer!r}, metric {metric} "
                    "appears more than once"
                )
            names = order_layers(rows["layer"].tolist())
            rows = rows.set_index("layer").loc[names]
            hidden = [n for n in names if n != EMBEDDINGS_LAYER]
            if order == "depth":
                positions = {n: layer_index(n) for n in hidden}
            else:
                labels = dict(zip(hidden, _authors_positions(rows.loc[hidden], hidden)))
                positions = {n: x for n, x in labels.items() if x is not None}
                if len(positions) < len(hidden):
                    log.info(
                        "figureS5: task %s, model %s: %s left out of the authors' order (no authors' index)",
                        task, model, ", ".join(n for n in hidden if n not in positions),
                    )
            if EMBEDDINGS_LAYER in names:
                positions[EMBEDDINGS_LAYER] = max(positions.values(), default=-1) + 1
            drawn = sorted(positions, key=lambda n: positions[n])
            frames.append(
                pd.DataFrame(
                    {
                        "task": task,
                        "model": model,
                        "layer": drawn,
                        "index": [-1 if n == EMBEDDINGS_LAYER else layer_index(n) for n in drawn],
                        "x": [positions[n] for n in drawn],
                        "value": rows.loc[drawn, "value"].to_numpy(float),
                        "sd": rows.loc[drawn, "sd"].to_numpy(float),
                        "ci_low": rows.loc[drawn, "ci_low"].to_numpy(float),
                        "ci_high": rows.loc[drawn, "ci_high"].to_numpy(float),
                    },
                    columns=columns,
                )
            )
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


def headline_layers(
    metrics: pd.DataFrame, tasks: Mapping[str, Mapping[str, Any]], models: Mapping[str, Mapping[str, Any]]
) -> dict[tuple[str, str], str]:
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


# --------------------------------------------------------------------------------------------
# Drawing helpers
# --------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)  # Agg canvas without pyplot: no global backend switch, no registry
    return figure


def _save(figure: Figure, out_stem: str | Path) -> None:
    """Write ``<out_stem>.pdf`` and ``<out_stem>.png`` and free the figure."""
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    try:
        # No creation date in the PDF, so that reruns write identical files.
        figure.savefig(f"{stem}.pdf", metadata={"CreationDate": None})
        figure.savefig(f"{stem}.png", dpi=PNG_DPI)
    finally:
        figure.clear()


def _grouped_bars(
    ax: Any,
    values: pd.DataFrame,
    sds: pd.DataFrame,
    models: Mapping[str, Mapping[str, Any]],
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
        heights = values[model].to_numpy(dtype=float)
        errors = sds[model].to_numpy(dtype=float)
        x = centres + (position - (n_models - 1) / 2) * width
        drawn = np.isfinite(heights)
        if not drawn.any():
            continue
        style = dict(color=_model_colour(models, model), label=_model_label(models, model), gid=model)
        if horizontal:
            ax.barh(x[drawn], heights[drawn], height=width, **style)
        else:
            ax.bar(x[drawn], heights[drawn], width=width, **style)
        with_error = drawn & np.isfinite(errors)
        if with_error.any():
            spread = {"xerr" if horizontal else "yerr": errors[with_error]}
            at = (heights[with_error], x[with_error]) if horizontal else (x[with_error], heights[with_error])
            ax.errorbar(*at, **spread, fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    if horizontal:
        ax.set_yticks(centres)
        ax.set_yticklabels(tick_labels, fontsize=7)
        ax.set_ylim(values.shape[0] - 0.4, -0.6)  # inverted: the first group on top
        ax.set_xlim(*UNIT_YLIM)
        ax.set_xticks(np.linspace(0, 1, 6))
        ax.grid(axis="x", linewidth=0.4, alpha=0.5)
        ax.set_axisbelow(True)
        return
    ax.set_xticks(centres)
    longest_line = max((len(line) for label in tick_labels for line in label.split("\n")), default=0)
    rotate = longest_line > 8 and len(tick_labels) > 4
    ax.set_xticklabels(tick_labels, rotation=35 if rotate else 0, ha="right" if rotate else "center")
    ax.set_xlim(-0.6, values.shape[0] - 0.4)
    ax.set_ylim(*UNIT_YLIM)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.grid(axis="y", linewidth=0.4, alpha=0.5)
    ax.set_axisbelow(True)


def _figure_legend(figure: Figure, models: Mapping[str, Mapping[str, Any]], present: Sequence[str]) -> float:
    """One legend for all panels above them; returns the top of the panel area (figure fraction)."""
    handles = [
        Line2D([], [], color=_model_colour(models, m), linewidth=8, label=_model_label(models, m))
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


def _no_data(figure_name: str, tasks_wanted: Sequence[str], table_name: str, detail: str = "") -> ValueError:
    return ValueError(
        f"{figure_name}: nothing to draw: the {table_name} table has no rows for task(s) "
        f"{', '.join(tasks_wanted)} with the configured models{detail}"
    )


# A bar panel: (letter, task, per-class or macro).
_BarPanel = tuple[str, str, bool]


def _bar_figure(
    figure_name: str,
    metrics: pd.DataFrame,
    tasks: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    panels: Sequence[_BarPanel],
) -> Figure:
    metrics = _prepare(metrics, f"{figure_name}: metrics table")
    drawable = []
    for letter, task, per_class in panels:
        if task not in tasks:
            log.warning("%s: task %s is not in the tasks config; panel (%s) skipped", figure_name, task, letter)
            continue
        task_conf = tasks[task]
        metric = headline_metric(tasks, task)
        if per_class:
            categories = class_order(metrics, task, task_conf)
            values, sds = bar_table(metrics, task, metric, models, categories)
            tick_labels = list(values.index)
        else:
            values, sds = bar_table(metrics, task, metric, models, [MACRO])
            tick_labels = [_macro_tick_label(task, task_conf, metric)] * len(values.index)
        if values.empty or values.isna().all().all():
            log.warning("%s: no %s rows for task %s; panel (%s) skipped", figure_name, metric, task, letter)
            continue
        drawable.append((letter, task, per_class, metric, values, sds, tick_labels))
    if not drawable:
        raise _no_data(figure_name, [task for _, task, _ in panels], "metrics")

    # Per-class panels get width in proportion to their number of classes.
    widths = [max(len(values.index), 1) if per_class else 1.4 for _, _, per_class, _, values, _, _ in drawable]
    figure = _new_figure(width=min(max(6.0, 2.0 + 0.55 * sum(widths) + 0.9 * len(drawable)), 18.0), height=4.2)
    axes = figure.subplots(1, len(drawable), gridspec_kw={"width_ratios": widths}, squeeze=False)[0]
    present_models: set[str] = set()
    for ax, (letter, task, per_class, metric, values, sds, tick_labels) in zip(axes, drawable):
        _grouped_bars(ax, values, sds, models, tick_labels)
        ax.set_title(_panel_title(letter, task, tasks[task]), fontsize=9)
        ax.set_ylabel(_metric_label(metric))
        if per_class:
            ax.set_xlabel(_class_axis_label(tasks[task]))
        present_models.update(values.columns[values.notna().any()])
    top = _figure_legend(figure, models, list(present_models))
    figure.tight_layout(rect=(0, 0, 1, top))
    return figure


# --------------------------------------------------------------------------------------------
# Figures: build_* returns the Figure (for inspection), figure* saves it
# --------------------------------------------------------------------------------------------


def build_figure3(
    metrics: pd.DataFrame, tasks: Mapping[str, Mapping[str, Any]], models: Mapping[str, Mapping[str, Any]]
) -> Figure:
    """Figure 3 (pathology and dermatology): T1 per class, T2 overall, T3 per class, T4 overall."""
    panels = [("a", "T1", True), ("b", "T2", False), ("c", "T3", True), ("d", "T4", False)]
    return _bar_figure("figure3", metrics, tasks, models, panels)


def figure3(
    metrics: pd.DataFrame,
    tasks: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    out_stem: str | Path,
) -> None:
    """Draw Figure 3 from the metrics table into ``<out_stem>.pdf`` / ``.png``.

    Panels: (a) T1 per-class, (b) T2 overall, (c) T3 per-class, (d) T4 overall, each in the task's
    headline metric; grouped bars per model with bootstrap-SD error bars.
    """
    _save(build_figure3(metrics, tasks, models), out_stem)


def build_figure4(
    metrics: pd.DataFrame, tasks: Mapping[str, Mapping[str, Any]], models: Mapping[str, Mapping[str, Any]]
) -> Figure:
    """Figure 4 (ophthalmology, knee): T5 per grade, T6 overall, T8 per grade."""
    panels = [("a", "T5", True), ("b", "T6", False), ("c", "T8", True)]
    return _bar_figure("figure4", metrics, tasks, models, panels)


def figure4(
    metrics: pd.DataFrame,
    tasks: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    out_stem: str | Path,
) -> None:
    """Draw Figure 4 (T5 per-grade, T6 overall, T8 per-grade headline metric) from the metrics table."""
    _save(build_figure4(metrics, tasks, models), out_stem)


def figure5_findings(
    metrics: pd.DataFrame,
    tasks: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    task: str = "T7",
) -> tuple[list[str], pd.Series | None]:
    """The findings Figure 5 draws, in order, and their test positives (None without support rows).

    The probe stage already probes only findings with more than ``tasks.<task>.min_test_positives``
    test positives; the same strict rule is applied here again to the ``support`` rows, where the
    table has them, so that a table from a run with a lower threshold still gives the paper's figure.
    With support rows the findings are sorted by support (descending), else they keep the order of
    :func:`class_order`.
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


def build_figure5(
    metrics: pd.DataFrame,
    tasks: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    task: str = "T7",
) -> Figure:
    """Figure 5: per-finding headline metric of a multilabel task, in two side-by-side panels.

    Findings as in :func:`figure5_findings` (strictly more than ``tasks.<task>.min_test_positives``
    test positives, most frequent first); the first half of them in the left panel, the rest in the
    right one (the paper's 54 findings: 27 and 27). Horizontal bars, one per model, with SD error bars.
    """
    metrics = _prepare(metrics, "figure5: metrics table")
    if task not in tasks:
        raise ValueError(f"figure5: task {task!r} is not in the tasks config (known: {', '.join(tasks)})")
    metric = headline_metric(tasks, task)
    findings, support = figure5_findings(metrics, tasks, models, task)
    values, sds = bar_table(metrics, task, metric, models, findings)
    values = values.dropna(how="all")
    sds = sds.reindex(index=values.index)
    if values.empty:
        raise _no_data("figure5", [task], "metrics", f" (metric {metric})")
    findings = list(values.index)
    half = math.ceil(len(findings) / 2)
    halves = [findings[:half], findings[half:]] if len(findings) > 1 else [findings]

    row_height = 0.1 * values.shape[1] + 0.15
    figure = _new_figure(width=6.0 * len(halves), height=max(4.0, 1.6 + half * row_height))
    axes = figure.subplots(1, len(halves), squeeze=False)[0]
    threshold = min_test_positives(tasks, task)
    rule = f" (findings with > {threshold} test positives)" if threshold else ""
    for ax, letter, part in zip(axes, "ab", halves):
        labels = [finding if support is None else f"{finding} (n={int(support[finding])})" for finding in part]
        # Keep bar heights equal in both panels: pad the shorter half with empty slots.
        padded = list(part) + [f"__pad{i}" for i in range(half - len(part))]
        _grouped_bars(
            ax, values.reindex(padded), sds.reindex(padded), models, labels + [""] * (half - len(part)), horizontal=True
        )
        ax.set_title(_panel_title(letter, task, tasks[task], rule), fontsize=9)
        ax.set_xlabel(_metric_label(metric))
    top = _figure_legend(figure, models, list(values.columns[values.notna().any()]))
    figure.tight_layout(rect=(0, 0, 1, top))
    return figure


def figure5(
    metrics: pd.DataFrame,
    tasks: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    out_stem: str | Path,
    task: str = "T7",
) -> None:
    """Draw Figure 5 (per-finding AUC of T7, findings with > ``tasks.T7.min_test_positives`` test positives)."""
    _save(build_figure5(metrics, tasks, models, task=task), out_stem)


def _disciplines(tasks: Mapping[str, Mapping[str, Any]], present_tasks: Sequence[str]) -> list[str]:
    found = [str(tasks[t].get("discipline", "other")) for t in tasks if t in present_tasks]
    known = [d for d in DISCIPLINES if d in found]
    return known + [d for d in dict.fromkeys(found) if d not in DISCIPLINES]


def _discipline_axes(figure: Figure, n_panels: int) -> list[Any]:
    rows, columns = (1, n_panels) if n_panels <= 2 else (2, 2) if n_panels <= 4 else (math.ceil(n_panels / 3), 3)
    axes = list(figure.subplots(rows, columns, squeeze=False).ravel())
    for spare in axes[n_panels:]:
        spare.remove()
    return axes[:n_panels]


def _task_style(tasks: Mapping[str, Mapping[str, Any]], discipline: str, task: str) -> tuple[str, str]:
    # Colour = model, line style and marker = task within its discipline panel.
    same_discipline = [t for t in tasks if tasks[t].get("discipline", "other") == discipline]
    position = same_discipline.index(task)
    return _TASK_LINESTYLES[position % len(_TASK_LINESTYLES)], _TASK_MARKERS[position % len(_TASK_MARKERS)]


def _panel_metric_label(tasks: Mapping[str, Mapping[str, Any]], panel_tasks: Sequence[str]) -> str:
    metrics = dict.fromkeys(_metric_label(headline_metric(tasks, t)) for t in panel_tasks)
    return " / ".join(metrics)


def build_figure6(
    efficiency: pd.DataFrame, tasks: Mapping[str, Mapping[str, Any]], models: Mapping[str, Mapping[str, Any]]
) -> Figure:
    """Figure 6: label efficiency, one panel per discipline, a line per task and model.

    Mean over seeds of the headline metric (class ``macro``) against the training fraction (log
    axis); the band is mean +- ``band_sd`` of :func:`efficiency_curves` (seed spread and bootstrap
    SD combined).
    """
    efficiency = _prepare(efficiency, "figure6: efficiency table")
    curves = efficiency_curves(efficiency, tasks, models)
    if curves.empty:
        raise _no_data("figure6", list(tasks), "efficiency", " (class 'macro', headline metric)")
    present_tasks = list(dict.fromkeys(curves["task"]))
    disciplines = _disciplines(tasks, present_tasks)
    figure = _new_figure(width=11.0 if len(disciplines) > 1 else 6.0, height=4.2 * math.ceil(len(disciplines) / 2) + 0.3)
    axes = _discipline_axes(figure, len(disciplines))
    fractions = sorted(curves["fraction"].unique())
    for letter, ax, discipline in zip("abcdefghij", axes, disciplines):
        panel_tasks = [t for t in present_tasks if tasks[t].get("discipline", "other") == discipline]
        for task in panel_tasks:
            linestyle, marker = _task_style(tasks, discipline, task)
            for model in models:
                line = curves[(curves["task"] == task) & (curves["model"] == model)]
                if line.empty:
                    continue
                x = line["fraction"].to_numpy(float)
                mean = line["mean"].to_numpy(float)
                band = line["band_sd"].to_numpy(float)
                colour = _model_colour(models, model)
                ax.plot(
                    x, mean, color=colour, linestyle=linestyle, marker=marker, markersize=4,
                    label=f"{task} · {_model_label(models, model)}",
                )
                ax.fill_between(x, mean - band, mean + band, color=colour, alpha=0.15, linewidth=0)
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


def figure6(
    efficiency: pd.DataFrame,
    tasks: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    out_stem: str | Path,
) -> None:
    """Draw Figure 6 (label efficiency) from the efficiency table.

    Band: mean +- sqrt(var across seeds + mean bootstrap variance); see :func:`efficiency_curves`.
    """
    _save(build_figure6(efficiency, tasks, models), out_stem)


def _task_colour(tasks: Mapping[str, Mapping[str, Any]], discipline: str, task: str) -> str:
    same_discipline = [t for t in tasks if tasks[t].get("discipline", "other") == discipline]
    return _MODEL_COLOURS[same_discipline.index(task) % len(_MODEL_COLOURS)]


def _model_linestyle(models: Mapping[str, Mapping[str, Any]], model: str) -> Any:
    return _MODEL_LINESTYLES[list(models).index(model) % len(_MODEL_LINESTYLES)]


def _curve_ylim(curves: pd.DataFrame) -> tuple[float, float]:
    """y range of the drawn bands with a margin, within :data:`UNIT_YLIM`: fluctuations across layers of a
    few hundredths must stay visible, which a full 0-1 axis would flatten."""
    sd = curves["sd"].fillna(0.0)
    low, high = float((curves["value"] - sd).min()), float((curves["value"] + sd).max())
    margin = max(0.05 * (high - low), 0.02)
    return max(UNIT_YLIM[0], low - margin), min(UNIT_YLIM[1], high + margin)


_LAYER_AXIS_LABELS = {
    "depth": "layer (hidden_states index, true depth)",
    "authors": "layer, authors' index (position in their text-sorted files x.0, x.1, x.10, ...)",
}


def build_figureS5(
    layers: pd.DataFrame,
    tasks: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    metrics: pd.DataFrame | None = None,
    order: str = "depth",
    metric: str = "auc",
) -> Figure:
    """Figure S5: ``metric`` (class ``macro``) of a probe on each layer, one panel per discipline.

    Every task of a discipline is drawn in its panel against the layer, as the mean line with the
    bootstrap SD as a band around it; the paper shows AUC for every discipline, F1 tasks included,
    hence one ``metric`` for all (``figures.figureS5_metric``).

    x axis (``figures.figureS5_order``): ``depth`` is the ``hidden_states`` index; ``authors`` the
    authors' layer index, the position in their text-sorted list of layer files, in which the
    paper's curves run (its "layer 32" of the 80B model is ``hidden.39``); see :func:`layer_curves`.
    ``image_embeds`` is a star one step right of the last layer.

    The paper draws IDEFICS-80B alone; here every configured model with rows in the layers table is
    drawn, so that the models can be compared: colour = task, line style = model. The headline layer
    of each task x model (``layer`` of the metrics table, fixed or chosen on validation) is marked by
    a black dashed vertical line and a black ring on its curve (the ring tells which curve a line
    belongs to when models or tasks differ in their headline layer). Without ``metrics`` no headline
    layer is marked.
    """
    check_layer_order(order)
    layers = _prepare(layers, "figureS5: layers table")
    headline = {} if metrics is None else headline_layers(_prepare(metrics, "figureS5: metrics table"), tasks, models)
    curves = layer_curves(layers, tasks, models, metric=metric, order=order)
    if curves.empty:
        detail = f" (class 'macro', metric {metric} = figures.figureS5_metric)"
        raise _no_data("figureS5", list(tasks), "layers", detail)
    present_tasks = list(dict.fromkeys(curves["task"]))
    disciplines = _disciplines(tasks, present_tasks)
    figure = _new_figure(width=11.0 if len(disciplines) > 1 else 6.0, height=4.2 * math.ceil(len(disciplines) / 2) + 0.3)
    axes = _discipline_axes(figure, len(disciplines))
    for letter, ax, discipline in zip("abcdefghij", axes, disciplines):
        panel_tasks = [t for t in present_tasks if tasks[t].get("discipline", "other") == discipline]
        has_embeddings = False
        headline_x: list[float] = []
        panel = curves[curves["task"].isin(panel_tasks)]
        for task in panel_tasks:
            colour = _task_colour(tasks, discipline, task)
            for model in models:
                line = curves[(curves["task"] == task) & (curves["model"] == model)]
                if line.empty:
                    continue
                hidden = line[line["layer"] != EMBEDDINGS_LAYER]
                x = hidden["x"].to_numpy(float)
                mean = hidden["value"].to_numpy(float)
                sd = hidden["sd"].to_numpy(float)
                label = f"{task} · {_model_label(models, model)}"
                ax.plot(x, mean, color=colour, linestyle=_model_linestyle(models, model), linewidth=1.2, label=label)
                ax.fill_between(x, mean - sd, mean + sd, color=colour, alpha=0.15, linewidth=0)
                embeds = line[line["layer"] == EMBEDDINGS_LAYER]
                if not embeds.empty:
                    has_embeddings = True
                    ax.errorbar(
                        embeds["x"], embeds["value"], yerr=embeds["sd"], color=colour, marker="*", markersize=9,
                        linestyle="none", label="_nolegend_",
                    )
                chosen = headline.get((task, model))
                if chosen is None:
                    continue
                at = line[line["layer"] == chosen]
                if at.empty:
                    log.warning(
                        "figureS5: headline layer %s of task %s, model %s is not drawn (not in the layers table "
                        "for metric %s, or without a place in the %s order)", chosen, task, model, metric, order,
                    )
                    continue
                headline_x.append(float(at["x"].iloc[0]))
                ax.plot(at["x"], at["value"], linestyle="none", marker="o", markersize=6, markerfacecolor="none",
                        markeredgecolor="black", label="_nolegend_")
        for x in sorted(set(headline_x)):
            ax.axvline(x, color="black", linestyle="--", linewidth=1.0, gid="headline", label="_nolegend_")
        handles, labels = ax.get_legend_handles_labels()
        if headline_x:
            handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1.0))
            labels.append("headline layer")
        if has_embeddings:
            handles.append(Line2D([], [], color="black", marker="*", markersize=9, linestyle="none"))
            labels.append(f"{EMBEDDINGS_LAYER} (projection)")
        ax.legend(handles, labels, fontsize=7, loc="best", frameon=True, framealpha=0.8)
        ax.set_ylim(*_curve_ylim(panel))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(_LAYER_AXIS_LABELS[order], fontsize=8)
        ax.set_ylabel(f"{_metric_label(metric)} (mean ± bootstrap SD)")
        ax.set_title(f"({letter}) {discipline}", fontsize=10)
        ax.grid(linewidth=0.4, alpha=0.5)
    figure.tight_layout()
    return figure


def figureS5(
    layers: pd.DataFrame,
    tasks: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    out_stem: str | Path,
    metrics: pd.DataFrame | None = None,
    order: str = "depth",
    metric: str = "auc",
) -> None:
    """Draw Figure S5 (``metric`` per layer with SD band, headline layer marked); see :func:`build_figureS5`."""
    _save(build_figureS5(layers, tasks, models, metrics=metrics, order=order, metric=metric), out_stem)


def figureS6_panels(
    groups: pd.DataFrame,
    tasks: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    task: str = "T2",
) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """The panels of Figure S6: ``(y label, values, sds)``, values and SDs with rows = groups, columns = models.

    For an F1 task two panels: the paper's macro F1 (for a binary task the mean of both classes' F1)
    and the positive class's F1 (``f1_positive`` rows, or the positive class's own ``f1`` rows in
    tables without them). Otherwise one panel of the task's headline metric. Panels without any row
    are left out; all panels share the groups of the first, in sorted order.
    """
    if task not in tasks:
        raise ValueError(f"figureS6: task {task!r} is not in the tasks config (known: {', '.join(tasks)})")
    metric = headline_metric(tasks, task)
    # Rows without a group (empty in the CSV, NaN in a DataFrame built in memory) belong to no bar.
    rows = groups[~groups["group"].str.strip().isin(["", "nan"])]

    def table(metric_name: str, class_name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        return bar_table(rows, task, metric_name, models, None, category_column="group", class_name=class_name)

    panels = []
    if metric == "f1":
        positive = _positive_class(tasks[task], task)
        macro_label = "macro F1 (mean of both classes)" if positive else "macro F1"
        panels.append((macro_label, *table("f1", MACRO)))
        if positive:
            values, sds = table("f1_positive", MACRO)
            if values.empty:
                values, sds = table("f1", positive)
            panels.append((f"F1 of {positive} (positive class)", values, sds))
    else:
        panels.append((_metric_label(metric), *table(metric, MACRO)))
    panels = [(label, values, sds) for label, values, sds in panels if not values.isna().all().all()]
    if not panels:
        raise _no_data("figureS6", [task], "groups", f" (class 'macro', metric {metric})")
    order = list(panels[0][1].index)
    return [(label, values.reindex(order), sds.reindex(order)) for label, values, sds in panels]


def build_figureS6(
    groups: pd.DataFrame,
    tasks: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    task: str = "T2",
) -> Figure:
    """Figure S6: ``task`` per sub-group (organ), grouped bars per model with SD error bars, one panel
    per metric of :func:`figureS6_panels` (T2: macro F1 and the positive class's F1), stacked."""
    groups = _prepare(groups, "figureS6: groups table", extra=("group",))
    panels = figureS6_panels(groups, tasks, models, task)
    n_groups, n_models = panels[0][1].shape
    figure = _new_figure(width=min(max(6.0, 3.0 + 0.45 * n_groups * n_models), 18.0), height=3.8 * len(panels) + 0.6)
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    what = "organ" if task == "T2" else "group"
    present: set[str] = set()
    for ax, letter, (label, values, sds) in zip(axes, "abcdefghij", panels):
        _grouped_bars(ax, values, sds, models, list(values.index))
        ax.set_title(f"({letter}) {task}: {tasks[task].get('name', task)}, by {what}", fontsize=10)
        ax.set_ylabel(label)
        ax.set_xlabel(what)
        present.update(values.columns[values.notna().any()])
    top = _figure_legend(figure, models, [m for m in models if m in present])
    figure.tight_layout(rect=(0, 0, 1, top))
    return figure


def figureS6(
    groups: pd.DataFrame,
    tasks: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    out_stem: str | Path,
    task: str = "T2",
) -> None:
    """Draw Figure S6 (T2 macro and positive-class F1 per organ group) from the groups table."""
    _save(build_figureS6(groups, tasks, models, task=task), out_stem)


# --------------------------------------------------------------------------------------------
# Figure 1d: NEJM Image Challenge accuracy by difficulty (results/tables/nejm.csv)
# --------------------------------------------------------------------------------------------

#: Answer modes of nejm.csv drawn as bars, with their hatching (top-k: any ``top<k>`` mode).
_NEJM_MODE_HATCH = {"greedy": "", "top": "//", "likelihood": ".."}
NEJM_COLUMNS = ("model", "mode", "stratum", "stratum_low", "stratum_high", "accuracy", "sd", "n_cases")


def _nejm_mode_label(mode: str) -> str:
    if mode.startswith("top"):
        return f"top-{mode[3:]} sampled"
    return {"greedy": "greedy", "likelihood": "likelihood"}.get(mode, mode)


def build_figure1d(nejm: pd.DataFrame, models: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Accuracy per difficulty stratum: bars per model and answer mode (bootstrap SD error bars), the
    readers' own accuracy (black line) and chance (dashed), from the ``nejm.csv`` table."""
    _require_columns(nejm, NEJM_COLUMNS, "nejm table")
    table = nejm[nejm["stratum"] != "all"].copy()
    for column in ("stratum_low", "stratum_high", "accuracy", "sd", "n_cases"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    strata = table.drop_duplicates("stratum").sort_values("stratum_low")["stratum"].tolist()
    bars = table[~table["model"].isin(["readers", "chance"])]
    series = [(m, mode) for m, mode in bars[["model", "mode"]].drop_duplicates().itertuples(index=False)]
    if not strata or not series:
        raise ValueError("figure1d: nothing to draw: the nejm table has no model rows per stratum")
    model_order = [m for m in models if m in set(bars["model"])] + sorted(set(bars["model"]) - set(models))
    mode_rank = {"greedy": 0, "likelihood": 2}
    series.sort(key=lambda s: (model_order.index(s[0]), mode_rank.get(s[1], 1), s[1]))
    figure = _new_figure(7.0, 4.2)
    ax = figure.add_subplot(1, 1, 1)
    centres = np.arange(len(strata), dtype=float)
    width = 0.8 / len(series)
    for position, (model, mode) in enumerate(series):
        rows = bars[(bars["model"] == model) & (bars["mode"] == mode)].set_index("stratum").reindex(strata)
        x = centres + (position - (len(series) - 1) / 2) * width
        heights = rows["accuracy"].to_numpy(dtype=float)
        drawn = np.isfinite(heights)
        hatch = _NEJM_MODE_HATCH.get("top" if mode.startswith("top") else mode, "")
        ax.bar(
            x[drawn],
            heights[drawn],
            width=width,
            color=_model_colour(models, model),
            alpha=1.0 if mode == "greedy" else 0.55,
            hatch=hatch,
            edgecolor="white",
            label=f"{_model_label(models, model)}, {_nejm_mode_label(mode)}",
            gid=f"{model}:{mode}",
        )
        errors = rows["sd"].to_numpy(dtype=float)
        with_error = drawn & np.isfinite(errors)
        if with_error.any():
            ax.errorbar(x[with_error], heights[with_error], yerr=errors[with_error], fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    readers = table[table["model"] == "readers"].set_index("stratum").reindex(strata)
    if readers["accuracy"].notna().any():
        ax.errorbar(centres, readers["accuracy"], yerr=readers["sd"], color="black", marker="o", linewidth=1.2,
                    capsize=2, label="human readers", gid="readers")
    chance = nejm[(nejm["model"] == "chance") & (nejm["stratum"] == "all")]
    chance_level = float(chance["accuracy"].iloc[0]) if len(chance) else 0.2
    ax.axhline(chance_level, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance_level:.0%})", gid="chance")
    n_cases = bars.groupby("stratum")["n_cases"].max().reindex(strata)
    ax.set_xticks(centres)
    ax.set_xticklabels([f"{s}\n(n={int(n) if np.isfinite(n) else 0})" for s, n in zip(strata, n_cases)])
    ax.set_xlabel("Readers answering correctly (difficulty stratum)")
    ax.set_ylabel("Accuracy")
    ax.set_ylim(*UNIT_YLIM)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.grid(axis="y", linewidth=0.4, alpha=0.5)
    ax.set_axisbelow(True)
    ax.set_title("d  NEJM Image Challenge", loc="left", fontsize=10, fontweight="bold")
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    figure.tight_layout()
    return figure


def figure1d(
    nejm: pd.DataFrame,
    tasks: Mapping[str, Mapping[str, Any]] | None,
    models: Mapping[str, Mapping[str, Any]],
    out_stem: str | Path,
) -> None:
    """Draw Figure 1d (NEJM accuracy by difficulty) from the nejm table; ``tasks`` is unused."""
    _save(build_figure1d(nejm, models), out_stem)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

#: Figure name -> (drawing function, the result table it reads).
FIGURES: dict[str, tuple[Callable[..., None], str]] = {
    "figure3": (figure3, "metrics"),
    "figure4": (figure4, "metrics"),
    "figure5": (figure5, "metrics"),
    "figure6": (figure6, "efficiency"),
    "figureS5": (figureS5, "layers"),
    "figureS6": (figureS6, "groups"),
    "figure1d": (figure1d, "nejm"),
}
#: Further tables a figure reads when given, passed by name: Figure S5 marks the headline layer of metrics.csv.
_OPTIONAL_TABLES: dict[str, tuple[str, ...]] = {"figureS5": ("metrics",)}
#: Figure name -> {keyword argument: (key of the config's ``figures`` section, default)}.
_FIGURE_OPTIONS: dict[str, dict[str, tuple[str, Any]]] = {
    "figure5": {"task": ("figure5_task", "T7")},
    "figureS5": {"order": ("figureS5_order", "depth"), "metric": ("figureS5_metric", "auc")},
    "figureS6": {"task": ("figureS6_task", "T2")},
}


def figure_options(name: str, figures_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments of figure ``name`` from the config's ``figures`` section (defaults where absent)."""
    figures_config = figures_config or {}
    return {
        argument: figures_config.get(key, default) for argument, (key, default) in _FIGURE_OPTIONS.get(name, {}).items()
    }


def draw(
    name: str,
    tables: Mapping[str, pd.DataFrame],
    tasks: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    out_stem: str | Path,
    **options: Any,
) -> None:
    """Draw the figure called ``name`` (``figure3`` ... ``figureS6``) from ``tables``.

    Args:
        name: one of :data:`FIGURES`.
        tables: result tables by name (``metrics``, ``layers``, ``efficiency``, ``groups``); the one
            the figure reads is needed, Figure S5 also uses ``metrics`` when given (headline layer).
        tasks, models: the config's ``tasks`` and ``models`` sections.
        out_stem: output path without extension.
        **options: passed on; :func:`figure_options` makes them from the config's ``figures`` section.
    """
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; known figures: {', '.join(FIGURES)}")
    function, table_name = FIGURES[name]
    if table_name not in tables:
        raise ValueError(
            f"{name} needs the {table_name!r} table (results/tables/{table_name}.csv); "
            f"given: {', '.join(tables) or 'none'}"
        )
    extra = {table: tables[table] for table in _OPTIONAL_TABLES.get(name, ()) if table in tables}
    function(tables[table_name], tasks, models, out_stem, **extra, **options)

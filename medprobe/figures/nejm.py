"""Figure 1d: NEJM Image Challenge accuracy per difficulty stratum, from the NEJM table (nejm.csv)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from medprobe.figures.common import UNIT_YLIM, Models, Tasks, model_colour, model_label, new_figure
from medprobe.figures.tables import require_columns
from medprobe.settings import FiguresSettings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NEJM_COLUMNS = ("model", "mode", "stratum", "stratum_low", "stratum_high", "accuracy", "sd", "n_cases")
#: Answer modes drawn as bars, with their hatching (top-k: any ``top<k>`` mode).
_MODE_HATCH = {"greedy": "", "top": "//", "likelihood": ".."}
#: Bars of one model: greedy first, then the sampled top-k modes, then likelihood.
_MODE_RANK = {"greedy": 0, "likelihood": 2}
#: Rows of nejm.csv that are references, not models' answers.
_REFERENCES = ("readers", "chance")


def _mode_label(mode: str) -> str:
    if mode.startswith("top"):
        return f"top-{mode[3:]} sampled"
    return {"greedy": "greedy", "likelihood": "likelihood"}.get(mode, mode)


def _series(bars: pd.DataFrame, models: Models) -> list[tuple[str, str]]:
    """The (model, mode) pairs drawn as bars: models in config order (unknown ones after, sorted)."""
    series = [(m, mode) for m, mode in bars[["model", "mode"]].drop_duplicates().itertuples(index=False)]
    model_order = [m for m in models if m in set(bars["model"])] + sorted(set(bars["model"]) - set(models))
    series.sort(key=lambda s: (model_order.index(s[0]), _MODE_RANK.get(s[1], 1), s[1]))
    return series


def _mode_bars(
    ax: Any, bars: pd.DataFrame, strata: Sequence[str], series: Sequence[tuple[str, str]], models: Models
) -> None:
    """A bar per stratum and (model, mode), with bootstrap-SD error bars."""
    centres = np.arange(len(strata), dtype=float)
    width = 0.8 / len(series)
    for position, (model, mode) in enumerate(series):
        rows = bars[(bars["model"] == model) & (bars["mode"] == mode)].set_index("stratum").reindex(strata)
        x = centres + (position - (len(series) - 1) / 2) * width
        heights = rows["accuracy"].to_numpy(dtype=float)
        drawn = np.isfinite(heights)
        ax.bar(
            x[drawn],
            heights[drawn],
            width=width,
            color=model_colour(models, model),
            alpha=1.0 if mode == "greedy" else 0.55,
            hatch=_MODE_HATCH.get("top" if mode.startswith("top") else mode, ""),
            edgecolor="white",
            label=f"{model_label(models, model)}, {_mode_label(mode)}",
            gid=f"{model}:{mode}",
        )
        errors = rows["sd"].to_numpy(dtype=float)
        with_error = drawn & np.isfinite(errors)
        if with_error.any():
            ax.errorbar(
                x[with_error],
                heights[with_error],
                yerr=errors[with_error],
                fmt="none",
                ecolor="black",
                elinewidth=0.8,
                capsize=2,
            )


def _references(ax: Any, nejm: pd.DataFrame, table: pd.DataFrame, strata: Sequence[str]) -> None:
    """The readers' accuracy per stratum (black line) and chance (dashed, 20% without a chance row)."""
    readers = table[table["model"] == "readers"].set_index("stratum").reindex(strata)
    if readers["accuracy"].notna().any():
        ax.errorbar(
            np.arange(len(strata), dtype=float),
            readers["accuracy"],
            yerr=readers["sd"],
            color="black",
            marker="o",
            linewidth=1.2,
            capsize=2,
            label="human readers",
            gid="readers",
        )
    chance = nejm[(nejm["model"] == "chance") & (nejm["stratum"] == "all")]
    chance_level = float(chance["accuracy"].iloc[0]) if len(chance) else 0.2
    ax.axhline(
        chance_level, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance_level:.0%})", gid="chance"
    )


def _stratum_axes(ax: Any, bars: pd.DataFrame, strata: Sequence[str]) -> None:
    """Strata on x with their number of cases, accuracy on y."""
    n_cases = bars.groupby("stratum")["n_cases"].max().reindex(strata)
    ax.set_xticks(np.arange(len(strata), dtype=float))
    ax.set_xticklabels([f"{s}\n(n={int(n) if np.isfinite(n) else 0})" for s, n in zip(strata, n_cases)])
    ax.set_xlabel("Readers answering correctly (difficulty stratum)")
    ax.set_ylabel("Accuracy")
    ax.set_ylim(*UNIT_YLIM)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.grid(axis="y", linewidth=0.4, alpha=0.5)
    ax.set_axisbelow(True)
    ax.set_title("d  NEJM Image Challenge", loc="left", fontsize=10, fontweight="bold")
    ax.legend(fontsize=7, frameon=False, loc="upper left")


def figure1d(tables: Mapping[str, pd.DataFrame], tasks: Tasks, models: Models, options: FiguresSettings) -> Figure:
    """Figure 1d: accuracy per difficulty stratum: bars per model and answer mode (bootstrap SD error bars),
    the readers' own accuracy (black line) and chance (dashed), from the ``nejm`` table."""
    nejm = tables["nejm"]
    require_columns(nejm, NEJM_COLUMNS, "nejm table")
    table = nejm[nejm["stratum"] != "all"].copy()
    for column in ("stratum_low", "stratum_high", "accuracy", "sd", "n_cases"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    strata = table.drop_duplicates("stratum").sort_values("stratum_low")["stratum"].tolist()
    bars = table[~table["model"].isin(_REFERENCES)]
    series = _series(bars, models)
    if not strata or not series:
        raise ValueError("figure1d: nothing to draw: the nejm table has no model rows per stratum")
    figure = new_figure(7.0, 4.2)
    ax = figure.add_subplot(1, 1, 1)
    _mode_bars(ax, bars, strata, series, models)
    _references(ax, nejm, table, strata)
    _stratum_axes(ax, bars, strata)
    figure.tight_layout()
    return figure

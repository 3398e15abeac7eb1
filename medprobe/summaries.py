"""Summary tables computed from the result tables: label efficiency as the paper reports it, and findings
counted at AUC thresholds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from medprobe.tables import as_table, write_table

EFFICIENCY_SUMMARY_COLUMNS = [
    "discipline",
    "model",
    "fraction",
    "tasks",
    "metrics",
    "n_seeds",
    "n_train",
    "value_mean",
    "value_sd",
    "retained_mean",
    "retained_sd",
]


# Each column of the summaries over seeds: the per-seed column it summarises and how.
_OVER_SEEDS = {
    "tasks": ("tasks", "first"),
    "metrics": ("metrics", "first"),
    "n_seeds": ("seed", "nunique"),
    "n_train": ("n_train", "mean"),
    "value_mean": ("value", "mean"),
    "value_sd": ("value", "std"),
    "reference_mean": ("reference", "mean"),
    "retained_mean": ("retained", "mean"),
    "retained_sd": ("retained", "std"),
}


def _over_seeds(
    per_seed: list[pd.DataFrame], keys: list[str], columns: list[str], *, sort: bool, out_path: str | Path | None
) -> pd.DataFrame:
    """The table of ``columns``: per group of ``keys``, the :data:`_OVER_SEEDS` statistics of the ``per_seed``
    rows (no rows: an empty table); written to ``out_path`` when given."""
    if per_seed:
        statistics = {column: _OVER_SEEDS[column] for column in columns if column not in keys}
        rows = pd.concat(per_seed, ignore_index=True)
        summary = rows.groupby(keys, sort=sort).agg(**statistics).reset_index()[columns]
    else:
        summary = pd.DataFrame(columns=columns)
    if out_path is not None:
        write_table(summary, Path(out_path))
    return summary


def efficiency_summary(
    efficiency: str | Path | pd.DataFrame, tasks: dict[str, dict[str, Any]], out_path: str | Path | None = None
) -> pd.DataFrame:
    """Label efficiency as the paper reports it: the share of the full-data metric retained at each fraction.

    From the ``efficiency`` table (rows of class ``macro``, each task's headline ``metric`` from ``tasks``): for
    every discipline, model, fraction and seed, the headline metric is averaged over the discipline's tasks and
    divided by the same seed's value at fraction 1.0 (``retained``). Rows give the mean and SD (ddof 1, NaN for
    one seed) over seeds of that mean metric (``value_*``) and of the retained share (``retained_*``), with the
    mean number of training images summed over the tasks (``n_train``). A (task, model) without a fraction-1.0
    row is an error: there is nothing to retain a share of.
    """
    rows = _headline_rows(efficiency, tasks)
    per_seed = [_discipline_per_seed(rows)] if len(rows) else []
    return _over_seeds(
        per_seed, ["discipline", "model", "fraction"], EFFICIENCY_SUMMARY_COLUMNS, sort=True, out_path=out_path
    )


def _headline_rows(efficiency: str | Path | pd.DataFrame, tasks: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The macro rows of each task's headline metric, with the task's discipline."""
    table = as_table(efficiency)
    missing = {"task", "model", "fraction", "seed", "class", "metric", "value", "n_train"} - set(table.columns)
    if missing:
        raise ValueError(
            f"{efficiency if not isinstance(efficiency, pd.DataFrame) else 'efficiency table'}: "
            f"missing columns {sorted(missing)}"
        )
    parts = []
    for task, rows in table.groupby("task", sort=False):
        if task not in tasks:
            raise ValueError(f"efficiency table has task {task!r}, which is not in the tasks config")
        config = tasks[task]
        for key in ("metric", "discipline"):
            if not config.get(key):
                raise ValueError(f"tasks.{task}: key {key!r} is missing")
        picked = rows[(rows["class"].astype(str) == "macro") & (rows["metric"] == config["metric"])]
        parts.append(picked.assign(discipline=config["discipline"]))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _discipline_per_seed(rows: pd.DataFrame) -> pd.DataFrame:
    """Per discipline, model, fraction and seed: the metric averaged over the discipline's tasks and its share
    of the same seed's value at fraction 1.0 (``retained``)."""
    full = rows[np.isclose(rows["fraction"].astype(float), 1.0)]
    lacking = set(map(tuple, rows[["task", "model"]].drop_duplicates().to_numpy())) - set(
        map(tuple, full[["task", "model"]].drop_duplicates().to_numpy())
    )
    if lacking:
        raise ValueError(
            f"efficiency table: no fraction 1.0 rows for (task, model) {sorted(lacking)}; "
            "add 1.0 to efficiency.fractions"
        )
    per_seed = (
        rows.groupby(["discipline", "model", "fraction", "seed"], sort=True)
        .agg(
            value=("value", "mean"),
            n_train=("n_train", "sum"),
            tasks=("task", lambda v: ",".join(sorted(set(v)))),
            metrics=("metric", lambda v: ",".join(sorted(set(v)))),
        )
        .reset_index()
    )
    reference = per_seed[np.isclose(per_seed["fraction"], 1.0)].set_index(["discipline", "model", "seed"])["value"]
    keys = list(zip(per_seed["discipline"], per_seed["model"], per_seed["seed"]))
    per_seed["retained"] = per_seed["value"].to_numpy() / reference.loc[keys].to_numpy()
    return per_seed


EFFICIENCY_RETAINED_COLUMNS = [
    "discipline",
    "task",
    "model",
    "metric",
    "fraction",
    "n_seeds",
    "n_train",
    "value_mean",
    "reference_mean",
    "retained_mean",
    "retained_sd",
]


def efficiency_retained(
    efficiency: str | Path | pd.DataFrame,
    tasks: dict[str, dict[str, Any]],
    summary_tasks: dict[str, str],
    out_path: str | Path | None = None,
) -> pd.DataFrame:
    """The paper's label-efficiency numbers: for one task per discipline (``summary_tasks``, discipline -> task),
    the task's macro headline metric at each fraction divided by its value at fraction 1.0 (same model, same
    seed), then mean and SD (ddof 1) over seeds. The paper's 95.8 / 94.3 / 95.2 / 94.7 % are the 80B model's
    rows at fraction 0.1 for T1 (F1), T3, T5 and T8 (AUC). Disciplines whose task has no rows are left out."""
    table = as_table(efficiency)
    parts = []
    for discipline, task in summary_tasks.items():
        if task not in tasks:
            continue
        metric = tasks[task]["metric"]
        rows = table[(table["task"] == task) & (table["class"].astype(str) == "macro") & (table["metric"] == metric)]
        if rows.empty:
            continue
        full = rows[np.isclose(rows["fraction"].astype(float), 1.0)].set_index(["model", "seed"])["value"]
        lacking = set(zip(rows["model"], rows["seed"])) - set(full.index)
        if lacking:
            raise ValueError(
                f"efficiency table: task {task} has no fraction 1.0 rows for (model, seed) "
                f"{sorted(lacking)}; add 1.0 to efficiency.fractions"
            )
        reference = full.loc[list(zip(rows["model"], rows["seed"]))].to_numpy()
        parts.append(
            rows.assign(discipline=discipline, reference=reference, retained=rows["value"].to_numpy() / reference)
        )
    keys = ["discipline", "task", "model", "metric", "fraction"]
    return _over_seeds(parts, keys, EFFICIENCY_RETAINED_COLUMNS, sort=False, out_path=out_path)


FINDINGS_COLUMNS = ["task", "model", "layer", "n_findings", "threshold", "n_at_or_above", "findings"]


def findings_summary(
    metrics: str | Path | pd.DataFrame,
    tasks: dict[str, dict[str, Any]],
    thresholds: Iterable[float],
    out_path: str | Path | None = None,
) -> pd.DataFrame:
    """Per multilabel task and model: how many findings reach a test AUC of at least each threshold (the paper:
    "Flamingo-80B led to an AUC of at least 0.90 in 7 findings and of at least 0.70 in 40"), and which."""
    table = as_table(metrics)
    rows = []
    for task, config in tasks.items():
        if config["kind"] != "multilabel":
            continue
        task_rows = table[
            (table["task"] == task) & (table["metric"] == "auc") & (table["class"].astype(str) != "macro")
        ]
        for model, per_model in task_rows.groupby("model", sort=False):
            for threshold in thresholds:
                reached = per_model[per_model["value"] >= threshold].sort_values("value", ascending=False)
                rows.append(
                    {
                        "task": task,
                        "model": model,
                        "layer": per_model["layer"].iloc[0],
                        "n_findings": len(per_model),
                        "threshold": float(threshold),
                        "n_at_or_above": len(reached),
                        "findings": "|".join(reached["class"].astype(str)),
                    }
                )
    summary = pd.DataFrame(rows, columns=FINDINGS_COLUMNS)
    if out_path is not None:
        write_table(summary, Path(out_path))
    return summary

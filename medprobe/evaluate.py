"""Probe predictions -> long-format result tables (the ``evaluate`` stage).

Every number comes from :func:`medprobe.stats.score_predictions` on the per-sample test predictions the
probe stage saved, so any table can be recomputed without refitting. Bootstrap resamples are drawn from
the test set (clustered by patient where patient ids exist) with the config's seed, so every model of a
task is scored on the very same resamples and paired comparisons are meaningful.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np
import pandas as pd

from medprobe.checks import check_finite, coverage_warnings
from medprobe.labels import load_manifest, task_targets
from medprobe.layers import authors_labels
from medprobe.stats import Scores, compare, delong_rows, holm, score_predictions

TABLE_COLUMNS = [
    "task", "model", "layer", "fraction", "seed", "class", "metric",
    "value", "sd", "ci_low", "ci_high", "n_train", "n_test", "n_degenerate",
]
COMPARISON_COLUMNS = [
    "task", "class", "metric", "model", "baseline", "difference", "ci_low", "ci_high", "p_value", "test", "p_holm",
]


def _decode(values: Iterable) -> list[str]:
    return [value.decode() if isinstance(value, bytes) else str(value) for value in values]


def task_classes(manifest_path: str | Path, task_config: dict[str, Any]) -> list[str]:
    """The classes a task's probes predict: the configured list, or every finding (``classes: all``), less the
    findings the ``min_test_positives`` rule leaves out (:func:`medprobe.labels.task_targets`)."""
    return task_targets(load_manifest(manifest_path), task_config, str(manifest_path))[1]


def test_set(manifest_path: str | Path, task_config: dict[str, Any], ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Targets (of :func:`task_classes`) and bootstrap groups (patient ids) for the test ids, in the order of ``ids``."""
    manifest = load_manifest(manifest_path)
    targets_all = task_targets(manifest, task_config, str(manifest_path))[0]
    position = pd.Series(np.arange(len(manifest)), index=manifest["image_id"])
    test_ids = set(manifest["image_id"][manifest["split"] == "test"])
    ids = list(ids)
    missing = [image_id for image_id in ids if image_id not in test_ids]
    if missing:
        raise ValueError(f"{manifest_path}: prediction ids not in the test split: {missing[:10]}")
    rows = position.loc[ids].to_numpy()
    # rows without a patient id become one-row clusters in the bootstrap
    return targets_all[rows], manifest["patient_id"].to_numpy()[rows]


def _rows(scores: Scores, **fixed: Any) -> list[dict[str, Any]]:
    return [{**fixed, **row} for row in scores.rows()]


def load_predictions(path: str | Path) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """(ids, probabilities, attrs) of a probe's ``predictions.h5``; NaN/Inf rows stop with their image ids."""
    with h5py.File(path, "r") as handle:
        ids, probabilities = _decode(handle["ids"][:]), handle["probabilities"][:].astype(np.float64)
        attrs = dict(handle.attrs)
    check_finite(probabilities, ids, str(path), "probabilities")
    return ids, probabilities, attrs


def evaluate_model_task(
    *,
    task: str,
    model: str,
    task_config: dict[str, Any],
    manifest: str | Path,
    probe_dir: str | Path,
    evaluation: dict[str, Any],
    seed: int,
    out_dir: str | Path,
) -> dict[str, pd.DataFrame]:
    """Write ``metrics.csv``, ``layers.csv``, ``efficiency.csv`` and ``groups.csv`` for one model x task."""
    probe_dir, out_dir = Path(probe_dir), Path(out_dir)
    kind, classes = task_config["kind"], task_classes(manifest, task_config)
    summary = json.loads((probe_dir / "probe.json").read_text())
    n_train = int(summary["n_train"])

    def _score(probabilities, targets, groups):
        return score_predictions(kind, classes, targets, probabilities, n_boot=evaluation["bootstrap"], seed=seed,
                                 groups=groups, ci=evaluation["ci"], graded=task_config.get("graded", False))

    ids, probabilities, attrs = load_predictions(probe_dir / "predictions.h5")
    _check_classes(probe_dir / "predictions.h5", _decode(attrs["classes"]), classes)
    targets, groups = test_set(manifest, task_config, ids)
    coverage_warnings(targets, kind, classes, f"{manifest} test split (task {task}, model {model})")
    common = dict(task=task, model=model, n_test=len(ids))
    headline = _score(probabilities, targets, groups)
    metrics = _rows(headline, **common, layer=summary["layer"], fraction=1.0, seed=seed, n_train=n_train)

    layer_rows: list[dict[str, Any]] = []
    with h5py.File(probe_dir / "layers.h5", "r") as handle:
        if _decode(handle["ids"][:]) != ids:
            raise ValueError(f"{probe_dir / 'layers.h5'}: ids differ from predictions.h5")
        layer_names = _decode(handle.attrs["layer_names"])
        num_hidden_states = handle.attrs.get("num_hidden_states")
        authors_index = authors_labels(layer_names, None if num_hidden_states is None else int(num_hidden_states))
        for index, layer in enumerate(layer_names):
            layer_probabilities = handle["probabilities"][index].astype(np.float64)
            check_finite(layer_probabilities, ids, f"{probe_dir / 'layers.h5'} layer {layer}", "probabilities")
            scores = _score(layer_probabilities, targets, groups)
            layer_rows += _rows(scores, **common, layer=layer, fraction=1.0, seed=seed, n_train=n_train,
                                authors_layer=authors_index[index])

    efficiency_rows: list[dict[str, Any]] = []
    efficiency_path = probe_dir / "efficiency.h5"
    if efficiency_path.exists():
        with h5py.File(efficiency_path, "r") as handle:
            fractions, seeds = handle.attrs["fractions"], handle.attrs["seeds"]
            subset_sizes = handle["n_train"][:]
            for f_index, fraction in enumerate(fractions):
                for s_index, subset_seed in enumerate(seeds):
                    subset_probabilities = handle["probabilities"][f_index, s_index].astype(np.float64)
                    check_finite(subset_probabilities, ids, f"{efficiency_path} fraction {fraction:g} seed {subset_seed}",
                                 "probabilities")
                    scores = _score(subset_probabilities, targets, groups)
                    efficiency_rows += _rows(scores, **common, layer=summary["layer"], fraction=float(fraction),
                                             seed=int(subset_seed), n_train=int(subset_sizes[f_index, s_index]))

    group_rows: list[dict[str, Any]] = []
    test_manifest = load_manifest(manifest).set_index("image_id").loc[ids]
    group_labels = test_manifest["group"].to_numpy()
    for group in sorted(set(group_labels) - {""}):
        mask = group_labels == group
        scores = _score(probabilities[mask], targets[mask], None if groups is None else groups[mask])
        group_rows += [{**row, "group": group} for row in _rows(scores, **{**common, "n_test": int(mask.sum())},
                                                                layer=summary["layer"], fraction=1.0, seed=seed, n_train=n_train)]

    tables = {
        "metrics": pd.DataFrame(metrics, columns=TABLE_COLUMNS),
        "layers": pd.DataFrame(layer_rows, columns=TABLE_COLUMNS + ["authors_layer"]).astype({"authors_layer": "Int64"}),
        "efficiency": pd.DataFrame(efficiency_rows, columns=TABLE_COLUMNS),
        "groups": pd.DataFrame(group_rows, columns=TABLE_COLUMNS + ["group"]),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        write_table(table, out_dir / f"{name}.csv")
    return tables


def compare_models(
    *,
    task: str,
    task_config: dict[str, Any],
    manifest: str | Path,
    predictions: dict[str, str | Path],
    evaluation: dict[str, Any],
    seed: int,
    out_path: str | Path,
    pairs: Iterable[tuple[str, str]] | None = None,
    baseline: str | None = None,
) -> pd.DataFrame:
    """Paired comparisons on one task (shared bootstrap resamples): each ``(model, reference)`` of ``pairs``
    whose two models both have predictions, or, without ``pairs``, every model against ``baseline``. The
    reference model is the table's ``baseline`` column."""
    kind, classes = task_config["kind"], task_classes(manifest, task_config)
    if pairs is None:
        pairs = [(model, baseline) for model in predictions if baseline is not None and model != baseline]
    pairs = [(model, reference) for model, reference in pairs if model in predictions and reference in predictions]
    scored, probabilities_of = {}, {}
    reference_ids, targets = None, None
    for model in dict.fromkeys(name for pair in pairs for name in pair):
        path = predictions[model]
        ids, probabilities, attrs = load_predictions(path)
        _check_classes(Path(path), _decode(attrs["classes"]), classes)
        if reference_ids is None:
            reference_ids = ids
            targets, groups = test_set(manifest, task_config, ids)
        elif ids != reference_ids:
            raise ValueError(f"{path}: test ids differ from {predictions[next(iter(scored))]}; "
                             "models must be compared on the same test images")
        scored[model] = score_predictions(kind, classes, targets, probabilities, n_boot=evaluation["bootstrap"],
                                          seed=seed, groups=groups, ci=evaluation["ci"],
                                          graded=task_config.get("graded", False))
        probabilities_of[model] = probabilities
    rows = [
        {"task": task, "model": model, "baseline": reference, **row}
        for model, reference in pairs
        for row in compare(scored[model], scored[reference], ci=evaluation["ci"])
        + delong_rows(kind, classes, targets, probabilities_of[model], probabilities_of[reference], ci=evaluation["ci"])
    ]
    table = add_holm(pd.DataFrame(rows, columns=COMPARISON_COLUMNS))
    write_table(table, Path(out_path))
    return table


def add_holm(table: pd.DataFrame) -> pd.DataFrame:
    """Fill ``p_holm``: Holm-adjusted ``p_value`` across the classes of each (task, model, baseline, metric, test)
    family. ``macro`` rows summarise the classes rather than join them, so each is its own family
    (``p_holm = p_value``); NaN p-values stay NaN and do not count towards the family size."""
    table = table.copy()
    table["p_holm"] = table["p_value"].astype(np.float64)
    per_class = table["class"].astype(str) != "macro"
    keys = ["task", "model", "baseline", "metric", "test"]
    for _, family in table[per_class].groupby(keys, sort=False, dropna=False):
        table.loc[family.index, "p_holm"] = holm(family["p_value"].to_numpy(dtype=np.float64))
    return table


EFFICIENCY_SUMMARY_COLUMNS = [
    "discipline", "model", "fraction", "tasks", "metrics", "n_seeds", "n_train",
    "value_mean", "value_sd", "retained_mean", "retained_sd",
]


def efficiency_summary(efficiency: str | Path | pd.DataFrame, tasks: dict[str, dict[str, Any]],
                       out_path: str | Path | None = None) -> pd.DataFrame:
    """Label efficiency as the paper reports it: the share of the full-data metric retained at each fraction.

    From the ``efficiency`` table (rows of class ``macro``, each task's headline ``metric`` from ``tasks``): for
    every discipline, model, fraction and seed, the headline metric is averaged over the discipline's tasks and
    divided by the same seed's value at fraction 1.0 (``retained``). Rows give the mean and SD (ddof 1, NaN for
    one seed) over seeds of that mean metric (``value_*``) and of the retained share (``retained_*``), with the
    mean number of training images summed over the tasks (``n_train``). A (task, model) without a fraction-1.0
    row is an error: there is nothing to retain a share of.
    """
    table = efficiency if isinstance(efficiency, pd.DataFrame) else pd.read_csv(
        efficiency, keep_default_na=False, na_values=[""], dtype={"class": str, "layer": str})
    missing = {"task", "model", "fraction", "seed", "class", "metric", "value", "n_train"} - set(table.columns)
    if missing:
        raise ValueError(f"{efficiency if not isinstance(efficiency, pd.DataFrame) else 'efficiency table'}: "
                         f"missing columns {sorted(missing)}")
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
    columns = EFFICIENCY_SUMMARY_COLUMNS
    if not parts:
        summary = pd.DataFrame(columns=columns)
    else:
        rows = pd.concat(parts, ignore_index=True)
        full = rows[np.isclose(rows["fraction"].astype(float), 1.0)]
        lacking = set(map(tuple, rows[["task", "model"]].drop_duplicates().to_numpy())) - set(
            map(tuple, full[["task", "model"]].drop_duplicates().to_numpy()))
        if lacking:
            raise ValueError(f"efficiency table: no fraction 1.0 rows for (task, model) {sorted(lacking)}; "
                             "add 1.0 to efficiency.fractions")
        keys = ["discipline", "model", "fraction", "seed"]
        per_seed = rows.groupby(keys, sort=True).agg(
            value=("value", "mean"), n_train=("n_train", "sum"),
            tasks=("task", lambda v: ",".join(sorted(set(v)))),
            metrics=("metric", lambda v: ",".join(sorted(set(v))))).reset_index()
        reference = per_seed[np.isclose(per_seed["fraction"], 1.0)].set_index(["discipline", "model", "seed"])["value"]
        per_seed["retained"] = per_seed["value"].to_numpy() / reference.loc[
            list(zip(per_seed["discipline"], per_seed["model"], per_seed["seed"]))].to_numpy()
        summary = per_seed.groupby(["discipline", "model", "fraction"], sort=True).agg(
            tasks=("tasks", "first"), metrics=("metrics", "first"), n_seeds=("seed", "nunique"),
            n_train=("n_train", "mean"), value_mean=("value", "mean"), value_sd=("value", "std"),
            retained_mean=("retained", "mean"), retained_sd=("retained", "std")).reset_index()[columns]
    if out_path is not None:
        write_table(summary, Path(out_path))
    return summary


EFFICIENCY_RETAINED_COLUMNS = [
    "discipline", "task", "model", "metric", "fraction", "n_seeds", "n_train",
    "value_mean", "reference_mean", "retained_mean", "retained_sd",
]


def efficiency_retained(efficiency: str | Path | pd.DataFrame, tasks: dict[str, dict[str, Any]],
                        summary_tasks: dict[str, str], out_path: str | Path | None = None) -> pd.DataFrame:
    """The paper's label-efficiency numbers: for one task per discipline (``summary_tasks``, discipline -> task),
    the task's macro headline metric at each fraction divided by its value at fraction 1.0 (same model, same
    seed), then mean and SD (ddof 1) over seeds. The paper's 95.8 / 94.3 / 95.2 / 94.7 % are the 80B model's
    rows at fraction 0.1 for T1 (F1), T3, T5 and T8 (AUC). Disciplines whose task has no rows are left out."""
    table = efficiency if isinstance(efficiency, pd.DataFrame) else pd.read_csv(
        efficiency, keep_default_na=False, na_values=[""], dtype={"class": str, "layer": str})
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
            raise ValueError(f"efficiency table: task {task} has no fraction 1.0 rows for (model, seed) "
                             f"{sorted(lacking)}; add 1.0 to efficiency.fractions")
        reference = full.loc[list(zip(rows["model"], rows["seed"]))].to_numpy()
        parts.append(rows.assign(discipline=discipline, reference=reference, retained=rows["value"].to_numpy() / reference))
    if not parts:
        summary = pd.DataFrame(columns=EFFICIENCY_RETAINED_COLUMNS)
    else:
        rows = pd.concat(parts, ignore_index=True)
        summary = rows.groupby(["discipline", "task", "model", "metric", "fraction"], sort=False).agg(
            n_seeds=("seed", "nunique"), n_train=("n_train", "mean"), value_mean=("value", "mean"),
            reference_mean=("reference", "mean"), retained_mean=("retained", "mean"),
            retained_sd=("retained", "std")).reset_index()[EFFICIENCY_RETAINED_COLUMNS]
    if out_path is not None:
        write_table(summary, Path(out_path))
    return summary


FINDINGS_COLUMNS = ["task", "model", "layer", "n_findings", "threshold", "n_at_or_above", "findings"]


def findings_summary(metrics: str | Path | pd.DataFrame, tasks: dict[str, dict[str, Any]],
                     thresholds: Iterable[float], out_path: str | Path | None = None) -> pd.DataFrame:
    """Per multilabel task and model: how many findings reach a test AUC of at least each threshold (the paper:
    "Flamingo-80B led to an AUC of at least 0.90 in 7 findings and of at least 0.70 in 40"), and which."""
    table = metrics if isinstance(metrics, pd.DataFrame) else pd.read_csv(
        metrics, keep_default_na=False, na_values=[""], dtype={"class": str, "layer": str})
    rows = []
    for task, config in tasks.items():
        if config["kind"] != "multilabel":
            continue
        task_rows = table[(table["task"] == task) & (table["metric"] == "auc") & (table["class"].astype(str) != "macro")]
        for model, per_model in task_rows.groupby("model", sort=False):
            for threshold in thresholds:
                reached = per_model[per_model["value"] >= threshold].sort_values("value", ascending=False)
                rows.append({"task": task, "model": model, "layer": per_model["layer"].iloc[0],
                             "n_findings": len(per_model), "threshold": float(threshold),
                             "n_at_or_above": len(reached), "findings": "|".join(reached["class"].astype(str))})
    summary = pd.DataFrame(rows, columns=FINDINGS_COLUMNS)
    if out_path is not None:
        write_table(summary, Path(out_path))
    return summary


def collect(paths: Iterable[str | Path], out_path: str | Path) -> pd.DataFrame:
    """Concatenate per-job tables into one results table (rows keep the order of ``paths``)."""
    frames = [pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"class": str, "layer": str, "group": str})
              for path in paths]
    frames = [frame for frame in frames if len(frame)]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    write_table(table, Path(out_path))
    return table


def write_table(table: pd.DataFrame, path: Path) -> None:
    """Write a CSV atomically with fixed float formatting so reruns are byte-identical."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    table.to_csv(temporary, index=False, float_format="%.6g", lineterminator="\n")
    os.replace(temporary, path)


def _check_classes(path: Path, found: list[str], expected: list[str]) -> None:
    if list(found) != list(expected):
        raise ValueError(f"{path}: classes {found} differ from the task's configured classes {expected}")

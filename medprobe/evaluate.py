"""Probe predictions -> long-format result tables (the ``evaluate`` stage), and paired model comparisons.

Every number comes from :func:`medprobe.stats.score_predictions` on the per-sample test predictions the
probe stage saved, so any table can be recomputed without refitting. Bootstrap resamples are drawn from
the test set (clustered by patient where patient ids exist) with the config's seed, so every model of a
task is scored on the very same resamples and paired comparisons are meaningful. Each table has its own
entry point and input, so that changing the label-efficiency settings rescores only ``efficiency.csv``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medprobe.checks import check_finite, coverage_warnings
from medprobe.contracts import PROBE_OUTPUT, open_hdf5, open_probe_output, read_dataset, read_json
from medprobe.io import decode_strings
from medprobe.labels import load_manifest, task_targets
from medprobe.layers import authors_labels
from medprobe.settings import EvaluationSettings, TaskSettings
from medprobe.stats import Scores, score_predictions
from medprobe.tables import COMPARISON_COLUMNS, TABLE_COLUMNS, write_table


def task_classes(manifest_path: str | Path, task_config: dict[str, Any]) -> list[str]:
    """The classes a task's probes predict: the configured list, or every finding (``classes: all``), less the
    findings the ``min_test_positives`` rule leaves out (:func:`medprobe.labels.task_targets`)."""
    return task_targets(load_manifest(manifest_path), task_config, str(manifest_path))[1]


def test_set(
    manifest_path: str | Path, task_config: dict[str, Any], ids: Iterable[str]
) -> tuple[np.ndarray, np.ndarray]:
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


def load_predictions(path: str | Path) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """(ids, probabilities, attrs) of a probe's ``predictions.h5``; NaN/Inf rows stop with their image ids, a file
    that breaks its contract with :class:`medprobe.contracts.DamagedFileError`."""
    with open_probe_output(path, "predictions") as (handle, ids):
        probabilities = read_dataset(handle, PROBE_OUTPUT, "probabilities").astype(np.float64)
        attrs = dict(handle.attrs)
    check_finite(probabilities, ids, str(path), "probabilities")
    return ids, probabilities, attrs


@dataclasses.dataclass(frozen=True)
class TestScorer:
    """Scores probabilities of one model x task on its test split, and turns the scores into table rows."""

    task: str
    model: str
    config: dict[str, Any]
    classes: list[str]
    targets: np.ndarray
    groups: np.ndarray
    evaluation: EvaluationSettings
    seed: int
    layer: str
    n_train: int

    def score(self, probabilities: np.ndarray, rows: np.ndarray | None = None) -> Scores:
        targets, groups = (self.targets, self.groups) if rows is None else (self.targets[rows], self.groups[rows])
        return score_predictions(
            self.config["kind"],
            self.classes,
            targets,
            probabilities,
            n_boot=self.evaluation.bootstrap,
            seed=self.seed,
            groups=groups,
            ci=self.evaluation.ci,
            graded=self.config.get("graded", False),
        )

    def rows(self, scores: Scores, **fixed: Any) -> list[dict[str, Any]]:
        common = {
            "task": self.task,
            "model": self.model,
            "layer": self.layer,
            "fraction": 1.0,
            "seed": self.seed,
            "n_train": self.n_train,
            "n_test": scores.n,
        }
        return [{**common, **fixed, **row} for row in scores.rows()]


def test_scorer(
    *,
    task: str,
    model: str,
    task_settings: TaskSettings,
    evaluation: EvaluationSettings,
    seed: int,
    manifest: str | Path,
    summary: str | Path | None,
    ids: list[str],
    source: str | Path,
) -> TestScorer:
    """The scorer of the test ids ``ids`` read from ``source`` (a probe output whose ``classes`` must be the task's);
    ``summary`` (probe.json) gives the rows' layer and training size (comparisons need neither)."""
    config = task_settings.as_dict()
    classes = task_classes(manifest, config)
    with open_hdf5(source, PROBE_OUTPUT) as handle:
        _check_classes(Path(source), decode_strings(handle.attrs["classes"]), classes)
    targets, groups = test_set(manifest, config, ids)
    probe = {"layer": "", "n_train": 0}
    if summary is not None:
        probe = read_json(summary, "probe summary", keys=("layer", "n_train"))
    return TestScorer(
        task, model, config, classes, targets, groups, evaluation, seed, probe["layer"], int(probe["n_train"])
    )


def metrics_table(*, source: str | Path, out: str | Path, **context: Any) -> pd.DataFrame:
    """``metrics.csv``: the headline predictions (``predictions.h5``) scored per class and macro."""
    ids, probabilities, _ = load_predictions(source)
    scorer = test_scorer(ids=ids, source=source, **context)
    coverage_warnings(
        scorer.targets,
        scorer.config["kind"],
        scorer.classes,
        f"{context['manifest']} test split (task {scorer.task}, model {scorer.model})",
    )
    return _write(scorer.rows(scorer.score(probabilities)), TABLE_COLUMNS, out)


def groups_table(*, source: str | Path, out: str | Path, **context: Any) -> pd.DataFrame:
    """``groups.csv``: the headline predictions scored within each sub-group of the manifest (T2's organs)."""
    ids, probabilities, _ = load_predictions(source)
    scorer = test_scorer(ids=ids, source=source, **context)
    labels = load_manifest(context["manifest"]).set_index("image_id").loc[ids, "group"].to_numpy()
    rows = []
    for group in sorted(set(labels) - {""}):
        mask = labels == group
        rows += scorer.rows(scorer.score(probabilities[mask], mask), group=group)
    return _write(rows, TABLE_COLUMNS + ["group"], out)


def layers_table(*, source: str | Path, out: str | Path, **context: Any) -> pd.DataFrame:
    """``layers.csv``: every layer's test predictions (``layers.h5``), with each layer's index in the authors'
    numbering (``authors_layer``)."""
    with open_probe_output(source, "layers") as (handle, ids):
        names = decode_strings(handle.attrs["layer_names"])
        num_hidden_states = handle.attrs.get("num_hidden_states")
        authors = authors_labels(names, None if num_hidden_states is None else int(num_hidden_states))
        scorer = test_scorer(ids=ids, source=source, **context)
        rows = []
        for index, layer in enumerate(names):
            probabilities = read_dataset(handle, PROBE_OUTPUT, "probabilities", index).astype(np.float64)
            check_finite(probabilities, ids, f"{source} layer {layer}", "probabilities")
            rows += scorer.rows(scorer.score(probabilities), layer=layer, authors_layer=authors[index])
    table = _write(rows, TABLE_COLUMNS + ["authors_layer"], out, types={"authors_layer": "Int64"})
    return table


def efficiency_table(*, source: str | Path, out: str | Path, **context: Any) -> pd.DataFrame:
    """``efficiency.csv``: the label-efficiency refits (``efficiency.h5``), one block per fraction x seed."""
    with open_probe_output(source, "efficiency") as (handle, ids):
        scorer = test_scorer(ids=ids, source=source, **context)
        fractions, seeds = handle.attrs["fractions"], handle.attrs["seeds"]
        sizes = read_dataset(handle, PROBE_OUTPUT, "n_train")
        rows = []
        for f, fraction in enumerate(fractions):
            for s, subset_seed in enumerate(seeds):
                probabilities = read_dataset(handle, PROBE_OUTPUT, "probabilities", (f, s)).astype(np.float64)
                check_finite(probabilities, ids, f"{source} fraction {fraction:g} seed {subset_seed}", "probabilities")
                rows += scorer.rows(
                    scorer.score(probabilities),
                    fraction=float(fraction),
                    seed=int(subset_seed),
                    n_train=int(sizes[f, s]),
                )
    return _write(rows, TABLE_COLUMNS, out)


TABLES: dict[str, Callable[..., pd.DataFrame]] = {
    "metrics": metrics_table,
    "layers": layers_table,
    "efficiency": efficiency_table,
    "groups": groups_table,
}

# The probe output each table scores (a probe rule's output: predictions.h5, layers.h5 or efficiency.h5).
TABLE_SOURCES = {"metrics": "predictions", "groups": "predictions", "layers": "layers", "efficiency": "efficiency"}


def evaluation_table(table: str, **arguments: Any) -> pd.DataFrame:
    """Write result table ``table`` (metrics, layers, efficiency or groups) of one model x task."""
    if table not in TABLES:
        raise ValueError(f"unknown evaluation table {table!r}; expected one of {sorted(TABLES)}")
    return TABLES[table](**arguments)


def _write(
    rows: list[dict[str, Any]], columns: list[str], out: str | Path, types: dict[str, str] | None = None
) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=columns)
    if types:
        table = table.astype(types)
    write_table(table, Path(out))
    return table


def compare_models(
    *,
    task: str,
    task_settings: TaskSettings,
    manifest: str | Path,
    predictions: dict[str, str | Path],
    evaluation: EvaluationSettings,
    seed: int,
    out_path: str | Path,
    pairs: Iterable[tuple[str, str]] | None = None,
    baseline: str | None = None,
) -> pd.DataFrame:
    """Paired comparisons on one task (shared bootstrap resamples): each ``(model, reference)`` of ``pairs``
    whose two models both have predictions, or, without ``pairs``, every model against ``baseline``. The
    reference model is the table's ``baseline`` column."""
    # Here, not at the top: the paired tests need scipy.stats (~0.4 s to import), which evaluate jobs do not.
    from medprobe.stats.comparisons import compare, delong_rows

    if pairs is None:
        pairs = [(model, baseline) for model in predictions if baseline is not None and model != baseline]
    pairs = [(model, reference) for model, reference in pairs if model in predictions and reference in predictions]
    compared = list(dict.fromkeys(name for pair in pairs for name in pair))
    loaded = {model: load_predictions(predictions[model]) for model in compared}
    for model in compared[1:]:
        if loaded[model][0] != loaded[compared[0]][0]:
            raise ValueError(
                f"{predictions[model]}: test ids differ from {predictions[compared[0]]}; "
                "models must be compared on the same test images"
            )
    rows = []
    if compared:
        scorer = test_scorer(
            task=task,
            model=compared[0],
            task_settings=task_settings,
            evaluation=evaluation,
            seed=seed,
            manifest=manifest,
            summary=None,
            ids=loaded[compared[0]][0],
            source=predictions[compared[0]],
        )
        for model in compared[1:]:
            with open_hdf5(predictions[model], PROBE_OUTPUT) as handle:
                _check_classes(Path(predictions[model]), decode_strings(handle.attrs["classes"]), scorer.classes)
        scored = {model: scorer.score(loaded[model][1]) for model in compared}
        rows = [
            {"task": task, "model": model, "baseline": reference, **row}
            for model, reference in pairs
            for row in compare(scored[model], scored[reference], ci=evaluation.ci)
            + delong_rows(
                scorer.config["kind"],
                scorer.classes,
                scorer.targets,
                loaded[model][1],
                loaded[reference][1],
                ci=evaluation.ci,
            )
        ]
    table = add_holm(pd.DataFrame(rows, columns=COMPARISON_COLUMNS))
    write_table(table, Path(out_path))
    return table


def add_holm(table: pd.DataFrame) -> pd.DataFrame:
    """Fill ``p_holm``: Holm-adjusted ``p_value`` across the classes of each (task, model, baseline, metric, test)
    family. ``macro`` rows summarise the classes rather than join them, so each is its own family
    (``p_holm = p_value``); NaN p-values stay NaN and do not count towards the family size."""
    from medprobe.stats.comparisons import holm

    table = table.copy()
    table["p_holm"] = table["p_value"].astype(np.float64)
    per_class = table["class"].astype(str) != "macro"
    keys = ["task", "model", "baseline", "metric", "test"]
    for _, family in table[per_class].groupby(keys, sort=False, dropna=False):
        table.loc[family.index, "p_holm"] = holm(family["p_value"].to_numpy(dtype=np.float64))
    return table


def _check_classes(path: Path, found: list[str], expected: list[str]) -> None:
    if list(found) != list(expected):
        raise ValueError(f"{path}: classes {found} differ from the task's configured classes {expected}")

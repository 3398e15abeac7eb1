"""Shared fixtures. Tests never download: models are built from configs, data is generated."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


# The probe output each evaluation table is scored from.
TABLE_SOURCES = {
    "metrics": "predictions.h5",
    "groups": "predictions.h5",
    "layers": "layers.h5",
    "efficiency": "efficiency.h5",
}


def task_settings(task_config, name="T"):
    """TaskSettings of a test's partial task config (the keys scoring does not read get neutral values)."""
    from medprobe.settings import TaskSettings

    return TaskSettings.from_dict(
        {
            "name": name,
            "discipline": "pathology",
            "dataset": "demo",
            "metric": "auc",
            "prompt": "",
            "graded": False,
            "min_test_positives": 0,
            **task_config,
        }
    )


def evaluate_all(*, task, model, task_config, manifest, probe_dir, evaluation, seed, out_dir):
    """Every evaluation table of one probe folder, as the workflow's evaluate jobs write them (tables whose
    probe output is absent are left out). Returns {table: DataFrame}."""
    from medprobe.evaluate import evaluation_table
    from medprobe.settings import EvaluationSettings

    probe_dir, out_dir = Path(probe_dir), Path(out_dir)
    tables = {}
    for table, source in TABLE_SOURCES.items():
        if (probe_dir / source).exists():
            tables[table] = evaluation_table(
                table,
                source=probe_dir / source,
                out=out_dir / f"{table}.csv",
                task=task,
                model=model,
                task_settings=task_settings(task_config, task),
                evaluation=EvaluationSettings.from_dict(evaluation),
                seed=seed,
                manifest=manifest,
                summary=probe_dir / "probe.json",
            )
    return tables

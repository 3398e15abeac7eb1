"""The long-format result tables: their columns, and reading, writing and collecting them.

Columns (docs/architecture.md, "Result tables"): one row per number, ``task, model, layer, fraction, seed, class,
metric, value, sd, ci_low, ci_high, n_train, n_test, n_degenerate``. Tables are written with fixed float
formatting and atomically, so reruns are byte-identical and a killed job leaves no partial table.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from medprobe.io import atomic_path

TABLE_COLUMNS = [
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
    "n_degenerate",
]
COMPARISON_COLUMNS = [
    "task",
    "class",
    "metric",
    "model",
    "baseline",
    "difference",
    "ci_low",
    "ci_high",
    "p_value",
    "test",
    "p_holm",
]
# Columns read as text: class names such as "0" and layer names must not become numbers.
_TEXT_COLUMNS = {"class": str, "layer": str, "group": str}


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """A result table with class, layer and group names kept as text and empty cells as NaN."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype=_TEXT_COLUMNS)


def as_table(table: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    """``table`` itself, or the table read from that path."""
    return table if isinstance(table, pd.DataFrame) else read_table(table)


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a CSV atomically with fixed float formatting so reruns are byte-identical."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")


def collect(paths: Iterable[str | os.PathLike], out_path: str | os.PathLike) -> pd.DataFrame:
    """Concatenate per-job tables into one results table (rows keep the order of ``paths``)."""
    frames = [frame for frame in map(read_table, paths) if len(frame)]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    write_table(table, Path(out_path))
    return table

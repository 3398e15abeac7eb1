"""Reading and checking the result tables figures are drawn from.

Every figure reads only the long-format result tables (``results/tables/*.csv``, see docs/outputs.md), so
figures can be redrawn without touching activations or probes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from medprobe.tables import TABLE_COLUMNS, read_table

#: Columns a figure needs of every result table (groups.csv adds ``group``); ``n_degenerate`` is never drawn.
REQUIRED_COLUMNS: tuple[str, ...] = tuple(column for column in TABLE_COLUMNS if column != "n_degenerate")
#: Identifier columns, compared as text so that class names such as "0" or "NA" survive unchanged.
TEXT_COLUMNS: tuple[str, ...] = ("task", "model", "layer", "class", "metric", "group")
NUMERIC_COLUMNS: tuple[str, ...] = tuple(column for column in REQUIRED_COLUMNS if column not in TEXT_COLUMNS)
#: Spellings of "no value" accepted in numeric columns (support rows have no CI, metrics.csv no seed).
_MISSING_SPELLINGS = {"", "nan", "NaN", "NA", "N/A", "None", "null"}
#: The class of the rows that summarise a task over its classes.
MACRO = "macro"


def load_table(path: str | os.PathLike, extra_columns: Sequence[str] = ()) -> pd.DataFrame:
    """Read a long-format result table (:func:`medprobe.tables.read_table`) and check it (:func:`prepare`).

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
    extra = list(extra_columns)
    if path.name == "groups.csv" and "group" not in extra:
        extra.append("group")
    return prepare(read_table(path), f"result table {path}", extra)


def read_tables(paths: Mapping[str, str | os.PathLike]) -> dict[str, pd.DataFrame]:
    """The result tables at ``paths`` by name: the long-format tables checked by :func:`load_table`, the
    NEJM table (its own columns, checked by Figure 1d) as written."""
    return {name: read_table(path) if name == "nejm" else load_table(path) for name, path in paths.items()}


def _to_float(column: pd.Series, where: str, name: str) -> pd.Series:
    text = column.astype(str).str.strip()
    text = text.where(~text.isin(_MISSING_SPELLINGS), "nan")
    numbers = pd.to_numeric(text, errors="coerce")
    bad = numbers.isna() & (text != "nan")
    if bad.any():
        examples = ", ".join(repr(v) for v in text[bad].unique()[:3])
        raise ValueError(f"{where}: column {name!r} must be numeric, found {examples}")
    return numbers.astype(float)


def require_columns(table: pd.DataFrame, required: Sequence[str], where: str) -> None:
    """Raise ValueError naming ``where`` and every column of ``required`` that ``table`` lacks."""
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ValueError(
            f"{where} lacks required column(s) {', '.join(repr(c) for c in missing)}; "
            f"it has {', '.join(map(str, table.columns))}"
        )


def prepare(table: pd.DataFrame, where: str, extra: Sequence[str] = ()) -> pd.DataFrame:
    """Check the columns of ``table`` (named ``where`` in errors) and normalise their dtypes.

    Tables built in memory may carry integer class names (0..4) or integer seeds, and a table read from
    CSV integer counts or spelled-out missing values; figures compare identifiers as strings and numbers as
    floats, whichever way the table was made.
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"{where} must be a pandas DataFrame, got {type(table).__name__}")
    require_columns(table, list(REQUIRED_COLUMNS) + list(extra), where)
    table = table.copy()
    for column in TEXT_COLUMNS:
        if column in table.columns:
            # A missing identifier (an empty CSV cell, NaN in memory) is the empty string.
            table[column] = table[column].fillna("").astype(str)
    for column in NUMERIC_COLUMNS:
        if not pd.api.types.is_float_dtype(table[column]):
            table[column] = _to_float(table[column], where, column)
    return table

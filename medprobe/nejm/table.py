"""Accuracy per difficulty stratum (the readers' percent correct) for every model and answer mode, with
the readers' own accuracy and chance: ``results/tables/nejm.csv`` (Figure 1d)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medprobe.io import atomic_path
from medprobe.nejm.answering import load_answers
from medprobe.nejm.cases import N_CHOICES, Case, load_cases
from medprobe.settings import NejmSettings
from medprobe.stats import bootstrap_indices

logger = logging.getLogger(__name__)

__all__ = [
    "TABLE_COLUMNS",
    "accuracy_table",
    "assign_strata",
    "stratum_edges",
    "top_k_correct",
    "write_table",
]

TABLE_COLUMNS = (
    "model",
    "mode",
    "shots",
    "stratum",
    "stratum_low",
    "stratum_high",
    "n_cases",
    "n_correct",
    "accuracy",
    "sd",
    "ci_low",
    "ci_high",
    "n_unparseable",
)
UNPARSEABLE_COLUMNS = ("model", "case_id", "mode", "sample", "raw_output")


def stratum_edges(n_strata: int = 5) -> np.ndarray:
    """Edges of ``n_strata`` equal intervals of the readers' percent correct over [0, 100]."""
    if n_strata < 1:
        raise ValueError(f"nejm.strata must be >= 1, got {n_strata}")
    return np.linspace(0.0, 100.0, n_strata + 1)


def assign_strata(percent_correct: Sequence[float] | np.ndarray, n_strata: int = 5) -> np.ndarray:
    """Stratum (0 = hardest) of each case: intervals ``[lo, hi)``, the last one closed (100% included).

    NaN (readers' shares unknown) gives -1. Values outside [0, 100] raise ``ValueError``.
    """
    values = np.asarray(percent_correct, dtype=float)
    known = np.isfinite(values)
    if ((values[known] < 0) | (values[known] > 100)).any():
        raise ValueError(
            f"readers' percent correct must lie in [0, 100], got {values[known & ((values < 0) | (values > 100))]}"
        )
    edges = stratum_edges(n_strata)
    strata = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, n_strata - 1)
    return np.where(known, strata, -1)


def top_k_correct(records: Iterable[Mapping[str, Any]]) -> dict[str, bool]:
    """Case id -> whether any of its sampled answers is right (the paper's top-3 rule)."""
    result: dict[str, bool] = {}
    for record in records:
        if record["mode"] == "sample":
            result[record["case_id"]] = result.get(record["case_id"], False) or bool(record["correct"])
    return result


def _strata(edges: np.ndarray) -> Iterator[tuple[int, str, float, float]]:
    """``(index, stratum, low, high)``: ``all`` (index -1) over [0, 100], then each stratum ``lo-hi%``."""
    yield -1, "all", 0.0, 100.0
    for index in range(len(edges) - 1):
        lo, hi = edges[index], edges[index + 1]
        yield index, f"{lo:g}-{hi:g}%", lo, hi


def _accuracy_row(values: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    n = len(values)
    if n == 0:
        return {"n_cases": 0, "n_correct": 0.0, "accuracy": np.nan, "sd": np.nan, "ci_low": np.nan, "ci_high": np.nan}
    replicates = values[bootstrap_indices(n, n_boot, seed)].mean(axis=1)
    return {
        "n_cases": n,
        "n_correct": float(values.sum()),
        "accuracy": float(values.mean()),
        "sd": float(replicates.std(ddof=1)) if n_boot > 1 else np.nan,
        "ci_low": float(np.percentile(replicates, 2.5)),
        "ci_high": float(np.percentile(replicates, 97.5)),
    }


def _strata_rows(model, mode, shots, values, strata, unparsed, edges, n_boot, seed) -> list[dict[str, Any]]:
    """One row for all cases and one per stratum; stratum ``index`` resamples with ``seed + index + 1``,
    so every model and mode gets the same resamples of a stratum."""
    rows = []
    for index, stratum, lo, hi in _strata(edges):
        selected = np.ones(len(values), bool) if index < 0 else strata == index
        rows.append(
            {
                "model": model,
                "mode": mode,
                "shots": shots,
                "stratum": stratum,
                "stratum_low": lo,
                "stratum_high": hi,
                **_accuracy_row(values[selected], n_boot, seed + index + 1),
                "n_unparseable": int(unparsed[selected].sum()),
            }
        )
    return rows


def _model_records(model: str, source: Any, cases: Mapping[str, Case], cases_dir: str | Path) -> list[dict[str, Any]]:
    records = load_answers(source) if isinstance(source, (str, Path)) else list(source)
    unknown = sorted({r["case_id"] for r in records} - set(cases))
    if unknown:
        raise ValueError(f"answers of model {model!r} name cases not in {cases_dir}: {unknown[:5]}")
    return records


def _model_shots(model: str, records: Sequence[Mapping[str, Any]]) -> int | None:
    """How many solved cases the model's prompts showed (``None``: answers that do not say)."""
    shots = {r.get("shots") for r in records}
    if len(shots) > 1:
        raise ValueError(f"answers of model {model!r} mix prompts with different numbers of shots: {shots}")
    value = next(iter(shots), None)
    return None if value is None else int(value)


def _correct_by_mode(
    model: str, records: Sequence[Mapping[str, Any]], top_k_samples: int
) -> dict[str, dict[str, bool]]:
    """Mode (``greedy``, ``likelihood``, ``top{k}``) -> case id -> whether its answer is right."""
    correct: dict[str, dict[str, bool]] = {"greedy": {}, "likelihood": {}}
    for r in records:
        if r["mode"] in correct:
            correct[r["mode"]][r["case_id"]] = bool(r["correct"])
    sampled: dict[str, list[bool]] = {}
    for r in records:
        if r["mode"] == "sample":
            sampled.setdefault(r["case_id"], []).append(bool(r["correct"]))
    incomplete = sorted(i for i, v in sampled.items() if len(v) < top_k_samples)
    if incomplete:
        raise ValueError(f"model {model!r}: fewer than {top_k_samples} sampled answers for cases {incomplete[:5]}")
    correct[f"top{top_k_samples}"] = top_k_correct(r for r in records if r["mode"] == "sample")
    return correct


def _unparseable_counts(
    records: Sequence[Mapping[str, Any]], ids: Sequence[str], top_k_samples: int
) -> dict[str, dict[str, int]]:
    """Mode -> case id -> its unparseable answers (sampled ones count for ``top{k}``)."""
    top = f"top{top_k_samples}"
    counts = {mode: {i: 0 for i in ids} for mode in ("greedy", top, "likelihood")}
    for r in records:
        if r["rule"] == "unparseable":
            counts["greedy" if r["mode"] == "greedy" else top][r["case_id"]] += 1
    return counts


def _model_rows(model, records, cases, top_k_samples, edges, n_boot, seed) -> list[dict[str, Any]]:
    """Every stratum row of one model's answers, per mode."""
    ids = sorted({r["case_id"] for r in records}, key=lambda i: (cases[i].date, i))
    correct = _correct_by_mode(model, records, top_k_samples)
    n_unparseable = _unparseable_counts(records, ids, top_k_samples)
    shots = _model_shots(model, records)
    rows: list[dict[str, Any]] = []
    for mode, by_case in correct.items():
        if not by_case:
            continue
        mode_ids = [i for i in ids if i in by_case]
        values = np.array([by_case[i] for i in mode_ids], dtype=float)
        strata = assign_strata([cases[i].reader_percent_correct for i in mode_ids], len(edges) - 1)
        unparsed = np.array([n_unparseable[mode][i] > 0 for i in mode_ids])
        rows += _strata_rows(model, mode, shots, values, strata, unparsed, edges, n_boot, seed)
    return rows


def _reader_rows(ids: Sequence[str], cases: Mapping[str, Case], edges, n_boot: int, seed: int) -> list[dict[str, Any]]:
    """The readers' accuracy (the mean share who picked the answer) on the cases whose shares are known."""
    percent = np.array([cases[i].reader_percent_correct for i in ids], dtype=float)
    if not (len(ids) and np.isfinite(percent).any()):
        return []
    known = np.isfinite(percent)
    strata = assign_strata(percent[known], len(edges) - 1)
    return _strata_rows(
        "readers", "readers", None, percent[known] / 100.0, strata, np.zeros(known.sum(), bool), edges, n_boot, seed
    )


def _chance_rows(edges: np.ndarray) -> list[dict[str, Any]]:
    return [
        {
            "model": "chance",
            "mode": "chance",
            "shots": None,
            "stratum": stratum,
            "stratum_low": lo,
            "stratum_high": hi,
            "n_cases": 0,
            "n_correct": np.nan,
            "accuracy": 1.0 / N_CHOICES,
            "sd": np.nan,
            "ci_low": np.nan,
            "ci_high": np.nan,
            "n_unparseable": 0,
        }
        for _, stratum, lo, hi in _strata(edges)
    ]


def accuracy_table(
    answers: Mapping[str, str | Path | Sequence[Mapping[str, Any]]],
    cases_dir: str | Path,
    *,
    top_k_samples: int = 3,
    n_strata: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Accuracy per difficulty stratum and overall, for every model and mode; readers and chance too.

    Args:
        answers: model -> its answers JSONL (or the records themselves).
        cases_dir: the case folders (for the readers' shares).

    Returns:
        ``(table, unparseable)``. ``table`` has :data:`TABLE_COLUMNS`; ``mode`` is ``greedy``,
        ``top{k}`` (any of the k sampled answers right), ``likelihood``, ``readers`` (model
        ``readers``: the mean share of readers who picked the answer, on the first model's cases) or
        ``chance`` (1/5); ``shots`` is how many solved cases the model's prompts showed (0: zero-shot, a
        model that takes one image; empty for readers and chance); ``stratum`` is ``all`` or ``lo-hi%``. ``sd`` and the 95% CI come from
        ``n_boot`` case resamples within the stratum (the same resamples for every model and mode).
        ``unparseable`` lists the greedy and sampled answers no rule could map to a choice
        (:data:`UNPARSEABLE_COLUMNS`).
    """
    cases = {case.id: case for case in load_cases(cases_dir)}
    edges = stratum_edges(n_strata)
    rows: list[dict[str, Any]] = []
    unparseable: list[dict[str, Any]] = []
    reader_ids: list[str] | None = None
    for model, source in answers.items():
        records = _model_records(model, source, cases, cases_dir)
        unparseable += [
            {"model": model, **{k: r[k] for k in UNPARSEABLE_COLUMNS[1:]}}
            for r in records
            if r["rule"] == "unparseable"
        ]
        if reader_ids is None:
            reader_ids = sorted({r["case_id"] for r in records}, key=lambda i: (cases[i].date, i))
        rows += _model_rows(model, records, cases, top_k_samples, edges, n_boot, seed)
    rows += _reader_rows(reader_ids or [], cases, edges, n_boot, seed)
    rows += _chance_rows(edges)
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    table["shots"] = table["shots"].astype("Int64")
    return table, pd.DataFrame(unparseable, columns=list(UNPARSEABLE_COLUMNS))


def write_table(
    answers: Mapping[str, str | Path],
    cases_dir: str | Path,
    table_path: str | Path,
    unparseable_path: str | Path,
    *,
    settings: NejmSettings,
    n_boot: int,
    seed: int,
) -> None:
    """:func:`accuracy_table` (``settings.top_k_samples`` sampled answers, ``settings.strata`` strata)
    into ``table_path`` and ``unparseable_path`` (CSV)."""
    table, unparseable = accuracy_table(
        answers, cases_dir, top_k_samples=settings.top_k_samples, n_strata=settings.strata, n_boot=n_boot, seed=seed
    )
    for frame, path in ((table, table_path), (unparseable, unparseable_path)):
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
    overall = table[table["stratum"] == "all"]
    for row in overall.itertuples():
        shots = "" if pd.isna(row.shots) else f" ({row.shots}-shot)"
        logger.info("%s %s%s: accuracy %.3f (n=%d)", row.model, row.mode, shots, row.accuracy, row.n_cases)
    answered = overall.dropna(subset=["shots"]).drop_duplicates("model")
    if answered["shots"].nunique() > 1:
        logger.warning(
            "the models' prompts show different numbers of shots (column shots): %s",
            ", ".join(f"{row.model} {row.shots}" for row in answered.itertuples()),
        )

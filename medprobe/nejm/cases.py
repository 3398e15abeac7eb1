"""The NEJM cases: one folder per case (``<cases_dir>/<id>/{image.*, case.json}``, docs/nejm.md), read and
checked, and the in-context shots taken out of the test set."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medprobe.user_tables import bad_characters, normalise_id, read_text

__all__ = ["Case", "N_CHOICES", "load_case", "load_cases", "normalise", "split_shots"]

N_CHOICES = 5
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".tif", ".tiff", ".bmp")
REQUIRED_KEYS = ("id", "date", "question", "choices", "answer")
_WORD = re.compile(r"[a-z0-9]+")


def normalise(text: str) -> str:
    """Lower case, words of letters and digits joined by single spaces: the form in which choices are
    compared with each other and with a generated answer."""
    return " ".join(_WORD.findall(text.lower()))


@dataclass(frozen=True)
class Case:
    """One case folder. ``answer_index`` is 0-based; ``reader_shares`` align with ``choices``."""

    id: str
    date: str
    question: str
    context: str
    choices: tuple[str, ...]
    answer: str
    image: Path
    reader_shares: tuple[float, ...] | None = None
    explanation: str = ""

    @property
    def answer_index(self) -> int:
        return self.choices.index(self.answer)

    @property
    def reader_percent_correct(self) -> float:
        """Share of readers who picked the answer, in percent (NaN when the shares are unknown)."""
        if self.reader_shares is None:
            return float("nan")
        return 100.0 * float(self.reader_shares[self.answer_index])


def _case_error(path: Path, message: str) -> ValueError:
    return ValueError(f"{path}: {message}")


def _read_case_json(folder: Path) -> dict[str, Any]:
    """``case.json`` as a dict: UTF-8 (:func:`medprobe.user_tables.read_text`), its strings stripped and in
    Unicode NFC (:func:`_normalised`)."""
    path = folder / "case.json"
    try:
        text = read_text(path, "case.json")
    except FileNotFoundError:
        raise FileNotFoundError(f"case folder {folder} has no case.json") from None
    if not text.strip():
        raise _case_error(path, "the file is empty; it must hold a JSON object (docs/nejm.md)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise _case_error(path, f"not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise _case_error(path, "must hold a JSON object")
    return _normalised(data)


def _normalised(data: dict[str, Any]) -> dict[str, Any]:
    """The case's strings as they are compared (ids, answer and choices) and shown: surrounding whitespace
    stripped and Unicode NFC (:func:`medprobe.user_tables.normalise_id`), so that an answer typed with a combining
    accent is still its choice."""
    out = dict(data)
    for key in ("id", "date", "question", "answer", "context", "explanation"):
        if isinstance(out.get(key), str):
            out[key] = normalise_id(out[key])
    if isinstance(out.get("choices"), list):
        out["choices"] = [normalise_id(c) if isinstance(c, str) else c for c in out["choices"]]
    return out


def _check_fields(path: Path, data: dict[str, Any]) -> None:
    for key in REQUIRED_KEYS:
        if key not in data:
            raise _case_error(path, f"missing key {key!r}")
    for key in ("id", "date", "question", "answer"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise _case_error(path, f"key {key!r} must be a non-empty string, got {data[key]!r}")
    for key in ("id", "answer"):
        if bad_characters(data[key]):
            raise _case_error(
                path,
                f"key {key!r}: {data[key]!r} contains the control or invisible character(s) "
                f"{', '.join(dict.fromkeys(bad_characters(data[key])))}",
            )


def _check_choices(path: Path, data: dict[str, Any]) -> None:
    choices = data["choices"]
    if (
        not isinstance(choices, list)
        or len(choices) != N_CHOICES
        or not all(isinstance(c, str) and c.strip() for c in choices)
    ):
        raise _case_error(path, f"key 'choices' must be {N_CHOICES} non-empty strings, got {choices!r}")
    # Choices that normalise alike could not be told apart in a generated answer.
    if len({normalise(c) for c in choices}) != N_CHOICES:
        raise _case_error(path, f"key 'choices' has duplicates: {choices!r}")
    if data["answer"] not in choices:
        raise _case_error(path, f"key 'answer' {data['answer']!r} is not one of the choices {choices!r}")


def _reader_shares(path: Path, data: dict[str, Any]) -> tuple[float, ...] | None:
    shares = data.get("reader_shares")
    if shares is None:
        return None
    if (
        not isinstance(shares, list)
        or len(shares) != N_CHOICES
        or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s <= 1 for s in shares)
    ):
        raise _case_error(path, f"key 'reader_shares' must be {N_CHOICES} numbers in [0, 1], got {shares!r}")
    return tuple(float(s) for s in shares)


def _check_texts(path: Path, data: dict[str, Any]) -> None:
    for key in ("context", "explanation"):
        value = data.get(key, "")
        if not isinstance(value, str):
            raise _case_error(path, f"key {key!r} must be a string, got {value!r}")


def _case_image(folder: Path) -> Path:
    """``image.*``, else the folder's only image file."""
    preferred = [p for p in sorted(folder.glob("image.*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    images = preferred or [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if len(images) != 1:
        raise FileNotFoundError(
            f"case folder {folder} must hold one image (image.png, image.jpg, ...); found "
            f"{[p.name for p in images] or 'none'}"
        )
    return images[0]


def load_case(folder: str | Path) -> Case:
    """Read ``<folder>/case.json`` and the folder's image (``image.*``, else its only image file)."""
    folder = Path(folder)
    path = folder / "case.json"
    data = _read_case_json(folder)
    _check_fields(path, data)
    _check_choices(path, data)
    shares = _reader_shares(path, data)
    _check_texts(path, data)
    image = _case_image(folder)
    return Case(
        id=data["id"],
        date=data["date"],
        question=data["question"].strip(),
        context=data.get("context", "").strip(),
        choices=tuple(c.strip() for c in data["choices"]),
        answer=data["answer"].strip(),
        image=image,
        reader_shares=shares,
        explanation=data.get("explanation", "").strip(),
    )


def load_cases(cases_dir: str | Path) -> list[Case]:
    """Every case folder under ``cases_dir`` (folders holding a ``case.json``), sorted by date, then id."""
    cases_dir = Path(cases_dir)
    if not cases_dir.is_dir():
        raise FileNotFoundError(f"NEJM cases folder {cases_dir} not found (config key nejm.cases_dir)")
    cases = [load_case(folder) for folder in sorted(cases_dir.iterdir()) if (folder / "case.json").is_file()]
    if not cases:
        raise ValueError(f"NEJM cases folder {cases_dir} holds no case folders (<id>/case.json)")
    seen: dict[str, Path] = {}
    for case in cases:
        if case.id in seen:
            raise ValueError(f"case id {case.id!r} appears twice: {seen[case.id]} and {case.image.parent}")
        seen[case.id] = case.image.parent
    return sorted(cases, key=lambda case: (case.date, case.id))


def split_shots(cases: Sequence[Case], shots: int = 2, shot_ids: Sequence[str] = ()) -> tuple[list[Case], list[Case]]:
    """``(shots, test cases)``: the named ``shot_ids`` (in that order), else the first ``shots`` by date.

    The shots are taken out of the test set. Raises ``ValueError`` for unknown ids or too few cases.
    """
    cases = sorted(cases, key=lambda case: (case.date, case.id))
    by_id = {case.id: case for case in cases}
    shot_ids = [normalise_id(i) for i in shot_ids]  # compared as the case ids are (stripped, NFC)
    if shot_ids:
        unknown = [i for i in shot_ids if i not in by_id]
        if unknown:
            raise ValueError(f"nejm.shot_ids: unknown case id(s) {unknown}; the cases folder has {len(cases)} cases")
        chosen = [by_id[i] for i in shot_ids]
    else:
        if shots < 0:
            raise ValueError(f"nejm.shots must be >= 0, got {shots}")
        chosen = list(cases[:shots])
    test = [case for case in cases if case.id not in {c.id for c in chosen}]
    if not test:
        raise ValueError(f"no test cases left: {len(cases)} cases, {len(chosen)} of them shots")
    return chosen, test

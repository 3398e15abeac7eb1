"""NEJM Image Challenge: few-shot multiple-choice answers, answer extraction, accuracy by difficulty.

The paper's first result: IDEFICS-80B, shown two solved cases in its prompt, picks the right diagnosis
of 40.4% of 929 NEJM Image Challenge cases (54.3% with three sampled answers), plotted per difficulty
stratum against the human readers (Figure 1d). The cases are copyrighted: users bring them as case
folders (``<cases_dir>/<id>/{image.*, case.json}``; docs/nejm.md); the demo generates synthetic ones.

Steps, each a function here:

* :func:`load_cases` reads and checks the case folders; :func:`split_shots` takes the in-context shots
  (the first ``shots`` cases by date, or named ones) out of the test set.
* :func:`build_prompt` writes the interleaved image-and-text prompt in one of :data:`TEMPLATES`: the
  paper's Figure S2 text (``figure_s2``) or the IDEFICS instruct chat turns (``chat``);
  :func:`prompt_hash` fingerprints it (text and image bytes). The template also decides what
  likelihood mode scores (:func:`likelihood_continuations`), where generation stops
  (:func:`stop_strings`) and which part of a generated text is the answer (:func:`extract_choice`).
* :func:`extract_choice` maps a generated answer to one of the five choices by layered rules and says
  which rule decided; :func:`answer_cases` runs the three modes (greedy, sampled top-k, likelihood) and
  appends one JSON record per answer to a cache that makes reruns skip finished work.
* :func:`accuracy_table` turns the answers into ``results/tables/nejm.csv`` (accuracy per difficulty
  stratum with bootstrap SD, the readers' own accuracy and chance).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medprobe.stats import bootstrap_indices

logger = logging.getLogger(__name__)

__all__ = [
    "Case",
    "MODES",
    "RULES",
    "TEMPLATES",
    "accuracy_table",
    "answer_cases",
    "assign_strata",
    "build_prompt",
    "extract_choice",
    "load_answers",
    "load_cases",
    "prompt_hash",
    "prompt_text",
    "split_shots",
    "stop_strings",
    "stratum_edges",
    "top_k_correct",
]

N_CHOICES = 5
END_OF_UTTERANCE = "<end_of_utterance>"
IMAGE_PLACEHOLDER = "<image>"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".tif", ".tiff", ".bmp")
#: Prompt templates (config key ``nejm.template``): the paper's Figure S2 text, or IDEFICS instruct turns.
TEMPLATES = ("chat", "figure_s2")
#: Answer modes: the greedy answer, sampled answers (top-k accuracy) and choice likelihoods.
MODES = ("greedy", "sample", "likelihood")
#: Extraction rules, in the order they are tried (``likelihood`` records need no parsing).
RULES = ("exact_text", "exact_text_first", "choice_number", "fuzzy", "unparseable", "likelihood")
CACHE_SUFFIX = ".cache.jsonl"


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


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


def load_case(folder: str | Path) -> Case:
    """Read ``<folder>/case.json`` and the folder's image (``image.*``, else its only image file)."""
    folder = Path(folder)
    path = folder / "case.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"case folder {folder} has no case.json") from None
    except json.JSONDecodeError as error:
        raise _case_error(path, f"not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise _case_error(path, "must hold a JSON object")
    for key in ("id", "date", "question", "choices", "answer"):
        if key not in data:
            raise _case_error(path, f"missing key {key!r}")
    for key in ("id", "date", "question", "answer"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise _case_error(path, f"key {key!r} must be a non-empty string, got {data[key]!r}")
    choices = data["choices"]
    if (
        not isinstance(choices, list)
        or len(choices) != N_CHOICES
        or not all(isinstance(c, str) and c.strip() for c in choices)
    ):
        raise _case_error(path, f"key 'choices' must be {N_CHOICES} non-empty strings, got {choices!r}")
    if len({_normalise(c) for c in choices}) != N_CHOICES:
        raise _case_error(path, f"key 'choices' has duplicates: {choices!r}")
    if data["answer"] not in choices:
        raise _case_error(path, f"key 'answer' {data['answer']!r} is not one of the choices {choices!r}")
    shares = data.get("reader_shares")
    if shares is not None:
        if (
            not isinstance(shares, list)
            or len(shares) != N_CHOICES
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s <= 1 for s in shares)
        ):
            raise _case_error(path, f"key 'reader_shares' must be {N_CHOICES} numbers in [0, 1], got {shares!r}")
        shares = tuple(float(s) for s in shares)
    context = data.get("context", "")
    explanation = data.get("explanation", "")
    for key, value in (("context", context), ("explanation", explanation)):
        if not isinstance(value, str):
            raise _case_error(path, f"key {key!r} must be a string, got {value!r}")
    preferred = [p for p in sorted(folder.glob("image.*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    images = preferred or [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if len(images) != 1:
        raise FileNotFoundError(
            f"case folder {folder} must hold one image (image.png, image.jpg, ...); found "
            f"{[p.name for p in images] or 'none'}"
        )
    return Case(
        id=data["id"],
        date=data["date"],
        question=data["question"].strip(),
        context=context.strip(),
        choices=tuple(c.strip() for c in choices),
        answer=data["answer"].strip(),
        image=images[0],
        reader_shares=shares,
        explanation=explanation.strip(),
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


def split_shots(
    cases: Sequence[Case], shots: int = 2, shot_ids: Sequence[str] = ()
) -> tuple[list[Case], list[Case]]:
    """``(shots, test cases)``: the named ``shot_ids`` (in that order), else the first ``shots`` by date.

    The shots are taken out of the test set. Raises ``ValueError`` for unknown ids or too few cases.
    """
    cases = sorted(cases, key=lambda case: (case.date, case.id))
    by_id = {case.id: case for case in cases}
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


# --------------------------------------------------------------------------------------------
# Prompt
# --------------------------------------------------------------------------------------------


def check_template(template: str) -> str:
    """``template`` if it is one of :data:`TEMPLATES`, else ``ValueError`` naming the config key."""
    if template not in TEMPLATES:
        raise ValueError(f"nejm.template must be one of {list(TEMPLATES)}, got {template!r}")
    return template


def numbered_choices(case: Case) -> list[str]:
    """``1. {choice}`` ... ``5. {choice}``."""
    return [f"{number}. {choice}" for number, choice in enumerate(case.choices, start=1)]


def figure_s2_text(case: Case, *, solved: bool) -> str:
    """One case's text after its image, as printed in the paper's Figure S2.

    ``Question:``, ``Choices:``, the numbered choices and ``Answer:`` are separated by blank lines; a
    solved shot continues ``Answer: {answer}`` and, when the case has an ``explanation``, a blank line
    and ``Reason: {explanation}``. The query stops at ``Answer:``. Only the question is shown (the
    figure has no case history); ``case.context`` is left out.
    """
    lines = [f"Question: {case.question}", "", "Choices:", "", *numbered_choices(case), ""]
    if not solved:
        return "\n".join([*lines, "Answer:"])
    lines.append(f"Answer: {case.answer}")
    if case.explanation:
        lines += ["", f"Reason: {case.explanation}"]
    return "\n".join(lines)


def case_text(case: Case) -> str:
    """The chat template's user turn after the image: history, question and numbered choices."""
    lines = [f"{case.context} {case.question}".strip(), "Choices:"]
    lines += numbered_choices(case)
    return "\n".join(lines)


def answer_text(case: Case) -> str:
    """The chat template's solved-shot answer: the numbered choice, then the reason when the case gives one."""
    text = f"Answer: {case.answer_index + 1}. {case.answer}."
    if case.explanation:
        text += f" Reason: {case.explanation}"
    return text


def build_prompt(shots: Sequence[Case], query: Case, template: str = "chat") -> list[str | Path]:
    """The interleaved few-shot prompt as a processor list (image paths stand for the images).

    ``figure_s2``: the text of the paper's Figure S2, each case's image first (images and texts
    alternate, so the IDEFICS processor inserts nothing between them)::

        <image>Question: {question}

        Choices:

        1. ...
        ...
        5. ...

        Answer: {answer}

        Reason: {explanation}

        <image>...(second shot, the same)...

        <image>Question: {question of the query}

        Choices:

        1. ...
        ...
        5. ...

        Answer:

    The model continues after ``Answer:``; likelihood mode scores `` {choice}\\n``. A shot without an
    ``explanation`` ends at its ``Answer:`` line. The case history (``context``) is not shown.

    ``chat``: IDEFICS instruct chat format, one user turn per case and the shots' answers as assistant
    turns::

        User:<image>{context} {question}
        Choices:
        1. ...
        5. ...<end_of_utterance>
        Assistant: Answer: {n}. {choice}. Reason: {explanation}<end_of_utterance>
        User:<image>...(query case)...<end_of_utterance>
        Assistant:

    The model continues after ``Assistant:``; likelihood mode scores `` Answer: {n}. {choice}``.
    """
    items: list[str | Path] = []
    if check_template(template) == "figure_s2":
        for shot in shots:
            # A blank line closes each shot, as between the blocks inside a case.
            items += [shot.image, figure_s2_text(shot, solved=True) + "\n\n"]
        return [*items, query.image, figure_s2_text(query, solved=False)]
    for index, case in enumerate([*shots, query]):
        items += ["User:" if index == 0 else "\nUser:", case.image, f"{case_text(case)}{END_OF_UTTERANCE}"]
        if index < len(shots):
            items.append(f"\nAssistant: {answer_text(case)}{END_OF_UTTERANCE}")
    items.append("\nAssistant:")
    return items


def prompt_text(items: Sequence[str | Path]) -> str:
    """The prompt as text, ``<image>`` where an image goes (for logs and docs)."""
    return "".join(IMAGE_PLACEHOLDER if isinstance(item, Path) else item for item in items)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prompt_hash(items: Sequence[str | Path]) -> str:
    """SHA-256 (16 hex digits) of the prompt's text and its images' bytes: a changed shot, case text
    or image gives a new hash."""
    parts = [f"image:{_file_sha256(item)}" if isinstance(item, Path) else f"text:{item}" for item in items]
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()[:16]


def load_images(items: Sequence[str | Path], cache: dict[Path, Any] | None = None) -> list[Any]:
    """Replace image paths with RGB PIL images (opened once per path when ``cache`` is given)."""
    from PIL import Image

    out: list[Any] = []
    for item in items:
        if isinstance(item, Path):
            if cache is None or item not in cache:
                with Image.open(item) as image:
                    loaded = image.convert("RGB")
                if cache is None:
                    out.append(loaded)
                    continue
                cache[item] = loaded
            out.append(cache[item])
        else:
            out.append(item)
    return out


def likelihood_continuations(case: Case, template: str = "chat") -> list[str]:
    """What likelihood mode scores after the prompt, one per choice, in the shots' answer format.

    ``figure_s2``: `` {choice}\\n`` after ``Answer:``. The line break that ends a shot's answer line is
    scored too, so that a choice that begins another (``Leukemia``, ``Leukemia cutis``) is not favoured
    by the summed score merely for being shorter. ``chat``: `` Answer: {n}. {choice}`` after
    ``Assistant:`` (the number tells such choices apart).
    """
    if check_template(template) == "figure_s2":
        return [f" {choice}\n" for choice in case.choices]
    return [f" Answer: {number}. {choice}" for number, choice in enumerate(case.choices, start=1)]


def stop_strings(template: str = "chat") -> tuple[str, ...]:
    """Text at which generation stops, besides ``</s>`` and ``<end_of_utterance>`` (the chat turns' end).

    Figure S2 has no end-of-turn marker: a model that has answered and given its reason goes on with
    a next ``Question:``, so that ends the answer.
    """
    return ("Question:",) if check_template(template) == "figure_s2" else ()


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")
_LETTERS = "ABCDE"
# A choice number or letter given as the answer: at the start ("3", "3.", "(C)", "C)") or after
# "answer", "option", "choice" or "number" ("the answer is 3", "option C"). A letter must be a capital
# standing alone, so that the article "a" never counts as choice A.
_NUMBER_AT_START = re.compile(r"^\W*(?:answer\W*)?(?:is\W*)?\(?([1-5])(?![\d])(?:\)|\.|:|,|\s|$)", re.IGNORECASE)
_LETTER_AT_START = re.compile(r"^\W*(?:answer\W*)?(?:is\W*)?\(?([A-E])(?:\)|\.|:|,|$)")
_NUMBER_AFTER_WORD = re.compile(
    r"\b(?:answer|option|choice|number)\b(?:\s+(?:is|was|would\s+be))?\s*(?:number\s*)?[:#]?\s*\(?([1-5])(?![\d])",
    re.IGNORECASE,
)
_LETTER_AFTER_WORD = re.compile(
    r"\b(?:[Aa]nswer|[Oo]ption|[Cc]hoice)\b(?:\s+(?:is|was))?\s*:?\s*\(?([A-E])\b(?![-'])"
)


def _normalise(text: str) -> str:
    """Lower case, words of letters and digits joined by single spaces."""
    return " ".join(_WORD.findall(text.lower()))


# Where a figure_s2 answer (the text after "Answer:") ends: a blank line, or the next block's label.
_FIGURE_S2_ANSWER_END = re.compile(r"\n\s*\n|\b(?:Reason|Question|Choices|User|Assistant)\s*:")


def _answer_part(raw: str, template: str = "chat") -> str:
    """The answer alone.

    ``chat``: the assistant's turn, cut at its end or the start of a next turn (its ``Reason:`` stays,
    the shots teach it on the answer's line). ``figure_s2``: the text after ``Answer:`` up to a blank
    line or the next label (``Reason:``, ``Question:``, ...), so that the reason never decides.
    """
    text = raw.split(END_OF_UTTERANCE)[0]
    if template == "figure_s2":
        return _FIGURE_S2_ANSWER_END.split(text.strip(), maxsplit=1)[0].strip()
    text = re.split(r"\n?\s*(?:User|Assistant)\s*:", text)[0]
    return text.strip()


def extract_choice(
    raw: str, choices: Sequence[str], fuzzy_cutoff: float = 0.8, template: str = "chat"
) -> tuple[int | None, str]:
    """Map a generated answer to a choice; returns ``(0-based index or None, the rule that decided)``.

    Rules, tried in order on the answer part of ``raw`` (``chat``: up to ``<end_of_utterance>`` or a
    next turn; ``figure_s2``: up to a blank line or the next label such as ``Reason:``):

    1. ``exact_text``: exactly one choice's text occurs in the answer (case, punctuation and spacing
       ignored; whole words; a choice contained in a longer named choice does not count).
       ``exact_text_first``: several choices occur; the earliest-named one is taken (the prompt teaches
       "Answer: n. choice. Reason: ...", so later mentions belong to the reasoning).
    2. ``choice_number``: a number 1-5 or a capital letter A-E given as the answer ("3", "(C)",
       "the answer is 3", "option C").
    3. ``fuzzy``: the best :class:`difflib.SequenceMatcher` ratio between a choice and the answer's
       first line (or a window of the same number of words in it) is at least ``fuzzy_cutoff`` and
       beats every other choice.
    4. ``unparseable``: none of the above (counted as wrong).
    """
    if len(choices) == 0:
        raise ValueError("extract_choice needs the case's choices")
    answer = _answer_part(raw, check_template(template))
    norm_answer = f" {_normalise(answer)} "
    norm_choices = [_normalise(choice) for choice in choices]

    # 1. exact choice text
    spans: list[tuple[int, int, int]] = []  # (start, end, choice index)
    for index, choice in enumerate(norm_choices):
        if not choice:
            continue
        # every occurrence, also back to back (re.finditer would skip one sharing a space)
        start = norm_answer.find(f" {choice} ")
        while start != -1:
            spans.append((start, start + len(choice) + 2, index))
            start = norm_answer.find(f" {choice} ", start + 1)
    spans = sorted(set(spans))
    kept = [
        span
        for span in spans
        if not any(
            other[2] != span[2] and other[0] <= span[0] and span[1] <= other[1] and (other[1] - other[0]) > (span[1] - span[0])
            for other in spans
        )
    ]
    named = sorted({index for _, _, index in kept}, key=lambda i: min(s for s, _, j in kept if j == i))
    if len(named) == 1:
        return named[0], "exact_text"
    if len(named) > 1:
        return named[0], "exact_text_first"

    # 2. choice number or letter
    for pattern, letters in (
        (_NUMBER_AT_START, False),
        (_LETTER_AT_START, True),
        (_NUMBER_AFTER_WORD, False),
        (_LETTER_AFTER_WORD, True),
    ):
        match = pattern.search(answer)
        if match:
            token = match.group(1)
            index = _LETTERS.index(token.upper()) if letters else int(token) - 1
            if index < len(choices):
                return index, "choice_number"

    # 3. fuzzy match of the first line (or a window in it) against each choice
    first_line = _normalise(answer.split("\n")[0])
    first_line = re.sub(r"^(?:answer )?(?:is )?(?:[1-5] )?", "", first_line)
    if first_line:
        words = first_line.split()
        ratios = []
        for choice in norm_choices:
            n = max(1, len(choice.split()))
            candidates = {first_line} | {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}
            ratios.append(max(difflib.SequenceMatcher(None, choice, c).ratio() for c in candidates))
        best = int(np.argmax(ratios))
        ordered = sorted(ratios, reverse=True)
        if ratios[best] >= fuzzy_cutoff and (len(ordered) == 1 or ordered[0] > ordered[1]):
            return best, "fuzzy"
    return None, "unparseable"


def top_k_correct(records: Iterable[Mapping[str, Any]]) -> dict[str, bool]:
    """Case id -> whether any of its sampled answers is right (the paper's top-3 rule)."""
    result: dict[str, bool] = {}
    for record in records:
        if record["mode"] == "sample":
            result[record["case_id"]] = result.get(record["case_id"], False) or bool(record["correct"])
    return result


# --------------------------------------------------------------------------------------------
# Answering (resumable)
# --------------------------------------------------------------------------------------------


def _record_key(record: Mapping[str, Any]) -> tuple:
    return (
        record["case_id"],
        record["mode"],
        int(record.get("sample", 0)),
        record["prompt_hash"],
        json.dumps(record.get("settings", {}), sort_keys=True),
    )


def load_answers(path: str | Path) -> list[dict[str, Any]]:
    """Records of an answers (or cache) JSONL file; a torn last line (a killed run) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("%s: skipping a torn last line (an interrupted run)", path)
                continue
            raise ValueError(f"{path}, line {number}: not valid JSON") from None
        records.append(record)
    return records


class _Journal:
    """Append-only JSONL cache next to the answers file, flushed and synced after every batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records = {_record_key(r): r for r in load_answers(path)}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # cut a torn last line so that new records start on a line of their own
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as handle:
                    handle.truncate(data.rfind(b"\n") + 1)
        self._handle = open(path, "a", encoding="utf-8")

    def add(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self.records[_record_key(record)] = record
            self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def _sample_seed(seed: int, case_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{case_id}".encode()).digest()[:4], "little")


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def answer_cases(
    cases_dir: str | Path,
    out_path: str | Path,
    *,
    model_name: str,
    model_cfg: Mapping[str, Any],
    shots: int = 2,
    shot_ids: Sequence[str] = (),
    template: str = "chat",
    top_k_samples: int = 3,
    temperature: float = 1.0,
    top_k: int = 50,
    max_new_tokens: int = 64,
    batch_size: int = 4,
    fuzzy_cutoff: float = 0.8,
    likelihood_score: str = "sum",
    seed: int = 0,
    device: str | None = None,
    adapter: Any = None,
) -> Path:
    """Answer every test case in the three modes; write ``out_path`` (JSONL, one record per answer).

    Records (keys): ``case_id``, ``mode`` (``greedy`` | ``sample`` | ``likelihood``), ``sample`` (0 ...
    ``top_k_samples`` - 1 for sampled answers, else 0), ``prompt_hash``, ``raw_output``, ``parsed_choice``
    (1-5 or null), ``choice`` (its text), ``rule`` (see :data:`RULES`), ``correct``, ``answer`` (1-5),
    ``settings``, and for likelihood mode ``scores_sum``, ``scores_mean`` and ``n_tokens`` per choice.

    ``template`` (one of :data:`TEMPLATES`) writes the prompts, the likelihood continuations, the stop
    strings and the answer parsing alike.

    Every answer is appended to ``<out_path stem>.cache.jsonl`` as soon as its batch is done (flushed
    and synced). A rerun, also after Snakemake has removed ``out_path``, loads the cache and only
    answers what is missing: a case whose prompt hash (its text, shots or images; the template writes
    the text, so another template gives other hashes) or answer settings changed is answered again.
    ``out_path`` is written last, atomically, with the current records.

    ``adapter`` (tests) replaces loading ``model_cfg``; it needs ``generate`` and
    ``choice_loglikelihoods`` (see :class:`medprobe.models.idefics.IdeficsAdapter`).
    """
    check_template(template)
    if likelihood_score not in ("sum", "mean"):
        raise ValueError(f"nejm.likelihood_score must be 'sum' or 'mean', got {likelihood_score!r}")
    if batch_size < 1 or top_k_samples < 1 or max_new_tokens < 1:
        raise ValueError(
            f"nejm.batch_size, top_k_samples and max_new_tokens must be >= 1, got "
            f"{batch_size}, {top_k_samples}, {max_new_tokens}"
        )
    out_path = Path(out_path)
    shot_cases, test_cases = split_shots(load_cases(cases_dir), shots, shot_ids)
    logger.info(
        "%d test cases; shots: %s", len(test_cases), ", ".join(f"{c.id} ({c.date})" for c in shot_cases) or "none"
    )
    for shot in shot_cases:
        if not shot.explanation:
            logger.warning(
                "shot %s (%s) has no 'explanation': its answer is shown without a Reason",
                shot.id,
                shot.image.parent / "case.json",
            )
    prompts = {case.id: build_prompt(shot_cases, case, template) for case in test_cases}
    hashes = {case_id: prompt_hash(items) for case_id, items in prompts.items()}
    if test_cases:
        logger.info("prompt of %s:\n%s", test_cases[0].id, prompt_text(prompts[test_cases[0].id]))
    model_settings = {
        "model": model_name,
        "checkpoint": str(model_cfg.get("checkpoint", "")),
        "revision": str(model_cfg.get("revision") or ""),
    }
    settings = {
        "greedy": {**model_settings, "max_new_tokens": int(max_new_tokens)},
        "sample": {
            **model_settings,
            "max_new_tokens": int(max_new_tokens),
            "temperature": float(temperature),
            "top_k": int(top_k),
            "seed": int(seed),
        },
        "likelihood": dict(model_settings),
    }
    samples = {"greedy": 1, "sample": int(top_k_samples), "likelihood": 1}

    def key(case: Case, mode: str, sample: int = 0) -> tuple:
        return _record_key(
            {"case_id": case.id, "mode": mode, "sample": sample, "prompt_hash": hashes[case.id], "settings": settings[mode]}
        )

    cache_path = out_path.with_name(out_path.name.removesuffix(".jsonl") + CACHE_SUFFIX)
    journal = _Journal(cache_path)
    todo = {
        mode: [case for case in test_cases if any(key(case, mode, s) not in journal.records for s in range(samples[mode]))]
        for mode in MODES
    }
    logger.info(
        "cache %s: %s", cache_path, ", ".join(f"{mode} {len(test_cases) - len(todo[mode])}/{len(test_cases)} done" for mode in MODES)
    )
    images: dict[Path, Any] = {}
    # Under chat, generate is called as before (adapters without stop strings keep working).
    stops = {"stop_strings": list(stop_strings(template))} if stop_strings(template) else {}
    started = time.perf_counter()
    try:
        if any(todo.values()) and adapter is None:
            from medprobe.models import load_adapter

            cfg = dict(model_cfg)
            if int(cfg.get("gpus", 1)) > 1 and "device_map" not in cfg and device is None:
                import torch

                if torch.cuda.device_count() > 1:
                    cfg["device_map"] = "auto"  # shard a large model over the job's GPUs
            adapter = load_adapter(cfg, device=device)
            logger.info("loaded %r in %.1f s", adapter, time.perf_counter() - started)

        def record(case: Case, mode: str, sample: int, raw: str, index: int | None, rule: str, **extra) -> dict:
            return {
                "case_id": case.id,
                "mode": mode,
                "sample": sample,
                "prompt_hash": hashes[case.id],
                "raw_output": raw,
                "parsed_choice": None if index is None else index + 1,
                "choice": None if index is None else case.choices[index],
                "rule": rule,
                "correct": index == case.answer_index,
                "answer": case.answer_index + 1,
                "settings": settings[mode],
                **extra,
            }

        for batch in _batches(todo["greedy"], batch_size):
            outputs = adapter.generate(
                [load_images(prompts[c.id], images) for c in batch],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                **stops,
            )
            journal.add(
                record(case, "greedy", 0, texts[0], *extract_choice(texts[0], case.choices, fuzzy_cutoff, template))
                for case, texts in zip(batch, outputs)
            )
            logger.info("greedy: %d cases answered", len(batch))
        for case in todo["sample"]:
            # One call per case with its own seed: the samples do not depend on batching or resuming.
            (texts,) = adapter.generate(
                [load_images(prompts[case.id], images)],
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_k=top_k,
                num_return_sequences=top_k_samples,
                seed=_sample_seed(seed, case.id),
                **stops,
            )
            journal.add(
                record(case, "sample", s, text, *extract_choice(text, case.choices, fuzzy_cutoff, template))
                for s, text in enumerate(texts)
            )
        for case in todo["likelihood"]:
            continuations = likelihood_continuations(case, template)
            sums, n_tokens = adapter.choice_loglikelihoods(load_images(prompts[case.id], images), continuations)
            means = [s / n for s, n in zip(sums, n_tokens)]
            scores = sums if likelihood_score == "sum" else means
            best = int(np.argmax(scores))
            journal.add(
                [
                    record(
                        case,
                        "likelihood",
                        0,
                        continuations[best].strip(),
                        best,
                        "likelihood",
                        scores_sum=sums,
                        scores_mean=means,
                        n_tokens=n_tokens,
                        score=likelihood_score,
                    )
                ]
            )
    finally:
        journal.close()
    if any(todo.values()):
        logger.info("answered in %.1f s", time.perf_counter() - started)

    current = [
        journal.records[key(case, mode, s)] for case in test_cases for mode in MODES for s in range(samples[mode])
    ]
    # likelihood records keep both scores; the configured one decides
    for rec in current:
        if rec["mode"] == "likelihood" and rec.get("score") != likelihood_score:
            case = next(c for c in test_cases if c.id == rec["case_id"])
            best = int(np.argmax(rec["scores_sum"] if likelihood_score == "sum" else rec["scores_mean"]))
            rec.update(
                score=likelihood_score,
                parsed_choice=best + 1,
                choice=case.choices[best],
                correct=best == case.answer_index,
                raw_output=likelihood_continuations(case, template)[best].strip(),
            )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in current), encoding="utf-8")
    os.replace(tmp, out_path)
    unparseable = [r for r in current if r["rule"] == "unparseable"]
    logger.info(
        "wrote %s: %d records; %d unparseable answers (counted wrong): %s",
        out_path,
        len(current),
        len(unparseable),
        ", ".join(f"{r['case_id']}/{r['mode']}{r['sample']}" for r in unparseable[:20])
        + (f", ... ({len(unparseable) - 20} more)" if len(unparseable) > 20 else "")
        or "none",
    )
    return out_path


# --------------------------------------------------------------------------------------------
# Accuracy by difficulty
# --------------------------------------------------------------------------------------------


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
        raise ValueError(f"readers' percent correct must lie in [0, 100], got {values[known & ((values < 0) | (values > 100))]}")
    edges = stratum_edges(n_strata)
    strata = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, n_strata - 1)
    return np.where(known, strata, -1)


def _stratum_label(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}%"


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


TABLE_COLUMNS = (
    "model",
    "mode",
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
        ``readers``: the mean share of readers who picked the answer) or ``chance`` (1/5); ``stratum``
        is ``all`` or ``lo-hi%``. ``sd`` and the 95% CI come from ``n_boot`` case resamples within the
        stratum (the same resamples for every model and mode). ``unparseable`` lists the greedy and
        sampled answers no rule could map to a choice (``model, case_id, mode, sample, raw_output``).
    """
    cases = {case.id: case for case in load_cases(cases_dir)}
    edges = stratum_edges(n_strata)
    rows: list[dict[str, Any]] = []
    unparseable: list[dict[str, Any]] = []
    case_ids_seen: list[str] | None = None
    for model, source in answers.items():
        records = load_answers(source) if isinstance(source, (str, Path)) else list(source)
        unknown = sorted({r["case_id"] for r in records} - set(cases))
        if unknown:
            raise ValueError(f"answers of model {model!r} name cases not in {cases_dir}: {unknown[:5]}")
        ids = sorted({r["case_id"] for r in records}, key=lambda i: (cases[i].date, i))
        if case_ids_seen is None:
            case_ids_seen = ids
        correct: dict[str, dict[str, bool]] = {"greedy": {}, "likelihood": {}}
        for r in records:
            if r["mode"] in correct:
                correct[r["mode"]][r["case_id"]] = bool(r["correct"])
            if r["rule"] == "unparseable":
                unparseable.append({"model": model, **{k: r[k] for k in ("case_id", "mode", "sample", "raw_output")}})
        sampled: dict[str, list[bool]] = {}
        for r in records:
            if r["mode"] == "sample":
                sampled.setdefault(r["case_id"], []).append(bool(r["correct"]))
        incomplete = sorted(i for i, v in sampled.items() if len(v) < top_k_samples)
        if incomplete:
            raise ValueError(f"model {model!r}: fewer than {top_k_samples} sampled answers for cases {incomplete[:5]}")
        correct[f"top{top_k_samples}"] = top_k_correct(r for r in records if r["mode"] == "sample")
        n_unparseable = {
            "greedy": {i: 0 for i in ids},
            f"top{top_k_samples}": {i: 0 for i in ids},
            "likelihood": {i: 0 for i in ids},
        }
        for r in records:
            if r["rule"] == "unparseable":
                mode = "greedy" if r["mode"] == "greedy" else f"top{top_k_samples}"
                n_unparseable[mode][r["case_id"]] += 1
        for mode, by_case in correct.items():
            if not by_case:
                continue
            mode_ids = [i for i in ids if i in by_case]
            values = np.array([by_case[i] for i in mode_ids], dtype=float)
            strata = assign_strata([cases[i].reader_percent_correct for i in mode_ids], n_strata)
            unparsed = np.array([n_unparseable[mode][i] > 0 for i in mode_ids])
            rows += _strata_rows(model, mode, values, strata, unparsed, edges, n_boot, seed)
    ids = case_ids_seen or []
    percent = np.array([cases[i].reader_percent_correct for i in ids], dtype=float)
    if len(ids) and np.isfinite(percent).any():
        known = np.isfinite(percent)
        rows += _strata_rows(
            "readers", "readers", percent[known] / 100.0, assign_strata(percent[known], n_strata), np.zeros(known.sum(), bool), edges, n_boot, seed
        )
    for index in range(-1, n_strata):
        lo, hi = (0.0, 100.0) if index < 0 else (edges[index], edges[index + 1])
        rows.append(
            {
                "model": "chance",
                "mode": "chance",
                "stratum": "all" if index < 0 else _stratum_label(lo, hi),
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
        )
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    return table, pd.DataFrame(unparseable, columns=["model", "case_id", "mode", "sample", "raw_output"])


def _strata_rows(model, mode, values, strata, unparsed, edges, n_boot, seed) -> list[dict[str, Any]]:
    rows = []
    n_strata = len(edges) - 1
    for index in range(-1, n_strata):
        selected = np.ones(len(values), bool) if index < 0 else strata == index
        lo, hi = (0.0, 100.0) if index < 0 else (edges[index], edges[index + 1])
        rows.append(
            {
                "model": model,
                "mode": mode,
                "stratum": "all" if index < 0 else _stratum_label(lo, hi),
                "stratum_low": lo,
                "stratum_high": hi,
                **_accuracy_row(values[selected], n_boot, seed + index + 1),
                "n_unparseable": int(unparsed[selected].sum()),
            }
        )
    return rows


def write_table(
    answers: Mapping[str, str | Path],
    cases_dir: str | Path,
    table_path: str | Path,
    unparseable_path: str | Path,
    **options: Any,
) -> None:
    """:func:`accuracy_table` into ``table_path`` and ``unparseable_path`` (CSV)."""
    table, unparseable = accuracy_table(answers, cases_dir, **options)
    for frame, path in ((table, table_path), (unparseable, unparseable_path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False)
    overall = table[table["stratum"] == "all"]
    for row in overall.itertuples():
        logger.info("%s %s: accuracy %.3f (n=%d)", row.model, row.mode, row.accuracy, row.n_cases)

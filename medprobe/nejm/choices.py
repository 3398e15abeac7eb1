"""Which of the five choices a generated answer names, and which rule decided (:data:`RULES`)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import numpy as np

from medprobe.nejm.cases import normalise
from medprobe.nejm.prompt import END_OF_UTTERANCE, check_template

__all__ = ["RULES", "extract_choice"]

#: Extraction rules, in the order they are tried (``likelihood`` records need no parsing).
RULES = ("exact_text", "exact_text_first", "choice_number", "fuzzy", "unparseable", "likelihood")

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
_LETTER_AFTER_WORD = re.compile(r"\b(?:[Aa]nswer|[Oo]ption|[Cc]hoice)\b(?:\s+(?:is|was))?\s*:?\s*\(?([A-E])\b(?![-'])")
# (pattern, whether it captures a letter), in the order they are tried.
_NUMBER_PATTERNS = (
    (_NUMBER_AT_START, False),
    (_LETTER_AT_START, True),
    (_NUMBER_AFTER_WORD, False),
    (_LETTER_AFTER_WORD, True),
)
# Where a figure_s2 answer (the text after "Answer:") ends: a blank line, or the next block's label.
_FIGURE_S2_ANSWER_END = re.compile(r"\n\s*\n|\b(?:Reason|Question|Choices|User|Assistant)\s*:")
_NEXT_TURN = re.compile(r"\n?\s*(?:User|Assistant)\s*:")
# What a first line may begin with before the choice text: "answer", "is", a choice number.
_FIRST_LINE_LEAD = re.compile(r"^(?:answer )?(?:is )?(?:[1-5] )?")


def _answer_part(raw: str, template: str = "chat") -> str:
    """The answer alone.

    ``chat``: the assistant's turn, cut at its end or the start of a next turn (its ``Reason:`` stays,
    the shots teach it on the answer's line). ``figure_s2``: the text after ``Answer:`` up to a blank
    line or the next label (``Reason:``, ``Question:``, ...), so that the reason never decides.
    """
    text = raw.split(END_OF_UTTERANCE)[0]
    if template == "figure_s2":
        return _FIGURE_S2_ANSWER_END.split(text.strip(), maxsplit=1)[0].strip()
    return _NEXT_TURN.split(text)[0].strip()


def _choice_spans(norm_answer: str, norm_choices: Sequence[str]) -> list[tuple[int, int, int]]:
    """``(start, end, choice index)`` of every whole-word occurrence of a choice, sorted."""
    spans: list[tuple[int, int, int]] = []
    for index, choice in enumerate(norm_choices):
        if not choice:
            continue
        # every occurrence, also back to back (re.finditer would skip one sharing a space)
        start = norm_answer.find(f" {choice} ")
        while start != -1:
            spans.append((start, start + len(choice) + 2, index))
            start = norm_answer.find(f" {choice} ", start + 1)
    return sorted(set(spans))


def _inside_longer_choice(span: tuple[int, int, int], spans: Sequence[tuple[int, int, int]]) -> bool:
    """Whether ``span`` lies within a longer occurrence of another choice ("melanoma" in "amelanotic
    melanoma")."""
    return any(
        other[2] != span[2]
        and other[0] <= span[0]
        and span[1] <= other[1]
        and (other[1] - other[0]) > (span[1] - span[0])
        for other in spans
    )


def _exact_text(answer: str, norm_choices: Sequence[str]) -> tuple[int | None, str]:
    """Rule 1: the choices named in the answer, the earliest first."""
    spans = _choice_spans(f" {normalise(answer)} ", norm_choices)
    kept = [span for span in spans if not _inside_longer_choice(span, spans)]
    named = sorted({index for _, _, index in kept}, key=lambda i: min(s for s, _, j in kept if j == i))
    if len(named) == 1:
        return named[0], "exact_text"
    if len(named) > 1:
        return named[0], "exact_text_first"
    return None, "unparseable"


def _choice_number(answer: str, n_choices: int) -> tuple[int | None, str]:
    """Rule 2: a choice number or letter given as the answer."""
    for pattern, letters in _NUMBER_PATTERNS:
        match = pattern.search(answer)
        if match:
            token = match.group(1)
            index = _LETTERS.index(token.upper()) if letters else int(token) - 1
            if index < n_choices:
                return index, "choice_number"
    return None, "unparseable"


def _fuzzy(answer: str, norm_choices: Sequence[str], fuzzy_cutoff: float) -> tuple[int | None, str]:
    """Rule 3: the choice closest to the answer's first line (or a window of its words), if close enough
    and closer than every other choice."""
    first_line = _FIRST_LINE_LEAD.sub("", normalise(answer.split("\n")[0]))
    if not first_line:
        return None, "unparseable"
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
    norm_choices = [normalise(choice) for choice in choices]
    index, rule = _exact_text(answer, norm_choices)
    if index is None:
        index, rule = _choice_number(answer, len(choices))
    if index is None:
        index, rule = _fuzzy(answer, norm_choices, fuzzy_cutoff)
    return index, rule

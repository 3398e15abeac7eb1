r"""The few-shot prompt, in one of :data:`TEMPLATES`; the template also decides what likelihood mode
scores and where generation stops.

``figure_s2``: the text of the paper's Figure S2, each case's image first (images and texts alternate,
so the IDEFICS processor inserts nothing between them)::

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

The model continues after ``Answer:``; likelihood mode scores `` {choice}\n``. A shot without an
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

Both are written in IDEFICS markup; an ``hf_vlm`` model gets the same text in its own chat template
(:mod:`medprobe.models.vlm_answering`, docs/nejm.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medprobe.io import sha256_file
from medprobe.nejm.cases import Case

__all__ = [
    "END_OF_UTTERANCE",
    "TEMPLATES",
    "build_prompt",
    "check_template",
    "likelihood_continuations",
    "load_images",
    "prompt_hash",
    "prompt_text",
    "stop_strings",
]

END_OF_UTTERANCE = "<end_of_utterance>"
IMAGE_PLACEHOLDER = "<image>"
#: Prompt templates (config key ``nejm.template``): the paper's Figure S2 text, or IDEFICS instruct turns.
TEMPLATES = ("chat", "figure_s2")


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
    """The interleaved few-shot prompt as a processor list (image paths stand for the images), written
    in ``template`` as this module's docstring shows."""
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


def prompt_hash(items: Sequence[str | Path]) -> str:
    """SHA-256 (16 hex digits) of the prompt's text and its images' bytes: a changed shot, case text
    or image gives a new hash."""
    parts = [f"image:{sha256_file(item)}" if isinstance(item, Path) else f"text:{item}" for item in items]
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()[:16]


def load_images(items: Sequence[str | Path], cache: dict[Path, Any] | None = None) -> list[Any]:
    """Replace image paths with RGB PIL images (opened once per path when ``cache`` is given)."""
    from PIL import Image

    out: list[Any] = []
    for item in items:
        if not isinstance(item, Path):
            out.append(item)
            continue
        if cache is not None and item in cache:
            out.append(cache[item])
            continue
        with Image.open(item) as image:
            loaded = image.convert("RGB")
        if cache is not None:
            cache[item] = loaded
        out.append(loaded)
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

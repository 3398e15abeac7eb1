"""Synthetic NEJM-Image-Challenge-style cases for the demo's multiple-choice evaluation.

Each case is a folder ``<out_dir>/<id>/`` with ``image.png`` and ``case.json`` -- the same format users
give for the real (copyrighted, never shipped) cases. The picture hints at the answer: every diagnosis
has its own shape and colour, drawn on a noisy background, so a model can in principle pick the right
choice from the image. ``reader_shares`` mimic the published share of readers choosing each answer; the
share of the correct answer spreads evenly from 0.15 to 0.9 so that every difficulty stratum has cases.
With ``explanations=True`` each case also gets an ``explanation`` naming the drawn sign, which the
prompts show as a solved shot's reason (Figure S2's ``Reason:`` line).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from medprobe.io import atomic_path, write_text_atomic

FIRST_DATE = dt.date(2005, 10, 13)  # the first NEJM Image Challenge; cases follow weekly
N_CHOICES = 5
IMAGE_SIZE = 224
ANSWER_SHARE_RANGE = (0.15, 0.9)

# Diagnosis -> (shape, RGB colour) drawn in the case image.
DIAGNOSES: dict[str, tuple[str, tuple[int, int, int]]] = {
    "Erythema migrans": ("ring", (200, 40, 40)),
    "Herpes zoster": ("dots", (190, 60, 80)),
    "Psoriasis": ("square", (210, 120, 110)),
    "Melanoma": ("blob", (40, 25, 20)),
    "Basal cell carcinoma": ("circle", (230, 170, 170)),
    "Pyoderma gangrenosum": ("ring", (120, 40, 90)),
    "Kaposi sarcoma": ("blob", (110, 40, 110)),
    "Vitiligo": ("blob", (245, 240, 230)),
    "Jaundice": ("circle", (220, 200, 40)),
    "Pneumothorax": ("triangle", (20, 20, 20)),
    "Pleural effusion": ("square", (235, 235, 235)),
    "Situs inversus": ("cross", (150, 150, 150)),
    "Aortic dissection": ("stripe", (200, 30, 30)),
    "Gout tophus": ("dots", (240, 240, 200)),
    "Clubbing": ("circle", (180, 120, 100)),
    "Kayser-Fleischer ring": ("ring", (140, 110, 40)),
    "Central retinal artery occlusion": ("dot_on_white", (200, 40, 40)),
    "Papilledema": ("circle", (240, 200, 120)),
    "Tinea corporis": ("ring", (200, 110, 80)),
    "Scabies": ("stripe", (120, 60, 40)),
    "Urticaria": ("blob", (240, 150, 150)),
    "Sarcoidosis": ("dots", (100, 100, 160)),
    "Tuberculosis": ("triangle", (200, 200, 200)),
    "Mycosis fungoides": ("square", (170, 60, 60)),
    "Lichen planus": ("triangle", (110, 60, 130)),
    "Hereditary hemorrhagic telangiectasia": ("dots", (220, 20, 40)),
    "Xanthelasma": ("stripe", (240, 210, 120)),
    "Angioedema": ("blob", (230, 120, 120)),
    "Cellulitis": ("square", (230, 80, 60)),
    "Necrotizing fasciitis": ("cross", (60, 30, 40)),
    "Spider angioma": ("cross", (220, 30, 30)),
    "Hemochromatosis": ("circle", (120, 90, 60)),
    "Acanthosis nigricans": ("stripe", (60, 45, 35)),
    "Koilonychia": ("triangle", (220, 180, 170)),
    "Livedo reticularis": ("ring", (150, 60, 120)),
    "Cutaneous larva migrans": ("stripe", (200, 80, 90)),
}

_FINDINGS = [
    "a rash that had been enlarging for 2 weeks",
    "fever and a painful lesion on the leg",
    "progressive shortness of breath",
    "a painless lesion noticed by a family member",
    "itching that worsened at night",
    "chest pain radiating to the back",
    "blurred vision in one eye",
    "fatigue and joint pain",
    "a swelling that appeared after a hike",
    "weight loss and night sweats",
]
# How each shape reads in an explanation.
_SHAPE_WORDS = {
    "ring": "ring",
    "dots": "scattered dots",
    "square": "square",
    "blob": "irregular patch",
    "circle": "round spot",
    "triangle": "triangle",
    "cross": "cross",
    "stripe": "slanted stripes",
    "dot_on_white": "dot on a pale disc",
}
_QUESTIONS = [
    "What is the most likely diagnosis?",
    "What is the diagnosis?",
    "Which of the following is the most likely diagnosis?",
]


def generate_cases(out_dir: str | Path, *, n_cases: int = 30, seed: int = 0, explanations: bool = False) -> list[Path]:
    """Write ``n_cases`` synthetic NEJM-style cases (``<out_dir>/<id>/{image.png,case.json}``).

    Cases are dated weekly from 2005-10-13 in id order. Deterministic for a given ``seed``.
    ``explanations`` adds each case's ``explanation`` (:func:`explanation`); it draws no random
    numbers, so the cases are otherwise the same with and without it. It is off by default because
    the chat prompt shows a shot's explanation too, so turning it on changes the demo's chat prompts.

    Returns:
        The case folders, sorted by date.

    Raises:
        ValueError: when ``n_cases`` is not a positive integer or ``seed`` is negative.
    """
    if not isinstance(n_cases, (int, np.integer)) or isinstance(n_cases, bool) or n_cases < 1:
        raise ValueError(f"n_cases must be a positive integer, got {n_cases!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 9001]))
    # Answer shares spread evenly over the range, in random order over the dates.
    answer_shares = rng.permutation(np.linspace(*ANSWER_SHARE_RANGE, n_cases)) if n_cases > 1 else np.array([0.5])
    folders = []
    for index in range(n_cases):
        case = _draw_case(rng, index, float(answer_shares[index]))
        if explanations:
            case["explanation"] = explanation(case["answer"])
        folders.append(_write_case(Path(out_dir) / case["id"], case, _draw_case_image(rng, case["answer"])))
    return folders


def _draw_case(rng: np.random.Generator, index: int, answer_share: float) -> dict[str, Any]:
    """Case ``index``'s text: a random answer, four distractors in shuffled order, readers and patient."""
    names = sorted(DIAGNOSES)
    answer_index = int(rng.integers(len(names)))
    answer = names[answer_index]
    others = [i for i in range(len(names)) if i != answer_index]
    choices = [answer] + [names[i] for i in rng.choice(others, size=N_CHOICES - 1, replace=False)]
    choices = [choices[i] for i in rng.permutation(N_CHOICES)]
    shares = _reader_shares(rng, answer_share, choices.index(answer))
    age = int(rng.integers(18, 90))
    sex = "woman" if rng.random() < 0.5 else "man"
    article = "An" if str(age).startswith("8") or age in (11, 18) else "A"
    return {
        "id": f"case{index + 1:03d}",
        "date": (FIRST_DATE + dt.timedelta(weeks=index)).isoformat(),
        "question": _QUESTIONS[0] if rng.random() < 0.7 else str(rng.choice(_QUESTIONS[1:])),
        "context": f"{article} {age}-year-old {sex} presented with {_FINDINGS[int(rng.integers(len(_FINDINGS)))]}.",
        "choices": choices,
        "answer": answer,
        "reader_shares": shares,
    }


def _write_case(folder: Path, case: dict[str, Any], image: Image.Image) -> Path:
    """``image.png``, then ``case.json``: a folder with case.json is complete."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "image.png") as tmp:
        image.save(tmp, format="PNG", compress_level=6, optimize=False)  # no metadata chunks: byte-stable
    write_text_atomic(folder / "case.json", json.dumps(case, indent=2) + "\n")
    return folder


def explanation(diagnosis: str) -> str:
    """The reason a solved demo case gives: the shape and colour its image draws for ``diagnosis``."""
    shape, colour = DIAGNOSES[diagnosis]
    red, green, blue = colour
    return f"The {_SHAPE_WORDS[shape]} drawn in RGB {red}, {green}, {blue} is this synthetic set's sign of {diagnosis}."


def _reader_shares(rng: np.random.Generator, answer_share: float, answer_position: int) -> list[float]:
    """Five shares summing to 1, the answer's at ``answer_position``; the rest split at random."""
    rest = rng.dirichlet(np.full(N_CHOICES - 1, 1.5)) * (1.0 - answer_share)
    shares = np.insert(rest, answer_position, answer_share)
    shares = np.round(shares, 4)
    # Put the rounding residual on the largest wrong choice so the shares sum to 1 (to float precision).
    wrong = [i for i in range(N_CHOICES) if i != answer_position]
    shares[max(wrong, key=lambda i: shares[i])] += 1.0 - shares.sum()
    return [round(float(s), 6) for s in shares]


def _draw_case_image(rng: np.random.Generator, diagnosis: str) -> Image.Image:
    """A noisy skin/grey background with the diagnosis's shape in its colour, at a random place and size."""
    shape, colour = DIAGNOSES[diagnosis]
    size = IMAGE_SIZE
    background = np.array([205, 170, 150]) if rng.random() < 0.6 else np.array([90, 90, 95])
    pixels = background + rng.normal(0, 8, size=(size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cx, cy = (int(v) for v in rng.integers(size // 3, 2 * size // 3, size=2))
    r = int(rng.integers(size // 8, size // 4))
    fill = tuple(int(c) for c in np.clip(np.array(colour) + rng.normal(0, 10, 3), 0, 255))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(3, r // 4))
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        draw.rectangle((cx - r, cy - r // 4, cx + r, cy + r // 4), fill=fill)
        draw.rectangle((cx - r // 4, cy - r, cx + r // 4, cy + r), fill=fill)
    elif shape == "stripe":
        for k in range(-2, 3):
            draw.line(
                (cx - r, cy + k * r // 2 - r // 3, cx + r, cy + k * r // 2 + r // 3), fill=fill, width=max(2, r // 6)
            )
    elif shape == "dots":
        for x, y in rng.integers(-r, r, size=(12, 2)):
            draw.ellipse((cx + x - 4, cy + y - 4, cx + x + 4, cy + y + 4), fill=fill)
    elif shape == "blob":
        angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        radii = r * (1 + 0.25 * rng.standard_normal(16))
        draw.polygon([(cx + float(q * np.cos(a)), cy + float(q * np.sin(a))) for a, q in zip(angles, radii)], fill=fill)
    elif shape == "dot_on_white":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(235, 225, 215))
        draw.ellipse((cx - r // 5, cy - r // 5, cx + r // 5, cy + r // 5), fill=fill)
    else:  # pragma: no cover - DIAGNOSES only uses the shapes above
        raise ValueError(f"unknown shape {shape!r} for {diagnosis!r}")
    return image

"""What every demo task shares: the planned image, the task spec, validation, patients, sizes and labels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TASK_IDS = ("T1", "T2", "T3", "T4", "T5", "T6", "T7", "T8")

# Share of images whose appearance is drawn independently of their label (label-independent variation).
APPEARANCE_NOISE = 0.10
# Share of images larger than 1024 px in one dimension, for the tasks whose real data has such images.
LARGE_FRACTION = 0.04


@dataclass
class PlannedImage:
    """One planned image: its metadata row plus what the renderer needs to draw it."""

    image_id: str
    patient_id: str
    label: str = ""
    labels: str = ""
    source: str = ""
    partition: str = ""
    group: str = ""
    size: tuple[int, int] = (224, 224)  # (height, width)
    params: dict[str, Any] = field(default_factory=dict)


def patient_image(patient: str, j: int, params: dict[str, Any], side: str = "", **fields: Any) -> PlannedImage:
    """Image ``j`` (from 0) of ``patient``, named ``<patient>-<j + 1>`` (``<patient>-<side>-<j + 1>`` for an
    eye or knee); ``fields`` are the other fields of :class:`PlannedImage`."""
    image_id = f"{patient}-{side}-{j + 1}" if side else f"{patient}-{j + 1}"
    return PlannedImage(image_id, patient, params=params, **fields)


# plan(rng, task_id, classes, n_train, n_test, images_per_patient) -> the task's images, in file order
Plan = Callable[[np.random.Generator, str, list[str], int, int, int], list[PlannedImage]]
# render(rng, height, width, params) -> float pixels in [0, 1], (h, w) or (h, w, 3)
Render = Callable[[np.random.Generator, int, int, dict[str, Any]], np.ndarray]


@dataclass(frozen=True)
class TaskSpec:
    """How one demo task is made: its label kind, file encoding, and the modality's planner and renderer."""

    kind: str
    extension: str  # file extension, also selects the encoder
    sixteen_bit: bool
    plan: Plan
    render: Render


def require_binary(task_id: str, classes: list[str]) -> None:
    if len(classes) != 2:
        raise ValueError(f"tasks.{task_id}.classes: a binary task needs 2 classes, got {classes!r}")


def require_grades(task_id: str, classes: list[str]) -> None:
    if len(classes) < 2:
        raise ValueError(f"tasks.{task_id}.classes: a graded task needs at least 2 grades, got {classes!r}")


def validate_task(task_id: str, task: dict, kind: str) -> tuple[list[str], int, int]:
    """``(classes, train patients, test patients)`` of a task's config entry; errors name the key."""
    if not isinstance(task, dict):
        raise ValueError(f"tasks.{task_id}: expected a mapping, got {type(task).__name__}")
    if task.get("kind", kind) != kind:
        raise ValueError(f"tasks.{task_id}.kind: the demo {task_id} is {kind!r}, got {task.get('kind')!r}")
    classes = task.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ValueError(f"tasks.{task_id}.classes: expected a non-empty list of names, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"tasks.{task_id}.classes: names must be distinct, got {classes!r}")
    patients = task.get("demo_patients")
    if not isinstance(patients, dict):
        raise ValueError(f"tasks.{task_id}.demo_patients: expected a mapping {{train, test}}, got {patients!r}")
    counts = []
    for part in ("train", "test"):
        value = patients.get(part)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"tasks.{task_id}.demo_patients.{part}: expected a positive integer, got {value!r}")
        counts.append(value)
    return list(classes), counts[0], counts[1]


def patient_ids(task_id: str, n: int) -> list[str]:
    return [f"{task_id}-P{i + 1:04d}" for i in range(n)]


def large_size(rng: np.random.Generator) -> tuple[int, int]:
    """A 1100-1400 px (long side), never square, mostly landscape image size (height, width)."""
    long_side = int(rng.integers(1100, 1401))
    short_side = int(long_side * rng.uniform(0.66, 0.85))
    return (short_side, long_side) if rng.random() < 0.7 else (long_side, short_side)


def large_indices(rng: np.random.Generator, n: int) -> np.ndarray:
    """About LARGE_FRACTION of ``n`` image indices (at least one when n > 0)."""
    return rng.choice(n, size=max(1, round(LARGE_FRACTION * n)), replace=False) if n else np.zeros(0, int)


def image_sizes(
    rng: np.random.Generator, n: int, lo: int, hi: int, large: bool, square: bool = False
) -> list[tuple[int, int]]:
    """Mostly ``lo``..``hi`` px; with ``large``, about 4 % (at least one) 1100-1400 px, never square."""
    sizes = []
    for _ in range(n):
        h = int(rng.integers(lo, hi + 1))
        sizes.append((h, h) if square else (h, int(rng.integers(lo, hi + 1))))
    if large:
        for i in large_indices(rng, n):
            sizes[int(i)] = large_size(rng)
    return sizes


def ensure_each_class(
    rng: np.random.Generator, labels: np.ndarray, n_classes: int, donor: int | None = None
) -> np.ndarray:
    """Overwrite entries so that every class occurs at least once (when there is room).

    Entries are taken from the most frequent class (or ``donor``) so the imbalance survives.
    """
    labels = labels.copy()
    if len(labels) < n_classes:
        return labels
    for c in range(n_classes):
        if np.any(labels == c):
            continue
        counts = np.bincount(labels, minlength=n_classes)
        source = donor if donor is not None and counts[donor] > 1 else int(np.argmax(counts))
        candidates = np.flatnonzero(labels == source)
        labels[rng.choice(candidates)] = c
    return labels


def noisy_appearance(rng: np.random.Generator, label: int, n_classes: int) -> int:
    """The class an image is drawn as: its label, or with APPEARANCE_NOISE a uniformly random class."""
    return int(rng.integers(n_classes)) if rng.random() < APPEARANCE_NOISE else label


def neighbour_grade(rng: np.random.Generator, grade: int, n_grades: int) -> int:
    """The grade an image is drawn as: graders disagree between neighbouring grades (2 x APPEARANCE_NOISE)."""
    if rng.random() >= 2 * APPEARANCE_NOISE:
        return grade
    return int(np.clip(grade + rng.choice([-1, 1]), 0, n_grades - 1))


def grade_prior(shares: list[float], n_grades: int, beyond: float) -> np.ndarray:
    """Shares of ``n_grades`` grades: the first of ``shares``, ``beyond`` for each grade past them, normalised."""
    prior = np.array(shares[:n_grades] + [beyond] * max(0, n_grades - len(shares)))
    return prior / prior.sum()

"""Synthetic raw data for the eight demo tasks T1-T8.

Each task is generated as a publisher's archive would look after unpacking: ``images/*`` next to
``metadata.csv`` with the columns of :data:`METADATA_COLUMNS` (see docs/architecture.md, "Raw demo data").
The ``prepare`` step turns that table into a manifest exactly as it does for real data.

The pictures are procedural (numpy, vectorised) stand-ins for the real modalities, one module each:
:mod:`~medprobe.demo.data.histology` (T1, T2), :mod:`~medprobe.demo.data.dermatology` (T3, T4),
:mod:`~medprobe.demo.data.fundus` (T5, T6), :mod:`~medprobe.demo.data.chest` (T7) and
:mod:`~medprobe.demo.data.knee` (T8); :mod:`~medprobe.demo.data.tasks` holds what they share. Every task has
a real but imperfect signal: the class drives a few visual parameters, while per-patient and per-image
nuisance (staining, skin tone, illumination, exposure, position), pixel noise and about 10 % of images
whose appearance does not follow their label keep a linear probe well below perfect.

Determinism: every random draw comes from ``numpy`` generators seeded by ``(seed, task, image index)``
and the encoders run with fixed parameters and no metadata, so the same seed gives byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medprobe.demo.data import chest, dermatology, files, fundus, histology, knee
from medprobe.demo.data.drawing import render_at_size
from medprobe.demo.data.files import METADATA_COLUMNS
from medprobe.demo.data.tasks import TASK_IDS, PlannedImage, TaskSpec, validate_task

__all__ = ["METADATA_COLUMNS", "TASK_IDS", "generate_task"]

_SPECS: dict[str, TaskSpec] = {
    "T1": histology.T1,
    "T2": histology.T2,
    "T3": dermatology.T3,
    "T4": dermatology.T4,
    "T5": fundus.T5,
    "T6": fundus.T6,
    "T7": chest.T7,
    "T8": knee.T8,
}


def generate_task(task_id: str, task: dict, metadata: str | Path, *, seed: int, images_per_patient: int) -> Path:
    """Generate one synthetic task's raw images and its ``metadata`` table; the images go to ``images/`` next
    to it.

    Args:
        task_id: ``T1`` .. ``T8``; selects the task-specific label structure and image modality.
        task: the task's entry of the config (``kind``, ``classes``, ``demo_patients: {train, test}``, ...).
        metadata: the ``metadata.csv`` to write.
        seed: non-negative integer; the same seed gives byte-identical files.
        images_per_patient: images per patient (for T5/T6/T8 they alternate between the two eyes/knees).

    Returns:
        ``metadata`` as a path.

    Raises:
        ValueError: for an unknown task id or an invalid ``task`` entry (the message names the key).
    """
    spec = _spec(task_id, seed, images_per_patient)
    classes, n_train, n_test = validate_task(task_id, task, spec.kind)
    task_number = TASK_IDS.index(task_id) + 1
    plan_rng = np.random.default_rng(np.random.SeedSequence([int(seed), task_number, 0]))
    images = spec.plan(plan_rng, task_id, classes, n_train, n_test, int(images_per_patient))

    metadata = Path(metadata)
    (metadata.parent / "images").mkdir(parents=True, exist_ok=True)
    # A folder whose images are being rewritten must not look complete: drop the old table first.
    metadata.unlink(missing_ok=True)
    rows = []
    for index, image in enumerate(images):
        # One generator per image: an image depends on (seed, task, its index), not on drawing order.
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), task_number, index + 1]))
        rows.append(_draw(spec, image, rng, metadata.parent))
    files.write_metadata(rows, metadata)
    return metadata


def _spec(task_id: str, seed: int, images_per_patient: int) -> TaskSpec:
    if task_id not in _SPECS:
        raise ValueError(f"unknown demo task id {task_id!r}; the demo generator knows {', '.join(TASK_IDS)}")
    if not _is_count(seed) or seed < 0:
        raise ValueError(f"{task_id}: seed must be a non-negative integer, got {seed!r}")
    if not _is_count(images_per_patient) or images_per_patient < 1:
        raise ValueError(f"{task_id}: images_per_patient must be a positive integer, got {images_per_patient!r}")
    return _SPECS[task_id]


def _is_count(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _draw(spec: TaskSpec, image: PlannedImage, rng: np.random.Generator, folder: Path) -> dict[str, str]:
    """Render and save one planned image below ``folder``; return its metadata row."""
    pixels = render_at_size(spec.render, rng, image.size, image.params)
    file = f"images/{image.image_id}.{spec.extension}"
    files.save_image(pixels, folder / file, spec.extension, spec.sixteen_bit, image.params.get("max_value", 65535))
    return {
        "image_id": image.image_id,
        "file": file,
        "patient_id": image.patient_id,
        "label": image.label,
        "labels": image.labels,
        "source": image.source,
        "partition": image.partition,
        "group": image.group,
    }

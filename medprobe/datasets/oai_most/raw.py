"""T8's raw table: a 140 mm crop of every knee with landmarks, the user's ready-made crops, and the knees left out."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medprobe import kneel
from medprobe.datasets import relative_file
from medprobe.datasets.oai_most.knees import knee_table
from medprobe.datasets.oai_most.layout import FROM_OAI_RELEASE, KNEES, LANDMARKS, NO_JOINT, NO_LANDMARKS

log = logging.getLogger("medprobe.datasets.oai_most")


def _read_pixels(path: Path, row: pd.Series) -> tuple[np.ndarray, tuple[float, float]]:
    if path.suffix.lower() in (".dcm", ".dicom", "") and path.exists():
        return kneel.read_dicom(path)
    spacing = (float(row["spacing_row"]), float(row["spacing_col"]))
    return np.asarray(Image.open(path)), spacing


def convert(
    data_dir: Path, out_dir: Path, classes: list[str], landmarks: Path | None = None, undetected: Path | None = None
) -> pd.DataFrame:
    """T8's raw table: a 140 mm crop (written below ``out_dir/images/``) of every knee with landmarks, the user's
    ready-made crops, and in ``attrs["excluded"]`` the knees left out by reason.

    ``landmarks`` are KNEEL's or the user's (else ``landmarks.csv`` next to ``knees.csv``); ``undetected``
    KNEEL's list of the knees it found no joint for."""
    knees, excluded = knee_table(data_dir)
    landmarks = landmarks if landmarks is not None else _default_landmarks(data_dir)
    table = kneel.read_landmarks(landmarks)
    points = {key: group[["x", "y"]].to_numpy(float) for key, group in table.groupby(["file", "side"])}
    missed = set()
    if undetected is not None:
        missed = set(map(tuple, kneel.read_undetected(undetected)[["file", "side"]].to_numpy().tolist()))
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows, left_out = [], Counter()
    for _, knee in knees.iterrows():
        row, reason = _knee_row(knee, data_dir, out_dir, points, missed)
        if reason is not None:
            left_out[reason] += 1
        else:
            rows.append(row)
    for reason, where in ((NO_JOINT, undetected), (NO_LANDMARKS, landmarks)):
        if left_out[reason]:
            log.warning("%d knee(s) left out: %s (%s)", left_out[reason], reason, where)
            excluded[reason] = left_out[reason]
    raw = pd.DataFrame(rows)
    if excluded:
        raw.attrs["excluded"] = excluded
    return raw


def _knee_row(
    knee: pd.Series,
    data_dir: Path,
    out_dir: Path,
    points: dict[tuple[str, str], np.ndarray],
    undetected: set[tuple[str, str]],
) -> tuple[dict[str, str] | None, str | None]:
    """One knee's row of the raw table (its crop written when it has landmarks), or the reason it is left out."""
    side = knee["side"].strip().upper()[:1]
    if side not in ("R", "L"):
        raise ValueError(f"{data_dir / KNEES}: file {knee['file']}: side must be R or L, got {knee['side']!r}")
    key = (knee["file"], side)
    source_path = data_dir / knee["file"]
    image_id = f"{knee['source']}_{Path(knee['file']).with_suffix('').as_posix().replace('/', '_')}_{side}"
    if key in points:
        pixels, spacing = _read_pixels(source_path, knee)
        crop = kneel.crop_knee(pixels, kneel.joint_centre(points[key]), spacing, side)
        target = out_dir / "images" / f"{image_id}.png"
        Image.fromarray(
            crop.astype(np.uint16) if crop.dtype.kind in "iu" and crop.max() > 255 else crop.astype(np.uint8)
        ).save(target)
        file = relative_file(target, out_dir)
    elif key in undetected:
        return None, NO_JOINT
    elif knee["origin"] == FROM_OAI_RELEASE:  # a whole bilateral radiograph: never a crop
        return None, NO_LANDMARKS
    else:  # a crop the user made already
        file = relative_file(source_path, out_dir)
    return {
        "image_id": image_id,
        "file": file,
        "patient_id": f"{knee['source']}_{knee['patient_id']}",
        "label": knee["kl"],
        "source": knee["source"],
        "partition": knee["partition"],
    }, None


def _default_landmarks(data_dir: Path) -> Path:
    """``landmarks.csv`` next to ``knees.csv``, for a task that names no landmarks."""
    if (data_dir / LANDMARKS).exists():
        return data_dir / LANDMARKS
    raise FileNotFoundError(
        f"no knee landmarks for the knees of {data_dir}: the task names none (`landmarks: kneel` runs KNEEL, "
        f"`landmarks: <your file>` takes yours) and {data_dir / LANDMARKS} does not exist; see docs/datasets.md (T8)"
    )

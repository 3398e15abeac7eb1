"""T8: knee radiographs of OAI and MOST (KL grade 0-4), each knee cropped to 140 mm x 140 mm around the joint.

Access is by data-use agreement: OAI through the NIMH Data Archive (https://nda.nih.gov/oai), MOST through
the NIA (https://agingresearchbiobank.nia.nih.gov). Their clinical files come in release-specific layouts, so
the recipe reads a table the user derives from them once (docs/datasets.md shows how):

* ``knees.csv`` with columns ``file`` (radiograph, DICOM or PNG, relative to this folder), ``patient_id``,
  ``side`` (``R``/``L``), ``kl`` (0-4), ``source`` (``oai``/``most``), ``partition`` (``train``/``test``/empty)
  and, for non-DICOM files, ``spacing_row``/``spacing_col`` in mm per pixel;
* landmarks with columns ``file, side, x, y`` (one row per landmark, pixels of the original image).

Where the landmarks come from is the task's ``landmarks`` setting: ``kneel`` runs the upstream KNEEL models
(rule ``kneel_landmarks`` in ``envs/kneel.yaml``), a path names the user's own file; either way the workflow
puts ``landmarks.csv`` and ``landmarks_undetected.csv`` (``file, side, reason``: knees KNEEL found no joint
for) into the raw folder (``out_dir``) before this recipe runs. Without that, the recipe reads
``landmarks.csv`` next to ``knees.csv``. Knees listed as undetected are left out and counted in
``counts.json``; knees with neither landmarks nor an undetected entry are taken as ready-made crops (users
who already have crops name them in ``knees.csv`` and give no landmarks for them).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medprobe import kneel
from medprobe.datasets import Dataset, Source, register, relative_file

log = logging.getLogger("medprobe.datasets.oai_most")

KNEE_COLUMNS = ["file", "patient_id", "side", "kl", "source", "partition"]
LANDMARKS = "landmarks.csv"
UNDETECTED = "landmarks_undetected.csv"


def _read_pixels(path: Path, row: pd.Series) -> tuple[np.ndarray, tuple[float, float]]:
    if path.suffix.lower() in (".dcm", ".dicom", "") and path.exists():
        return kneel.read_dicom(path)
    spacing = (float(row["spacing_row"]), float(row["spacing_col"]))
    return np.asarray(Image.open(path)), spacing


def convert(data_dir: Path, out_dir: Path, classes: list[str]) -> pd.DataFrame:
    knees = pd.read_csv(data_dir / "knees.csv", dtype=str, keep_default_na=False)
    missing = [column for column in KNEE_COLUMNS if column not in knees.columns]
    if missing:
        raise ValueError(f"{data_dir / 'knees.csv'}: missing column(s) {missing}; found {list(knees.columns)}")
    landmarks_path, undetected_path = landmark_files(data_dir, out_dir)
    landmarks = kneel.read_landmarks(landmarks_path)
    points = {key: group[["x", "y"]].to_numpy(float) for key, group in landmarks.groupby(["file", "side"])}
    undetected = set()
    if undetected_path is not None:
        undetected = set(map(tuple, kneel.read_undetected(undetected_path)[["file", "side"]].to_numpy().tolist()))
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows, left_out = [], 0
    for _, row in knees.iterrows():
        side = row["side"].strip().upper()[:1]
        if side not in ("R", "L"):
            raise ValueError(f"{data_dir / 'knees.csv'}: file {row['file']}: side must be R or L, got {row['side']!r}")
        source_path = data_dir / row["file"]
        image_id = f"{row['source']}_{Path(row['file']).with_suffix('').as_posix().replace('/', '_')}_{side}"
        if (row["file"], side) in undetected and (row["file"], side) not in points:
            left_out += 1
            continue
        if (row["file"], side) in points:
            pixels, spacing = _read_pixels(source_path, row)
            crop = kneel.crop_knee(pixels, kneel.joint_centre(points[(row["file"], side)]), spacing, side)
            target = image_dir / f"{image_id}.png"
            Image.fromarray(crop.astype(np.uint16) if crop.dtype.kind in "iu" and crop.max() > 255 else crop.astype(np.uint8)).save(target)
            file = relative_file(target, out_dir)
        else:  # a crop the user made already
            file = relative_file(source_path, out_dir)
        rows.append({"image_id": image_id, "file": file, "patient_id": f"{row['source']}_{row['patient_id']}",
                     "label": str(int(float(row["kl"]))), "source": row["source"], "partition": row["partition"]})
    table = pd.DataFrame(rows)
    if left_out:
        log.warning("%d knee(s) left out: KNEEL found no joint (listed in %s)", left_out, undetected_path)
        table.attrs["excluded"] = {"no joint found by KNEEL": left_out}
    return table


def landmark_files(data_dir: Path, out_dir: Path) -> tuple[Path, Path | None]:
    """The landmarks the recipe uses: those the workflow put into the raw folder (KNEEL's or the user's
    file named by ``tasks.<task>.landmarks``), else ``landmarks.csv`` next to ``knees.csv``."""
    if (out_dir / LANDMARKS).exists():
        undetected = out_dir / UNDETECTED
        return out_dir / LANDMARKS, undetected if undetected.exists() else None
    if (data_dir / LANDMARKS).exists():
        return data_dir / LANDMARKS, None
    raise FileNotFoundError(
        f"no knee landmarks for {data_dir / 'knees.csv'}: neither {out_dir / LANDMARKS} (made by the workflow when "
        f"the task sets `landmarks: kneel` or `landmarks: <your file>`) nor {data_dir / LANDMARKS} exists; see "
        "docs/datasets.md (T8)"
    )


register(Dataset(
    name="oai_most",
    title="Osteoarthritis Initiative (OAI) + Multicenter Osteoarthritis Study (MOST)",
    licence="OAI and MOST data-use agreements (no redistribution)",
    access="OAI: https://nda.nih.gov/oai (NIMH Data Archive account and data-use certification); MOST: "
    "https://agingresearchbiobank.nia.nih.gov (NIA request)",
    sources=(
        Source("knees.csv", description="one row per knee: file, patient_id, side, kl, source, partition[, spacing_row, spacing_col]"),
    ),
    convert=convert,
    expected={"total": {"images": 66089}},
    manual_note="Radiographs go below the same folder, at the paths knees.csv names. Landmarks come from KNEEL "
    "(`landmarks: kneel`) or your own file (`landmarks: <path>`); see docs/datasets.md (T8).",
))

"""T8: knee radiographs of OAI and MOST (KL grade 0-4), each knee cropped to 140 mm x 140 mm around the joint.

Access is by data-use agreement: OAI through the NIMH Data Archive (https://nda.nih.gov/oai), MOST through
the NIA (https://agingresearchbiobank.nia.nih.gov). Their clinical files come in release-specific layouts, so
the recipe reads a table the user derives from them once (docs/datasets.md shows how):

* ``knees.csv`` with columns ``file`` (radiograph, DICOM or PNG, relative to this folder), ``patient_id``,
  ``side`` (``R``/``L``), ``kl`` (0-4), ``source`` (``oai``/``most``), ``partition`` (``train``/``test``/empty)
  and, for non-DICOM files, ``spacing_row``/``spacing_col`` in mm per pixel;
* ``landmarks.csv`` with columns ``file, side, x, y`` (one row per landmark, pixels) - KNEEL's output
  (run in ``envs/kneel.yaml``) in this long form, or the user's own landmarks. Users who already have
  crops give ``file`` as the crop and leave ``landmarks.csv`` without rows for it: such files are used as is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medprobe import kneel
from medprobe.datasets import Dataset, Source, register, relative_file

KNEE_COLUMNS = ["file", "patient_id", "side", "kl", "source", "partition"]


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
    landmarks = pd.read_csv(data_dir / "landmarks.csv", dtype={"file": str, "side": str})
    points = {key: group[["x", "y"]].to_numpy(float) for key, group in landmarks.groupby(["file", "side"])}
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for _, row in knees.iterrows():
        side = row["side"].upper()[:1]
        source_path = data_dir / row["file"]
        image_id = f"{row['source']}_{Path(row['file']).with_suffix('').as_posix().replace('/', '_')}_{side}"
        if (row["file"], row["side"]) in points:
            pixels, spacing = _read_pixels(source_path, row)
            crop = kneel.crop_knee(pixels, kneel.joint_centre(points[(row["file"], row["side"])]), spacing, side)
            target = image_dir / f"{image_id}.png"
            Image.fromarray(crop.astype(np.uint16) if crop.dtype.kind in "iu" and crop.max() > 255 else crop.astype(np.uint8)).save(target)
            file = relative_file(target, out_dir)
        else:  # a crop the user made already
            file = relative_file(source_path, out_dir)
        rows.append({"image_id": image_id, "file": file, "patient_id": f"{row['source']}_{row['patient_id']}",
                     "label": str(int(float(row["kl"]))), "source": row["source"], "partition": row["partition"]})
    return pd.DataFrame(rows)


register(Dataset(
    name="oai_most",
    title="Osteoarthritis Initiative (OAI) + Multicenter Osteoarthritis Study (MOST)",
    licence="OAI and MOST data-use agreements (no redistribution)",
    access="OAI: https://nda.nih.gov/oai (NIMH Data Archive account and data-use certification); MOST: "
    "https://agingresearchbiobank.nia.nih.gov (NIA request)",
    sources=(
        Source("knees.csv", description="one row per knee: file, patient_id, side, kl, source, partition[, spacing_row, spacing_col]"),
        Source("landmarks.csv", description="KNEEL landmarks per knee: file, side, x, y"),
    ),
    convert=convert,
    expected={"total": {"images": 66089}},
    manual_note="Radiographs go below the same folder, at the paths knees.csv names; see docs/datasets.md (T8).",
))

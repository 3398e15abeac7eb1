"""T7: PadChest (Bustos et al. 2020, BIMCV), manual: request access at https://bimcv.cipf.es/bimcv-projects/padchest/.

Layout: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (or ``.csv.gz``) with columns ``ImageID,
ImageDir, StudyID, PatientID, Projection, MethodLabel, Labels, ...`` and 16-bit PNGs in the zip parts
``0.zip`` ... ``54.zip``, extracted so that an image is ``images/<ImageDir>/<ImageID>``.

Only the radiologist-labelled subset (``MethodLabel == "Physician"``) is used, as in the paper. ``Labels`` is
a Python-list string such as ``['pleural effusion', ' cardiomegaly']``; labels are normalised (stripped,
lower case, single spaces) and kept when they are among the task's findings. Rows whose image file is missing
are excluded and counted; images that cannot be decoded are handled by ``prepare`` (``on_bad_image: skip``
lists them in the sidecar).

Evidence: public loaders (e.g. one derived from torchxrayvision's PadChest dataset) read ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz``
(as BIMCV distributes it) with ``ImageID``, ``PatientID``, ``Projection`` and ``Labels``; other public loaders build
image paths as ``<ImageDir>/<ImageID>`` ("images live inside numbered sub-folders, each named like the ImageDir
field", i.e. ``0.zip`` unpacked into ``0/``) and select ``MethodLabel`` in {``Physician``, ``RNN_model``}. BIMCV
publishes no checksums.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pandas as pd

from medprobe.datasets import Dataset, Source, register, relative_file

CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"


def normalise_labels(value: str) -> list[str]:
    """``"['pleural effusion', ' Cardiomegaly', '']"`` -> ``['pleural effusion', 'cardiomegaly']`` (order kept, unique)."""
    if not isinstance(value, str) or not value.strip() or value.strip().lower() == "nan":
        return []
    try:
        items = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        items = value.strip("[]").split(",")
    seen: list[str] = []
    for item in items:
        name = re.sub(r"\s+", " ", str(item).strip().strip("'\"").lower())
        if name and name not in seen:
            seen.append(name)
    return seen


def convert(data_dir: Path, out_dir: Path, classes: list[str]) -> pd.DataFrame:
    path = data_dir / CSV if (data_dir / CSV).exists() else data_dir / f"{CSV}.gz"
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [column for column in ("ImageID", "ImageDir", "PatientID", "MethodLabel", "Labels") if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(table.columns)}")
    table = table[table["MethodLabel"] == "Physician"]
    wanted = set(classes)
    files = [data_dir / "images" / str(int(float(folder))) / image for folder, image in zip(table["ImageDir"], table["ImageID"])]
    present = [file.exists() for file in files]
    labels = ["|".join(name for name in normalise_labels(value) if name in wanted) for value in table["Labels"]]
    result = pd.DataFrame({
        "image_id": [Path(image).stem for image in table["ImageID"]],
        "file": [relative_file(file, out_dir) for file in files],
        "patient_id": table["PatientID"].to_numpy(),
        "labels": labels,
        "source": "padchest",
        "partition": "",
    })
    result = result[present].reset_index(drop=True)
    result.attrs["excluded"] = {"image file missing": int(len(present) - sum(present)),
                                "missing_files": [str(file) for file, ok in zip(files, present) if not ok][:1000]}
    return result


register(Dataset(
    name="padchest",
    title="PadChest (BIMCV), radiologist-labelled subset",
    licence="PadChest data-use agreement (research use, no redistribution)",
    access="request access at https://bimcv.cipf.es/bimcv-projects/padchest/ (data-use agreement)",
    sources=(
        Source(f"{CSV}.gz", description="the labels table as distributed by BIMCV"),
        Source("images", description="folder: the zip parts 0.zip ... 54.zip each extracted into images/<part number>/"),
    ),
    convert=convert,
    expected={"total": {"images": 94658, "patients": 67247}},
))

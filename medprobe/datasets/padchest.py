"""T7: PadChest (Bustos et al. 2020, BIMCV), manual: request access at https://bimcv.cipf.es/bimcv-projects/padchest/.

Layout: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (or ``.csv.gz``) with columns ``ImageID,
ImageDir, StudyID, PatientID, Projection, MethodLabel, Labels, ...`` and 16-bit PNGs in the zip parts
``0.zip`` ... ``54.zip``, extracted so that an image is ``images/<ImageDir>/<ImageID>``.

Rows (``tasks.<task>.label_rule``):

* ``all_rows`` (default; the paper trains on 86,715 radiographs, i.e. all its 94,658 but the test set, most of
  them labelled automatically, and tests on 7,943 radiologist-labelled radiographs of 7,272 patients): every
  row. Radiologist-labelled rows (``MethodLabel == "Physician"``) get an empty ``partition``, automatically
  labelled ones (``RNN_model``) ``partition = train``. ``prepare`` then holds out its test fraction of the
  patients among those with an empty partition, i.e. of the patients with radiologist-labelled images, and
  takes only their radiologist-labelled rows as test: a held-out patient's automatic rows are dropped (counted
  in the sidecar), so no patient is in two splits and the test labels are all radiologist labels.
* ``radiologist_only``: the radiologist-labelled rows only (the automatic ones are counted as excluded), split
  by patient by ``prepare``.

``Labels`` is a Python-list string such as ``['pleural effusion', ' cardiomegaly']``, in the same form for both
label methods; labels are normalised (stripped, lower case, single spaces, duplicates dropped). With ``classes:
all`` every normalised finding is kept; with a list, those of the list. Rows without labels (``Labels`` empty or
``nan``, or a list without a label such as ``[]`` or ``['']``) are excluded and counted: they are unlabelled, not
"no finding" (normal radiographs are labelled ``normal``). Rows whose image file is missing are excluded and
counted; images that cannot be decoded are handled by ``prepare`` (``on_bad_image: skip`` lists them in the
sidecar).

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

import numpy as np
import pandas as pd

from medprobe.datasets import Dataset, Source, register, relative_file

CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
RADIOLOGIST, AUTOMATIC = "Physician", "RNN_model"
METHODS = (RADIOLOGIST, AUTOMATIC)
LABEL_RULES = ("all_rows", "radiologist_only")


def normalise_labels(value: str) -> list[str]:
    """``"['pleural effusion', ' Cardiomegaly', '']"`` -> ``['pleural effusion', 'cardiomegaly']`` (order kept, unique).

    Empty cells, ``nan``, ``[]`` and ``['']`` give no label; a bare string (``normal``) is one label; a string
    that is no Python literal is split at its commas."""
    if not isinstance(value, str) or value.strip().lower() in ("", "nan", "none"):
        return []
    try:
        items = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        items = value.strip().strip("[]").split(",")
    if isinstance(items, str) or not isinstance(items, (list, tuple, set)):
        items = [items]
    seen: list[str] = []
    for item in items:
        if item is None or (isinstance(item, float) and np.isnan(item)):
            continue
        name = re.sub(r"\s+", " ", str(item).strip().strip("'\"").strip().lower())
        if name and name not in ("nan", "none") and name not in seen:
            seen.append(name)
    return seen


def convert(data_dir: Path, out_dir: Path, classes: list[str] | str, label_rule: str = LABEL_RULES[0]) -> pd.DataFrame:
    if label_rule not in LABEL_RULES:
        raise ValueError(f"PadChest label_rule {label_rule!r}; allowed: {', '.join(LABEL_RULES)}")
    path = data_dir / CSV if (data_dir / CSV).exists() else data_dir / f"{CSV}.gz"
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [
        column
        for column in ("ImageID", "ImageDir", "PatientID", "MethodLabel", "Labels")
        if column not in table.columns
    ]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(table.columns)}")
    method = table["MethodLabel"].str.strip()
    unknown = sorted(set(method) - set(METHODS))
    if unknown:
        raise ValueError(f"{path}: column MethodLabel has value(s) {unknown[:10]}; expected {' or '.join(METHODS)}")
    excluded: dict[str, object] = {}
    if label_rule == "radiologist_only":
        excluded[f"automatic labels (MethodLabel {AUTOMATIC}; label_rule radiologist_only)"] = int(
            (method == AUTOMATIC).sum()
        )
        table, method = table[method == RADIOLOGIST], method[method == RADIOLOGIST]
    parsed = [normalise_labels(value) for value in table["Labels"]]
    labelled = [bool(names) for names in parsed]
    excluded["no labels (Labels empty, nan, [] or [''])"] = int(len(labelled) - sum(labelled))
    keep = (lambda name: True) if classes == "all" else set(classes).__contains__
    files = [
        data_dir / "images" / str(int(float(folder))) / image
        for folder, image in zip(table["ImageDir"], table["ImageID"])
    ]
    present = [file.exists() for file in files]
    result = pd.DataFrame(
        {
            "image_id": [Path(image).stem for image in table["ImageID"]],
            "file": [relative_file(file, out_dir) for file in files],
            "patient_id": table["PatientID"].str.strip().to_numpy(),
            "labels": ["|".join(name for name in names if keep(name)) for names in parsed],
            "source": "padchest",
            # automatic labels may train but never test; prepare holds test patients out of the radiologist-labelled rows
            "partition": np.where(method.to_numpy() == AUTOMATIC, "train", ""),
        }
    )
    usable = np.array(labelled, dtype=bool) & np.array(present, dtype=bool)
    missing_files = [str(file) for file, ok, has in zip(files, present, labelled) if has and not ok]
    excluded["image file missing"] = len(missing_files)
    excluded["missing_files"] = missing_files[:1000]
    result = result[usable].reset_index(drop=True)
    result.attrs["excluded"] = excluded
    return result


register(
    Dataset(
        name="padchest",
        title="PadChest (BIMCV)",
        licence="PadChest data-use agreement (research use, no redistribution)",
        access="request access at https://bimcv.cipf.es/bimcv-projects/padchest/ (data-use agreement)",
        sources=(
            Source(f"{CSV}.gz", description="the labels table as distributed by BIMCV"),
            Source(
                "images", description="folder: the zip parts 0.zip ... 54.zip each extracted into images/<part number>/"
            ),
        ),
        convert=convert,
        expected={"total": {"images": 94658, "patients": 67247}},
        label_rules=LABEL_RULES,
    )
)

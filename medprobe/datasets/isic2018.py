"""T3: ISIC 2018 challenge task 3 (HAM10000, Tschandl et al.), CC BY-NC 4.0, from the ISIC challenge bucket.

Layout: ``ISIC2018_Task3_{Training,Validation,Test}_Input/ISIC_<id>.jpg`` and ground-truth CSVs
``ISIC2018_Task3_{Training,Validation,Test}_GroundTruth.csv`` with columns ``image, MEL, NV, BCC, AKIEC,
BKL, DF, VASC`` (one-hot, 1.0 for the diagnosis). ``ISIC2018_Task3_Training_LesionGroupings.csv``
(``image, lesion_id, diagnosis_confirm_type``) groups the training images by lesion; the lesion is the
grouping unit (no patient ids are released); images without a lesion id are their own group. Training + validation -> train (10,208), test -> test (1,512).

Unpacked, each ground-truth zip gives a folder of its own name holding the CSV (plus ATTRIBUTION.txt, LICENSE.txt),
e.g. ``ISIC2018_Task3_Test_GroundTruth/ISIC2018_Task3_Test_GroundTruth.csv``, and each input zip a folder of
``ISIC_<id>.jpg``. Evidence: public loaders that read these exact paths from the unpacked bucket archives, e.g. one
reading ``ISIC2018_Task3_{Training,Validation,Test}_GroundTruth/ISIC2018_Task3_*_GroundTruth.csv`` with header
``image`` and the one-hot column ``MEL`` for all three splits, and many download scripts fetching
``https://isic-challenge-data.s3.amazonaws.com/2018/ISIC2018_Task3_Test_{Input,GroundTruth}.zip`` and
``ISIC2018_Task3_Training_LesionGroupings.csv`` (public code index). The ISIC archive
publishes no checksums for these files.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medprobe.datasets import Dataset, Source, find_one, register, relative_file

CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
BUCKET = "https://isic-challenge-data.s3.amazonaws.com/2018"
PARTS = {"Training": "train", "Validation": "train", "Test": "test"}


def read_ground_truth(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path)
    missing = [column for column in ["image"] + CLASSES if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(table.columns)}")
    onehot = table[CLASSES].to_numpy()
    if not ((onehot.sum(axis=1) == 1) & ((onehot == 0) | (onehot == 1)).all(axis=1)).all():
        raise ValueError(f"{path}: every row must have exactly one diagnosis column set to 1")
    return pd.DataFrame({"image": table["image"], "label": [CLASSES[i] for i in onehot.argmax(axis=1)]})


def convert(data_dir: Path, out_dir: Path, classes: list[str]) -> pd.DataFrame:
    lesions = pd.read_csv(find_one(data_dir, "ISIC2018_Task3_Training_LesionGroupings.csv"))
    lesion_of = dict(zip(lesions["image"], lesions["lesion_id"]))
    frames = []
    for part, partition in PARTS.items():
        truth = read_ground_truth(find_one(data_dir, f"ISIC2018_Task3_{part}_GroundTruth.csv"))
        images = find_one(data_dir, f"ISIC2018_Task3_{part}_Input")
        frames.append(
            pd.DataFrame(
                {
                    "image_id": truth["image"],
                    "file": [relative_file(images / f"{image}.jpg", out_dir) for image in truth["image"]],
                    "patient_id": [lesion_of.get(image, image) for image in truth["image"]],
                    "label": truth["label"],
                    "source": f"isic2018_{part.lower()}",
                    "partition": partition,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _sources():
    sources = [
        Source(f"ISIC2018_Task3_{part}_{kind}.zip", url=f"{BUCKET}/ISIC2018_Task3_{part}_{kind}.zip", extract=True)
        for part in PARTS
        for kind in ("Input", "GroundTruth")
    ]
    sources.append(
        Source(
            "ISIC2018_Task3_Training_LesionGroupings.csv", url=f"{BUCKET}/ISIC2018_Task3_Training_LesionGroupings.csv"
        )
    )
    return tuple(sources)


register(
    Dataset(
        name="isic2018",
        title="ISIC 2018 task 3 / HAM10000",
        licence="CC BY-NC 4.0",
        access="public, https://challenge.isic-archive.com/data/#2018 (downloaded automatically; no published checksums: "
        "pin the SHA-256 values logged by the first download under tasks.T3.checksums)",
        sources=_sources(),
        convert=convert,
        expected={"train": {"images": 10208}, "test": {"images": 1512}},
    )
)

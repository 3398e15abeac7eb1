"""T4: SIIM-ISIC 2020 challenge training set (Rotemberg et al. 2021), CC BY-NC 4.0.

Layout: ``ISIC_2020_Training_JPEG.zip`` -> ``train/ISIC_<id>.jpg``; ``ISIC_2020_Training_GroundTruth.csv``
with columns ``image_name, patient_id, sex, age_approx, anatom_site_general_challenge, diagnosis,
benign_malignant, target``. All 33,126 images; ``prepare`` splits them by patient (the paper: 26,045 train
from 1,644 patients, 7,081 test from 412 patients, i.e. test_fraction 0.2 of the patients).

Evidence: public loaders read the unpacked archive as ``ISIC_2020_Training_JPEG/train/ISIC_<id>.jpg`` (or ``train/``
when unpacked in place) and the ground truth with exactly the header above (``image_name,patient_id,sex,age_approx,
anatom_site_general_challenge,diagnosis,benign_malignant,target``); the bucket also serves a
``ISIC_2020_Training_GroundTruth_v2.csv`` (adds ``lesion_id``) and ``ISIC_2020_Training_Duplicates.csv``, which the
paper's 33,126 images do not use. The ISIC archive publishes no checksums for these files.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medprobe.datasets import Dataset, Source, find_one, register, relative_file

BUCKET = "https://isic-challenge-data.s3.amazonaws.com/2020"
COLUMNS = ["image_name", "patient_id", "benign_malignant"]


def convert(data_dir: Path, out_dir: Path, classes: list[str]) -> pd.DataFrame:
    path = find_one(data_dir, "ISIC_2020_Training_GroundTruth.csv")
    truth = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [column for column in COLUMNS if column not in truth.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(truth.columns)}")
    bad = sorted(set(truth["benign_malignant"]) - {"benign", "malignant"})
    if bad:
        raise ValueError(f"{path}: column benign_malignant has values {bad}; expected benign or malignant")
    images = find_one(data_dir, "train")
    return pd.DataFrame(
        {
            "image_id": truth["image_name"],
            "file": [relative_file(images / f"{name}.jpg", out_dir) for name in truth["image_name"]],
            "patient_id": truth["patient_id"],
            "label": truth["benign_malignant"],
            "source": "isic2020",
            "partition": "",
        }
    )


register(
    Dataset(
        name="isic2020",
        title="SIIM-ISIC Melanoma Classification 2020, training set",
        licence="CC BY-NC 4.0",
        access="public, https://challenge.isic-archive.com/data/#2020 (downloaded automatically; no published checksums: "
        "pin the SHA-256 values logged by the first download under tasks.T4.checksums)",
        sources=(
            Source("ISIC_2020_Training_JPEG.zip", url=f"{BUCKET}/ISIC_2020_Training_JPEG.zip", extract=True),
            Source("ISIC_2020_Training_GroundTruth.csv", url=f"{BUCKET}/ISIC_2020_Training_GroundTruth.csv"),
        ),
        convert=convert,
        expected={"total": {"images": 33126, "patients": 2056}},
    )
)

"""T1: NCT-CRC-HE-100K (train) and CRC-VAL-HE-7K (test), Kather et al., Zenodo record 1214456 (CC BY 4.0).

Archive layout: ``NCT-CRC-HE-100K/<CLASS>/<CLASS>-<ID>.tif`` and ``CRC-VAL-HE-7K/<CLASS>/<CLASS>-<ID>.tif``
with the nine classes ADI BACK DEB LYM MUC MUS NORM STR TUM. The release has no patient ids (the patches of
86 + 50 patients are not attributed), so every patch is its own group (patient_id = image_id); train and test come from different
patients by construction.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medprobe.datasets import Dataset, Source, find_one, register, relative_file

CLASSES = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
RECORD = "https://zenodo.org/records/1214456/files"
PARTS = {"NCT-CRC-HE-100K": "train", "CRC-VAL-HE-7K": "test"}


def convert(data_dir: Path, out_dir: Path, classes: list[str]) -> pd.DataFrame:
    rows = []
    for folder, partition in PARTS.items():
        root = find_one(data_dir, folder)
        for label in CLASSES:
            for path in sorted((root / label).glob("*.tif")):
                rows.append({"image_id": f"{folder}_{path.stem}", "file": relative_file(path, out_dir), "patient_id": f"{folder}_{path.stem}",
                             "label": label, "source": folder, "partition": partition})
    return pd.DataFrame(rows)


register(Dataset(
    name="nct_crc_he",
    title="NCT-CRC-HE-100K and CRC-VAL-HE-7K (Kather et al. 2018)",
    licence="CC BY 4.0",
    access="public, https://zenodo.org/records/1214456 (downloaded automatically)",
    sources=(
        Source("NCT-CRC-HE-100K.zip", url=f"{RECORD}/NCT-CRC-HE-100K.zip?download=1", md5="035777cf327776a71a05c95da6d6325f", extract=True),
        Source("CRC-VAL-HE-7K.zip", url=f"{RECORD}/CRC-VAL-HE-7K.zip?download=1", md5="2fd1651b4f94ebd818ebf90ad2b6ce06", extract=True),
    ),
    convert=convert,
    expected={"train": {"images": 100000}, "test": {"images": 7180}},
))

"""T1: NCT-CRC-HE-100K (train) and CRC-VAL-HE-7K (test), Kather et al., Zenodo record 1214456 (CC BY 4.0).

Archive layout: ``NCT-CRC-HE-100K/<CLASS>/<CLASS>-<ID>.tif`` and ``CRC-VAL-HE-7K/<CLASS>/<CLASS>-<ID>.tif``
with the nine classes ADI BACK DEB LYM MUC MUS NORM STR TUM. The release has no patient ids (the patches of
86 + 50 patients are not attributed), so every patch is its own group (patient_id = image_id); train and test come from different
patients by construction.

Evidence for the layout: the eva documentation (https://kaiko-ai.github.io/eva/main/datasets/crc, "Organization":
``NCT-CRC-HE-100K/ADI/ADI-AAAFLCLY.tif``) and kaiko-ai/eva src/eva/vision/data/datasets/classification/crc.py, which
reads ``<root>/NCT-CRC-HE-100K`` and ``<root>/CRC-VAL-HE-7K`` as one folder per class of ``.tif`` files. Some copies
nest the folder once more (``NCT-CRC-HE-100K/NCT-CRC-HE-100K/ADI/...``); :func:`class_root` accepts both.

The record holds two 100K archives: ``NCT-CRC-HE-100K.zip`` (Macenko colour-normalised; the archive named in the
paper and used here) and ``NCT-CRC-HE-100K-NONORM.zip``, with different MD5s.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medprobe.datasets import Dataset, Source, find_one, register, relative_file

CLASSES = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
RECORD = "https://zenodo.org/records/1214456/files"
PARTS = {"NCT-CRC-HE-100K": "train", "CRC-VAL-HE-7K": "test"}
# The MD5s the Zenodo record lists (NCT-CRC-HE-100K.zip, 11,690,284,003 bytes; CRC-VAL-HE-7K.zip, 800,276,929 bytes), as
# pinned with the byte sizes by independent acquisition scripts. 035777cf327776a71a05c95da6d6325f belongs to
# NCT-CRC-HE-100K-NONORM.zip (kaiko-ai/eva crc_nonorm.py), not to the archive used here.
MD5 = {
    "NCT-CRC-HE-100K.zip": "6fd702d11df6292bc054397ae038a464",
    "CRC-VAL-HE-7K.zip": "2fd1651b4f94ebd818ebf90ad2b6ce06",
}


def class_root(data_dir: Path, folder: str) -> Path:
    """The extracted ``folder`` that directly holds the class sub-folders (also when the archive nests it twice)."""
    top = find_one(data_dir, folder)
    for candidate in [top, *sorted(path for path in top.rglob(folder) if path.is_dir())]:
        if any((candidate / label).is_dir() for label in CLASSES):
            return candidate
    raise FileNotFoundError(
        f"{top}: expected one sub-folder per class ({' '.join(CLASSES)}) holding .tif patches, "
        f"as in {folder}.zip of Zenodo record 1214456; found {sorted(p.name for p in top.iterdir())[:10]}"
    )


def convert(data_dir: Path, out_dir: Path, classes: list[str]) -> pd.DataFrame:
    rows = []
    for folder, partition in PARTS.items():
        root = class_root(data_dir, folder)
        found = 0
        for label in CLASSES:
            for path in sorted((root / label).glob("*.tif")):
                rows.append(
                    {
                        "image_id": f"{folder}_{path.stem}",
                        "file": relative_file(path, out_dir),
                        "patient_id": f"{folder}_{path.stem}",
                        "label": label,
                        "source": folder,
                        "partition": partition,
                    }
                )
                found += 1
        if not found:
            raise FileNotFoundError(f"{root}: no .tif patch in any class folder ({' '.join(CLASSES)})")
    return pd.DataFrame(rows)


register(
    Dataset(
        name="nct_crc_he",
        title="NCT-CRC-HE-100K and CRC-VAL-HE-7K (Kather et al. 2018)",
        licence="CC BY 4.0",
        access="public, https://zenodo.org/records/1214456 (downloaded automatically, MD5-verified)",
        sources=tuple(
            Source(name, url=f"{RECORD}/{name}?download=1", md5=md5, extract=True) for name, md5 in MD5.items()
        ),
        convert=convert,
        expected={"train": {"images": 100000}, "test": {"images": 7180}},
    )
)

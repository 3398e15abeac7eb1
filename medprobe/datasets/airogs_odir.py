"""T6: AIROGS (de Vente et al., Zenodo record 5793241) -> train; ODIR-2019 (Peking University) -> test.

* AIROGS: ``train_labels.csv`` (``challenge_id, class`` with ``RG`` referable glaucoma / ``NRG``) and the images
  ``<challenge_id>.jpg`` (``TRAIN000000.jpg`` ...) in the record's zip parts ``0.zip`` ... ``5.zip`` (found at any depth
  below ``airogs/``, e.g. ``airogs/0/TRAIN000000.jpg``); 101,442 images. CC BY-NC-ND 4.0. The release has no patient ids,
  so every image is its own group (patient_id = image id).
* ODIR-5K: ``ODIR-5K_Training_Annotations(Updated)_V2.xlsx`` (columns ``ID, ..., Left-Fundus, Right-Fundus,
  Left-Diagnostic Keywords, Right-Diagnostic Keywords, N, D, G, C, A, H, M, O``; several keywords of one eye are
  joined by a full-width comma) and ``ODIR-5K_Training_Dataset/<ID>_<left|right>.jpg``; 3,500 patients, 7,000
  eyes. Manual (registration at https://odir2019.grand-challenge.org). An eye is ``glaucoma`` when its diagnostic
  keywords mention glaucoma.

Evidence. AIROGS: the challenge's "Data and challenge" page (https://airogs.grand-challenge.org/data-and-challenge/)
says the training set is on Zenodo and that its maintainers accept access requests by hand, so an anonymous download
may be refused (HTTP 403) until access is granted; then download the files in a browser into
``resources/datasets/airogs_odir/airogs/`` and rerun (files already present are verified, not downloaded again). Public loaders read ``train_labels.csv``
with ``challenge_id`` and ``class`` in {RG, NRG} and the images as ``<challenge_id>.jpg`` after flattening the zip
sub-folders (a unified-format conversion script asserts this for every row), one folder per zip part ``0`` ... ``5`` (an
anomalib AIROGS datamodule: ``airogs/0/TRAIN000000.jpg``). No MD5 of the record's files could be confirmed (one
third-party value for ``0.zip`` only, from code that never verifies it), so none is pinned. ODIR: loaders read the
``.xlsx`` above with ``Left-Fundus``/``Right-Fundus`` and ``Left-``/``Right-Diagnostic Keywords`` (split on
"，") and the images from ``ODIR-5K_Training_Dataset/`` (some copies nest it in ``ODIR-5K_Training_Images/``: move
the folder up).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medprobe.datasets import Dataset, Source, find_one, register, relative_file

RECORD = "https://zenodo.org/records/5793241/files"
ODIR_SHEET = "ODIR-5K_Training_Annotations(Updated)_V2.xlsx"
AIROGS_LABELS = {"RG": "glaucoma", "NRG": "no_glaucoma"}


def read_odir(path: Path) -> pd.DataFrame:
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    try:
        return pd.read_excel(path, dtype=str).fillna("")
    except ImportError as error:
        raise ImportError(f"{path}: reading ODIR's .xlsx needs openpyxl (pip install openpyxl)") from error


def odir_eyes(table: pd.DataFrame, where: str) -> pd.DataFrame:
    """One row per eye: ID, side, fundus file, label (glaucoma if the eye's keywords mention it)."""
    needed = ["ID", "Left-Fundus", "Right-Fundus", "Left-Diagnostic Keywords", "Right-Diagnostic Keywords"]
    missing = [column for column in needed if column not in table.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; found {list(table.columns)}")
    eyes = []
    for side in ("Left", "Right"):
        keywords = table[f"{side}-Diagnostic Keywords"].str.lower()
        eyes.append(
            pd.DataFrame(
                {
                    "ID": table["ID"],
                    "side": side.lower(),
                    "file": table[f"{side}-Fundus"],
                    "label": keywords.str.contains("glaucoma").map({True: "glaucoma", False: "no_glaucoma"}),
                }
            )
        )
    return pd.concat(eyes, ignore_index=True)


def convert(data_dir: Path, out_dir: Path, classes: list[str]) -> pd.DataFrame:
    labels = pd.read_csv(data_dir / "airogs" / "train_labels.csv", dtype=str, keep_default_na=False)
    bad = sorted(set(labels["class"]) - set(AIROGS_LABELS))
    if bad:
        raise ValueError(
            f"{data_dir / 'airogs' / 'train_labels.csv'}: column class has values {bad}; expected RG or NRG"
        )
    images = {path.stem: path for path in sorted((data_dir / "airogs").rglob("*")) if path.suffix.lower() == ".jpg"}
    missing = [name for name in labels["challenge_id"] if name not in images]
    if missing:
        raise FileNotFoundError(
            f"{data_dir / 'airogs'}: {len(missing)} image(s) of train_labels.csv not found, e.g. {missing[:5]}"
        )
    airogs = pd.DataFrame(
        {
            "image_id": labels["challenge_id"],
            "file": [relative_file(images[name], out_dir) for name in labels["challenge_id"]],
            "patient_id": labels["challenge_id"],
            "label": labels["class"].map(AIROGS_LABELS),
            "source": "airogs",
            "partition": "train",
        }
    )
    sheet = data_dir / "odir" / ODIR_SHEET
    eyes = odir_eyes(read_odir(sheet), str(sheet))
    folder = find_one(data_dir / "odir", "ODIR-5K_Training_Dataset")
    odir = pd.DataFrame(
        {
            "image_id": "odir_" + eyes["file"].str.replace(".jpg", "", regex=False),
            "file": [relative_file(folder / name, out_dir) for name in eyes["file"]],
            "patient_id": "odir_" + eyes["ID"],
            "label": eyes["label"],
            "source": "odir",
            "partition": "test",
        }
    )
    return pd.concat([airogs, odir], ignore_index=True)


register(
    Dataset(
        name="airogs_odir",
        title="AIROGS (train) + ODIR-2019 (test)",
        licence="AIROGS CC BY-NC-ND 4.0; ODIR-2019 challenge terms (research use)",
        access="AIROGS: https://zenodo.org/records/5793241 (downloaded automatically; if Zenodo answers HTTP 403, request "
        "access there, download train_labels.csv and 0.zip-5.zip by hand into the airogs/ folder below and rerun); "
        "ODIR-2019: register at https://odir2019.grand-challenge.org and download the training set",
        sources=(
            Source("airogs/train_labels.csv", url=f"{RECORD}/train_labels.csv?download=1"),
            *(Source(f"airogs/{k}.zip", url=f"{RECORD}/{k}.zip?download=1", extract=True) for k in range(6)),
            Source(f"odir/{ODIR_SHEET}", description="the ODIR-5K training annotations"),
            Source(
                "odir/ODIR-5K_Training_Dataset",
                description="folder: the extracted ODIR-5K training images (<ID>_left.jpg, <ID>_right.jpg)",
            ),
        ),
        convert=convert,
        expected={"train": {"images": 101442}, "test": {"images": 7000, "patients": 3500}},
    )
)

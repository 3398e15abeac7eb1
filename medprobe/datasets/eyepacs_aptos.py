"""T5: EyePACS (Kaggle "diabetic-retinopathy-detection") and APTOS 2019 (Kaggle "aptos2019-blindness-detection").

Both are Kaggle competition data under the competitions' rules (accept them on kaggle.com first).

* EyePACS: ``trainLabels.csv`` (``image, level``; shipped as ``trainLabels.csv.zip``), ``retinopathy_solution.csv``
  (the test labels: ``image, level, Usage`` with Usage ``Public``/``Private``) and the images
  ``<patient>_<left|right>.jpeg`` from the multi-part archives ``train.zip.001-005`` and ``test.zip.001-007`` (join
  and extract them by hand, e.g. ``7z x train.zip.001`` or ``cat train.zip.* > train.zip && unzip train.zip``, into
  ``train/`` (35,126 images) and ``test/`` (53,576 images)). The paper pools both and splits by patient: 73,622 train
  (36,811 patients) / 15,078 test (7,539 patients).
* APTOS 2019: ``train.csv`` (``id_code, diagnosis``) and ``train_images/<id_code>.png``; all 3,662 images are
  test images. Fetched automatically with the Kaggle client when KAGGLE_USERNAME/KAGGLE_KEY are set.

Evidence. The competition's file list (Kaggle data page, "File descriptions": train.zip.* 5 files, test.zip.* 7
files, sample.zip, sampleSubmission.csv, trainLabels.csv) does not include the test labels: Kaggle released them after
the competition as an attachment to the forum thread https://www.kaggle.com/competitions/diabetic-retinopathy-detection/discussion/16149,
``RETINOPATHY_SOLUTION_URL`` below (pointed to in jusiro/FLAIR issue 9 and mikevoets/jama16-retina-replication issue 19;
shaswa123/pytorch-classification setup.sh fetches it with wget). Its columns ``image, level, Usage`` are those read by
public loaders (e.g. ``val_test_df.Usage == "Public"``). google/uncertainty-baselines PR 1198 documents the extracted
``train/`` and ``test/`` folders with 35,126 and 53,576 images. APTOS: many Kaggle kernels read
``aptos2019-blindness-detection/train.csv`` (``id_code``, ``diagnosis``) and ``train_images/<id_code>.png``.
Kaggle publishes no checksums.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medprobe.datasets import Dataset, Source, register, relative_file

EYEPACS = "https://www.kaggle.com/competitions/diabetic-retinopathy-detection/data"
RETINOPATHY_SOLUTION_URL = (
    "https://storage.googleapis.com/kaggle-forum-message-attachments/90528/2877/retinopathy_solution.csv"
)
GRADES = {"0", "1", "2", "3", "4"}


def _read(path: Path, columns: list[str]) -> pd.DataFrame:
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(table.columns)}")
    grade = columns[1]
    bad = sorted(set(table[grade].str.strip()) - GRADES)
    if bad:
        raise ValueError(f"{path}: column {grade} has value(s) {bad[:10]}; expected the grades 0-4")
    table[grade] = table[grade].str.strip()
    return table


def convert(data_dir: Path, out_dir: Path, classes: list[str]) -> pd.DataFrame:
    frames = []
    for labels, folder in (("trainLabels.csv", "train"), ("retinopathy_solution.csv", "test")):
        table = _read(data_dir / "eyepacs" / labels, ["image", "level"])
        frames.append(
            pd.DataFrame(
                {
                    "image_id": "eyepacs_" + table["image"],
                    "file": [
                        relative_file(data_dir / "eyepacs" / folder / f"{image}.jpeg", out_dir)
                        for image in table["image"]
                    ],
                    "patient_id": "eyepacs_" + table["image"].str.split("_").str[0],
                    "label": table["level"],
                    "source": "eyepacs",
                    "partition": "",  # pooled and split by patient, as in the paper
                }
            )
        )
    aptos = _read(data_dir / "aptos" / "train.csv", ["id_code", "diagnosis"])
    frames.append(
        pd.DataFrame(
            {
                "image_id": "aptos_" + aptos["id_code"],
                "file": [
                    relative_file(data_dir / "aptos" / "train_images" / f"{code}.png", out_dir)
                    for code in aptos["id_code"]
                ],
                "patient_id": "aptos_" + aptos["id_code"],  # APTOS has no patient ids
                "label": aptos["diagnosis"],
                "source": "aptos",
                "partition": "test",
            }
        )
    )
    return pd.concat(frames, ignore_index=True)


register(
    Dataset(
        name="eyepacs_aptos",
        title="EyePACS (Kaggle diabetic retinopathy detection) + APTOS 2019",
        licence="Kaggle competition rules (non-commercial research use; no redistribution)",
        access="Kaggle account; accept the rules of https://www.kaggle.com/competitions/diabetic-retinopathy-detection and "
        "https://www.kaggle.com/competitions/aptos2019-blindness-detection",
        sources=(
            Source("eyepacs/trainLabels.csv", description=f"unzipped trainLabels.csv.zip from {EYEPACS}"),
            Source(
                "eyepacs/retinopathy_solution.csv",
                description=f"test labels, attached to the competition's forum thread (not on the data page): {RETINOPATHY_SOLUTION_URL}",
            ),
            Source("eyepacs/train", description="folder: train.zip.001-005 joined and extracted (7z x train.zip.001)"),
            Source("eyepacs/test", description="folder: test.zip.001-007 joined and extracted (7z x test.zip.001)"),
            Source(
                "aptos/aptos2019-blindness-detection.zip",
                kaggle="aptos2019-blindness-detection",
                extract=True,
                description="kaggle competitions download -c aptos2019-blindness-detection (automatic with KAGGLE_USERNAME/KAGGLE_KEY)",
            ),
        ),
        convert=convert,
        expected={"total": {"images": 92362}},
        manual_note="The Kaggle client reads KAGGLE_USERNAME and KAGGLE_KEY from the environment (never stored by medprobe).",
    )
)

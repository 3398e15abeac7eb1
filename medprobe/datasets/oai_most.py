"""T8: knee radiographs of OAI and MOST (KL grade 0-4), each knee cropped to 140 mm x 140 mm around the joint.

Access is by data-use agreement: OAI through the NIMH Data Archive (https://nda.nih.gov/oai), MOST through
the NIA (https://agingresearchbiobank.nia.nih.gov). The recipe takes the knees from one or both of these, in
``resources/datasets/oai_most/``:

* ``oai/``: the OAI release as downloaded. The recipe lists every knee and visit itself (:func:`oai_knees`)
  from the X-ray semi-quantitative readings ``kXR_SQ_BU<visit>.txt`` (pipe-separated ASCII release) or
  ``kxr_sq_bu<visit>.sas7bdat`` (SAS release): one row per knee and reading project with ``ID``, ``SIDE``
  (1 = right, 2 = left), ``READPRJ``, ``V<visit>XRKL`` and ``V<visit>BARCDBU`` (the barcode of the radiograph
  read), and from the image archives, each unpacked into a folder named by its visit (``00m``, ``12m``, ...):
  ``contents.csv`` (``Folder``, ``ParticipantID``, ``Barcode``, ``SeriesDescription``, ...) whose rows with
  ``SeriesDescription`` "Bilateral PA Fixed Flexion Knee" are the knee radiographs, a DICOM at ``<Folder>/001``;
* ``knees.csv``, a table the user makes (MOST, whose image folders public code does not link to a ``MOSTID``
  for certain; or everything): columns ``file`` (radiograph, DICOM or PNG, relative to this folder),
  ``patient_id``, ``side`` (``R``/``L``), ``kl`` (0-4), ``source`` (``oai``/``most``), ``partition``
  (``train``/``test``/empty) and, for non-DICOM files, ``spacing_row``/``spacing_col`` in mm per pixel.

Where the layouts come from (public code that reads the releases): Oulu-IMEDS/KNEEL
``create_train_dataset_from_oai.py`` (contents.csv, the series description, ``<Folder>/001``, one reading per
knee), Oulu-IMEDS/OAProgression ``oaprogression/metadata/oai.py`` (visits 00 01 03 05 08 10, one reading per
knee), epierson9/pain-disparities ``image_processing.py`` and ``non_image_data_processing.py`` (visit folders
``00m`` ... ``96m``, pipe separators, ``SIDE`` 1/2, ``READPRJ``, ``BARCDBU`` barcodes with the leading zero
lost, ``Barcode``/``AccessionNumber`` in contents.csv).

Rule ``oai_most_files`` (:func:`prepare`) checks which of the two is there (stopping with both options when
neither is), lists every knee in ``knees_all.csv`` (the radiographs KNEEL runs on) and writes the receipt.

Landmarks come from the task's ``landmarks`` setting: ``kneel`` runs the upstream KNEEL models (rule
``kneel_landmarks`` in ``envs/kneel.yaml``, which also lists in ``landmarks_undetected.csv``, ``file, side, reason``,
the knees it found no joint for), a path names the user's own file (``file, side, x, y``, one row per landmark,
pixels of the original image); rule ``raw_dataset`` passes them to :func:`convert`. Without them, the recipe
reads ``landmarks.csv`` next to ``knees.csv``. Knees listed as undetected are left out and counted in
``counts.json``; knees of ``knees.csv`` with neither landmarks nor an undetected entry are taken as ready-made
crops (users who already have crops name them in ``knees.csv`` and give no landmarks for them); knees of the OAI
release without landmarks are left out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medprobe import kneel
from medprobe.datasets import Dataset, Source, register, relative_file
from medprobe.download import MissingDataError, verify
from medprobe.io import atomic_path, write_text_atomic

log = logging.getLogger("medprobe.datasets.oai_most")

KNEE_COLUMNS = ["file", "patient_id", "side", "kl", "source", "partition"]
KNEES = "knees.csv"
KNEES_ALL = "knees_all.csv"  # every knee of knees.csv and of the OAI release: what KNEEL runs on
OAI_DIR = "oai"
LANDMARKS = "landmarks.csv"
# Knees left out of the raw table, counted in counts.json under these reasons
NO_JOINT, NO_LANDMARKS = "no joint found by KNEEL", "OAI: no landmarks"

BILATERAL_PA = "Bilateral PA Fixed Flexion Knee"
DICOM_NAME = "001"
# Image archive folder (months) -> visit code of the kXR_SQ_BU files (V00 baseline, V01 12 months, ...).
OAI_VISITS = {0: "00", 12: "01", 18: "02", 24: "03", 30: "04", 36: "05", 48: "06", 72: "08", 96: "10"}
READINGS_FILE = re.compile(r"^kxr_sq_bu(\d\d)\.(txt|sas7bdat)$", re.IGNORECASE)
VISIT_FOLDER = re.compile(r"(\d{2,3})m$", re.IGNORECASE)
SEARCH_DEPTH = 3  # the release's tables and contents.csv are looked for at most this many folders below oai/
FROM_KNEES_CSV, FROM_OAI_RELEASE = "knees.csv", "oai release"


# ---- the OAI release ---------------------------------------------------------------------------------------


def _text(value: object) -> str:
    """A cell as text: SAS bytes decoded, blanks and NaN empty, integral floats without ``.0``."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    text = str(value).strip()
    return text[: text.index(".")] if re.fullmatch(r"-?\d+\.0+", text) else text


def _leading_number(text: str) -> float | None:
    """The code of an OAI value: ``2``, ``2.0`` or ``2: Grade 2`` -> 2.0; missing codes (``.``, ``.A: ...``) -> None."""
    match = re.match(r"^(-?\d+(?:\.\d+)?)\s*(?::|$)", text)
    return float(match.group(1)) if match else None


def _grade(text: str) -> str | None:
    number = _leading_number(text)
    return str(int(number)) if number is not None and number in (0, 1, 2, 3, 4) else None


def _side(text: str) -> str | None:
    number = _leading_number(text)
    if number is not None:
        return {1.0: "R", 2.0: "L"}.get(number)
    return text[:1].upper() if text[:1].upper() in ("R", "L") else None  # "Right", "Left"


def _barcode(text: str) -> str:
    """Last 7 digits: the releases write the 12-digit barcode (``016600839603``) with or without its leading
    zero, with a prefix or cut to its last digits; the last 7 identify the radiograph."""
    digits = re.sub(r"\D", "", _text(text))
    return digits[-7:].zfill(7) if digits else ""


def _read_table(path: Path) -> pd.DataFrame:
    """An OAI table as text cells with upper-case column names: ``.txt`` (ASCII release, ``|``-separated) or
    ``.sas7bdat`` (SAS release)."""
    if path.suffix.lower() == ".sas7bdat":
        table = pd.read_sas(path, format="sas7bdat", encoding="latin-1")
    else:
        with open(path, encoding="latin-1") as handle:
            header = handle.readline()
        if "|" not in header:
            raise ValueError(
                f"{path}: not an OAI ASCII table (the release separates columns by '|'); first line {header[:80]!r}"
            )
        table = pd.read_csv(path, sep="|", dtype=str, keep_default_na=False, encoding="latin-1")
    table.columns = [_text(column).upper() for column in table.columns]
    return table.map(_text)


def read_readings(path: str | Path, visit: str) -> pd.DataFrame:
    """One KL reading per knee of ``kXR_SQ_BU<visit>``: columns ``ID, side, kl`` (``None`` when missing or not
    0-4), ``kl_text`` (as written), ``barcode``, ``readprj``.

    Reading project: where a knee has several rows (``READPRJ`` 15, 37, 42, ...), the file's first one is used,
    as OAProgression (``build_img_progression_meta``) and KNEEL (``create_train_dataset_from_oai.py``) do with
    ``drop_duplicates(subset=['ID', 'SIDE'])``; knees with several readings, and those that disagree on the
    grade, are logged."""
    path = Path(path)
    table = _read_table(path)
    kl_column, barcode_column = f"V{visit}XRKL", f"V{visit}BARCDBU"
    missing = [column for column in ("ID", "SIDE", kl_column) if column not in table.columns]
    if missing:
        raise ValueError(
            f"{path}: not an OAI kXR_SQ_BU{visit} table: missing column(s) {missing}; found "
            f"{list(table.columns)[:12]}{' ...' if len(table.columns) > 12 else ''}"
        )
    readings = pd.DataFrame(
        {
            "ID": table["ID"],
            "side_text": table["SIDE"],
            "side": table["SIDE"].map(_side),
            "kl_text": table[kl_column],
            "kl": table[kl_column].map(_grade),
            "barcode": table[barcode_column].map(_barcode) if barcode_column in table.columns else "",
            "readprj": table["READPRJ"] if "READPRJ" in table.columns else "",
        }
    )
    if (readings["ID"] == "").any():
        raise ValueError(f"{path}: row {int(np.flatnonzero(readings['ID'] == '')[0]) + 2}: empty ID")
    readings["knee"] = readings["side"].where(
        readings["side"].map(lambda side: isinstance(side, str)), readings["side_text"]
    )
    repeated = readings.duplicated(["ID", "knee"], keep=False)
    if repeated.any():
        groups = readings[repeated].groupby(["ID", "knee"])
        log.info(
            "%s: %d knee(s) read by several projects (READPRJ %s); the first reading is used, %d disagree on KL",
            path.name,
            groups.ngroups,
            sorted(set(readings.loc[repeated, "readprj"])),
            int(groups["kl_text"].nunique().gt(1).sum()),
        )
    return readings.drop_duplicates(["ID", "knee"], keep="first").drop(columns="knee").reset_index(drop=True)


def _walk(root: Path, depth: int):
    """Files at most ``depth`` folders below ``root`` (the image trees below are not entered)."""
    for folder, subfolders, files in os.walk(root):
        level = len(Path(folder).relative_to(root).parts)
        if level >= depth:
            subfolders[:] = []
        subfolders.sort()
        for name in sorted(files):
            yield Path(folder) / name


def archive_visit(contents: Path, oai_dir: Path) -> str:
    """Visit code of an image archive: from the nearest folder above its contents.csv named by months."""
    for folder in [contents.parent, *contents.parent.parents]:
        if folder == oai_dir or oai_dir not in folder.parents:
            break
        match = VISIT_FOLDER.search(folder.name)
        if match:
            months = int(match.group(1))
            if months not in OAI_VISITS:
                raise ValueError(
                    f"{contents}: folder {folder.name!r} names month {months}, not an OAI imaging visit "
                    f"(months {sorted(OAI_VISITS)})"
                )
            return OAI_VISITS[months]
    raise ValueError(
        f"{contents}: cannot tell the visit of this image archive; unpack each archive into a folder "
        f"named by its visit below {oai_dir}/ (00m, 12m, 24m, 36m, 48m, 72m, 96m)"
    )


def find_release(oai_dir: str | Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """The OAI release files below ``oai_dir``: ``({visit: kXR_SQ_BU file}, {visit: [contents.csv, ...]})``.
    A visit's ASCII table is preferred to its SAS one; two of the same kind are an error."""
    oai_dir = Path(oai_dir)
    readings: dict[str, Path] = {}
    archives: dict[str, list[Path]] = {}
    for path in _walk(oai_dir, SEARCH_DEPTH):
        match = READINGS_FILE.match(path.name)
        if match:
            visit, kind = match.group(1), match.group(2).lower()
            other = readings.get(visit)
            if other is not None and other.suffix.lower() == f".{kind}":
                raise ValueError(f"two readings tables for visit {visit}: {other} and {path}; keep one")
            if other is None or kind == "txt":
                readings[visit] = path
        elif path.name.lower() == "contents.csv":
            archives.setdefault(archive_visit(path, oai_dir), []).append(path)
    return readings, archives


def read_contents(path: str | Path) -> pd.DataFrame:
    """The bilateral PA knee radiographs an image archive's contents.csv lists: ``ID, dicom, barcode`` (the
    DICOM ``<Folder>/001`` as found below the archive's folder, also where the archive nests its visit folder)."""
    path = Path(path)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.columns = [column.strip() for column in table.columns]
    missing = [column for column in ("Folder", "ParticipantID", "SeriesDescription") if column not in table.columns]
    if missing:
        raise ValueError(
            f"{path}: not an OAI image archive's contents.csv: missing column(s) {missing}; found {list(table.columns)}"
        )
    knees = table[table["SeriesDescription"].str.strip().str.casefold() == BILATERAL_PA.casefold()]
    barcode = next((column for column in ("Barcode", "AccessionNumber") if column in table.columns), None)
    bases = [path.parent]
    while (bases[-1] / bases[-1].name).is_dir():  # e.g. 48m/48m/48m
        bases.append(bases[-1] / bases[-1].name)

    def dicom(folder: str) -> Path:
        candidates = [base / folder.strip().strip("/") / DICOM_NAME for base in bases]
        return next((candidate for candidate in candidates if candidate.is_file()), candidates[0])

    return pd.DataFrame(
        {
            "ID": knees["ParticipantID"].map(_text),
            "dicom": knees["Folder"].map(dicom),
            "barcode": knees[barcode].map(_barcode) if barcode else "",
        }
    ).reset_index(drop=True)


def oai_knees(data_dir: str | Path) -> tuple[pd.DataFrame, dict[str, int]] | None:
    """The rows of ``knees.csv`` for the OAI release below ``data_dir/oai/`` (None when it holds none): one per
    knee and visit with a KL grade 0-4 and a bilateral PA radiograph, ``file`` relative to ``data_dir``,
    ``partition`` empty (the paper's split is not published). Also the knees left out, by reason."""
    data_dir = Path(data_dir)
    oai_dir = data_dir / OAI_DIR
    if not oai_dir.is_dir():
        return None
    readings, archives = find_release(oai_dir)
    if not readings and not archives:
        return None
    if not readings:
        raise FileNotFoundError(
            f"{oai_dir}: found image archives ({', '.join(str(p) for v in archives.values() for p in v)}) but no "
            "kXR_SQ_BU<visit>.txt (X-Ray Image Assessments, Semi-Quant Scoring) with the KL grades; put them into "
            f"{oai_dir}/ (see docs/datasets.md, T8)"
        )
    if not archives:
        raise FileNotFoundError(
            f"{oai_dir}: found {', '.join(p.name for p in readings.values())} but no image archive: unpack each "
            f"archive (its contents.csv and image folders) into a folder named by its visit below {oai_dir}/ (00m, 12m, ...)"
        )
    excluded: Counter = Counter()
    rows = []
    for visit in sorted(readings):
        knees = read_readings(readings[visit], visit)
        if visit not in archives:
            log.warning("%s: no image archive for visit %s (its knees are left out)", readings[visit], visit)
            excluded["OAI: no image archive for the visit"] += len(knees)
            continue
        images: dict[str, list[tuple[Path, str]]] = {}
        for contents in archives[visit]:
            for image in read_contents(contents).itertuples():
                images.setdefault(image.ID, []).append((image.dicom, image.barcode))
        for knee in knees.itertuples():
            if not isinstance(knee.side, str):
                excluded["OAI: SIDE not 1 (right) or 2 (left)"] += 1
                continue
            if not isinstance(knee.kl, str):
                reason = "no KL grade" if _leading_number(knee.kl_text) is None else "KL grade not 0-4"
                excluded[f"OAI: {reason}"] += 1
                continue
            candidates = images.get(knee.ID, [])
            if not candidates:
                excluded["OAI: no bilateral PA radiograph at the visit"] += 1
                continue
            dicom = next((d for d, barcode in candidates if knee.barcode and barcode == knee.barcode), candidates[0][0])
            if not dicom.is_file():
                excluded["OAI: radiograph file missing"] += 1
                continue
            rows.append(
                {
                    "file": dicom.relative_to(data_dir).as_posix(),
                    "patient_id": knee.ID,
                    "side": knee.side,
                    "kl": knee.kl,
                    "source": "oai",
                    "partition": "",
                    "visit": visit,
                    "origin": FROM_OAI_RELEASE,
                }
            )
    unread = sorted(set(archives) - set(readings))
    if unread:
        log.warning("image archives of visit(s) %s have no kXR_SQ_BU file: their radiographs have no KL grade", unread)
    table = pd.DataFrame(rows, columns=KNEE_COLUMNS + ["visit", "origin"])
    log.info(
        "OAI release in %s: %d knee(s) of %d patient(s) over visit(s) %s; left out: %s",
        oai_dir,
        len(table),
        table["patient_id"].nunique(),
        sorted(set(table["visit"])),
        dict(excluded) or "none",
    )
    return table, dict(excluded)


# ---- all knees of the task ---------------------------------------------------------------------------------

LANDMARKS_NOTE = (
    "Landmarks come from KNEEL (`landmarks: kneel`) or your own file (`landmarks: <path>`); see docs/datasets.md (T8)."
)


def missing_files_message(data_dir: Path) -> str:
    recipe = RECIPE
    folder = data_dir.resolve()
    return "\n".join(
        [
            f"Dataset {recipe.name!r} ({recipe.title}) is not available: neither {KNEES} nor the OAI release in "
            f"{OAI_DIR}/ is in {data_dir}/.",
            f"Access: {recipe.access}",
            f"Put one or both of these into {folder}/ and rerun:",
            f"  1. the OAI release as downloaded, below {OAI_DIR}/ (the recipe lists every knee and visit itself):",
            f"     - {OAI_DIR}/<visit>/contents.csv and the image folders it names: each image archive unpacked into a "
            "folder named by its visit (00m, 12m, 24m, 36m, 48m, 72m, 96m); a radiograph is <visit>/<Folder>/001",
            f"     - {OAI_DIR}/kXR_SQ_BU<visit>.txt, the KL readings (X-Ray Image Assessments, ASCII; visits 00 01 03 05 "
            "06 08 10), or the kxr_sq_bu<visit>.sas7bdat files of the SAS release (up to three folders deep)",
            f"  2. {KNEES}, a table you make (MOST, or everything): one row per knee: file, patient_id, side, kl, "
            "source, partition[, spacing_row, spacing_col], with the radiographs it names below the same folder",
            LANDMARKS_NOTE,
        ]
    )


def _user_knees(data_dir: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows of ``knees.csv`` with a KL grade 0-4 (``kl`` as ``0``-``4``) and the rows left out, by reason:
    as the authors drop knees without a valid grade (``cat >= 5``), a missing grade or a code such as MOST's 8
    or 9 leaves the knee out."""
    path = data_dir / KNEES
    knees = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [column for column in KNEE_COLUMNS if column not in knees.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(knees.columns)}")
    grades = knees["kl"].map(lambda value: _grade(_text(value)))
    valid = grades.map(lambda grade: isinstance(grade, str)).astype(bool)
    reasons = Counter(
        "knees.csv: no KL grade" if _leading_number(_text(value)) is None else "knees.csv: KL grade not 0-4"
        for value in knees.loc[~valid, "kl"]
    )
    if reasons:
        log.warning("%s: %d knee(s) without a KL grade 0-4 left out (%s)", path, int((~valid).sum()), dict(reasons))
    knees = knees[valid].assign(kl=grades[valid]).reset_index(drop=True)
    knees["origin"] = FROM_KNEES_CSV
    return knees, dict(reasons)


def knee_table(data_dir: str | Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """Every knee of the task: the rows of ``knees.csv`` and those of the OAI release (:func:`oai_knees`), with
    the knees left out by reason. Raises :class:`MissingDataError` (naming both options) when there is neither."""
    data_dir = Path(data_dir)
    parts, excluded = [], {}
    if (data_dir / KNEES).exists():
        user, excluded = _user_knees(data_dir)
        parts.append(user)
    release = oai_knees(data_dir)
    if release is not None:
        if parts and (parts[0]["source"] == "oai").any():
            raise ValueError(
                f"{data_dir / KNEES} has rows with source 'oai' and {data_dir / OAI_DIR}/ holds the OAI release, from "
                f"which the recipe lists the OAI knees itself: remove those rows from {KNEES} (keep MOST's), or take "
                f"the release's tables (kXR_SQ_BU*, contents.csv) out of {OAI_DIR}/ to use your own OAI rows"
            )
        parts.append(release[0])
        excluded.update(release[1])
    if not parts:
        raise MissingDataError(missing_files_message(data_dir))
    return pd.concat(parts, ignore_index=True).fillna(""), excluded


def prepare(
    data_dir: str | Path, knees_out: str | Path, receipt: str | Path, checksums: dict[str, str] | None = None
) -> dict:
    """Rule ``oai_most_files`` (instead of ``download_dataset`` for this dataset): check the files, write
    :func:`knee_table` to ``knees_out`` and a receipt (SHA-256 of knees.csv and the release's tables, checked
    against ``checksums`` pinned in the config; every knee counted), each atomically."""
    data_dir = Path(data_dir)
    checksums = checksums or {}
    table, excluded = knee_table(data_dir)
    tables = [data_dir / KNEES] if (data_dir / KNEES).exists() else []
    if (data_dir / OAI_DIR).is_dir():
        readings, archives = find_release(data_dir / OAI_DIR)
        tables += sorted(readings.values()) + sorted(p for paths in archives.values() for p in paths)
    files = {}
    for path in tables:
        name = path.relative_to(data_dir).as_posix()
        digest = verify(path, sha256=checksums.get(name))
        files[name] = {"sha256": digest, "pinned": name in checksums}
    with atomic_path(knees_out) as temporary:
        table.to_csv(temporary, index=False, lineterminator="\n")
    result = {
        "dataset": RECIPE.name,
        "data_dir": str(data_dir),
        "files": files,
        "knees": int(len(table)),
        "knees_by_origin": {k: int(v) for k, v in table["origin"].value_counts().items()},
        "excluded": excluded,
    }
    write_text_atomic(receipt, json.dumps(result, indent=2) + "\n")
    log.info("%d knee(s) -> %s (%s)", len(table), knees_out, result["knees_by_origin"])
    return result


# ---- the raw table -----------------------------------------------------------------------------------------


def _read_pixels(path: Path, row: pd.Series) -> tuple[np.ndarray, tuple[float, float]]:
    if path.suffix.lower() in (".dcm", ".dicom", "") and path.exists():
        return kneel.read_dicom(path)
    spacing = (float(row["spacing_row"]), float(row["spacing_col"]))
    return np.asarray(Image.open(path)), spacing


def convert(
    data_dir: Path, out_dir: Path, classes: list[str], landmarks: Path | None = None, undetected: Path | None = None
) -> pd.DataFrame:
    """T8's raw table: a 140 mm crop (written below ``out_dir/images/``) of every knee with landmarks, the user's
    ready-made crops, and in ``attrs["excluded"]`` the knees left out by reason.

    ``landmarks`` are KNEEL's or the user's (else ``landmarks.csv`` next to ``knees.csv``); ``undetected``
    KNEEL's list of the knees it found no joint for."""
    knees, excluded = knee_table(data_dir)
    landmarks = landmarks if landmarks is not None else _default_landmarks(data_dir)
    table = kneel.read_landmarks(landmarks)
    points = {key: group[["x", "y"]].to_numpy(float) for key, group in table.groupby(["file", "side"])}
    missed = set()
    if undetected is not None:
        missed = set(map(tuple, kneel.read_undetected(undetected)[["file", "side"]].to_numpy().tolist()))
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows, left_out = [], Counter()
    for _, knee in knees.iterrows():
        row, reason = _knee_row(knee, data_dir, out_dir, points, missed)
        if reason is not None:
            left_out[reason] += 1
        else:
            rows.append(row)
    for reason, where in ((NO_JOINT, undetected), (NO_LANDMARKS, landmarks)):
        if left_out[reason]:
            log.warning("%d knee(s) left out: %s (%s)", left_out[reason], reason, where)
            excluded[reason] = left_out[reason]
    raw = pd.DataFrame(rows)
    if excluded:
        raw.attrs["excluded"] = excluded
    return raw


def _knee_row(
    knee: pd.Series,
    data_dir: Path,
    out_dir: Path,
    points: dict[tuple[str, str], np.ndarray],
    undetected: set[tuple[str, str]],
) -> tuple[dict[str, str] | None, str | None]:
    """One knee's row of the raw table (its crop written when it has landmarks), or the reason it is left out."""
    side = knee["side"].strip().upper()[:1]
    if side not in ("R", "L"):
        raise ValueError(f"{data_dir / KNEES}: file {knee['file']}: side must be R or L, got {knee['side']!r}")
    key = (knee["file"], side)
    source_path = data_dir / knee["file"]
    image_id = f"{knee['source']}_{Path(knee['file']).with_suffix('').as_posix().replace('/', '_')}_{side}"
    if key in points:
        pixels, spacing = _read_pixels(source_path, knee)
        crop = kneel.crop_knee(pixels, kneel.joint_centre(points[key]), spacing, side)
        target = out_dir / "images" / f"{image_id}.png"
        Image.fromarray(
            crop.astype(np.uint16) if crop.dtype.kind in "iu" and crop.max() > 255 else crop.astype(np.uint8)
        ).save(target)
        file = relative_file(target, out_dir)
    elif key in undetected:
        return None, NO_JOINT
    elif knee["origin"] == FROM_OAI_RELEASE:  # a whole bilateral radiograph: never a crop
        return None, NO_LANDMARKS
    else:  # a crop the user made already
        file = relative_file(source_path, out_dir)
    return {
        "image_id": image_id,
        "file": file,
        "patient_id": f"{knee['source']}_{knee['patient_id']}",
        "label": knee["kl"],
        "source": knee["source"],
        "partition": knee["partition"],
    }, None


def _default_landmarks(data_dir: Path) -> Path:
    """``landmarks.csv`` next to ``knees.csv``, for a task that names no landmarks."""
    if (data_dir / LANDMARKS).exists():
        return data_dir / LANDMARKS
    raise FileNotFoundError(
        f"no knee landmarks for the knees of {data_dir}: the task names none (`landmarks: kneel` runs KNEEL, "
        f"`landmarks: <your file>` takes yours) and {data_dir / LANDMARKS} does not exist; see docs/datasets.md (T8)"
    )


RECIPE = register(
    Dataset(
        name="oai_most",
        title="Osteoarthritis Initiative (OAI) + Multicenter Osteoarthritis Study (MOST)",
        licence="OAI and MOST data-use agreements (no redistribution)",
        access="OAI: https://nda.nih.gov/oai (NIMH Data Archive account and data-use certification); MOST: "
        "https://agingresearchbiobank.nia.nih.gov (NIA request)",
        sources=(
            Source(
                KNEES,
                description="one row per knee: file, patient_id, side, kl, source, partition[, spacing_row, spacing_col]",
            ),
        ),
        convert=convert,
        inputs=("landmarks", "undetected"),
        expected={"total": {"images": 66089}},
        manual_note=f"Instead of (or next to) {KNEES}, the OAI release as downloaded can go below {OAI_DIR}/: the image "
        "archives, each in a folder named by its visit (00m, 12m, ...), and the kXR_SQ_BU<visit>.txt readings; the "
        "workflow (rule oai_most_files) then lists the OAI knees itself. Radiographs named in knees.csv go below the "
        f"same folder. {LANDMARKS_NOTE}",
    )
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="T8: check the OAI/MOST files and list every knee (rule oai_most_files)"
    )
    parser.add_argument("--data-dir", required=True, help="resources/datasets/oai_most")
    parser.add_argument("--knees-out", required=True, help=f"the knee list to write ({KNEES_ALL})")
    parser.add_argument("--receipt", required=True, help="the receipt to write (download.json)")
    parser.add_argument("--checksums", default="{}", help="JSON: file name below the data folder -> pinned SHA-256")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger("medprobe").addHandler(handler)
    logging.getLogger("medprobe").setLevel(logging.INFO)
    prepare(args.data_dir, args.knees_out, args.receipt, json.loads(args.checksums))


if __name__ == "__main__":
    main()

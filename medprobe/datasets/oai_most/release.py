"""The OAI release as downloaded, below ``oai/``: the KL readings, the image archives, and the knees they list.

Where the layouts come from (public code that reads the releases): Oulu-IMEDS/KNEEL
``create_train_dataset_from_oai.py`` (contents.csv, the series description, ``<Folder>/001``, one reading per
knee), Oulu-IMEDS/OAProgression ``oaprogression/metadata/oai.py`` (visits 00 01 03 05 08 10, one reading per
knee), epierson9/pain-disparities ``image_processing.py`` and ``non_image_data_processing.py`` (visit folders
``00m`` ... ``96m``, pipe separators, ``SIDE`` 1/2, ``READPRJ``, ``BARCDBU`` barcodes with the leading zero
lost, ``Barcode``/``AccessionNumber`` in contents.csv).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from medprobe.datasets.oai_most.layout import FROM_OAI_RELEASE, KNEE_COLUMNS, OAI_DIR

log = logging.getLogger("medprobe.datasets.oai_most")

BILATERAL_PA = "Bilateral PA Fixed Flexion Knee"
DICOM_NAME = "001"
# Image archive folder (months) -> visit code of the kXR_SQ_BU files (V00 baseline, V01 12 months, ...).
OAI_VISITS = {0: "00", 12: "01", 18: "02", 24: "03", 30: "04", 36: "05", 48: "06", 72: "08", 96: "10"}
READINGS_FILE = re.compile(r"^kxr_sq_bu(\d\d)\.(txt|sas7bdat)$", re.IGNORECASE)
VISIT_FOLDER = re.compile(r"(\d{2,3})m$", re.IGNORECASE)
SEARCH_DEPTH = 3  # the release's tables and contents.csv are looked for at most this many folders below oai/
# The release's knees as rows of knees.csv, with the visit and where they were listed
RELEASE_COLUMNS = KNEE_COLUMNS + ["visit", "origin"]


def cell_text(value: object) -> str:
    """A cell as text: SAS bytes decoded, blanks and NaN empty, integral floats without ``.0``."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    text = str(value).strip()
    return text[: text.index(".")] if re.fullmatch(r"-?\d+\.0+", text) else text


def leading_number(text: str) -> float | None:
    """The code of an OAI value: ``2``, ``2.0`` or ``2: Grade 2`` -> 2.0; missing codes (``.``, ``.A: ...``) -> None."""
    match = re.match(r"^(-?\d+(?:\.\d+)?)\s*(?::|$)", text)
    return float(match.group(1)) if match else None


def kl_grade(text: str) -> str | None:
    number = leading_number(text)
    return str(int(number)) if number is not None and number in (0, 1, 2, 3, 4) else None


def _side(text: str) -> str | None:
    number = leading_number(text)
    if number is not None:
        return {1.0: "R", 2.0: "L"}.get(number)
    return text[:1].upper() if text[:1].upper() in ("R", "L") else None  # "Right", "Left"


def _barcode(text: str) -> str:
    """Last 7 digits: the releases write the 12-digit barcode (``016600839603``) with or without its leading
    zero, with a prefix or cut to its last digits; the last 7 identify the radiograph."""
    digits = re.sub(r"\D", "", cell_text(text))
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
    table.columns = [cell_text(column).upper() for column in table.columns]
    return table.map(cell_text)


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
            "kl": table[kl_column].map(kl_grade),
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
            "ID": knees["ParticipantID"].map(cell_text),
            "dicom": knees["Folder"].map(dicom),
            "barcode": knees[barcode].map(_barcode) if barcode else "",
        }
    ).reset_index(drop=True)


def oai_knees(data_dir: str | Path) -> tuple[pd.DataFrame, dict[str, int]] | None:
    """The rows of ``knees.csv`` for the OAI release below ``data_dir/oai/`` (None when it holds none): one per
    knee and visit with a KL grade 0-4 and a bilateral PA radiograph, ``file`` relative to ``data_dir``,
    ``partition`` empty (the paper's split is not published). Also the knees left out, by reason."""
    data_dir = Path(data_dir)
    release = _complete_release(data_dir / OAI_DIR)
    if release is None:
        return None
    readings, archives = release
    excluded: Counter = Counter()
    rows = []
    for visit in sorted(readings):
        knees = read_readings(readings[visit], visit)
        if visit not in archives:
            log.warning("%s: no image archive for visit %s (its knees are left out)", readings[visit], visit)
            excluded["OAI: no image archive for the visit"] += len(knees)
            continue
        images = _visit_radiographs(archives[visit])
        for knee in knees.itertuples():
            row, reason = _knee_row(knee, visit, images, data_dir)
            if reason is not None:
                excluded[reason] += 1
            else:
                rows.append(row)
    unread = sorted(set(archives) - set(readings))
    if unread:
        log.warning("image archives of visit(s) %s have no kXR_SQ_BU file: their radiographs have no KL grade", unread)
    table = pd.DataFrame(rows, columns=RELEASE_COLUMNS)
    log.info(
        "OAI release in %s: %d knee(s) of %d patient(s) over visit(s) %s; left out: %s",
        data_dir / OAI_DIR,
        len(table),
        table["patient_id"].nunique(),
        sorted(set(table["visit"])),
        dict(excluded) or "none",
    )
    return table, dict(excluded)


def _complete_release(oai_dir: Path) -> tuple[dict[str, Path], dict[str, list[Path]]] | None:
    """:func:`find_release` of ``oai_dir``; None when it holds no release, an error when half of one."""
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
    return readings, archives


def _visit_radiographs(contents_files: list[Path]) -> dict[str, list[tuple[Path, str]]]:
    """Participant ID -> the ``(DICOM, barcode)`` of each bilateral PA radiograph of one visit's archives."""
    images: dict[str, list[tuple[Path, str]]] = {}
    for contents in contents_files:
        for image in read_contents(contents).itertuples():
            images.setdefault(image.ID, []).append((image.dicom, image.barcode))
    return images


def _knee_row(
    knee: tuple, visit: str, images: dict[str, list[tuple[Path, str]]], data_dir: Path
) -> tuple[dict[str, str] | None, str | None]:
    """One reading's row of ``knees.csv``: the radiograph read (by barcode, else the visit's first), or the
    reason the knee is left out."""
    if not isinstance(knee.side, str):
        return None, "OAI: SIDE not 1 (right) or 2 (left)"
    if not isinstance(knee.kl, str):
        return None, "OAI: " + ("no KL grade" if leading_number(knee.kl_text) is None else "KL grade not 0-4")
    candidates = images.get(knee.ID, [])
    if not candidates:
        return None, "OAI: no bilateral PA radiograph at the visit"
    dicom = next((d for d, barcode in candidates if knee.barcode and barcode == knee.barcode), candidates[0][0])
    if not dicom.is_file():
        return None, "OAI: radiograph file missing"
    values = [dicom.relative_to(data_dir).as_posix(), knee.ID, knee.side, knee.kl, "oai", "", visit, FROM_OAI_RELEASE]
    return dict(zip(RELEASE_COLUMNS, values)), None

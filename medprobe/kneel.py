"""Knee crops for T8: 140 mm x 140 mm around each joint, from landmarks and the radiograph's pixel spacing.

KNEEL (Tiulpin et al. 2019) localises the joints; it runs the upstream hourglass models in their own conda
environment (``envs/kneel.yaml``) and is not reimplemented here. This module owns the geometry:

* the joint centre is the mean of the landmarks KNEEL (or the user) gives for one knee;
* the crop is ``size_mm`` wide and high: ``size_mm / column_spacing`` by ``size_mm / row_spacing`` pixels
  (DICOM ``PixelSpacing`` is [row spacing, column spacing] in mm), centred on the joint; parts outside the
  image are filled with zeros;
* flip policy: on a posterior-anterior bilateral radiograph the patient's right knee is on the image's left.
  Left knees are mirrored horizontally so that every crop shows the knee as a right knee (lateral side on the
  image's left), the convention of KNEEL and of the OAI/MOST KL-grading literature.

The centre is the mean of all the landmarks given for a knee. KNEEL gives 16 per knee (9 tibial, then 7
femoral, along the joint line); its own 140 mm ROIs are centred on the middle tibial landmark (index 4), which
lies a few millimetres from the mean - well inside the tolerance of a 140 mm crop.

Running KNEEL: ``workflow/scripts/kneel_landmarks.py`` builds the upstream pipeline in KNEEL's own environment
(``envs/kneel.yaml``: Python 3.7, numpy and pandas, medprobe not installed) and hands its ``predict`` to
:func:`annotate`, which runs it on every radiograph of ``knees_all.csv`` (the task's knees, listed by
:mod:`medprobe.datasets.oai_most`) and writes ``landmarks.csv`` (``file, side, landmark, x, y``, pixels of the
original image) and ``landmarks_undetected.csv`` (``file, side, reason``). The script imports this module from
the source tree, so it must stay importable there: Python 3.7 syntax and library, numpy and pandas only at
import time (tests/test_kneel.py checks the syntax). :func:`fetch_snapshots` downloads the released model
snapshots the pipeline needs.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("medprobe.kneel")

CROP_MM = 140.0

# The released KNEEL models (README and fetch_snapshots.sh of github.com/Oulu-IMEDS/KNEEL): one archive that
# unpacks into snapshots_release/ with the shared normalisation statistics and two 5-fold snapshots, the
# low-cost ROI localiser (lc) and the high-cost landmark localiser (hc), each with fold_*.pth and session.pkl.
SNAPSHOTS_URL = "http://mipt-ml.oulu.fi/models/KNEEL/snapshots_release.tar.xz"
SNAPSHOTS_ARCHIVE = "snapshots_release.tar.xz"
SNAPSHOTS_DIR = "snapshots_release"
LC_SNAPSHOT = "lext-devbox_2019_07_14_16_04_41"
HC_SNAPSHOT = "lext-devbox_2019_07_14_19_25_40"
MEAN_STD = "mean_std.npy"

LANDMARK_COLUMNS = ["file", "side", "x", "y"]  # what a landmarks.csv needs; KNEEL's also has `landmark`
KNEEL_COLUMNS = ["file", "side", "landmark", "x", "y"]
UNDETECTED_COLUMNS = ["file", "side", "reason"]
SIDES = ("R", "L")  # the order of KNEEL's output: the patient's right knee (the image's left half), then the left


def joint_centre(landmarks: np.ndarray) -> tuple[float, float]:
    """Mean (x, y) of a knee's landmarks, shape (K, 2) in pixels."""
    points = np.asarray(landmarks, dtype=float).reshape(-1, 2)
    if len(points) == 0 or not np.isfinite(points).all():
        raise ValueError(f"joint landmarks must be finite (x, y) pairs; got {landmarks!r}")
    x, y = points.mean(axis=0)
    return float(x), float(y)


def crop_box(
    centre: tuple[float, float], spacing: tuple[float, float], size_mm: float = CROP_MM
) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixel box of ``size_mm`` around ``centre``; ``spacing`` = (row mm, column mm)."""
    row_mm, column_mm = (float(value) for value in spacing)
    if row_mm <= 0 or column_mm <= 0:
        raise ValueError(f"pixel spacing must be positive (mm per pixel); got {spacing!r}")
    width, height = int(round(size_mm / column_mm)), int(round(size_mm / row_mm))
    x0 = int(round(centre[0] - width / 2))
    y0 = int(round(centre[1] - height / 2))
    return x0, y0, x0 + width, y0 + height


def crop_knee(
    image: np.ndarray, centre: tuple[float, float], spacing: tuple[float, float], side: str, size_mm: float = CROP_MM
) -> np.ndarray:
    """Crop one knee (zero padding outside the image); left knees are mirrored (see the module's flip policy)."""
    side = side.upper()[:1]
    if side not in ("L", "R"):
        raise ValueError(f"knee side must be L or R; got {side!r}")
    x0, y0, x1, y1 = crop_box(centre, spacing, size_mm)
    out = np.zeros((y1 - y0, x1 - x0) + image.shape[2:], dtype=image.dtype)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x1, image.shape[1]), min(y1, image.shape[0])
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out[:, ::-1].copy() if side == "L" else out


def read_dicom(path: str | Path) -> tuple[np.ndarray, tuple[float, float]]:
    """Pixel array and (row, column) spacing in mm of a radiograph (PixelSpacing, else ImagerPixelSpacing)."""
    try:
        import pydicom
    except ImportError as error:
        raise ImportError("reading OAI/MOST DICOM files needs pydicom (pip install pydicom)") from error
    dataset = pydicom.dcmread(str(path))
    spacing = getattr(dataset, "PixelSpacing", None) or getattr(dataset, "ImagerPixelSpacing", None)
    if spacing is None:
        raise ValueError(f"{path}: neither PixelSpacing nor ImagerPixelSpacing is set; cannot crop 140 mm")
    pixels = dataset.pixel_array
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = pixels.max() - pixels
    return pixels, (float(spacing[0]), float(spacing[1]))


def check_snapshots(folder: str | Path) -> dict[str, Path]:
    """The KNEEL snapshot paths below ``folder`` (``snapshots_release/``); raises naming what is missing."""
    folder = Path(folder)
    paths = {"lc": folder / LC_SNAPSHOT, "hc": folder / HC_SNAPSHOT, "mean_std": folder / MEAN_STD}
    missing = [str(paths["mean_std"])] if not paths["mean_std"].is_file() else []
    for key in ("lc", "hc"):
        if not (paths[key] / "session.pkl").is_file():
            missing.append(str(paths[key] / "session.pkl"))
        if not list(paths[key].glob("fold_*.pth")):
            missing.append(str(paths[key] / "fold_*.pth"))
    if missing:
        raise FileNotFoundError(
            f"{folder}: not a KNEEL snapshot folder, missing {missing}. Unpack {SNAPSHOTS_URL} there "
            f"(it holds {SNAPSHOTS_DIR}/{MEAN_STD}, {SNAPSHOTS_DIR}/{LC_SNAPSHOT}/, {SNAPSHOTS_DIR}/{HC_SNAPSHOT}/)"
        )
    return paths


def fetch_snapshots(folder: str | Path, url: str = SNAPSHOTS_URL, sha256: str | None = None) -> dict[str, Path]:
    """Download (resumable, checksum-verified when ``sha256`` is pinned) and unpack the KNEEL snapshots so that
    ``folder`` (named ``snapshots_release``) holds them; the archive stays next to it. Returns the paths."""
    import shutil

    from medprobe.download import download, safe_extract

    folder = Path(folder)
    if folder.name != SNAPSHOTS_DIR:
        raise ValueError(f"{folder}: the KNEEL archive unpacks into a folder named {SNAPSHOTS_DIR}")
    if folder.exists():
        raise FileExistsError(f"{folder} exists already; remove it to unpack the snapshots again")
    archive = folder.parent / SNAPSHOTS_ARCHIVE
    digest = download(url, archive, sha256=sha256)
    staging = folder.parent / f".{SNAPSHOTS_DIR}.unpack"  # unpacked aside, moved into place only when complete
    shutil.rmtree(staging, ignore_errors=True)
    safe_extract(archive, staging)
    check_snapshots(staging / SNAPSHOTS_DIR)
    os.replace(staging / SNAPSHOTS_DIR, folder)
    shutil.rmtree(staging)
    log.info("KNEEL snapshots (sha256 %s of %s) unpacked into %s", digest, archive.name, folder)
    return check_snapshots(folder)


def _side(value: str) -> str:
    return str(value).strip().upper()[:1]


def read_landmarks(path: str | Path) -> pd.DataFrame:
    """A ``landmarks.csv`` (``file, side, x, y`` and optional extra columns such as ``landmark``), checked:
    sides ``R``/``L`` and finite pixel coordinates. Read as every user table is
    (:func:`medprobe.user_tables.read_csv`: UTF-8, file names stripped, indexed by line number; a header without
    rows is allowed: ready-made crops need no landmarks). Raises ``ValueError`` naming the file, line, column and
    value."""
    from medprobe.user_tables import UserTableError, at, read_csv  # not importable in KNEEL's Python 3.7

    path = Path(path)
    table = read_csv(
        path, LANDMARK_COLUMNS, files=["file"], identifiers=["side"], allow_no_rows=True, what="landmarks table"
    )
    sides = table["side"].map(_side)
    bad_side = table.index[~sides.isin(["R", "L"])]
    if len(bad_side):
        line = bad_side[0]
        raise UserTableError(f"{at(path, line, 'side')}: side must be R or L, got {table.at[line, 'side']!r}")
    table["side"] = sides
    for column in ("x", "y"):
        values = pd.to_numeric(table[column].map(str.strip), errors="coerce")
        bad = table.index[~np.isfinite(values.to_numpy(float))]
        if len(bad):
            value = table.at[bad[0], column]
            raise UserTableError(
                f"{at(path, bad[0], column)}: {column} must be a finite number of pixels, got {value!r}"
            )
        table[column] = values.astype(float)
    return table


def read_undetected(path: str | Path) -> pd.DataFrame:
    """KNEEL's ``landmarks_undetected.csv`` (``file, side, reason``): the knees it found no joint for."""
    path = Path(path)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [column for column in UNDETECTED_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(table.columns)}")
    table["side"] = table["side"].map(_side)
    return table


# ---- running KNEEL (imported by workflow/scripts/kneel_landmarks.py in KNEEL's Python 3.7 environment) --------


def read_knee_list(path: str | Path) -> list[tuple[str, list[str]]]:
    """Radiographs of a knee list (``file, side, ...``: knees.csv, knees_all.csv) in first-seen order, each with
    the sides asked for."""
    order: list[str] = []
    sides: dict[str, list[str]] = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in ("file", "side") if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        for number, row in enumerate(reader, start=2):
            side = _side(row["side"] or "")
            if side not in SIDES:
                raise ValueError(f"{path}: row {number}: side must be R or L, got {row['side']!r}")
            if row["file"] not in sides:
                order.append(row["file"])
                sides[row["file"]] = []
            if side not in sides[row["file"]]:
                sides[row["file"]].append(side)
    return [(file, sides[file]) for file in order]


def dicom_size(path: str | Path) -> tuple[int, int] | None:
    """(columns, rows) from a DICOM header, or None when pydicom cannot tell."""
    try:
        import pydicom

        header = pydicom.dcmread(str(path), stop_before_pixels=True)
        return int(header.Columns), int(header.Rows)
    except Exception:  # the bounds check is a safeguard only; KNEEL itself decides what it can read
        return None


def knee_results(path: str | Path, predict: Callable, image_size: Callable | None = None) -> dict[str, tuple]:
    """KNEEL's answer for both knees of one radiograph, by side: ``("ok", [[x, y], ...])`` or ``("undetected",
    reason)``. ``predict(path)`` is None when KNEEL cannot read the file, else an array (1, 2, 16, 2) of (x, y)
    pixels; ``image_size`` (default :func:`dicom_size`) bounds the joint centre."""
    if not os.path.isfile(path):
        return {side: ("undetected", "file not found") for side in SIDES}
    try:
        landmarks = predict(str(path))
    except Exception as error:  # one bad radiograph must not stop the others; it is reported
        reason = f"KNEEL failed: {type(error).__name__}: {error}".replace("\n", " ")
        return {side: ("undetected", reason) for side in SIDES}
    if landmarks is None:
        return {
            side: ("undetected", "KNEEL could not read it (not a DICOM with pixel data and spacing?)") for side in SIDES
        }
    points = np.asarray(landmarks, dtype=float)
    if points.ndim == 4 and points.shape[0] == 1:
        points = points[0]
    if points.ndim != 3 or points.shape[0] != 2 or points.shape[2] != 2:
        reason = f"unexpected KNEEL output of shape {list(np.shape(landmarks))}"
        return {side: ("undetected", reason) for side in SIDES}
    size = (image_size or dicom_size)(path)
    return {side: _knee_result(points[index], size) for index, side in enumerate(SIDES)}


def _knee_result(knee: np.ndarray, size: tuple[int, int] | None) -> tuple:
    if not np.isfinite(knee).all():
        return ("undetected", "no joint found")
    x, y = joint_centre(knee)
    if size is not None and not (0 <= x < size[0] and 0 <= y < size[1]):
        return ("undetected", f"joint centre ({x:.0f}, {y:.0f}) outside the {size[0]}x{size[1]} image")
    return ("ok", knee.tolist())


def annotate(
    knees: Sequence[tuple[str, list[str]]],
    data_dir: str | Path,
    predict: Callable,
    landmarks: str | Path,
    undetected: str | Path,
    settings: dict | None = None,
    image_size: Callable | None = None,
) -> tuple[int, int]:
    """Run ``predict`` (KNEEL's pipeline) once per radiograph of ``knees`` (paths below ``data_dir``) and write
    ``landmarks`` (:data:`KNEEL_COLUMNS`, one row per landmark of each requested knee) and ``undetected``
    (:data:`UNDETECTED_COLUMNS`, every requested knee without a joint, also logged).

    Progress goes to ``<landmarks>.progress.jsonl``: a run interrupted with the same ``settings`` resumes where it
    stopped and ends with the same files as an uninterrupted one. Returns (knees found, knees undetected)."""
    progress_path = f"{landmarks}.progress.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(landmarks)), exist_ok=True)
    done = _read_progress(progress_path, dict(settings or {}))
    if done:
        log.info("resuming: %d of %d radiograph(s) done before", sum(file in done for file, _ in knees), len(knees))
    with open(progress_path, "a" if done else "w") as progress:
        if not done:
            progress.write(json.dumps(dict(settings or {})) + "\n")
        started = time.time()
        for number, (file, _) in enumerate(knees, start=1):
            if file in done:
                continue
            done[file] = knee_results(os.path.join(str(data_dir), file), predict, image_size)
            progress.write(json.dumps({"file": file, "results": done[file]}) + "\n")
            progress.flush()
            if number % 100 == 0:
                log.info("%d/%d radiographs (%.1f s each)", number, len(knees), (time.time() - started) / number)
    found, missed = _result_rows(knees, done)
    _write_csv(undetected, UNDETECTED_COLUMNS, missed)
    _write_csv(landmarks, KNEEL_COLUMNS, found)
    os.remove(progress_path)
    knees_found = len({(row[0], row[1]) for row in found})
    log.info("%d knee(s) with landmarks -> %s; %d without -> %s", knees_found, landmarks, len(missed), undetected)
    return knees_found, len(missed)


def _result_rows(knees: Sequence[tuple[str, list[str]]], done: dict[str, dict[str, tuple]]) -> tuple[list, list]:
    """The rows of landmarks.csv and of landmarks_undetected.csv for the requested knees, in the list's order."""
    found, missed = [], []
    for file, sides in knees:
        for side in sides:
            status, value = done[file][side]
            if status == "ok":
                found.extend([file, side, k, round(x, 2), round(y, 2)] for k, (x, y) in enumerate(value))
            else:
                missed.append([file, side, value])
                log.warning("no landmarks for %s knee %s: %s", file, side, value)
    return found, missed


def _read_progress(path: str, settings: dict) -> dict[str, dict[str, tuple]]:
    """Results of an interrupted run with the same settings: {file: results}; a torn last line is ignored."""
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        lines = handle.read().split("\n")
    try:
        if json.loads(lines[0]) != settings:
            log.info("%s was written with other settings; starting over", path)
            return {}
    except ValueError:
        return {}
    done = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        done[entry["file"]] = {side: tuple(value) for side, value in entry["results"].items()}
    return done


def _write_csv(path: str | Path, columns: list[str], rows: list) -> None:
    # Written by hand rather than with medprobe.io, which this Python 3.7 environment cannot import.
    path = os.path.abspath(path)
    temporary = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
    os.replace(temporary, path)

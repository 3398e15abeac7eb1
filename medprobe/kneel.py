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

Running KNEEL: ``workflow/scripts/kneel_landmarks.py`` (in ``envs/kneel.yaml``) calls the upstream pipeline on
every radiograph of ``knees_all.csv`` (the task's knees, listed by
:mod:`medprobe.datasets.oai_most`) and writes ``landmarks.csv`` (``file, side, landmark, x, y``, pixels of
the original image) and ``landmarks_undetected.csv`` (``file, side, reason``); :func:`fetch_snapshots`
downloads the released model snapshots it needs.
"""

from __future__ import annotations

import logging
import os
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

LANDMARK_COLUMNS = ["file", "side", "x", "y"]
UNDETECTED_COLUMNS = ["file", "side", "reason"]


def joint_centre(landmarks: np.ndarray) -> tuple[float, float]:
    """Mean (x, y) of a knee's landmarks, shape (K, 2) in pixels."""
    points = np.asarray(landmarks, dtype=float).reshape(-1, 2)
    if len(points) == 0 or not np.isfinite(points).all():
        raise ValueError(f"joint landmarks must be finite (x, y) pairs; got {landmarks!r}")
    x, y = points.mean(axis=0)
    return float(x), float(y)


def crop_box(centre: tuple[float, float], spacing: tuple[float, float], size_mm: float = CROP_MM) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixel box of ``size_mm`` around ``centre``; ``spacing`` = (row mm, column mm)."""
    row_mm, column_mm = (float(value) for value in spacing)
    if row_mm <= 0 or column_mm <= 0:
        raise ValueError(f"pixel spacing must be positive (mm per pixel); got {spacing!r}")
    width, height = int(round(size_mm / column_mm)), int(round(size_mm / row_mm))
    x0 = int(round(centre[0] - width / 2))
    y0 = int(round(centre[1] - height / 2))
    return x0, y0, x0 + width, y0 + height


def crop_knee(image: np.ndarray, centre: tuple[float, float], spacing: tuple[float, float], side: str,
              size_mm: float = CROP_MM) -> np.ndarray:
    """Crop one knee (zero padding outside the image); left knees are mirrored (see the module's flip policy)."""
    side = side.upper()[:1]
    if side not in ("L", "R"):
        raise ValueError(f"knee side must be L or R; got {side!r}")
    x0, y0, x1, y1 = crop_box(centre, spacing, size_mm)
    out = np.zeros((y1 - y0, x1 - x0) + image.shape[2:], dtype=image.dtype)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x1, image.shape[1]), min(y1, image.shape[0])
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
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


def snapshots_source(config: dict) -> tuple[str, str | None]:
    """(URL, pinned SHA-256 or None) of the snapshot archive from the workflow config's ``kneel`` section."""
    section = config.get("kneel", {})
    return section.get("snapshots_url") or SNAPSHOTS_URL, section.get("snapshots_sha256") or None


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
    sides ``R``/``L`` and finite pixel coordinates. Raises ``ValueError`` naming the file, row and value."""
    path = Path(path)
    table = pd.read_csv(path, dtype={"file": str, "side": str}, keep_default_na=False)
    missing = [column for column in LANDMARK_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(table.columns)} (expected file, side, x, y)")
    table["side"] = table["side"].map(_side)
    bad_side = table.index[~table["side"].isin(["R", "L"])]
    if len(bad_side):
        raise ValueError(f"{path}: row {bad_side[0] + 2}: side must be R or L, got {table['side'][bad_side[0]]!r}")
    for column in ("x", "y"):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = table.index[~np.isfinite(values.to_numpy(float))]
        if len(bad):
            raise ValueError(f"{path}: row {bad[0] + 2}: {column} must be a finite number of pixels, got {table[column][bad[0]]!r}")
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


def install_landmarks(source: str | Path, landmarks: str | Path, undetected: str | Path) -> int:
    """Check the user's landmark file ``source`` and copy it to ``landmarks`` (atomically), with an empty
    ``undetected`` list next to it (nothing was detected automatically). Returns the number of knees."""
    table = read_landmarks(source)
    for frame, target in ((table, landmarks), (pd.DataFrame(columns=UNDETECTED_COLUMNS), undetected)):
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        frame.to_csv(temporary, index=False, lineterminator="\n")
        os.replace(temporary, target)
    knees = int(table.groupby(["file", "side"]).ngroups)
    log.info("%s: landmarks of %d knee(s) -> %s", source, knees, landmarks)
    return knees

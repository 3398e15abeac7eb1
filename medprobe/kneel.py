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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CROP_MM = 140.0


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

"""Writing the demo's files: images with fixed encoder settings and the raw ``metadata.csv``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from medprobe.io import atomic_path

METADATA_COLUMNS = ["image_id", "file", "patient_id", "label", "labels", "source", "partition", "group"]
_JPEG_QUALITY = 92


def save_image(pixels: np.ndarray, path: Path, extension: str, sixteen_bit: bool, max_value: int) -> None:
    """Quantise a float image in [0, 1] and write it atomically with fixed encoder settings."""
    pixels = np.clip(np.nan_to_num(pixels, nan=0.0), 0.0, 1.0)
    if sixteen_bit:
        image = Image.fromarray(np.round(pixels * max_value).astype(np.uint16))  # mode I;16
    else:
        image = Image.fromarray(np.round(pixels * 255).astype(np.uint8))
    with atomic_path(path) as tmp:
        if extension == "tif":
            image.save(tmp, format="TIFF", compression="raw")
        elif extension == "png":
            # No pnginfo: Pillow then writes no tEXt/tIME chunks, so the bytes depend on the pixels only.
            image.save(tmp, format="PNG", compress_level=1, optimize=False)  # as medprobe.images: fast, ~11% larger
        elif extension == "jpg":
            image.save(tmp, format="JPEG", quality=_JPEG_QUALITY, subsampling=2, optimize=False, progressive=False)
        else:  # pragma: no cover - the task specs use these three formats only
            raise ValueError(f"{path}: unsupported extension {extension!r}")


def write_metadata(rows: list[dict[str, str]], path: Path) -> None:
    """The raw table, atomically: its presence marks a complete image folder."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=METADATA_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

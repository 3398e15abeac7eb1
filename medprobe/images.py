"""Reading and preprocessing images the same way for every dataset.

Preprocessing (Han et al., 2023): images larger than 1024 x 1024 are downsampled to fit within 1024
(aspect ratio kept) and intensities are normalised relative to the image's maximum value, which puts
16-bit radiographs and 8-bit photographs on the same 8-bit scale. Whatever comes out is what the
manifest's ``path`` points to; extraction applies nothing but the model's own processor to it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from medprobe.io import atomic_path

MAX_SIDE = 1024
# Pillow's default bomb limit (~179 Mpx) warns and only errors at twice that; we refuse anything above
# it outright, since no medical image in these datasets comes close (a 16-bit 4k x 5k radiograph is 20 Mpx).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


class BadImageError(ValueError):
    """An image cannot be read or converted; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def load_image(path: str | Path) -> Image.Image:
    """Read an image and return it as 8-bit ``L`` or ``RGB``, max-normalised and EXIF-oriented.

    Raises :class:`BadImageError` for a missing, empty, truncated or undecodable file and for a
    decompression bomb.
    """
    path = Path(path)
    if not path.exists():
        raise BadImageError(path, "file does not exist")
    if path.stat().st_size == 0:
        raise BadImageError(path, "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise BadImageError(path, f"declared size {image.width}x{image.height} exceeds {MAX_PIXELS} pixels")
                image.load()  # decode now, inside the error handling: truncated files fail here
                image = ImageOps.exif_transpose(image)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImageError(path, f"decompression bomb: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL's ways of saying "not an image"/truncated
        raise BadImageError(path, f"cannot decode image: {error}") from None
    return normalise(image)


def normalise(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit ``L`` or ``RGB``, scaling intensities by the image's maximum."""
    mode = image.mode
    if mode in ("P", "PA"):
        image = image.convert("RGBA" if "transparency" in image.info or mode == "PA" else "RGB")
    elif mode == "CMYK":
        image = image.convert("RGB")
    elif mode == "1":
        image = image.convert("L")
    if image.mode in ("RGBA", "LA"):
        # composite on black: medical images have black backgrounds; alpha carries no diagnosis
        background = Image.new(image.mode, image.size)
        image = Image.alpha_composite(background.convert("RGBA"), image.convert("RGBA"))
        image = image.convert("RGB" if image.mode == "RGBA" else "L")
    if image.mode not in ("L", "RGB", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return _normalised_uint8(array)
    return Image.fromarray(_scaled_by_maximum(array), mode="RGB" if array.ndim == 3 else "L")


def _normalised_uint8(array: np.ndarray) -> Image.Image:
    """:func:`_scaled_by_maximum` of an 8-bit image through a 256-entry table: each value maps as the float64
    path maps it (the same expression per value; tested for every maximum), without float64 copies of the
    image (a third of prepare's time on the demo's images)."""
    mode = "RGB" if array.ndim == 3 else "L"
    peak = int(array.max()) if array.size else 0
    if peak in (0, 255):
        return Image.fromarray(array, mode=mode)
    table = _scaled_by_maximum(np.arange(peak + 1, dtype=np.uint8))  # every value 0..peak, maximum peak
    return Image.fromarray(table[array], mode=mode)


def _scaled_by_maximum(array: np.ndarray) -> np.ndarray:
    """Intensities scaled so that the array's maximum becomes 255 (shifted to zero first if negative), as uint8."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))
    array = array.astype(np.float64)
    peak = float(array.max()) if array.size else 0.0
    low = float(array.min()) if array.size else 0.0
    if low < 0:  # float or signed images: shift to zero first so "relative to the maximum" is defined
        array = array - low
        peak -= low
    if peak > 0:
        array = array * (255.0 / peak)
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def downsample(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """Shrink so that both sides fit within ``max_side`` (aspect kept); smaller images are unchanged."""
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def preprocess(source: str | Path, target: str | Path, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """Read ``source``, normalise and downsample it, write PNG to ``target`` atomically; return its size."""
    image = downsample(load_image(source), max_side)
    with atomic_path(target) as temporary:
        # zlib level 1: 4x faster than Pillow's default 6 on image noise, files ~11% larger (docs/benchmarks.md).
        image.save(temporary, format="PNG", compress_level=1, optimize=False)
    return image.size

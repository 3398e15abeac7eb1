"""int8 activations with a per-channel scale: the storage of ``extraction.dtype: int8``.

Each layer's channel ``j`` is stored as ``q = round(x / s_j)`` in int8 with the symmetric scale
``s_j = max_i |x_ij| / 127`` over every image of the file, so ``x`` is read back as ``q * s_j``; the error
per value is at most ``s_j / 2``. The authors stored uint8 per channel; a symmetric scale keeps zero exact
and needs one number per channel. Because the scale needs every row, extraction jobs write float16 and
:func:`medprobe.extract.merge_shards` quantises when it joins the shards; readers dequantise
(:func:`dequantise`). The file has ``activations`` (N, L, D) int8 and ``scales`` (L, D) float32, and
``embeddings`` (N, E) int8 with ``embedding_scales`` (E,) float32 where it has embeddings.
"""

from __future__ import annotations

from collections.abc import Iterator

import h5py
import numpy as np

__all__ = ["INT8_MAX", "channel_scales", "dequantise", "quantise"]

INT8_MAX = 127


def channel_scales(absmax: np.ndarray) -> np.ndarray:
    """float32 scales from per-channel maxima of ``|x|``; a channel that is zero everywhere gets scale 1."""
    scales = np.asarray(absmax, dtype=np.float32) / INT8_MAX
    return np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)


def quantise(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 ``round(values / scales)`` (scales broadcast over the last axis)."""
    scaled = np.rint(np.asarray(values, dtype=np.float32) / scales)
    return np.clip(scaled, -INT8_MAX, INT8_MAX).astype(np.int8)


def dequantise(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 ``values * scales``."""
    return values.astype(np.float32) * np.asarray(scales, dtype=np.float32)


def row_blocks(n_rows: int, block: int) -> Iterator[slice]:
    for start in range(0, n_rows, block):
        yield slice(start, min(start + block, n_rows))


def layer_absmax(datasets: list[tuple[h5py.Dataset, int]], layer: int | None, block: int) -> np.ndarray:
    """Per-channel max of ``|x|`` of one layer (``None``: a 2-D embeddings dataset) over every row of every
    ``(dataset, n_rows)``, read in row blocks (bounded memory); non-finite values are an error."""
    absmax = None
    for dataset, n_rows in datasets:
        for rows in row_blocks(n_rows, block):
            values = dataset[rows] if layer is None else dataset[rows, layer, :]
            values = np.abs(values.astype(np.float32))
            if not np.isfinite(values).all():
                raise ValueError(
                    f"{dataset.file.filename}: non-finite activations in rows {rows.start}-{rows.stop - 1}"
                    f"{'' if layer is None else f' of layer {layer}'}; they cannot be stored as int8 (float16 "
                    "overflow? use extraction.dtype: float32)"
                )
            block_max = values.max(axis=0)
            absmax = block_max if absmax is None else np.maximum(absmax, block_max)
    return absmax

"""The activations HDF5: its layout, the resumable writer of one extraction job, and reading one layer.

The layout (``docs/architecture.md``)::

    ids           (N,)       UTF-8 image_id, manifest order
    activations   (N, L, D)  float16 (or float32, or int8), chunks (min(N, 256), 1, D) so one layer reads fast
    embeddings    (N, E)     only for models with their own projected image embedding (CLIP)
    scales        (L, D)     int8 files only: float32 per-channel scales (and embedding_scales (E,))
    attrs: layer_names, num_hidden_states, model, checkpoint, revision, prompt, prompt_format, pooling, dtype,
           software_version, manifest_sha256
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from medprobe.contracts import DamagedFileError, check_shape, open_hdf5, read_dataset, require
from medprobe.extract.quantise import dequantise
from medprobe.io import decode_strings, write_strings
from medprobe.layers import EMBEDDINGS_LAYER

__all__ = [
    "ActivationsWriter",
    "ACTIVATIONS",
    "InsufficientDiskSpaceError",
    "Layout",
    "check_disk_space",
    "check_layout",
    "check_manifest_match",
    "format_bytes",
    "layer_names",
    "projected_size",
    "read_activations",
]

logger = logging.getLogger("medprobe.extract")

# What a damaged activations file is called in messages (medprobe.contracts.DamagedFileError).
ACTIVATIONS = "activations file"

CHUNK_ROWS = 256
# Enough chunk cache to keep one row of chunks (all layers) in memory between batches, so that a
# batch write does not read-modify-write every chunk; capped for 80-layer, 8192-wide models.
_MAX_CHUNK_CACHE_BYTES = 1 << 30
_CHUNK_CACHE_SLOTS = 100_003


class InsufficientDiskSpaceError(OSError):
    """The output folder's disk cannot hold the projected activations file."""


def projected_size(
    ids: Sequence[str], n_layers: int, hidden_dim: int, embedding_dim: int | None, storage_dtype: np.dtype
) -> int:
    """Bytes an activations file for ``ids`` needs, uncompressed (compression only makes it smaller)."""
    itemsize = np.dtype(storage_dtype).itemsize
    values = len(ids) * (n_layers * hidden_dim + (embedding_dim or 0)) * itemsize
    strings = sum(len(image_id.encode("utf-8")) + 32 for image_id in ids)  # variable-length string heap
    return values + strings + (1 << 16)  # + HDF5 metadata (chunk index, attributes)


def check_disk_space(directory: Path, needed: int, what: str) -> None:
    """Log what ``what`` needs and what ``directory`` has free; raise when it does not fit."""
    free = shutil.disk_usage(directory).free
    logger.info("%s needs about %s; %s free in %s", what, format_bytes(needed), format_bytes(free), directory)
    if needed > free:
        raise InsufficientDiskSpaceError(
            f"not enough disk space for {what}: it needs about {needed} bytes ({format_bytes(needed)}) but "
            f"{directory} has {free} bytes ({format_bytes(free)}) free"
        )


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class Layout:
    """The datasets of one activations file: its ids, widths, storage dtype and compression."""

    ids: Sequence[str]
    n_layers: int
    hidden_dim: int
    embedding_dim: int | None
    dtype: np.dtype
    compression: Mapping[str, Any]

    @classmethod
    def of_file(cls, handle: h5py.File, ids: Sequence[str]) -> Layout:
        """The layout of an existing file, for ``ids`` (a merge keeps its shards' storage)."""
        activations = handle["activations"]
        compression: dict[str, Any] = {}
        if activations.compression:
            compression = {"compression": activations.compression}
            if activations.compression_opts is not None:
                compression["compression_opts"] = activations.compression_opts
        n_layers, hidden_dim = activations.shape[1:]
        embedding_dim = handle["embeddings"].shape[1] if "embeddings" in handle else None
        return cls(ids, n_layers, hidden_dim, embedding_dim, activations.dtype, compression)

    @property
    def n_rows(self) -> int:
        return len(self.ids)

    def projected_size(self) -> int:
        return projected_size(self.ids, self.n_layers, self.hidden_dim, self.embedding_dim, self.dtype)

    def chunk_cache_bytes(self) -> int:
        """A chunk cache that holds one row of chunks of every layer (see _MAX_CHUNK_CACHE_BYTES)."""
        chunk_bytes = max(1, min(self.n_rows, CHUNK_ROWS)) * self.hidden_dim * np.dtype(self.dtype).itemsize
        return int(min(_MAX_CHUNK_CACHE_BYTES, max(1 << 20, 2 * self.n_layers * chunk_bytes)))

    def open(self, path: Path, mode: str) -> h5py.File:
        """``path`` opened with the chunk cache this layout needs."""
        return h5py.File(path, mode, rdcc_nbytes=self.chunk_cache_bytes(), rdcc_nslots=_CHUNK_CACHE_SLOTS)

    def create_datasets(self, handle: h5py.File) -> None:
        """``ids``, ``activations`` chunked by layer (and ``embeddings``), empty but for the ids."""
        chunk_rows = min(self.n_rows, CHUNK_ROWS)
        write_strings(handle, "ids", self.ids)
        # An empty shard cannot be chunked (HDF5 needs chunk sizes > 0); it holds no values anyway.
        layout = dict(chunks=(chunk_rows, 1, self.hidden_dim), **self.compression) if self.n_rows else {}
        shape = (self.n_rows, self.n_layers, self.hidden_dim)
        handle.create_dataset("activations", shape=shape, dtype=self.dtype, **layout)
        if self.embedding_dim is not None:
            layout = dict(chunks=(chunk_rows, self.embedding_dim), **self.compression) if self.n_rows else {}
            handle.create_dataset("embeddings", shape=(self.n_rows, self.embedding_dim), dtype=self.dtype, **layout)


class ActivationsWriter:
    """The activations file of one extraction job, written so that an interrupted job can continue.

    The file is ``<out_path>.partial`` until :meth:`finish` renames it onto ``out_path``, so ``out_path``
    exists only when complete.  While partial it carries two more attributes: ``fingerprint``, everything
    the stored values depend on, and ``rows_done``, advanced after each batch once its rows are on disk.
    :meth:`open` continues a partial file with the same fingerprint at ``rows_done`` and starts any other
    over.  Batches start at multiples of the batch size (part of the fingerprint), so a resumed file holds
    the same bytes as an uninterrupted one.
    """

    def __init__(
        self, out_path: Path, layout: Layout, attrs: Mapping[str, Any], fingerprint: Mapping[str, Any]
    ) -> None:
        self.out_path = out_path
        self.partial = out_path.with_name(out_path.name + ".partial")
        self.layout = layout
        self.attrs = dict(attrs)
        self.fingerprint = json.dumps(dict(fingerprint), sort_keys=True)
        self.rows_done = 0
        self._handle: h5py.File | None = None
        self._activations: h5py.Dataset | None = None
        self._embeddings: h5py.Dataset | None = None
        self._warned_overflow = False

    @property
    def has_embeddings(self) -> bool:
        return self.layout.embedding_dim is not None

    def open(self) -> int:
        """Resume the partial file or create it (after checking the disk can hold it); returns the rows done."""
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        rows_done = self._resumable_rows()
        already = self.partial.stat().st_size if rows_done is not None else 0
        needed = max(0, self.layout.projected_size() - already)
        check_disk_space(self.out_path.parent, needed, f"{self.out_path.name} ({self.layout.n_rows} images)")
        if rows_done is None:
            rows_done = 0
            self._create()
        elif rows_done:
            logger.info("resuming %s at row %d of %d", self.partial, rows_done, self.layout.n_rows)
        self._handle = self.layout.open(self.partial, "r+")
        # Held open for the whole run: closing a dataset drops its chunk cache, and every batch would then
        # rewrite (and, compressed, reallocate) the chunks it shares with the previous one.
        self._activations = self._handle["activations"]
        self._embeddings = self._handle.get("embeddings")
        self.rows_done = rows_done
        return rows_done

    def _resumable_rows(self) -> int | None:
        """Rows a matching partial file already holds; None (file removed) when it must start over."""
        if not self.partial.exists():
            return None
        try:
            with h5py.File(self.partial, "r") as handle:
                stored = handle.attrs.get("fingerprint")
                rows_done = int(handle.attrs.get("rows_done", -1))
        except OSError as error:  # e.g. killed while HDF5 metadata was being written
            logger.warning("cannot reopen %s (%s); starting over", self.partial, error)
            self.partial.unlink()
            return None
        if stored != self.fingerprint or not 0 <= rows_done <= self.layout.n_rows:
            logger.warning(
                "%s was written for a different manifest, model, prompt, prompt format, layers or dtype; starting over",
                self.partial,
            )
            self.partial.unlink()
            return None
        return rows_done

    def _create(self) -> None:
        with h5py.File(self.partial, "w") as handle:
            self.layout.create_datasets(handle)
            for key, value in self.attrs.items():
                handle.attrs[key] = value
            handle.attrs["fingerprint"] = self.fingerprint
            handle.attrs["rows_done"] = 0

    def write(self, start: int, activations: np.ndarray, embeddings: np.ndarray | None = None) -> None:
        """Store rows ``start, start + 1, ...`` (float32 values, stored in the file's dtype) and count them done."""
        handle = self._handle
        stop = start + len(activations)
        stored = activations.astype(self.layout.dtype)
        if not self._warned_overflow and not np.isfinite(stored).all():
            self._warned_overflow = True
            logger.warning(
                "non-finite activations in rows %d-%d (float16 range exceeded?); consider dtype float32",
                start,
                stop - 1,
            )
        self._activations[start:stop] = stored
        if embeddings is not None:
            self._embeddings[start:stop] = embeddings.astype(self.layout.dtype)
        # Rows count as done only once their data is on disk.
        handle.flush()
        handle.attrs["rows_done"] = stop
        handle.flush()
        self.rows_done = stop

    def finish(self) -> Path:
        """Drop the resume attributes and rename the complete file onto ``out_path``."""
        del self._handle.attrs["rows_done"]
        del self._handle.attrs["fingerprint"]
        self.close()
        os.replace(self.partial, self.out_path)
        return self.out_path

    def close(self) -> None:
        if self._handle is not None:
            self._activations = self._embeddings = None
            self._handle.close()
            self._handle = None

    def __enter__(self) -> ActivationsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_layout(handle: h5py.File, what: str = ACTIVATIONS, target: str | Path | None = None) -> list[str]:
    """Check an open activations (or shard) file against the layout above: ``ids`` (N,), ``activations``
    (N, L, D) for its L ``layer_names``, ``embeddings`` (N, E), and int8 values with their ``scales`` (L, D) and
    ``embedding_scales`` (E,). Raises :class:`medprobe.contracts.DamagedFileError` (rebuilding ``target``, the file
    itself by default); returns the layer names, plus ``image_embeds`` when the file has embeddings."""
    require(handle, what, datasets=("ids", "activations"), attrs=("layer_names",), target=target)
    n_ids = check_shape(handle, what, "ids", (None,), "one id per image", target=target)[0]
    names = decode_strings(handle.attrs["layer_names"])
    shape = check_shape(
        handle, what, "activations", (n_ids, len(names), None), "ids x layer_names x width", target=target
    )
    if handle["activations"].dtype == np.int8:
        require(handle, what, datasets=("scales",), target=target)
        check_shape(handle, what, "scales", (len(names), shape[2]), "layer_names x width of int8 values", target=target)
    if "embeddings" in handle:
        width = check_shape(handle, what, "embeddings", (n_ids, None), "ids x embedding width", target=target)[1]
        if handle["embeddings"].dtype == np.int8:
            require(handle, what, datasets=("embedding_scales",), target=target)
            check_shape(handle, what, "embedding_scales", (width,), "embedding width of int8 values", target=target)
        names.append(EMBEDDINGS_LAYER)
    return names


def check_manifest_match(
    handle: h5py.File, manifest_ids: Sequence[str], manifest_csv: str | Path, manifest_sha256: str
) -> None:
    """The ids of an open activations file are the manifest's ``image_id`` in manifest order, and its
    ``manifest_sha256`` is the manifest's SHA-256 (``manifest_sha256``); else
    :class:`medprobe.contracts.DamagedFileError`."""
    ids, expected = decode_strings(read_dataset(handle, ACTIVATIONS, "ids")), list(manifest_ids)
    if ids != expected:
        mismatch = next((i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), min(len(ids), len(expected)))
        raise DamagedFileError(
            handle.filename,
            f"ids do not match manifest {manifest_csv} image_id ({len(ids)} vs {len(expected)} rows; "
            f"first difference at row {mismatch})",
            what=ACTIVATIONS,
        )
    stored = handle.attrs.get("manifest_sha256")
    stored = decode_strings(stored)[0] if stored is not None else None
    if stored != manifest_sha256:
        raise DamagedFileError(
            handle.filename,
            f"extracted from a different manifest: its manifest_sha256 is {stored!r} but {manifest_csv} hashes to "
            f"{manifest_sha256!r}",
            what=ACTIVATIONS,
        )


def layer_names(path: str | Path) -> list[str]:
    """Layer names of an activations file: its ``hidden.i`` layers, plus ``image_embeds`` when present."""
    with open_hdf5(path, ACTIVATIONS) as handle:
        return check_layout(handle)


def _layer_name(names: list[str], layer: int | str, path: Path) -> str:
    if isinstance(layer, str):
        if layer not in names:
            raise ValueError(f"layer {layer!r} is not in {path}; its layers: {', '.join(names)}")
        return layer
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
        if not -len(names) <= layer < len(names):
            raise ValueError(f"layer index {layer} is out of range for {path}, which has {len(names)} layers")
        return names[layer]
    raise ValueError(f"layer must be a name or an integer position, got {layer!r}")


def read_activations(path: str | Path, layer: int | str) -> tuple[np.ndarray, np.ndarray]:
    """Read one layer of an activations file without loading the others.

    Args:
        path: the activations HDF5.
        layer: a name from :func:`layer_names` (``hidden.3``, ``image_embeds``) or a position in that
            list (negative counts from the end, so -1 is ``image_embeds`` when the file has embeddings).

    Returns:
        ``(ids, X)``: ids (N,) str in manifest order, X (N, D) float32.
    """
    path = Path(path)
    with open_hdf5(path, ACTIVATIONS) as handle:
        names = check_layout(handle)
        name = _layer_name(names, layer, path)
        ids = np.asarray(decode_strings(read_dataset(handle, ACTIVATIONS, "ids")), dtype=str)
        values = read_layer(handle, names.index(name), name == EMBEDDINGS_LAYER)
    return ids, values.astype(np.float32, copy=False)


def read_layer(handle: h5py.File, index: int, embeddings: bool = False) -> np.ndarray:
    """Layer ``index`` of ``activations`` (or the ``embeddings``) of an open activations file, ``(N, D)``:
    as stored for float16/float32 files, dequantised to float32 for int8 files (:mod:`medprobe.extract.quantise`).
    Data that cannot be read, or int8 values without their scales, raise :class:`medprobe.contracts.DamagedFileError`."""
    name, scale_name = ("embeddings", "embedding_scales") if embeddings else ("activations", "scales")
    values = read_dataset(handle, ACTIVATIONS, name, () if embeddings else np.s_[:, index, :])
    if values.dtype != np.int8:
        return values
    if scale_name not in handle:
        raise DamagedFileError(handle.filename, f"int8 values without their {scale_name!r}", what=ACTIVATIONS)
    scales = read_dataset(handle, ACTIVATIONS, scale_name, () if embeddings else index)
    return dequantise(values, scales)

"""Batched, resumable extraction of per-layer activations into the activations HDF5.

The file layout (see ``docs/architecture.md``)::

    ids           (N,)       UTF-8 image_id, manifest order
    activations   (N, L, D)  float16 (or float32), chunks (min(N, 256), 1, D) so one layer reads fast
    embeddings    (N, E)     only for models with their own projected image embedding (CLIP)
    attrs: layer_names, num_hidden_states, model, checkpoint, revision, prompt, prompt_format, pooling, dtype,
           software_version, manifest_sha256

Shards: ``shard=(i, n)`` extracts only the i-th of n consecutive, batch-aligned row ranges of the
manifest into its own file (attributes ``shard_index``, ``shard_count``, ``row_start``, ``row_stop`` added);
:func:`merge_shards` joins the n shard files into the contract file, bit-identical to an unsharded run
with the same batch size (the batches are the same).

Resume: the file is written as ``<out_path>.partial``; after every batch the rows are flushed and the
attribute ``rows_done`` is advanced.  A rerun for the same manifest, model, prompt, prompt format, layers
and dtype continues at ``rows_done`` (any difference starts over), and the finished file is renamed onto
``out_path``, so ``out_path`` exists only when complete.  Batches always start at a multiple of the
batch size, so a resumed run with the same ``batch_size`` writes bit-identical data.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from PIL import Image

import medprobe
from medprobe.checks import OomBackoff
from medprobe.models import Adapter, load_adapter
from medprobe.models.base import PROMPT_FORMATS

__all__ = [
    "ImageReadError",
    "InsufficientDiskSpaceError",
    "extract_activations",
    "layer_names",
    "merge_shards",
    "projected_size",
    "read_activations",
    "shard_rows",
]

logger = logging.getLogger("medprobe.extract")

EMBEDDINGS_LAYER = "image_embeds"
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
COMPRESSIONS = ("none", "gzip", "lzf")
SHARD_ATTRS = ("shard_index", "shard_count", "row_start", "row_stop")
_CHUNK_ROWS = 256
# Enough chunk cache to keep one row of chunks (all layers) in memory between batches, so that a
# batch write does not read-modify-write every chunk; capped for 80-layer, 8192-wide models.
_MAX_CHUNK_CACHE_BYTES = 1 << 30


class ImageReadError(RuntimeError):
    """An image named in the manifest is missing or cannot be decoded."""


class InsufficientDiskSpaceError(OSError):
    """The output folder's disk cannot hold the projected activations file."""


def shard_rows(n_rows: int, batch_size: int, shard: int, shards: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of shard ``shard`` of ``shards``: consecutive ranges of whole batches.

    Batches are split as evenly as possible, so a shard's batches are exactly the unsharded run's
    (which makes sharded and unsharded files identical); shards beyond the number of batches are empty.
    """
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a positive integer, got {shards!r}")
    if not isinstance(shard, int) or not 0 <= shard < shards:
        raise ValueError(f"shard index {shard!r} is out of range for {shards} shards (0..{shards - 1})")
    n_batches = -(-n_rows // batch_size)
    first, last = shard * n_batches // shards, (shard + 1) * n_batches // shards
    return min(first * batch_size, n_rows), min(last * batch_size, n_rows)


def projected_size(
    ids: Sequence[str], n_layers: int, hidden_dim: int, embedding_dim: int | None, storage_dtype: np.dtype
) -> int:
    """Bytes an activations file for ``ids`` needs, uncompressed (compression only makes it smaller)."""
    itemsize = np.dtype(storage_dtype).itemsize
    values = len(ids) * (n_layers * hidden_dim + (embedding_dim or 0)) * itemsize
    strings = sum(len(image_id.encode("utf-8")) + 32 for image_id in ids)  # variable-length string heap
    return values + strings + (1 << 16)  # + HDF5 metadata (chunk index, attributes)


def _check_disk_space(directory: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    logger.info("%s needs about %s; %s free in %s", what, _format_bytes(needed), _format_bytes(free), directory)
    if needed > free:
        raise InsufficientDiskSpaceError(
            f"not enough disk space for {what}: it needs about {needed} bytes ({_format_bytes(needed)}) but "
            f"{directory} has {free} bytes ({_format_bytes(free)}) free"
        )


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _compression_options(compression: str | None, level: int | None) -> dict[str, Any]:
    if compression in (None, "none"):
        return {}
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression is {compression!r}; valid values: {', '.join(COMPRESSIONS)}")
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4 if level is None else int(level)}
    return {"compression": compression}


class _LogStream:
    """A file-like object that turns tqdm's refreshes into log lines (for rule log files)."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        if text:
            self.log.info("%s", text)

    def flush(self) -> None:
        pass


def _peak_device_memory(adapter: Adapter) -> str:
    if not torch.cuda.is_available() or adapter.device.type != "cuda":
        return "n/a (not on CUDA)"
    devices = sorted({p.device.index for p in adapter.model.parameters() if p.device.type == "cuda"})
    peaks = [torch.cuda.max_memory_allocated(index) for index in devices]
    return ", ".join(f"cuda:{index} {_format_bytes(peak)}" for index, peak in zip(devices, peaks))


def _read_manifest(manifest: Path, root: Path) -> list[tuple[str, Path]]:
    """``(image_id, resolved path)`` for every manifest row, in manifest order."""
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    with manifest.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"image_id", "path"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"manifest {manifest} lacks column(s) {sorted(missing)}; it has {reader.fieldnames}")
        entries: list[tuple[str, Path]] = []
        seen: set[str] = set()
        for line_number, row in enumerate(reader, start=2):
            image_id, path = row["image_id"], row["path"]
            if not image_id or not path:
                raise ValueError(f"manifest {manifest} line {line_number}: empty image_id or path ({row})")
            if image_id in seen:
                raise ValueError(f"manifest {manifest} line {line_number}: duplicate image_id {image_id!r}")
            seen.add(image_id)
            resolved = Path(path) if os.path.isabs(path) else root / path
            entries.append((image_id, resolved))
    if not entries:
        raise ValueError(f"manifest {manifest} has no rows")
    return entries


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _resolve_layers(layers: Sequence[int] | None, num_hidden_states: int) -> list[int]:
    """Sorted, unique, non-negative hidden-state indices (negative ones count from the end)."""
    if layers is None:
        return list(range(num_hidden_states))
    resolved = set()
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ValueError(f"layers must be integers (hidden-state indices), got {layer!r}")
        if not -num_hidden_states <= layer < num_hidden_states:
            raise ValueError(
                f"layer {layer} is out of range: the model has {num_hidden_states} hidden states "
                f"(indices 0..{num_hidden_states - 1})"
            )
        resolved.add(int(layer) % num_hidden_states)
    if not resolved:
        raise ValueError("layers is empty; pass None for all layers")
    return sorted(resolved)


def software_version() -> str:
    """medprobe, torch and transformers versions, as recorded in every activations file."""
    import transformers

    return f"medprobe {medprobe.__version__}; torch {torch.__version__}; transformers {transformers.__version__}"


class _ImageDataset(torch.utils.data.Dataset):
    """Loads manifest images as RGB; item ``i`` is ``(offset + i, image)``."""

    def __init__(self, entries: Sequence[tuple[str, Path]], offset: int = 0) -> None:
        self.entries = list(entries)
        self.offset = offset

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[int, Image.Image | ImageReadError]:
        image_id, path = self.entries[index]
        try:
            with Image.open(path) as image:
                return self.offset + index, image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            # Returned, not raised: an exception raised inside a DataLoader worker reaches the caller
            # re-wrapped, and the abandoned worker then holds up shutdown for seconds.
            return self.offset + index, ImageReadError(f"cannot read image {image_id!r} at {path}: {error}")


class _Collate:
    """Preprocesses a list of ``(row, image)`` into ``(rows, model inputs)``; runs in DataLoader workers."""

    def __init__(self, adapter: Adapter, prompt: str, prompt_format: str) -> None:
        self.adapter = adapter
        self.prompt = prompt
        self.prompt_format = prompt_format

    def __call__(
        self, items: list[tuple[int, Image.Image | ImageReadError]]
    ) -> tuple[list[int], dict[str, torch.Tensor] | ImageReadError]:
        rows = [row for row, _ in items]
        images = [image for _, image in items]
        for image in images:
            if isinstance(image, ImageReadError):
                return rows, image
        return rows, self.adapter.preprocess(images, self.prompt, prompt_format=self.prompt_format)


def _rows_done_in_partial(partial: Path, fingerprint: str, n_rows: int) -> int | None:
    """Rows a matching ``.partial`` file already holds; ``None`` (file removed) when it must start over."""
    if not partial.exists():
        return None
    try:
        with h5py.File(partial, "r") as handle:
            stored = handle.attrs.get("fingerprint")
            rows_done = int(handle.attrs.get("rows_done", -1))
    except OSError as error:  # e.g. killed while HDF5 metadata was being written
        logger.warning("cannot reopen %s (%s); starting over", partial, error)
        partial.unlink()
        return None
    if stored != fingerprint or not 0 <= rows_done <= n_rows:
        logger.warning(
            "%s was written for a different manifest, model, prompt, prompt format, layers or dtype; starting over",
            partial,
        )
        partial.unlink()
        return None
    return rows_done


def _create_partial(
    partial: Path,
    ids: Sequence[str],
    *,
    n_layers: int,
    hidden_dim: int,
    embedding_dim: int | None,
    storage_dtype: np.dtype,
    attrs: Mapping[str, Any],
    fingerprint: str | None,
    compression: Mapping[str, Any],
) -> None:
    """Create the ``.partial`` file: ids, empty activations (and embeddings), attributes, ``rows_done`` 0."""
    with h5py.File(partial, "w") as handle:
        _create_datasets(handle, ids, n_layers, hidden_dim, embedding_dim, storage_dtype, compression)
        for key, value in attrs.items():
            handle.attrs[key] = value
        if fingerprint is not None:
            handle.attrs["fingerprint"] = fingerprint
            handle.attrs["rows_done"] = 0


def _create_datasets(
    handle: h5py.File,
    ids: Sequence[str],
    n_layers: int,
    hidden_dim: int,
    embedding_dim: int | None,
    storage_dtype: np.dtype,
    compression: Mapping[str, Any],
) -> None:
    """``ids``, ``activations`` chunked by layer (and ``embeddings``), as every activations file has them."""
    n_rows = len(ids)
    chunk_rows = min(n_rows, _CHUNK_ROWS)
    handle.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
    # An empty shard cannot be chunked (HDF5 needs chunk sizes > 0); it holds no values anyway.
    layout = dict(chunks=(chunk_rows, 1, hidden_dim), **compression) if n_rows else {}
    handle.create_dataset("activations", shape=(n_rows, n_layers, hidden_dim), dtype=storage_dtype, **layout)
    if embedding_dim is not None:
        layout = dict(chunks=(chunk_rows, embedding_dim), **compression) if n_rows else {}
        handle.create_dataset("embeddings", shape=(n_rows, embedding_dim), dtype=storage_dtype, **layout)


def _chunk_cache_bytes(n_rows: int, n_layers: int, hidden_dim: int, storage_dtype: np.dtype) -> int:
    """A chunk cache that holds one row of chunks of every layer (see _MAX_CHUNK_CACHE_BYTES)."""
    chunk_bytes = max(1, min(n_rows, _CHUNK_ROWS)) * hidden_dim * storage_dtype.itemsize
    return int(min(_MAX_CHUNK_CACHE_BYTES, max(1 << 20, 2 * n_layers * chunk_bytes)))


def extract_activations(
    manifest: str | Path,
    out_path: str | Path,
    *,
    model_name: str,
    model_cfg: Mapping[str, Any],
    prompt: str,
    prompt_format: str = "chat",
    batch_size: int = 16,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    dtype: str = "float16",
    layers: list[int] | None = None,
    compression: str | None = None,
    compression_level: int | None = None,
    shard: tuple[int, int] = (0, 1),
    device: str | None = None,
    root: str | Path = ".",
    progress: bool | str = True,
    adapter: Adapter | None = None,
) -> Path:
    """Run every manifest image (or one shard of them) through the model; store pooled per-layer activations.

    Args:
        manifest: manifest CSV with at least ``image_id`` and ``path`` (relative to ``root`` unless absolute).
        out_path: the activations HDF5 to write (written as ``<out_path>.partial``, renamed when complete).
        model_name: the config's model key, stored as the ``model`` attribute.
        model_cfg: the model's config entry (see :func:`medprobe.models.load_adapter`).
        prompt: the task prompt; the adapter wraps it (attribute ``prompt`` holds the exact text).
        prompt_format: how the adapter lays the prompt out around the image, ``chat`` (User/Assistant
            turns) or ``question_answer`` (the paper's ``[image, "Question: {prompt} Answer:"]``); stored as
            the attribute ``prompt_format``, empty for image-only models, which ignore the prompt.
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes for image decoding and preprocessing (0 = in-process).
        prefetch_factor: batches each worker prepares ahead (only with ``num_workers`` > 0).
        dtype: storage dtype, ``float16`` or ``float32``.
        layers: hidden-state indices to keep (default all); the forward pass stops after the deepest.
        compression: ``none`` (default), ``gzip`` or ``lzf`` for the HDF5 datasets.
        compression_level: gzip level 0-9 (default 4).
        shard: ``(i, n)``: extract only shard i of n (see :func:`shard_rows`); ``(0, 1)`` is the whole manifest.
        device: ``cuda``, ``cuda:1``, ``cpu``...; default CUDA when available.
        root: directory that relative manifest paths are relative to.
        progress: ``True`` a tqdm bar on stderr, ``"log"`` the same figures (images/s, ETA) as log lines
            every 30 s, ``False`` none.
        adapter: an already loaded adapter (benchmarks); ``model_cfg`` still names its checkpoint.

    Returns:
        ``out_path``.

    Raises:
        FileNotFoundError: the manifest or an image is missing (the message names image_id and path).
        ImageReadError: an image cannot be decoded.
        InsufficientDiskSpaceError: the output folder cannot hold the projected file (both sizes named).
        ValueError: bad manifest, ``dtype``, ``prompt_format``, ``layers``, ``compression``, ``shard`` or
            ``batch_size``.
    """
    from tqdm import tqdm

    manifest, out_path, root = Path(manifest), Path(out_path), Path(root)
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype is {dtype!r}; valid storage dtypes: {', '.join(STORAGE_DTYPES)}")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(
            f"extraction config key 'prompt_format' is {prompt_format!r}; valid values: {', '.join(PROMPT_FORMATS)}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    compression_options = _compression_options(compression, compression_level)
    storage_dtype = np.dtype(STORAGE_DTYPES[dtype])
    all_entries = _read_manifest(manifest, root)
    shard_index, shard_count = shard
    row_start, row_stop = shard_rows(len(all_entries), batch_size, shard_index, shard_count)
    entries = all_entries[row_start:row_stop]
    for image_id, path in entries:  # fail before loading a large model, not hours into the run
        if not path.is_file():
            raise FileNotFoundError(f"image {image_id!r} listed in {manifest} not found at {path}")
    manifest_sha256 = _sha256(manifest)
    ids = [image_id for image_id, _ in entries]
    n_rows = len(entries)
    shard_label = f"shard {shard_index + 1}/{shard_count} (rows {row_start}-{row_stop - 1})" if shard_count > 1 else ""

    started = time.perf_counter()
    if adapter is None:
        adapter = load_adapter(model_cfg, device=device)
        logger.info("loaded %r in %.1f s on %s", adapter, time.perf_counter() - started, adapter.device)
    adapter.check_prompt_format(prompt_format)
    layer_indices = _resolve_layers(layers, adapter.num_hidden_states)
    stored_layer_names = [adapter.layer_names[i] for i in layer_indices]
    attrs: dict[str, Any] = {
        "layer_names": stored_layer_names,
        # The model's whole hidden_states length, so that layer numberings relative to the model (the
        # paper's files count hidden_states[1:]) still work when only some layers are stored.
        "num_hidden_states": int(adapter.num_hidden_states),
        "model": model_name,
        "checkpoint": str(model_cfg["checkpoint"]),
        "revision": str(model_cfg.get("revision") or ""),
        "prompt": adapter.prompt_text(prompt, prompt_format),
        # Image-only models see no prompt, so their files do not depend on the format.
        "prompt_format": prompt_format if adapter.prompt_formats else "",
        "pooling": adapter.pooling,
        "dtype": dtype,
        "software_version": software_version(),
        "manifest_sha256": manifest_sha256,
    }
    if shard_count > 1:
        attrs.update(shard_index=shard_index, shard_count=shard_count, row_start=row_start, row_stop=row_stop)
    fingerprint = json.dumps(
        {
            "manifest_sha256": manifest_sha256,
            "model": model_name,
            "checkpoint": attrs["checkpoint"],
            "revision": attrs["revision"],
            "adapter": adapter.name,
            "prompt": attrs["prompt"],
            "prompt_format": attrs["prompt_format"],
            "layers": layer_indices,
            "dtype": dtype,
            "compression": compression_options,
            "rows": [row_start, row_stop, batch_size],
            "shape": [n_rows, len(layer_indices), adapter.hidden_dim, adapter.embedding_dim],
        },
        sort_keys=True,
    )

    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    rows_done = _rows_done_in_partial(partial, fingerprint, n_rows)
    needed = projected_size(ids, len(layer_indices), adapter.hidden_dim, adapter.embedding_dim, storage_dtype)
    already = partial.stat().st_size if rows_done is not None else 0
    _check_disk_space(out_path.parent, max(0, needed - already), f"{out_path.name} ({n_rows} images)")
    if rows_done is None:
        rows_done = 0
        _create_partial(
            partial,
            ids,
            n_layers=len(layer_indices),
            hidden_dim=adapter.hidden_dim,
            embedding_dim=adapter.embedding_dim,
            storage_dtype=storage_dtype,
            attrs=attrs,
            fingerprint=fingerprint,
            compression=compression_options,
        )
    elif rows_done:
        logger.info("resuming %s at row %d of %d", partial, rows_done, n_rows)
    cache_bytes = _chunk_cache_bytes(n_rows, len(layer_indices), adapter.hidden_dim, storage_dtype)
    handle = h5py.File(partial, "r+", rdcc_nbytes=cache_bytes, rdcc_nslots=100_003)

    on_cuda = adapter.device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    loader = torch.utils.data.DataLoader(
        _ImageDataset(entries[rows_done:], offset=rows_done),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_Collate(adapter, prompt, prompt_format),
        pin_memory=on_cuda,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
    activations, embeddings = handle["activations"], handle.get("embeddings")
    expected_shape = (len(layer_indices), adapter.hidden_dim)
    warned_overflow = False
    new_rows = 0
    bar_options: dict[str, Any] = {"disable": not progress, "dynamic_ncols": True}
    if progress == "log":
        bar_options = {"file": _LogStream(logger), "mininterval": 30.0, "ncols": 100, "ascii": True}
    # On CUDA out-of-memory the batch is halved and retried (and the smaller size kept); an image that does
    # not fit alone stops the job with its id.
    backoff = OomBackoff()
    started = time.perf_counter()
    try:
        with tqdm(total=n_rows, initial=rows_done, unit="img", desc=model_name, **bar_options) as bar:
            for rows, batch in loader:
                if isinstance(batch, ImageReadError):
                    raise batch
                pooled, embedded = backoff.forward(
                    lambda inputs: adapter.forward(inputs, layers=layer_indices),
                    batch,
                    [entries[row][0] for row in rows],
                )
                if tuple(pooled.shape[1:]) != expected_shape:
                    raise RuntimeError(
                        f"{type(adapter).__name__} returned activations of shape {tuple(pooled.shape)}, "
                        f"expected (batch, {expected_shape[0]}, {expected_shape[1]})"
                    )
                start, stop = rows[0], rows[-1] + 1
                stored = pooled.numpy().astype(storage_dtype)
                if not warned_overflow and not np.isfinite(stored).all():
                    warned_overflow = True
                    logger.warning(
                        "non-finite activations in rows %d-%d (float16 range exceeded?); consider dtype float32",
                        start,
                        stop - 1,
                    )
                activations[start:stop] = stored
                if embeddings is not None:
                    if embedded is None:
                        raise RuntimeError(
                            f"{type(adapter).__name__} returned no embeddings for rows {start}-{stop - 1}"
                        )
                    embeddings[start:stop] = embedded.numpy().astype(storage_dtype)
                # Rows count as done only once their data is on disk.
                handle.flush()
                handle.attrs["rows_done"] = stop
                handle.flush()
                new_rows += stop - start
                bar.update(stop - start)
        del handle.attrs["rows_done"]
        del handle.attrs["fingerprint"]
    finally:
        handle.close()
    os.replace(partial, out_path)
    elapsed = time.perf_counter() - started
    logger.info(
        "extracted %d images%s (%d new) with %s in %.1f s, %.2f images/s, peak device memory %s -> %s",
        n_rows,
        f" of {shard_label}" if shard_label else "",
        new_rows,
        model_name,
        elapsed,
        new_rows / elapsed if elapsed > 0 else float("nan"),
        _peak_device_memory(adapter),
        out_path,
    )
    return out_path


def merge_shards(manifest: str | Path, shard_paths: Sequence[str | Path], out_path: str | Path) -> Path:
    """Join the shard files of one extraction into the contract file, exactly as an unsharded run writes it.

    Checks that the shards are ``0..n-1`` of one run (same attributes and layers, consecutive rows) and
    that their ids are the manifest's, in manifest order.  The merged file is written as
    ``<out_path>.partial`` and renamed when complete.

    Raises:
        ValueError: a shard is missing, repeated, from another run, or the ids do not match the manifest.
        InsufficientDiskSpaceError: the output folder cannot hold the merged file.
    """
    manifest, out_path = Path(manifest), Path(out_path)
    paths = [Path(path) for path in shard_paths]
    if not paths:
        raise ValueError("merge_shards needs at least one shard file")
    entries = _read_manifest(manifest, manifest.parent)
    manifest_ids = [image_id for image_id, _ in entries]
    manifest_sha256 = _sha256(manifest)
    infos = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"shard file {path} does not exist")
        with h5py.File(path, "r") as handle:
            attrs = dict(handle.attrs)
            missing = [key for key in SHARD_ATTRS if key not in attrs]
            if missing or "rows_done" in attrs:
                raise ValueError(f"{path} is not a finished shard file (missing attributes {missing})")
            infos.append(
                (
                    int(attrs["shard_index"]),
                    path,
                    attrs,
                    handle["activations"].shape[1:],
                    handle.get("embeddings") is not None,
                )
            )
    infos.sort(key=lambda info: info[0])
    count = int(infos[0][2]["shard_count"])
    if [info[0] for info in infos] != list(range(count)) or len(infos) != count:
        raise ValueError(
            f"expected shards 0..{count - 1}, got {sorted(info[0] for info in infos)} ({', '.join(map(str, paths))})"
        )
    common = {key: value for key, value in infos[0][2].items() if key not in SHARD_ATTRS}
    position = 0
    for index, path, attrs, shape, has_embeddings in infos:
        mine = {key: value for key, value in attrs.items() if key not in SHARD_ATTRS}
        differing = sorted(
            key
            for key in set(mine) | set(common)
            if not np.array_equal(np.asarray(mine.get(key)), np.asarray(common.get(key)))
        )
        if differing or shape != infos[0][3] or has_embeddings != infos[0][4]:
            raise ValueError(
                f"shard {path} was written by a different run than {infos[0][1]}: {differing or 'shapes differ'}"
            )
        if int(attrs["row_start"]) != position:
            raise ValueError(f"shard {path} starts at row {attrs['row_start']}, expected {position}")
        position = int(attrs["row_stop"])
    if common["manifest_sha256"] != manifest_sha256:
        raise ValueError(f"the shards were extracted from another version of {manifest} (manifest_sha256 differs)")
    if position != len(manifest_ids):
        raise ValueError(f"the shards cover {position} rows but {manifest} has {len(manifest_ids)}")

    with h5py.File(infos[0][1], "r") as first:
        n_layers, hidden_dim = first["activations"].shape[1:]
        embedding_dim = first["embeddings"].shape[1] if "embeddings" in first else None
        storage_dtype = first["activations"].dtype
        compression = {}
        if first["activations"].compression:
            compression = {"compression": first["activations"].compression}
            if first["activations"].compression_opts is not None:
                compression["compression_opts"] = first["activations"].compression_opts
    needed = projected_size(manifest_ids, n_layers, hidden_dim, embedding_dim, storage_dtype)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _check_disk_space(out_path.parent, needed, f"{out_path.name} ({len(manifest_ids)} images, {count} shards)")
    partial = out_path.with_name(out_path.name + ".partial")
    cache_bytes = _chunk_cache_bytes(len(manifest_ids), n_layers, hidden_dim, storage_dtype)
    with h5py.File(partial, "w", rdcc_nbytes=cache_bytes, rdcc_nslots=100_003) as merged:
        _create_datasets(merged, manifest_ids, n_layers, hidden_dim, embedding_dim, storage_dtype, compression)
        for key, value in common.items():
            merged.attrs[key] = value
        for _, path, attrs, _, _ in infos:
            start, stop = int(attrs["row_start"]), int(attrs["row_stop"])
            with h5py.File(path, "r") as shard_file:
                shard_ids = list(shard_file["ids"].asstr()[()])
                if shard_ids != manifest_ids[start:stop]:
                    raise ValueError(f"ids in {path} are not rows {start}-{stop - 1} of {manifest} in manifest order")
                for offset in range(0, stop - start, _CHUNK_ROWS):  # chunk-aligned blocks: bounded memory
                    block = slice(offset, min(offset + _CHUNK_ROWS, stop - start))
                    target = slice(start + block.start, start + block.stop)
                    merged["activations"][target] = shard_file["activations"][block]
                    if embedding_dim is not None:
                        merged["embeddings"][target] = shard_file["embeddings"][block]
    os.replace(partial, out_path)
    logger.info("merged %d shards (%d images) into %s", count, len(manifest_ids), out_path)
    return out_path


def _stored_layer_names(handle: h5py.File) -> list[str]:
    names = [str(name) for name in handle.attrs["layer_names"]]
    if "embeddings" in handle:
        names.append(EMBEDDINGS_LAYER)
    return names


def layer_names(path: str | Path) -> list[str]:
    """Layer names of an activations file: its ``hidden.i`` layers, plus ``image_embeds`` when present."""
    with h5py.File(path, "r") as handle:
        return _stored_layer_names(handle)


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
    if not path.is_file():
        raise FileNotFoundError(f"activations file {path} does not exist")
    with h5py.File(path, "r") as handle:
        names = _stored_layer_names(handle)
        if isinstance(layer, str):
            if layer not in names:
                raise ValueError(f"layer {layer!r} is not in {path}; its layers: {', '.join(names)}")
            name = layer
        elif isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
            if not -len(names) <= layer < len(names):
                raise ValueError(f"layer index {layer} is out of range for {path}, which has {len(names)} layers")
            name = names[layer]
        else:
            raise ValueError(f"layer must be a name or an integer position, got {layer!r}")
        ids = np.asarray(handle["ids"].asstr()[()], dtype=str)
        if name == EMBEDDINGS_LAYER:
            values = handle["embeddings"][()]
        else:
            values = handle["activations"][:, names.index(name), :]
    return ids, values.astype(np.float32, copy=False)

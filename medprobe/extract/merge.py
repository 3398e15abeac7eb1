"""Join the shard files of one extraction into the activations file, exactly as an unsharded run writes it.

A shard file is the activations file of consecutive, batch-aligned manifest rows, with the attributes
``shard_index``, ``shard_count``, ``row_start`` and ``row_stop`` added; the file of a job that was the whole
manifest (one shard) has none of them and already is the activations file. Under ``extraction.dtype: int8``
the shards hold float16 and the merge writes the int8 file with its per-channel scales
(:mod:`medprobe.extract.quantise`), also for a single shard.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from medprobe.contracts import DamagedFileError, open_hdf5, read_dataset
from medprobe.extract.files import CHUNK_ROWS, Layout, check_disk_space, check_layout
from medprobe.extract.plan import read_manifest
from medprobe.extract.quantise import channel_scales, layer_absmax, quantise, row_blocks
from medprobe.io import atomic_path, decode_strings, sha256_file

__all__ = ["SHARD", "SHARD_ATTRS", "merge_shards", "merged_path"]

logger = logging.getLogger("medprobe.extract")

SHARD_ATTRS = ("shard_index", "shard_count", "row_start", "row_stop")
# What a damaged shard is called in messages; it is rebuilt by asking for its activations file (merged_path).
SHARD = "shard file"


def merged_path(shard: str | Path) -> Path:
    """The activations file a shard ``{task}.shards/{i}.h5`` is merged into: ``{task}.h5``."""
    folder = Path(shard).parent
    return folder.with_name(folder.name.removesuffix(".shards") + ".h5")


@dataclasses.dataclass(frozen=True)
class _Shard:
    path: Path
    attrs: dict[str, Any]
    shape: tuple[int, ...]
    has_embeddings: bool

    @property
    def index(self) -> int:
        return int(self.attrs["shard_index"])

    @property
    def rows(self) -> tuple[int, int]:
        return int(self.attrs["row_start"]), int(self.attrs["row_stop"])

    @property
    def run_attrs(self) -> dict[str, Any]:
        """The attributes every shard of one run shares."""
        return {key: value for key, value in self.attrs.items() if key not in SHARD_ATTRS}


def merge_shards(manifest: str | Path, shard_paths: Sequence[str | Path], out_path: str | Path) -> Path:
    """Join the shard files of one extraction into ``out_path``, exactly as an unsharded run writes it.

    Checks that the shards are ``0..n-1`` of one run (same attributes and layers, consecutive rows) and
    that their ids are the manifest's, in manifest order.  One shard file without shard attributes (an
    extraction in one job) is linked to ``out_path`` (copied where the file system cannot link).  The
    output is written under a temporary name and renamed when complete.

    Raises:
        ValueError: a shard is missing, repeated, from another run, or the ids do not match the manifest.
        InsufficientDiskSpaceError: the output folder cannot hold the merged file.
    """
    manifest, out_path = Path(manifest), Path(out_path)
    if not shard_paths:
        raise ValueError("merge_shards needs at least one shard file")
    manifest_ids = [image_id for image_id, _ in read_manifest(manifest, manifest.parent)]
    shards = _in_order([_read_shard(Path(path)) for path in shard_paths])
    _check_one_run(shards)
    if shards[0].run_attrs["manifest_sha256"] != sha256_file(manifest):
        raise ValueError(f"the shards were extracted from another version of {manifest} (manifest_sha256 differs)")
    if shards[-1].rows[1] != len(manifest_ids):
        raise ValueError(f"the shards cover {shards[-1].rows[1]} rows but {manifest} has {len(manifest_ids)}")
    if _decoded(shards[0].attrs.get("dtype")) == "int8":
        _write_quantised(shards, manifest_ids, manifest, out_path)
        logger.info("quantised %d shard(s) (%d images) to int8 into %s", len(shards), len(manifest_ids), out_path)
        return out_path
    if len(shards) == 1:
        _check_ids(shards[0], manifest_ids, manifest)
        _link_or_copy(shards[0].path, out_path)
        logger.info("one shard (%d images): %s is %s", len(manifest_ids), out_path, shards[0].path)
        return out_path
    _write_merged(shards, manifest_ids, manifest, out_path)
    logger.info("merged %d shards (%d images) into %s", len(shards), len(manifest_ids), out_path)
    return out_path


def _read_shard(path: Path) -> _Shard:
    with open_hdf5(path, SHARD, target=merged_path(path)) as handle:
        check_layout(handle, SHARD, target=merged_path(path))
        attrs = dict(handle.attrs)
        shape = handle["activations"].shape
        has_embeddings = handle.get("embeddings") is not None
    missing = [key for key in SHARD_ATTRS if key not in attrs]
    if "rows_done" in attrs or missing and missing != list(SHARD_ATTRS):
        raise DamagedFileError(
            path, f"not a finished shard file (missing attributes {missing})", what=SHARD, target=merged_path(path)
        )
    if missing:  # the whole manifest in one job
        attrs.update(shard_index=0, shard_count=1, row_start=0, row_stop=shape[0])
    return _Shard(path, attrs, shape[1:], has_embeddings)


def _in_order(shards: list[_Shard]) -> list[_Shard]:
    """The shards by index; they must be exactly ``0..n-1`` of ``n``."""
    shards = sorted(shards, key=lambda shard: shard.index)
    count = int(shards[0].attrs["shard_count"])
    if [shard.index for shard in shards] != list(range(count)):
        raise ValueError(
            f"expected shards 0..{count - 1}, got {[shard.index for shard in shards]} "
            f"({', '.join(str(shard.path) for shard in shards)})"
        )
    return shards


def _check_one_run(shards: list[_Shard]) -> None:
    """Same attributes, shapes and datasets in every shard, and rows that follow on without a gap."""
    first, position = shards[0], 0
    for shard in shards:
        mine, common = shard.run_attrs, first.run_attrs
        differing = sorted(
            key
            for key in set(mine) | set(common)
            if not np.array_equal(np.asarray(mine.get(key)), np.asarray(common.get(key)))
        )
        if differing or shard.shape != first.shape or shard.has_embeddings != first.has_embeddings:
            raise ValueError(
                f"shard {shard.path} was written by a different run than {first.path}: {differing or 'shapes differ'}"
            )
        if shard.rows[0] != position:
            raise ValueError(f"shard {shard.path} starts at row {shard.rows[0]}, expected {position}")
        position = shard.rows[1]


def _check_ids(shard: _Shard, manifest_ids: list[str], manifest: Path) -> None:
    start, stop = shard.rows
    with h5py.File(shard.path, "r") as handle:
        if decode_strings(read_dataset(handle, SHARD, "ids")) != manifest_ids[start:stop]:
            raise DamagedFileError(
                shard.path,
                f"ids are not rows {start}-{stop - 1} of {manifest} in manifest order",
                what=SHARD,
                target=merged_path(shard.path),
            )


def _link_or_copy(source: Path, out_path: Path) -> None:
    """``out_path`` as a second name of ``source`` (no copy of a file of many GB), or a copy of it."""
    with atomic_path(out_path) as tmp:
        try:
            os.link(source, tmp)
        except OSError:  # a file system without hard links, or another device
            check_disk_space(out_path.parent, source.stat().st_size, out_path.name)
            shutil.copyfile(source, tmp)


def _write_merged(shards: list[_Shard], manifest_ids: list[str], manifest: Path, out_path: Path) -> None:
    with h5py.File(shards[0].path, "r") as first:
        layout = Layout.of_file(first, manifest_ids)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    what = f"{out_path.name} ({len(manifest_ids)} images, {len(shards)} shards)"
    check_disk_space(out_path.parent, layout.projected_size(), what)
    with atomic_path(out_path) as tmp, layout.open(tmp, "w") as merged:
        layout.create_datasets(merged)
        for key, value in shards[0].run_attrs.items():
            merged.attrs[key] = value
        for shard in shards:
            _check_ids(shard, manifest_ids, manifest)
            _copy_rows(shard, merged, layout.embedding_dim is not None)


def _copy_rows(shard: _Shard, merged: h5py.File, embeddings: bool) -> None:
    """The shard's rows into their place, in chunk-aligned blocks (bounded memory)."""
    start, stop = shard.rows
    with h5py.File(shard.path, "r") as source:
        for offset in range(0, stop - start, CHUNK_ROWS):
            block = slice(offset, min(offset + CHUNK_ROWS, stop - start))
            target = slice(start + block.start, start + block.stop)
            merged["activations"][target] = source["activations"][block]
            if embeddings:
                merged["embeddings"][target] = source["embeddings"][block]


def _decoded(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _write_quantised(shards: list[_Shard], manifest_ids: list[str], manifest: Path, out_path: Path) -> None:
    """The int8 activations file of the shards' float16 rows: every layer's per-channel scale from all rows
    (first pass), then the rows quantised into place (second pass), in chunk-sized blocks."""
    with h5py.File(shards[0].path, "r") as first:
        layout = dataclasses.replace(Layout.of_file(first, manifest_ids), dtype=np.dtype(np.int8))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    what = f"{out_path.name} ({len(manifest_ids)} images, int8)"
    check_disk_space(out_path.parent, layout.projected_size(), what)
    handles = [h5py.File(shard.path, "r") for shard in shards]
    try:
        with atomic_path(out_path) as tmp, layout.open(tmp, "w") as merged:
            layout.create_datasets(merged)
            for key, value in shards[0].run_attrs.items():
                merged.attrs[key] = value
            for shard in shards:
                _check_ids(shard, manifest_ids, manifest)
            sources = [(handle["activations"], shard.rows[1] - shard.rows[0]) for shard, handle in zip(shards, handles)]
            scales = np.stack(
                [channel_scales(layer_absmax(sources, layer, CHUNK_ROWS)) for layer in range(layout.n_layers)]
            )
            merged.create_dataset("scales", data=scales)
            for layer in range(layout.n_layers):
                _quantise_rows(shards, handles, merged["activations"], scales[layer], layer)
            if layout.embedding_dim is not None:
                sources = [
                    (handle["embeddings"], shard.rows[1] - shard.rows[0]) for shard, handle in zip(shards, handles)
                ]
                embedding_scales = channel_scales(layer_absmax(sources, None, CHUNK_ROWS))
                merged.create_dataset("embedding_scales", data=embedding_scales)
                _quantise_rows(shards, handles, merged["embeddings"], embedding_scales, None)
    finally:
        for handle in handles:
            handle.close()


def _quantise_rows(
    shards: list[_Shard], handles: list[h5py.File], target: h5py.Dataset, scales: np.ndarray, layer: int | None
) -> None:
    """One layer (``None``: the embeddings) of every shard, quantised with ``scales`` into ``target``."""
    name = "embeddings" if layer is None else "activations"
    for shard, handle in zip(shards, handles):
        start, stop = shard.rows
        for block in row_blocks(stop - start, CHUNK_ROWS):
            rows = slice(start + block.start, start + block.stop)
            if layer is None:
                target[rows] = quantise(handle[name][block], scales)
            else:
                target[rows, layer, :] = quantise(handle[name][block, layer, :], scales)

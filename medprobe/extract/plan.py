"""What one extraction job computes, fixed before its model loads: the manifest rows of its shard and how
they are stored.  Everything here is checked first, so that a bad setting or a missing image stops the job
before a large model is loaded, not hours into the run."""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medprobe.io import sha256_file
from medprobe.models import PROMPT_FORMATS
from medprobe.settings import ExtractionSettings

__all__ = ["ExtractionPlan", "ImageReadError", "plan_extraction", "read_manifest", "resolve_layers", "shard_rows"]

# ``int8``: the activations file holds int8 values with a float32 scale per layer and channel (the authors
# stored uint8 per channel). The scale needs every row, so extraction jobs write float16 and merge_shards
# quantises (:mod:`medprobe.extract.quantise`).
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32, "int8": np.float16}
COMPRESSIONS = ("none", "gzip", "lzf")


class ImageReadError(RuntimeError):
    """An image named in the manifest is missing or cannot be decoded."""


@dataclasses.dataclass(frozen=True)
class ExtractionPlan:
    """The rows ``[row_start, row_stop)`` of one manifest, shard ``shard_index`` of ``shard_count``.

    Attributes:
        entries: ``(image_id, image path)`` of the shard's rows, in manifest order.
        compression: the h5py dataset options of ``settings.compression``.
    """

    manifest: Path
    manifest_sha256: str
    settings: ExtractionSettings
    entries: tuple[tuple[str, Path], ...]
    row_start: int
    row_stop: int
    shard_index: int
    compression: dict[str, Any]

    @property
    def shard_count(self) -> int:
        return self.settings.shards

    @property
    def ids(self) -> list[str]:
        return [image_id for image_id, _ in self.entries]

    @property
    def storage_dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.settings.dtype])

    @property
    def shard_attrs(self) -> dict[str, int]:
        """The attributes that place a shard file in the manifest (none when the job is the whole manifest)."""
        if self.shard_count == 1:
            return {}
        return dict(
            shard_index=self.shard_index, shard_count=self.shard_count, row_start=self.row_start, row_stop=self.row_stop
        )

    def describe(self) -> str:
        """``shard 2/4 (rows 10-19)`` for a shard, empty for the whole manifest."""
        if self.shard_count == 1:
            return ""
        return f"shard {self.shard_index + 1}/{self.shard_count} (rows {self.row_start}-{self.row_stop - 1})"


def plan_extraction(
    manifest: Path, settings: ExtractionSettings, shard: int = 0, root: Path = Path(".")
) -> ExtractionPlan:
    """Check the settings, read the manifest and check that every image of shard ``shard`` exists.

    Raises:
        FileNotFoundError: the manifest or an image is missing (the message names image_id and path).
        ValueError: bad manifest, ``dtype``, ``prompt_format``, ``batch_size``, ``compression`` or shard.
    """
    if settings.dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype is {settings.dtype!r}; valid storage dtypes: {', '.join(STORAGE_DTYPES)}")
    if settings.prompt_format not in PROMPT_FORMATS:
        raise ValueError(
            f"extraction config key 'prompt_format' is {settings.prompt_format!r}; valid values: "
            f"{', '.join(PROMPT_FORMATS)}"
        )
    if not isinstance(settings.batch_size, int) or settings.batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {settings.batch_size!r}")
    compression = compression_options(settings.compression, settings.compression_level)
    all_entries = read_manifest(manifest, root)
    row_start, row_stop = shard_rows(len(all_entries), settings.batch_size, shard, settings.shards)
    entries = all_entries[row_start:row_stop]
    for image_id, path in entries:
        if not path.is_file():
            raise FileNotFoundError(f"image {image_id!r} listed in {manifest} not found at {path}")
    return ExtractionPlan(
        manifest=manifest,
        manifest_sha256=sha256_file(manifest),
        settings=settings,
        entries=tuple(entries),
        row_start=row_start,
        row_stop=row_stop,
        shard_index=shard,
        compression=compression,
    )


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


def compression_options(compression: str, level: int) -> dict[str, Any]:
    """h5py dataset options for ``extraction.compression`` and ``compression_level`` (gzip only)."""
    if compression == "none":
        return {}
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression is {compression!r}; valid values: {', '.join(COMPRESSIONS)}")
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": int(level)}
    return {"compression": compression}


def read_manifest(manifest: Path, root: Path) -> list[tuple[str, Path]]:
    """``(image_id, resolved path)`` for every manifest row, in manifest order; relative paths are
    relative to ``root``."""
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
            entries.append((image_id, Path(path) if os.path.isabs(path) else root / path))
    if not entries:
        raise ValueError(f"manifest {manifest} has no rows")
    return entries


def resolve_layers(layers: str | Sequence[int] | None, num_hidden_states: int) -> list[int]:
    """Sorted, unique, non-negative hidden-state indices of a layer selection (the config's ``layers``).

    ``None`` or ``"all"``: every hidden state; ``"every:k"``: ``0, k, 2k, ...`` and always the last one (the
    final, normed output); a list: those indices (negative ones count from the end).
    """
    if layers is None or layers == "all":
        return list(range(num_hidden_states))
    if isinstance(layers, str):
        step = layers.removeprefix("every:")
        if step == layers or not step.isdigit() or int(step) < 1:
            raise ValueError(f"layers is {layers!r}; valid: 'all', 'every:<k>' (k >= 1) or a list of indices")
        return sorted(set(range(0, num_hidden_states, int(step))) | {num_hidden_states - 1})
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

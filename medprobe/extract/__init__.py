"""Batched, resumable extraction of per-layer activations into the activations HDF5.

* :mod:`~medprobe.extract.plan`: what a job computes (settings, the manifest rows of its shard), checked
  before the model loads;
* :mod:`~medprobe.extract.run`: :func:`extract_activations`, the job itself (plan, load the model onto the
  job's devices, open or resume the file, run the batches, finish); :func:`extract_tasks`, one model loaded
  once for several tasks (``group_tasks``);
* :mod:`~medprobe.extract.files`: the file layout, the resumable :class:`ActivationsWriter`, reading a layer;
* :mod:`~medprobe.extract.merge`: :func:`merge_shards`, the shard files of one extraction joined into one.

Shards: with ``extraction.shards`` = n > 1, job i extracts the i-th of n consecutive, batch-aligned row
ranges of the manifest into its own file (attributes ``shard_index``, ``shard_count``, ``row_start``,
``row_stop`` added); :func:`merge_shards` joins them into the contract file, bit-identical to an unsharded
run with the same batch size (the batches are the same).  With one shard the job's file is the contract
file, and merging only gives it its final name.
"""

from __future__ import annotations

from typing import Any

from medprobe.extract.files import (
    ActivationsWriter,
    InsufficientDiskSpaceError,
    Layout,
    layer_names,
    projected_size,
    read_activations,
)
from medprobe.extract.merge import merge_shards
from medprobe.extract.plan import ExtractionPlan, ImageReadError, plan_extraction, shard_rows

__all__ = [
    "ActivationsWriter",
    "ExtractionPlan",
    "ImageReadError",
    "InsufficientDiskSpaceError",
    "Layout",
    "extract_activations",
    "extract_tasks",
    "layer_names",
    "merge_shards",
    "plan_extraction",
    "projected_size",
    "read_activations",
    "shard_rows",
    "software_version",
]

# Imported on first use: they need torch, which merging shards and reading files do not.
_RUN = ("extract_activations", "extract_tasks", "software_version")


def __getattr__(name: str) -> Any:
    if name in _RUN:
        from medprobe.extract import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The probes' files: activations read and checked against their manifest, probe outputs written.

File contracts (``layers.h5``, ``predictions.h5``, ``probe.json``, ``efficiency.h5``) are in
docs/architecture.md, section "Probes". Every output is written to a temporary sibling and renamed into
place (:func:`medprobe.io.atomic_path`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from medprobe.checks import check_finite
from medprobe.contracts import open_hdf5
from medprobe.extract.files import ACTIVATIONS, check_layout, check_manifest_match, read_layer
from medprobe.io import atomic_path, sha256_file, write_strings, write_text_atomic
from medprobe.labels import load_manifest
from medprobe.layers import EMBEDDINGS_LAYER, resolve_layer

SPLITS = ("train", "val", "test")


class Activations:
    """An activations file open for reading, checked against the manifest it was extracted from: the same
    image ids in the same order, the manifest's SHA-256, and arrays of matching shape; a file that breaks this raises
    :class:`medprobe.contracts.DamagedFileError`, whose message says how to rebuild it.

    ``layer_names`` are the stored hidden layers followed by ``image_embeds`` when the file holds the
    projected image embeddings. Use as a context manager; layers are read one at a time (:meth:`read`).
    """

    def __init__(self, path: str | os.PathLike, manifest_csv: str | os.PathLike) -> None:
        self.path, self.manifest_csv = path, manifest_csv
        self.manifest = load_manifest(manifest_csv)
        self.manifest_sha256 = sha256_file(manifest_csv)
        self.handle = open_hdf5(path, ACTIVATIONS)
        try:
            self.layer_names = self._checked_layer_names()
        except BaseException:
            self.handle.close()
            raise
        self.num_hidden_states = self.handle.attrs.get("num_hidden_states")

    def __enter__(self) -> Activations:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()

    def _checked_layer_names(self) -> list[str]:
        layer_names = check_layout(self.handle)
        check_manifest_match(self.handle, self.manifest["image_id"].tolist(), self.manifest_csv, self.manifest_sha256)
        return layer_names

    def resolve(self, layer: int | str) -> str:
        """The stored layer name a config value means (:func:`medprobe.layers.resolve_layer`)."""
        return resolve_layer(layer, self.layer_names, os.fspath(self.path), self.num_hidden_states)

    def width(self, name: str) -> int:
        """The number of features of layer ``name``."""
        if name == EMBEDDINGS_LAYER and "embeddings" in self.handle:
            return int(self.handle["embeddings"].shape[1])
        return int(self.handle["activations"].shape[2])

    def read(self, name: str) -> np.ndarray:
        """One layer's features ``(N, D)``, checked finite; never the whole activations array."""
        features = read_layer(self.handle, self.layer_names.index(name), name == EMBEDDINGS_LAYER)
        check_finite(features, self.manifest["image_id"].tolist(), f"{self.path} layer {name}", "activations")
        return features

    def split_masks(self, need_val: bool = True) -> dict[str, np.ndarray]:
        """Row masks of the manifest's ``train``, ``val`` and ``test`` splits; each needed one must be non-empty."""
        masks = {split: (self.manifest["split"] == split).to_numpy() for split in SPLITS}
        for split in SPLITS if need_val else ("train", "test"):
            if not masks[split].any():
                raise ValueError(f"manifest {self.manifest_csv} has no rows with split == {split!r}")
        return masks


def write_probabilities(
    path: str | os.PathLike,
    ids: Sequence[str],
    probabilities: np.ndarray,
    *,
    datasets: Mapping[str, np.ndarray] | None = None,
    attrs: Mapping[str, Any],
) -> None:
    """A probe output of test probabilities: ``ids``, ``probabilities`` (float32) and any further ``datasets``
    and ``attrs``; which ones each file has is its contract (``layers.h5``, ``predictions.h5``, ``efficiency.h5``)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as out:
        write_strings(out, "ids", ids)
        out.create_dataset("probabilities", data=probabilities, dtype=np.float32)
        for name, data in (datasets or {}).items():
            out.create_dataset(name, data=data)
        for key, value in attrs.items():
            out.attrs[key] = value


def write_json(path: str | os.PathLike, content: dict) -> None:
    write_text_atomic(path, json.dumps(content, indent=2) + "\n")

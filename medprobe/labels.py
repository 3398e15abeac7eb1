"""Manifest loading and target encoding for the probes.

The manifest contract (docs/architecture.md, "Manifest") stores every label as text: class names such as
``"0"`` or ``"NA"`` must stay strings, so manifests are always read with ``dtype=str`` and
``keep_default_na=False`` (an empty cell is the empty string, never NaN).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

KINDS = ("binary", "multiclass", "multilabel")
SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("image_id", "path", "split", "patient_id", "source")

# How many offending values an error message lists before it says "and N more".
_MAX_LISTED = 10


def _listing(values: Sequence[str]) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:_MAX_LISTED])
    if len(values) > _MAX_LISTED:
        shown += f" and {len(values) - _MAX_LISTED} more"
    return shown


def load_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a task manifest CSV with every column as text and check its structure.

    Checks: the columns ``image_id, path, split, patient_id, source`` and at least one of ``label`` /
    ``labels`` exist; ``image_id`` is unique; ``split`` only holds ``train``, ``val`` or ``test``.
    Raises ``ValueError`` naming the file and the offending columns or values.
    """
    path = os.fspath(path)
    manifest = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in REQUIRED_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(
            f"manifest {path}: missing required column(s) {_listing(missing)}; "
            f"found columns {list(manifest.columns)}"
        )
    if "label" not in manifest.columns and "labels" not in manifest.columns:
        raise ValueError(
            f"manifest {path}: needs a 'label' column (binary/multiclass) or a 'labels' column "
            f"(multilabel); found columns {list(manifest.columns)}"
        )
    duplicated = manifest["image_id"][manifest["image_id"].duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"manifest {path}: duplicate image_id value(s) {_listing(duplicated)}")
    bad_splits = sorted(set(manifest["split"]) - set(SPLITS))
    if bad_splits:
        raise ValueError(
            f"manifest {path}: column 'split' holds {_listing(bad_splits)}; allowed values are {list(SPLITS)}"
        )
    return manifest


def encode_targets(manifest: pd.DataFrame, kind: str, classes: Sequence[str]) -> np.ndarray:
    """Encode the manifest's labels against the task's class list.

    * ``binary`` / ``multiclass``: ``(n,)`` int64 index of column ``label`` into ``classes``
      (binary: ``classes[1]`` is the positive class).
    * ``multilabel``: ``(n, len(classes))`` uint8 indicator matrix from column ``labels``
      (``|``-joined finding names, the empty string meaning no finding).

    A label that is not in ``classes`` raises ``ValueError`` naming the value, an image carrying it
    and the valid classes.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {list(KINDS)}")
    classes = [str(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes {classes} contain duplicates")
    if kind == "binary" and len(classes) != 2:
        raise ValueError(f"binary task needs exactly 2 classes, got {classes}")
    index = {name: i for i, name in enumerate(classes)}
    image_ids = manifest["image_id"].tolist() if "image_id" in manifest.columns else None

    def where(row: int) -> str:
        return f" (image_id {image_ids[row]!r})" if image_ids is not None else f" (row {row})"

    if kind in ("binary", "multiclass"):
        if "label" not in manifest.columns:
            raise ValueError(f"{kind} task needs a 'label' column; found columns {list(manifest.columns)}")
        labels = manifest["label"].astype(str).tolist()
        targets = np.empty(len(labels), dtype=np.int64)
        for row, value in enumerate(labels):
            position = index.get(value)
            if position is None:
                raise ValueError(f"label {value!r}{where(row)} is not one of the task's classes {classes}")
            targets[row] = position
        return targets

    if "labels" not in manifest.columns:
        raise ValueError(f"multilabel task needs a 'labels' column; found columns {list(manifest.columns)}")
    cells = manifest["labels"].astype(str).tolist()
    targets = np.zeros((len(cells), len(classes)), dtype=np.uint8)
    for row, cell in enumerate(cells):
        if cell == "":
            continue
        for finding in cell.split("|"):
            position = index.get(finding)
            if position is None:
                raise ValueError(
                    f"finding {finding!r} in labels {cell!r}{where(row)} is not one of the task's classes {classes}"
                )
            targets[row, position] = 1
    return targets

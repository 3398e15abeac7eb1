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

from medprobe.contracts import DamagedFileError

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
    Raises :class:`medprobe.contracts.DamagedFileError` (a ``ValueError``) naming the file, the offending columns
    or values, and the command that rebuilds it; a file that does not parse as CSV raises it too.
    """
    path = os.fspath(path)
    try:
        manifest = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DamagedFileError(path, f"not a readable CSV table ({error})", what="manifest") from error
    missing = [c for c in REQUIRED_COLUMNS if c not in manifest.columns]
    if missing:
        raise DamagedFileError(
            path,
            f"missing required column(s) {_listing(missing)}; found columns {list(manifest.columns)}",
            what="manifest",
        )
    if "label" not in manifest.columns and "labels" not in manifest.columns:
        raise DamagedFileError(
            path,
            "needs a 'label' column (binary/multiclass) or a 'labels' column (multilabel); found columns "
            f"{list(manifest.columns)}",
            what="manifest",
        )
    duplicated = manifest["image_id"][manifest["image_id"].duplicated()].unique().tolist()
    if duplicated:
        raise DamagedFileError(path, f"duplicate image_id value(s) {_listing(duplicated)}", what="manifest")
    bad_splits = sorted(set(manifest["split"]) - set(SPLITS))
    if bad_splits:
        raise DamagedFileError(
            path, f"column 'split' holds {_listing(bad_splits)}; allowed values are {list(SPLITS)}", what="manifest"
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


def manifest_findings(manifest: pd.DataFrame) -> list[str]:
    """Every finding named in a multilabel manifest, most frequent in the training rows first (ties by name)."""
    counts: dict[str, list[int]] = {}
    for split, cell in zip(manifest["split"], manifest["labels"].astype(str)):
        for finding in filter(None, cell.split("|")):
            counts.setdefault(finding, [0, 0])[split != "train"] += 1
    return sorted(counts, key=lambda name: (-counts[name][0], -counts[name][1], name))


def task_targets(
    manifest: pd.DataFrame, task_config: dict, source: str = "manifest"
) -> tuple[np.ndarray, list[str], dict[str, int]]:
    """Targets of a task and the classes they encode, after the task's class rules.

    ``classes: all`` (multilabel) takes every finding of the manifest (:func:`manifest_findings`). For
    multilabel tasks with ``min_test_positives`` N > 0 only findings with more than N positive test images
    are kept, as the authors' ``label_counts > 50``. Returns ``(targets, classes, dropped)`` with
    ``dropped`` = {finding: test positives} of the findings the rule left out. Raises ``ValueError`` naming
    ``source`` when no finding is left.
    """
    kind = task_config["kind"]
    configured = task_config["classes"]
    classes = manifest_findings(manifest) if configured == "all" else [str(c) for c in configured]
    if kind != "multilabel":
        return encode_targets(manifest, kind, classes), classes, {}
    if not classes:
        raise ValueError(f"{source}: the labels column names no finding, so `classes: all` finds none")
    targets = encode_targets(manifest, kind, classes)
    threshold = int(task_config.get("min_test_positives", 0) or 0)
    if threshold <= 0:
        return targets, classes, {}
    positives = targets[(manifest["split"] == "test").to_numpy()].sum(axis=0)
    keep = positives > threshold
    dropped = {name: int(count) for name, count, kept in zip(classes, positives, keep) if not kept}
    if not keep.any():
        raise ValueError(
            f"{source}: no finding has more than min_test_positives={threshold} positive test images "
            f"(most: {int(positives.max())}); lower tasks.<task>.min_test_positives"
        )
    return targets[:, keep], [name for name, kept in zip(classes, keep) if kept], dropped

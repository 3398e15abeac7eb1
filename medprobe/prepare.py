"""Raw metadata table -> manifest, preprocessed images and sidecar (the ``prepare`` stage).

Every dataset recipe (the synthetic demo, and the real archives) ends in the same raw table, described
in docs/architecture.md; this module turns it into the manifest contract:

* train/test come from the dataset's own partition where it has one; otherwise patients are split
  (``tasks.<task>.test_fraction``, else ``split.test_fraction``, of the patients with unassigned rows);
* ``partition = train`` means "never test": a patient with such rows (PadChest's automatic labels) is a
  training patient with all of its rows, so the test patients are drawn from the others and nothing is dropped
  (the paper's PadChest counts add up to the whole dataset: 86,715 + 7,943 = 94,658 images);
* validation patients are carved out of train;
* all splits are grouped by patient (no patient in two splits) and stratified by each patient's
  majority label, with scikit-learn's StratifiedGroupKFold;
* every image goes through :func:`medprobe.images.preprocess`.

:func:`prepare_task` runs the steps in order: read the raw table, preprocess the images, assign the splits,
write the sidecar and, last, the manifest.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from medprobe.images import BadImageError, preprocess
from medprobe.io import sha256_file, write_text_atomic
from medprobe.settings import SplitSettings, TaskSettings
from medprobe.user_tables import (
    FileLookup,
    UserTableError,
    lines,
    normalise_id,
    read_csv,
    require_values,
    same_file_groups,
)

log = logging.getLogger("medprobe.prepare")

RECIPE_VERSION = "2"
# The raw table every dataset recipe writes (the demo's and the real ones), and the columns it must have.
RAW_TABLE_COLUMNS = ["image_id", "file", "patient_id", "label", "labels", "source", "partition", "group"]
RAW_COLUMNS = ["image_id", "file", "patient_id", "source", "partition"]
MANIFEST_COLUMNS = ["image_id", "path", "split", "patient_id", "label", "labels", "source", "group"]
SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")
# Raw-table columns compared as identifiers (stripped, Unicode NFC; medprobe.user_tables); `file` is a file name
IDENTIFIER_COLUMNS = ["image_id", "patient_id", "label", "labels", "source", "partition", "group"]
PARTITIONS = ("train", "test", "")
LABEL_SEPARATOR = "|"


def read_raw_table(path: str | Path, kind: str, classes: Sequence[str] | str) -> pd.DataFrame:
    """Read and check a raw ``metadata.csv`` (:func:`medprobe.user_tables.read_csv`: UTF-8, ids stripped and NFC,
    indexed by line number); errors name the file, the lines, the column and the offending values.

    ``classes: all`` (multilabel tasks) accepts every finding of the table."""
    path = Path(path)
    if classes == "all" and kind != "multilabel":
        raise ValueError(
            f"{path}: classes `all` takes every finding of a multilabel task; a {kind} task lists its classes"
        )
    label_column = "labels" if kind == "multilabel" else "label"
    table = read_csv(
        path,
        RAW_COLUMNS + [label_column],
        optional=["label", "labels", "group"],
        identifiers=IDENTIFIER_COLUMNS,
        files=["file"],
        what="raw metadata table",
    )
    table["labels"] = [
        LABEL_SEPARATOR.join(dict.fromkeys(filter(None, map(normalise_id, cell.split(LABEL_SEPARATOR)))))
        for cell in table["labels"]
    ]
    require_values(table, path, ["image_id", "file"] + ([] if kind == "multilabel" else ["label"]))
    check_image_ids(table, path)
    known = table["partition"].isin(PARTITIONS)
    if not known.all():
        raise UserTableError(
            f"{path}, column partition: must be train, test or empty; found {lines(table, ~known, 'partition')}"
        )
    check_labels(table, path, kind, classes)
    check_partitions(table, path)
    return table


def check_image_ids(table: pd.DataFrame, path: Path) -> None:
    """Image ids name the preprocessed files (``results/images/<task>/<image_id>.png``): safe characters only,
    and unique."""
    unsafe = ~table["image_id"].map(lambda value: bool(SAFE_ID.match(value)))
    if unsafe.any():
        raise UserTableError(
            f"{path}, column image_id: values must match {SAFE_ID.pattern} (letters, digits, '.', '_', '-': each "
            f"names a file, results/images/<task>/<image_id>.png); offending: {lines(table, unsafe, 'image_id')}"
        )
    repeated = table["image_id"].duplicated(keep=False)
    if repeated.any():
        values = list(dict.fromkeys(table["image_id"][repeated]))
        where = "; ".join(
            f"{value!r} on lines {', '.join(map(str, table.index[table['image_id'] == value]))}" for value in values[:5]
        )
        raise UserTableError(f"{path}: duplicate image_id values {values[:10]} ({where})")


def check_labels(table: pd.DataFrame, path: Path, kind: str, classes: Sequence[str] | str) -> None:
    """Labels (multilabel: findings) must be among the task's classes, compared as identifiers."""
    if classes == "all":
        return
    unnormalised = [name for name in classes if normalise_id(name) != name]
    if unnormalised:
        raise ValueError(
            f"the task's classes {unnormalised} have surrounding spaces or are not in Unicode NFC, but the labels of "
            f"{path} are compared stripped and in NFC: write them as {[normalise_id(n) for n in unnormalised]}"
        )
    if kind == "multilabel":
        label_column = "labels"
        outside = table["labels"].map(lambda cell: set(filter(None, cell.split(LABEL_SEPARATOR))) - set(classes))
        bad = outside.map(bool)
        unknown = sorted(set().union(*outside[bad]))
    else:
        label_column = "label"
        bad = ~table["label"].isin(list(classes))
        unknown = sorted(set(table["label"][bad]))
    if unknown:
        raise UserTableError(
            f"{path}: column {label_column} has values {unknown} not in the task's classes {list(classes)} "
            f"({lines(table, bad, label_column)})"
        )


def check_partitions(table: pd.DataFrame, path: Path) -> None:
    """A patient's rows must not be in both the train and the test partition, nor partly in test and partly
    unassigned (``prepare`` could then split the patient's unassigned rows into train). A patient with train and
    unassigned rows is a training patient. Rows without a patient id are their own patient."""
    with_id = table[table["patient_id"] != ""]
    counts = with_id.groupby("patient_id", sort=False)["partition"].nunique()
    mixed = with_id[with_id["patient_id"].isin(counts.index[counts > 1])]
    conflicts: dict[str, list[str]] = {"train_test": [], "test_empty": []}
    for patient, rows in mixed.groupby("patient_id", sort=False):
        found = set(rows["partition"])
        if "test" not in found:
            continue  # train and unassigned rows: a training patient
        kind = "train_test" if "train" in found else "test_empty"
        parts = ("train", "test") if kind == "train_test" else ("test", "")
        described = "; ".join(
            f"{part or 'empty'}: line(s) {', '.join(map(str, rows.index[rows['partition'] == part][:3]))}"
            for part in parts
        )
        conflicts[kind].append(f"{patient!r} ({described})")
    if conflicts["train_test"]:
        shown = conflicts["train_test"]
        raise UserTableError(
            f"{path}: patient(s) appear in both the train and the test partition: {', '.join(shown[:5])}"
            f"{f' and {len(shown) - 5} more' if len(shown) > 5 else ''}; a patient's images must all be on one side"
        )
    if conflicts["test_empty"]:
        shown = conflicts["test_empty"]
        raise UserTableError(
            f"{path}: patient(s) have rows with partition 'test' and rows with an empty partition: "
            f"{', '.join(shown[:5])}{f' and {len(shown) - 5} more' if len(shown) > 5 else ''}; the empty rows could "
            "be split into train while the others are test. Give all of a patient's rows partition test, or leave "
            "them all empty for prepare to split by patient"
        )


def patient_strata(table: pd.DataFrame, kind: str) -> pd.Series:
    """One stratum per image: the majority label of its patient (multilabel: the most common finding)."""
    if kind == "multilabel":
        per_image = table["labels"].map(lambda value: value.split("|")[0] if value else "none")
    else:
        per_image = table["label"]
    majority = per_image.groupby(table["patient_id"]).agg(lambda values: Counter(values).most_common(1)[0][0])
    return table["patient_id"].map(majority)


MAX_FOLDS = 20
FRACTION_TOLERANCE = 0.01


def holdout_folds(fraction: float, n_groups: int) -> tuple[int, int]:
    """``(n_splits, n_held)``: hold out ``n_held`` of ``n_splits`` folds, ``n_held / n_splits`` about ``fraction``.

    One fold of ``round(1 / fraction)`` where that is within one percentage point of ``fraction`` (0.2, 0.25,
    0.17 -> 1 of 6); otherwise the fewest folds (at most ``MAX_FOLDS``) that are (0.3 -> 3 of 10, 0.4 -> 2 of 5),
    else the closest."""
    single = max(2, min(round(1 / fraction), n_groups))
    best = (abs(1 / single - fraction), single, 1)
    if best[0] <= FRACTION_TOLERANCE:
        return single, 1
    for n_splits in range(2, max(2, min(MAX_FOLDS, n_groups)) + 1):
        n_held = min(n_splits - 1, max(1, round(fraction * n_splits)))
        error = abs(n_held / n_splits - fraction)
        if error <= FRACTION_TOLERANCE:
            return n_splits, n_held
        if error < best[0] - 1e-12:
            best = (error, n_splits, n_held)
    return best[1], best[2]


def grouped_holdout(
    table: pd.DataFrame, fraction: float, kind: str, seed: int, *, pool: str = "the patients", advice: str = ""
) -> np.ndarray:
    """Boolean mask of rows held out: about ``fraction`` of the patients, stratified by label.

    Rows without a patient id are their own group. StratifiedGroupKFold with the folds of
    :func:`holdout_folds`; the first ``n_held`` folds are the holdout. With fewer than two patients it raises
    ``ValueError`` naming ``pool`` (which patients these are), the patients and ``advice``.
    """
    if len(table) == 0:
        return np.zeros(0, dtype=bool)
    groups = table["patient_id"].where(table["patient_id"] != "", "image:" + table["image_id"])
    n_groups = groups.nunique()
    if n_groups < 2:
        named = ", ".join(repr(group) for group in groups.unique()[:1])
        raise ValueError(
            f"cannot hold out {fraction:.0%} of {pool}: there is only {n_groups} such patient ({named}, "
            f"{len(table)} row(s)){'; ' + advice if advice else ''}"
        )
    n_splits, n_held = holdout_folds(fraction, n_groups)
    strata = patient_strata(table.assign(patient_id=groups), kind)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    mask = np.zeros(len(table), dtype=bool)
    for _, (_, holdout) in zip(
        range(n_held), splitter.split(np.zeros(len(table)), strata.to_numpy(), groups.to_numpy())
    ):
        mask[holdout] = True
    return mask


def assign_splits(
    table: pd.DataFrame,
    kind: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    *,
    where: str | Path = "the raw table",
) -> pd.Series:
    """Split column (train/val/test), grouped by patient; the dataset's own partition is respected.

    ``test_fraction`` of the patients whose rows are all unassigned go to test; a patient with a
    ``partition = train`` row (which may never be test) stays in train with all its rows. ``where`` (the raw
    table's path) starts the messages of splits that cannot be made."""
    split = pd.Series("train", index=table.index, dtype=object)
    split[table["partition"] == "test"] = "test"
    training_patients = set(table["patient_id"][table["partition"] == "train"]) - {""}
    eligible = (table["partition"] == "") & ~table["patient_id"].isin(training_patients)
    try:
        if eligible.any():
            pool = table[eligible]
            held = grouped_holdout(
                pool,
                test_fraction,
                kind,
                seed,
                pool="the patients whose rows all have an empty partition, from whom the test split is drawn",
                advice="leave the partition of more patients empty, or set it (train/test) for every row yourself",
            )
            split[pool.index[held]] = "test"
        train = table[split == "train"]
        if len(train):
            held = grouped_holdout(
                train,
                val_fraction,
                kind,
                seed + 1,
                pool="the training patients, from whom the validation split is carved",
                advice="add training patients (rows with partition train, or more with an empty partition)",
            )
            split[train.index[held]] = "val"
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return split


def check_patients_disjoint(manifest: pd.DataFrame, where: str = "manifest") -> None:
    """Raise if a patient appears in two splits."""
    with_id = manifest[manifest["patient_id"] != ""]
    counts = with_id.groupby("patient_id")["split"].nunique()
    leaking = list(counts[counts > 1].index)
    if leaking:
        raise ValueError(f"{where}: patient(s) {leaking[:10]} appear in more than one split")


def class_counts(manifest: pd.DataFrame, kind: str) -> dict[str, dict[str, int]]:
    """Images per split and class (multilabel: per finding, plus ``none``)."""
    counts: dict[str, dict[str, int]] = {}
    for split, rows in manifest.groupby("split", sort=False):
        if kind == "multilabel":
            findings = Counter(name for value in rows["labels"] for name in (value.split("|") if value else ["none"]))
        else:
            findings = Counter(rows["label"])
        counts[str(split)] = {
            "images": int(len(rows)),
            "patients": int(rows["patient_id"].nunique()),
            **dict(sorted(findings.items())),
        }
    return counts


def prepare_task(
    task: str,
    settings: TaskSettings,
    split: SplitSettings,
    seed: int,
    *,
    metadata: str | Path,
    manifest: str | Path,
    sidecar: str | Path,
    images: str | Path,
    recipe_counts: str | Path | None = None,
    on_bad_image: str = "error",
    threads: int = 1,
) -> pd.DataFrame:
    """Build the manifest, the preprocessed images and the sidecar of one task from its raw table ``metadata``.

    ``split.test_fraction`` holds out test patients unless the task sets its own ``test_fraction``;
    ``recipe_counts`` is a real-dataset recipe's ``counts.json`` (the paper's counts next to those found), copied
    into the sidecar. The manifest is written last and atomically: if anything fails, no manifest exists, so
    Snakemake never takes a half-prepared task as complete.
    """
    metadata, images = Path(metadata), Path(images)
    test_fraction, fraction_origin = task_test_fraction(task, settings, split)
    table = read_raw_table(metadata, settings.kind, settings.classes)
    unique, shared = drop_shared_files(table, metadata, task, on_bad_image)
    kept, skipped = preprocess_images(unique, metadata.parent, images, task, on_bad_image, threads)
    skipped = sorted(shared + skipped, key=lambda entry: entry["line"])
    if kept.empty:
        raise ValueError(f"{metadata}: no usable image left for task {task}")
    splits = assign_splits(kept, settings.kind, split.val_fraction, test_fraction, seed, where=metadata)
    frame = manifest_frame(kept, splits, images, settings.kind)
    check_manifest(frame, task, metadata, manifest)
    description = describe(task, settings, frame, metadata, skipped, manifest)
    description["split_settings"] = {
        "val_fraction": split.val_fraction,
        "test_fraction": test_fraction,
        "test_fraction_from": fraction_origin,
        "seed": seed,
    }
    if recipe_counts is not None:
        description["recipe_counts"] = json.loads(Path(recipe_counts).read_text())
    write_text_atomic(sidecar, json.dumps(description, indent=2) + "\n")
    write_text_atomic(manifest, frame.to_csv(index=False, lineterminator="\n"))
    log.info("%s: %d images (%d skipped) -> %s", task, len(frame), len(skipped), manifest)
    if skipped:
        shown = ", ".join(entry["image_id"] for entry in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        log.warning(
            "%s: skipped %d of %d image(s) (on_bad_image: skip; listed with reasons in %s): %s",
            task,
            len(skipped),
            len(table),
            sidecar,
            shown,
        )
    return frame


def task_test_fraction(task: str, settings: TaskSettings, split: SplitSettings) -> tuple[float, str]:
    """The share of patients held out for test and the config key it comes from: the task's own
    ``test_fraction`` where set, else ``split.test_fraction``."""
    if settings.test_fraction is None:
        return split.test_fraction, "split.test_fraction"
    fraction = float(settings.test_fraction)
    if not 0 < fraction < 1:
        raise ValueError(f"tasks.{task}.test_fraction: {settings.test_fraction!r} is not between 0 and 1")
    return fraction, f"tasks.{task}.test_fraction"


def drop_shared_files(
    table: pd.DataFrame, metadata: Path, task: str, on_bad_image: str
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Rows that name one image file (:func:`medprobe.user_tables.same_file_groups`): one image listed twice
    could land in two splits. ``on_bad_image: error`` stops naming the rows; ``skip`` leaves every row of such a
    file out (keeping one would still leave the choice of its split, label and patient to chance), with a warning
    and a ``skipped`` entry each. Returns the rows kept and those entries."""
    groups = same_file_groups(table, "file", metadata.parent)
    if not groups:
        return table, []

    def rows(members: list) -> str:
        return " and ".join(
            f"line {line} (image_id {table.at[line, 'image_id']}, partition {table.at[line, 'partition'] or 'empty'}"
            f", file {table.at[line, 'file']})"
            for line in members
        )

    if on_bad_image == "error":
        shown = "; ".join(rows(members) for members in groups[:5])
        more = f" and {len(groups) - 5} more" if len(groups) > 5 else ""
        raise UserTableError(
            f"{metadata}: {len(groups)} image file(s) named by more than one row: {shown}{more}. One image is one "
            f"row (two could land in different splits); remove the extra rows, or set on_bad_image: skip to leave "
            f"every row of such a file out (task {task})"
        )
    skipped = []
    for members in groups:
        log.warning(
            "%s: %s name one image file; all of them are left out (on_bad_image: skip)", metadata, rows(members)
        )
        for line in members:
            others = [other for other in members if other != line]
            skipped.append(
                {
                    "image_id": table.at[line, "image_id"],
                    "file": table.at[line, "file"],
                    "line": int(line),
                    "reason": "the same image file as "
                    + ", ".join(f"image_id {table.at[other, 'image_id']} (line {other})" for other in others)
                    + "; every row naming it is left out",
                }
            )
    dropped = {line for members in groups for line in members}
    return table[~table.index.isin(dropped)], skipped


def preprocess_images(
    table: pd.DataFrame, raw_dir: Path, images: Path, task: str, on_bad_image: str, threads: int
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Preprocess every image of the raw table into ``images/<image_id>.png`` (``file`` is relative to
    ``raw_dir``); returns the rows kept (with the table's index) and, with ``on_bad_image: skip``, the images
    left out with the reason. A missing file whose name differs only in Unicode normal form or letter case from
    one that exists is reported naming both (:class:`medprobe.user_tables.FileLookup`)."""
    images.mkdir(parents=True, exist_ok=True)
    lookup = FileLookup()

    def convert(row: tuple[str, str]) -> str | None:
        image_id, relative = row
        source = Path(relative) if Path(relative).is_absolute() else raw_dir / relative
        try:
            if not source.exists():
                hint = lookup.hint(source)
                raise BadImageError(source, "file does not exist" + (f", {hint}" if hint else ""))
            preprocess(source, images / f"{image_id}.png")
        except BadImageError as error:
            if on_bad_image == "error":
                raise BadImageError(
                    error.path,
                    f"{error.reason} (image_id {image_id}, task {task}; set "
                    "on_bad_image: skip to leave such images out)",
                ) from None
            log.warning("skipping %s", error)
            return error.reason
        return None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        failures = list(pool.map(convert, zip(table["image_id"], table["file"])))
    skipped = [
        {"image_id": image_id, "file": file, "line": int(line), "reason": reason}
        for line, image_id, file, reason in zip(table.index, table["image_id"], table["file"], failures)
        if reason is not None
    ]
    return table[[reason is None for reason in failures]], skipped


def manifest_frame(kept: pd.DataFrame, splits: pd.Series, images: Path, kind: str) -> pd.DataFrame:
    """The manifest: one row per image kept, in the raw table's order, pointing at its preprocessed file."""
    return pd.DataFrame(
        {
            "image_id": kept["image_id"],
            "path": [str(images / f"{image_id}.png") for image_id in kept["image_id"]],
            "split": splits,
            "patient_id": kept["patient_id"],
            "label": kept["label"] if kind != "multilabel" else "",
            "labels": kept["labels"] if kind == "multilabel" else "",
            "source": kept["source"],
            "group": kept["group"],
        },
        columns=MANIFEST_COLUMNS,
    ).reset_index(drop=True)


def check_manifest(manifest: pd.DataFrame, task: str, metadata: Path, where: str | Path) -> None:
    """No patient in two splits, and no split empty."""
    check_patients_disjoint(manifest, f"{metadata} (task {task}, before writing {where})")
    for split in ("train", "val", "test"):
        if not (manifest["split"] == split).any():
            raise ValueError(
                f"{metadata}: split {split!r} is empty for task {task}; add patients or change split fractions"
            )


def describe(
    task: str,
    settings: TaskSettings,
    manifest: pd.DataFrame,
    metadata: Path,
    skipped: list[dict[str, str]],
    where: str | Path,
) -> dict[str, Any]:
    """The sidecar's account of the manifest: classes (or the findings found), counts, source and skipped images."""
    kind, classes = settings.kind, settings.classes
    counts = class_counts(manifest, kind)
    findings = present_findings(manifest) if classes == "all" else list(classes)
    return {
        "task": task,
        "recipe_version": RECIPE_VERSION,
        "dataset": settings.dataset,
        "kind": kind,
        "classes": classes if classes == "all" else list(classes),
        **({"findings": findings} if classes == "all" else {}),
        "counts": counts,
        "sources": {"metadata.csv": {"path": str(metadata), "sha256": sha256_file(metadata)}},
        "n_skipped": len(skipped),
        "skipped": skipped,
        "warnings": missing_class_warnings(counts, findings, kind, f"{where} (task {task})"),
    }


def present_findings(manifest: pd.DataFrame) -> list[str]:
    """Every finding of a multilabel manifest (``classes: all``), most frequent in train first, ties by name."""
    counts: dict[str, list[int]] = {}
    for split, cell in zip(manifest["split"], manifest["labels"]):
        for name in filter(None, cell.split("|")):
            counts.setdefault(name, [0, 0])[split != "train"] += 1
    return sorted(counts, key=lambda name: (-counts[name][0], -counts[name][1], name))


def missing_class_warnings(counts: dict[str, dict[str, int]], classes: list[str], kind: str, where: str) -> list[str]:
    """Warnings (also logged) for classes/findings with no image in a split; the probe and the metrics
    handle them (NaN AUC, counted as degenerate), so they are reported, not fatal."""
    noun = "finding" if kind == "multilabel" else "class"
    messages = []
    for split in ("train", "val", "test"):
        absent = [name for name in classes if counts.get(split, {}).get(name, 0) == 0]
        if absent:
            messages.append(f"{where}: {noun}(es) {absent} have no image in the {split} split")
    for message in messages:
        log.warning(message)
    return messages


# tests/test_reliability.py imports the former name
_write_atomic = write_text_atomic

"""Real-dataset recipes: the publishers' archives -> the raw metadata table of docs/architecture.md.

Each paper dataset is a :class:`Dataset` registered in :data:`RECIPES` under the config's
``tasks.<task>.dataset`` name, in one module of this package. A dataset lists its :class:`Source` files (public
URL with the publisher's checksum, Kaggle competition, or a file the user obtains under a data-use agreement)
and a ``convert`` function that reads the unpacked files and returns the raw table. Two steps use it:

* :func:`fetch` (rule ``download_dataset``): download what is public, check that manual files are present
  (else stop with :class:`~medprobe.download.MissingDataError` naming the dataset, where to request access,
  which files and the exact folder), verify checksums, extract archives safely, write a receipt;
* :func:`build_raw_table` (rule ``raw_dataset``): convert, write ``metadata.csv`` and ``counts.json``
  (the paper's expected counts next to the counts found).

A recipe with more than one way to label its images lists them in ``label_rules`` (the first is the default);
the task's ``label_rule`` picks one and reaches ``convert`` as the keyword argument ``label_rule``. A recipe that
reads files besides its dataset folder names them in ``inputs``; the rule passes their paths and they reach
``convert`` as keyword arguments too (T8's knee landmarks).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from medprobe.download import AccessDeniedError, MissingDataError, download, kaggle_download, safe_extract, verify
from medprobe.io import atomic_path, write_text_atomic
from medprobe.prepare import RAW_TABLE_COLUMNS
from medprobe.registry import Registry

log = logging.getLogger("medprobe.datasets")


@dataclass(frozen=True)
class Source:
    """One file of a dataset: public (``url``), on Kaggle (``kaggle``) or manual (neither)."""

    name: str
    url: str | None = None
    md5: str | None = None
    sha256: str | None = None
    kaggle: str | None = None
    extract: bool = False
    description: str = ""


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str
    licence: str
    access: str  # where to get it / request access
    sources: tuple[Source, ...]
    # (data_dir, out_dir, task classes[, label_rule=...][, <input>=path ...]) -> raw table; classes is a list
    # or "all" (multilabel)
    convert: Callable[..., pd.DataFrame]
    expected: dict[str, dict[str, int]] = field(default_factory=dict)
    manual_note: str = ""
    label_rules: tuple[str, ...] = ()  # values of tasks.<task>.label_rule; the first is the default
    inputs: tuple[str, ...] = ()  # further files convert reads, by keyword (paths the rule declares)

    @property
    def manual(self) -> bool:
        return any(source.url is None for source in self.sources)


def _load_modules() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


RECIPES: Registry[Dataset] = Registry("dataset recipe", loader=_load_modules)


def register(dataset: Dataset) -> Dataset:
    """Register a dataset recipe under ``dataset.name`` (the config's ``tasks.<task>.dataset``)."""
    return RECIPES.register(dataset.name, dataset)


def get(name: str) -> Dataset:
    """The registered recipe ``name`` (every module of this package is imported on first use)."""
    return RECIPES.get(
        name,
        hint="; provide the raw table metadata.csv yourself in the format of docs/datasets.md "
        "and point the task's raw_dir at its folder",
    )


def missing_message(dataset: Dataset, data_dir: Path, missing: list[Source]) -> str:
    lines = [
        f"Dataset {dataset.name!r} ({dataset.title}) is not available: {len(missing)} file(s) missing in {data_dir}/.",
        f"Access: {dataset.access}",
        f"Put these files (as downloaded, not renamed) into {data_dir.resolve()}/ and rerun:",
    ]
    lines += [f"  - {source.name}" + (f"  ({source.description})" if source.description else "") for source in missing]
    if dataset.manual_note:
        lines.append(dataset.manual_note)
    return "\n".join(lines)


def fetch(
    name: str, data_dir: str | Path, receipt: str | Path | None = None, checksums: dict[str, str] | None = None
) -> dict[str, Any]:
    """Download/verify/extract every source of dataset ``name`` into ``data_dir``; write and return a receipt.

    ``checksums`` (file name -> SHA-256, e.g. pinned in the config after a first download) are checked in
    addition to the publisher's. Nothing is written to ``receipt`` unless every file is present and valid.
    """
    dataset = get(name)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    missing = [source for source in dataset.sources if not _present(source, data_dir)]
    if missing:
        raise MissingDataError(missing_message(dataset, data_dir, missing))
    files = {
        source.name: _check_source(dataset, source, data_dir, (checksums or {}).get(source.name))
        for source in dataset.sources
    }
    result = {"dataset": name, "data_dir": str(data_dir), "files": files}
    if receipt is not None:
        write_text_atomic(receipt, json.dumps(result, indent=2) + "\n")
    return result


def _present(source: Source, data_dir: Path) -> bool:
    """Whether ``source`` is there or can be fetched: public, already present, or fetched now from Kaggle (with
    credentials in the environment)."""
    if (data_dir / source.name).exists() or source.url:
        return True
    if source.kaggle and os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        whole = source.name.endswith(f"{source.kaggle}.zip")
        kaggle_download(
            source.kaggle, (data_dir / source.name).parent, files=None if whole else [Path(source.name).name]
        )
        return (data_dir / source.name).exists()
    return False


def _check_source(dataset: Dataset, source: Source, data_dir: Path, pinned: str | None) -> dict[str, Any]:
    """Download (public) or verify (manual) one source and unpack it; its entry of the receipt."""
    path = data_dir / source.name
    pinned = pinned or source.sha256
    if path.is_dir():  # a folder the user unpacked (e.g. EyePACS' multi-part archives): listed, not hashed
        return {"folder": True, "entries": sum(1 for _ in path.iterdir())}
    if source.url:
        try:
            digest = download(source.url, path, md5=source.md5, sha256=pinned)
        except AccessDeniedError as error:
            raise MissingDataError(
                f"Dataset {dataset.name!r} ({dataset.title}): the server refused {error.url} (HTTP {error.status} "
                f"{error.reason}).\nAccess: {dataset.access}\nOnce you have access, download {source.name} by hand "
                f"and put it into {data_dir.resolve()}/ (not renamed); rerun, and it is verified"
                f"{' and unpacked' if source.extract else ''} instead of downloaded."
            ) from None
    else:
        digest = verify(path, md5=source.md5, sha256=pinned)
    if source.extract:
        safe_extract(path, path.parent)
    return {"sha256": digest, "md5": source.md5, "url": source.url, "pinned": bool(pinned or source.md5)}


def relative_file(path: Path, out_dir: Path) -> str:
    """Image path as stored in the raw table: relative to the raw folder, so the tree stays relocatable."""
    return os.path.relpath(Path(path).resolve(), Path(out_dir).resolve())


def raw_counts(table: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images, patients and classes in total and per partition (``train``/``test``) of a raw table."""
    counts: dict[str, dict[str, int]] = {}
    groups = [("total", table)] + [(str(part), rows) for part, rows in table.groupby("partition") if part]
    for name, rows in groups:
        entry = {"images": int(len(rows))}
        patients = rows["patient_id"][rows["patient_id"] != ""]
        if len(patients):
            entry["patients"] = int(patients.nunique())
        if rows["label"].ne("").any():
            entry.update({str(k): int(v) for k, v in rows["label"].value_counts().sort_index().items()})
        counts[name] = entry
    return counts


def compare_counts(expected: dict[str, dict[str, int]], found: dict[str, dict[str, int]]) -> list[str]:
    """Human-readable differences between the paper's counts and the counts found."""
    differences = []
    for part, entries in expected.items():
        for key, value in entries.items():
            got = found.get(part, {}).get(key)
            if got != value:
                differences.append(f"{part} {key}: paper {value}, found {got}")
    return differences


def resolve_label_rule(recipe: Dataset, task: str, label_rule: str | None) -> str | None:
    """The label rule ``convert`` gets: the task's ``label_rule`` checked against the recipe's, else its default."""
    if not recipe.label_rules:
        if label_rule is not None:
            raise ValueError(
                f"tasks.{task}.label_rule: dataset {recipe.name!r} has a single labelling rule; remove "
                f"the key (got {label_rule!r})"
            )
        return None
    if label_rule is None:
        return recipe.label_rules[0]
    if label_rule not in recipe.label_rules:
        raise ValueError(
            f"tasks.{task}.label_rule: {label_rule!r} is not a label rule of dataset {recipe.name!r}; "
            f"allowed: {', '.join(recipe.label_rules)} (default {recipe.label_rules[0]})"
        )
    return label_rule


def build_raw_table(
    dataset: str,
    task: str,
    data_dir: str | Path,
    metadata: str | Path,
    counts: str | Path,
    *,
    classes: list[str] | tuple[str, ...] | str,
    label_rule: str | None = None,
    inputs: Mapping[str, str | Path] | None = None,
) -> Path:
    """Convert dataset ``dataset`` (unpacked in ``data_dir``) into the raw table ``metadata`` and the count report
    ``counts``; images a recipe makes (T8's crops) go below the table's folder.

    ``classes`` are the task's classes (multilabel recipes keep only these findings; ``"all"`` keeps every
    finding); ``label_rule`` the task's ``label_rule`` (None: the recipe's default); ``inputs`` the further files
    the recipe reads (its ``inputs``, by name). Returns ``metadata`` as a path."""
    recipe = get(dataset)
    rule = resolve_label_rule(recipe, task, label_rule)
    metadata = Path(metadata)
    table = _convert(recipe, Path(data_dir), metadata.parent, classes, rule, inputs or {})
    excluded = table.attrs.get("excluded", {})
    table = table.reindex(columns=RAW_TABLE_COLUMNS, fill_value="").fillna("").astype(str)
    if table.empty:
        raise ValueError(f"{data_dir}: dataset {dataset!r} produced no image for task {task}")
    found = raw_counts(table)
    differences = compare_counts(recipe.expected, found)
    for line in differences:
        log.warning("%s (%s): %s", task, dataset, line)
    report = {
        "task": task,
        "dataset": dataset,
        "expected": recipe.expected,
        "found": found,
        "differences": differences,
        "excluded": excluded,
    }
    if rule is not None:
        report["label_rule"] = rule
    write_text_atomic(counts, json.dumps(report, indent=2) + "\n")
    with atomic_path(metadata) as temporary:
        table.to_csv(temporary, index=False, lineterminator="\n")
    log.info("%s: %d images from %s -> %s", task, len(table), dataset, metadata)
    return metadata


def _convert(
    recipe: Dataset,
    data_dir: Path,
    out_dir: Path,
    classes: list[str] | tuple[str, ...] | str,
    label_rule: str | None,
    inputs: Mapping[str, str | Path],
) -> pd.DataFrame:
    """The recipe's raw table, with the label rule and the recipe's further inputs passed by keyword."""
    unknown = sorted(set(inputs) - set(recipe.inputs))
    if unknown:
        raise ValueError(f"dataset {recipe.name!r} reads no input named {unknown}; its inputs: {list(recipe.inputs)}")
    keywords: dict[str, Any] = {name: Path(path) for name, path in inputs.items()}
    if label_rule is not None:
        keywords["label_rule"] = label_rule
    out_dir.mkdir(parents=True, exist_ok=True)
    return recipe.convert(data_dir, out_dir, "all" if classes == "all" else list(classes), **keywords)


def find_one(root: Path, name: str) -> Path:
    """The single file or folder called ``name`` below ``root`` (archives nest differently across releases)."""
    if (root / name).exists():
        return root / name
    hits = sorted(path for path in root.rglob(name))
    if not hits:
        raise FileNotFoundError(f"{root}: expected {name} (from the dataset's archives) but found none")
    return hits[0]

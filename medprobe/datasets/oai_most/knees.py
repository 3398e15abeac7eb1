"""Every knee of T8: the user's ``knees.csv`` and the OAI release's knees, listed in ``knees_all.csv``
with a receipt of the files read (rule ``oai_most_files``)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pandas as pd

from medprobe.datasets.oai_most.layout import (
    ACCESS,
    FROM_KNEES_CSV,
    KNEE_COLUMNS,
    KNEES,
    LANDMARKS_NOTE,
    NAME,
    OAI_DIR,
    TITLE,
)
from medprobe.datasets.oai_most.release import cell_text, find_release, kl_grade, leading_number, oai_knees
from medprobe.download import MissingDataError, verify
from medprobe.io import atomic_path, write_text_atomic
from medprobe.user_tables import read_csv

log = logging.getLogger("medprobe.datasets.oai_most")


def missing_files_message(data_dir: Path) -> str:
    folder = data_dir.resolve()
    return "\n".join(
        [
            f"Dataset {NAME!r} ({TITLE}) is not available: neither {KNEES} nor the OAI release in "
            f"{OAI_DIR}/ is in {data_dir}/.",
            f"Access: {ACCESS}",
            f"Put one or both of these into {folder}/ and rerun:",
            f"  1. the OAI release as downloaded, below {OAI_DIR}/ (the recipe lists every knee and visit itself):",
            f"     - {OAI_DIR}/<visit>/contents.csv and the image folders it names: each image archive unpacked into a "
            "folder named by its visit (00m, 12m, 24m, 36m, 48m, 72m, 96m); a radiograph is <visit>/<Folder>/001",
            f"     - {OAI_DIR}/kXR_SQ_BU<visit>.txt, the KL readings (X-Ray Image Assessments, ASCII; visits 00 01 03 05 "
            "06 08 10), or the kxr_sq_bu<visit>.sas7bdat files of the SAS release (up to three folders deep)",
            f"  2. {KNEES}, a table you make (MOST, or everything): one row per knee: file, patient_id, side, kl, "
            "source, partition[, spacing_row, spacing_col], with the radiographs it names below the same folder",
            LANDMARKS_NOTE,
        ]
    )


def _user_knees(data_dir: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows of ``knees.csv`` with a KL grade 0-4 (``kl`` as ``0``-``4``) and the rows left out, by reason:
    as the authors drop knees without a valid grade (``cat >= 5``), a missing grade or a code such as MOST's 8
    or 9 leaves the knee out."""
    path = data_dir / KNEES
    knees = read_csv(
        path,
        KNEE_COLUMNS,
        identifiers=["patient_id", "side", "source", "partition"],
        files=["file"],
        allow_no_rows=True,
        what="knee table",
    ).reset_index(drop=True)
    grades = knees["kl"].map(lambda value: kl_grade(cell_text(value)))
    valid = grades.map(lambda grade: isinstance(grade, str)).astype(bool)
    reasons = Counter(
        "knees.csv: no KL grade" if leading_number(cell_text(value)) is None else "knees.csv: KL grade not 0-4"
        for value in knees.loc[~valid, "kl"]
    )
    if reasons:
        log.warning("%s: %d knee(s) without a KL grade 0-4 left out (%s)", path, int((~valid).sum()), dict(reasons))
    knees = knees[valid].assign(kl=grades[valid]).reset_index(drop=True)
    knees["origin"] = FROM_KNEES_CSV
    return knees, dict(reasons)


def knee_table(data_dir: str | Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """Every knee of the task: the rows of ``knees.csv`` and those of the OAI release (:func:`oai_knees`), with
    the knees left out by reason. Raises :class:`MissingDataError` (naming both options) when there is neither."""
    data_dir = Path(data_dir)
    parts, excluded = [], {}
    if (data_dir / KNEES).exists():
        user, excluded = _user_knees(data_dir)
        parts.append(user)
    release = oai_knees(data_dir)
    if release is not None:
        if parts and (parts[0]["source"] == "oai").any():
            raise ValueError(
                f"{data_dir / KNEES} has rows with source 'oai' and {data_dir / OAI_DIR}/ holds the OAI release, from "
                f"which the recipe lists the OAI knees itself: remove those rows from {KNEES} (keep MOST's), or take "
                f"the release's tables (kXR_SQ_BU*, contents.csv) out of {OAI_DIR}/ to use your own OAI rows"
            )
        parts.append(release[0])
        excluded.update(release[1])
    if not parts:
        raise MissingDataError(missing_files_message(data_dir))
    return pd.concat(parts, ignore_index=True).fillna(""), excluded


def prepare(
    data_dir: str | Path, knees_out: str | Path, receipt: str | Path, checksums: dict[str, str] | None = None
) -> dict:
    """Rule ``oai_most_files`` (instead of ``download_dataset`` for this dataset): check the files, write
    :func:`knee_table` to ``knees_out`` and a receipt (SHA-256 of knees.csv and the release's tables, checked
    against ``checksums`` pinned in the config; every knee counted), each atomically."""
    data_dir = Path(data_dir)
    checksums = checksums or {}
    table, excluded = knee_table(data_dir)
    tables = [data_dir / KNEES] if (data_dir / KNEES).exists() else []
    if (data_dir / OAI_DIR).is_dir():
        readings, archives = find_release(data_dir / OAI_DIR)
        tables += sorted(readings.values()) + sorted(p for paths in archives.values() for p in paths)
    files = {}
    for path in tables:
        name = path.relative_to(data_dir).as_posix()
        digest = verify(path, sha256=checksums.get(name))
        files[name] = {"sha256": digest, "pinned": name in checksums}
    with atomic_path(knees_out) as temporary:
        table.to_csv(temporary, index=False, lineterminator="\n")
    result = {
        "dataset": NAME,
        "data_dir": str(data_dir),
        "files": files,
        "knees": int(len(table)),
        "knees_by_origin": {k: int(v) for k, v in table["origin"].value_counts().items()},
        "excluded": excluded,
    }
    write_text_atomic(receipt, json.dumps(result, indent=2) + "\n")
    log.info("%d knee(s) -> %s (%s)", len(table), knees_out, result["knees_by_origin"])
    return result

"""Real-dataset recipes: publisher archives -> the raw metadata table of docs/architecture.md.

A recipe is a function ``(task, out_dir) -> Path`` registered under the config's ``dataset`` name. The
eight paper recipes (download, checksum verification, safe extraction, label rules) are tracked in
issue 3; until a recipe exists, a user brings the raw table themselves: ``resources/raw/{task}/metadata.csv``
with the columns of docs/architecture.md, which makes this rule unnecessary (Snakemake only runs it when
the table is missing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

RECIPES: dict[str, Callable[[str, Path], Path]] = {}


def register(name: str) -> Callable[[Callable[[str, Path], Path]], Callable[[str, Path], Path]]:
    """Register a dataset recipe under ``name`` (the config's ``tasks.<task>.dataset``)."""

    def decorator(function: Callable[[str, Path], Path]) -> Callable[[str, Path], Path]:
        RECIPES[name] = function
        return function

    return decorator


def build_raw_table(dataset: str, task: str, out_dir: str | Path) -> Path:
    """Run the recipe for ``dataset``; a dataset without a recipe stops with what the user can do."""
    out_dir = Path(out_dir)
    if dataset not in RECIPES:
        raise NotImplementedError(
            f"tasks.{task}.dataset: no download/preparation recipe for {dataset!r} yet (recipes: "
            f"{sorted(RECIPES) or 'none'}). Provide {out_dir / 'metadata.csv'} yourself in the raw format of "
            "docs/architecture.md (columns image_id, file, patient_id, label|labels, source, partition, group) "
            "and rerun; see docs/datasets.md."
        )
    return RECIPES[dataset](task, out_dir)

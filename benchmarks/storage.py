"""What the cheaper activation storage costs in the numbers: int8 storage and every k-th layer on the demo.

Runs the demo's headline results (``results/tables/metrics.csv`` and ``layers.csv``: extraction, probes and
evaluation of every model x task) once as configured (float16, every layer: the reference), then again in a
copy of that working directory under each variant (``extraction.dtype: int8``; ``extraction.layers:
every:<k>``), which reruns extraction and everything after it. Prints, per variant, the activations' size
against the reference and how far the headline metrics (every model x task x class row of metrics.csv; the
selected layer may differ) and the per-layer metrics of the layers both runs stored (layers.csv) moved.

Usage: python benchmarks/storage.py [--workdir DIR] [--every 2] [--cores 2]
The last lines are ``variant=<name> size_ratio=<x> metrics_max_abs_diff=<x> metrics_median_abs_diff=<x>
layers_max_abs_diff=<x>``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["results/tables/metrics.csv", "results/tables/layers.csv"]
KEYS = ["task", "model", "class", "metric"]


def run_demo(workdir: Path, config: dict, cores: int) -> float:
    """The demo's headline tables in ``workdir`` under ``config``; returns the wall seconds."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", *TARGETS, "--cores", str(cores), "--directory", str(workdir),
         "--configfile", str(workdir / "config.yaml")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"snakemake failed in {workdir}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def activations_bytes(workdir: Path) -> int:
    return sum(path.stat().st_size for path in (workdir / "results" / "activations").rglob("*.h5"))


def differences(reference: Path, variant: Path) -> dict[str, float]:
    """Absolute differences of the headline metrics and of the per-layer metrics on the layers both store."""
    metrics = [pd.read_csv(root / TARGETS[0], dtype={"class": str}) for root in (reference, variant)]
    joined = metrics[0].merge(metrics[1], on=KEYS, suffixes=("_ref", "_var"), validate="one_to_one")
    headline = np.abs(joined["value_ref"] - joined["value_var"]).dropna()
    layers = [pd.read_csv(root / TARGETS[1], dtype={"class": str}) for root in (reference, variant)]
    joined_layers = layers[0].merge(layers[1], on=KEYS + ["layer"], suffixes=("_ref", "_var"))
    per_layer = np.abs(joined_layers["value_ref"] - joined_layers["value_var"]).dropna()
    return {
        "metrics_max_abs_diff": float(headline.max()),
        "metrics_median_abs_diff": float(headline.median()),
        "layers_max_abs_diff": float(per_layer.max()),
        "layers_compared": float(len(per_layer)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--every", type=int, default=2, help="k of the every:<k> layer selection")
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    base = args.workdir or Path(tempfile.mkdtemp(prefix="medprobe-storage-"))
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.pop("nejm", None)  # not part of the tables compared
    reference = base / "reference"
    reference.mkdir(parents=True, exist_ok=True)
    seconds = run_demo(reference, config, args.cores)
    reference_bytes = activations_bytes(reference)
    print(f"reference (float16, every layer): {seconds:.0f} s, activations {reference_bytes / 2**20:.1f} MiB")
    variants = {
        "int8": {"dtype": "int8"},
        f"every{args.every}": {"layers": f"every:{args.every}"},
    }
    lines = []
    for name, change in variants.items():
        workdir = base / name
        if workdir.exists():
            shutil.rmtree(workdir)
        shutil.copytree(reference, workdir, symlinks=True)
        variant = {**config, "extraction": {**config.get("extraction", {}), **change}}
        seconds = run_demo(workdir, variant, args.cores)
        ratio = activations_bytes(workdir) / reference_bytes
        found = differences(reference, workdir)
        print(f"{name}: {seconds:.0f} s, {found['layers_compared']:.0f} per-layer rows compared")
        lines.append(
            f"variant={name} size_ratio={ratio:.3f} metrics_max_abs_diff={found['metrics_max_abs_diff']:.4f} "
            f"metrics_median_abs_diff={found['metrics_median_abs_diff']:.4f} "
            f"layers_max_abs_diff={found['layers_max_abs_diff']:.4f}"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()

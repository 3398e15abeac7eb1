"""Fit a probe per layer, select the headline layer, save test predictions."""
from pathlib import Path

from medprobe.probe import probe_task
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    task, probe = snakemake.params.task, snakemake.params.probe
    probe_task(
        snakemake.input.activations,
        snakemake.input.manifest,
        Path(snakemake.output.summary).parent,
        kind=task["kind"],
        classes=task["classes"],
        C_grid=probe["C_grid"],
        refine=probe["refine"],
        max_iter=probe["max_iter"],
        tol=probe["tol"],
        class_weight=None if probe["class_weight"] == "none" else probe["class_weight"],
        layer=snakemake.params.layer,
        seed=snakemake.params.seed,
        dtype=probe["dtype"],
        mode=probe["mode"],
        paper=probe["paper"],
    )

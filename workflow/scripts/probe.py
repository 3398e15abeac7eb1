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
        min_test_positives=task["min_test_positives"],
        C_grid=probe["C_grid"],
        refine=probe["refine"],
        refit=probe["refit"],
        max_iter=probe["max_iter"],
        tol=probe["tol"],
        class_weight=probe["class_weight"],
        layer=snakemake.params.layer,
        seed=snakemake.params.seed,
        dtype=probe["dtype"],
        mode=snakemake.params.mode,
        adam=probe["adam"],
        sgd=probe["sgd"],
        protocol=snakemake.params.protocol,
    )

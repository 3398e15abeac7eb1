"""Score one model x task: headline metrics, per-layer curve, label efficiency, sub-groups."""
from pathlib import Path

from medprobe.evaluate import evaluate_model_task
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    evaluate_model_task(
        task=snakemake.wildcards.task,
        model=snakemake.wildcards.model,
        task_config=snakemake.params.task,
        manifest=snakemake.input.manifest,
        probe_dir=Path(snakemake.input.summary).parent,
        evaluation=snakemake.params.evaluation,
        seed=snakemake.params.seed,
        out_dir=snakemake.params.out_dir,
    )

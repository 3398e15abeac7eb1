"""Generate one synthetic demo task's raw data (metadata.csv + images)."""
from pathlib import Path

from medprobe.demo.data import generate_task
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    generate_task(
        snakemake.wildcards.task,
        snakemake.params.task,
        Path(snakemake.output[0]).parent,
        seed=snakemake.params.seed,
        images_per_patient=snakemake.params.images_per_patient,
    )

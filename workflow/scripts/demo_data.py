"""Generate one synthetic demo task's raw data (metadata.csv + images)."""

from medprobe.demo.data import generate_task
from medprobe.logs import rule_logging

with rule_logging(snakemake):
    generate_task(
        snakemake.wildcards.task,
        snakemake.params.task,
        snakemake.output[0],
        seed=snakemake.params.seed,
        images_per_patient=snakemake.params.images_per_patient,
    )

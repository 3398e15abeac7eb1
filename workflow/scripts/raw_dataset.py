"""Real dataset -> raw metadata table (convert the unpacked publisher's files; counts vs the paper's)."""
from pathlib import Path

from medprobe.datasets import build_raw_table
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    task = snakemake.params.task
    build_raw_table(task["dataset"], snakemake.wildcards.task, Path(snakemake.output[0]).parent,
                    Path(snakemake.input[0]).parent, classes=task["classes"], label_rule=task.get("label_rule"))

"""Real dataset -> raw metadata table (download/verify/convert the publisher's archive)."""
from pathlib import Path

from medprobe.datasets import build_raw_table
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    build_raw_table(snakemake.params.task["dataset"], snakemake.wildcards.task, Path(snakemake.output[0]).parent)

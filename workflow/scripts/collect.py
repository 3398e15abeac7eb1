"""Concatenate per-job tables into one results table."""

from medprobe.logs import rule_logging
from medprobe.tables import collect

with rule_logging(snakemake):
    collect(list(snakemake.input), snakemake.output[0])

"""Concatenate per-job tables into one results table."""
from medprobe.tables import collect
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    collect(list(snakemake.input), snakemake.output[0])

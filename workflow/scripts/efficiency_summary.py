"""Retained share of the full-data headline metric per discipline, model and training fraction."""

from medprobe.logs import rule_logging
from medprobe.summaries import efficiency_summary

with rule_logging(snakemake):
    efficiency_summary(snakemake.input[0], snakemake.params.tasks, snakemake.output[0])

"""Findings of each multilabel task reaching each AUC threshold, per model."""

from medprobe.logs import rule_logging
from medprobe.summaries import findings_summary

with rule_logging(snakemake):
    findings_summary(snakemake.input[0], snakemake.params.tasks, snakemake.params.thresholds, snakemake.output[0])

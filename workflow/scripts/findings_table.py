"""Findings of each multilabel task reaching each AUC threshold, per model."""
from medprobe.summaries import findings_summary
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    findings_summary(snakemake.input[0], snakemake.params.tasks, snakemake.params.thresholds, snakemake.output[0])

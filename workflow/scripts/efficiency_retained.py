"""The paper's label-efficiency numbers: retained share of one task per discipline."""

from medprobe.logs import rule_logging
from medprobe.summaries import efficiency_retained

with rule_logging(snakemake):
    efficiency_retained(snakemake.input[0], snakemake.params.tasks, snakemake.params.summary_tasks, snakemake.output[0])

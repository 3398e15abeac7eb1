"""Real dataset -> raw metadata table (convert the unpacked publisher's files; counts vs the paper's)."""

from medprobe.datasets import build_raw_table
from medprobe.logs import rule_logging
from medprobe.settings import TaskSettings

with rule_logging(snakemake):
    task = TaskSettings.from_dict(snakemake.params.task)
    build_raw_table(
        task.dataset,
        snakemake.wildcards.task,
        snakemake.params.data_dir,
        snakemake.output.metadata,
        snakemake.output.counts,
        classes=task.classes,
        label_rule=task.label_rule,
        inputs={name: path for name, path in snakemake.input.items() if name != "receipt"},
    )

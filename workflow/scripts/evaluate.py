"""Score one model x task into its result tables: each output (metrics, groups, layers or efficiency) from
the probe output the rule names for it."""

from medprobe.evaluate import TABLE_SOURCES, evaluation_table
from medprobe.logs import rule_logging
from medprobe.settings import EvaluationSettings, TaskSettings

with rule_logging(snakemake):
    for table, out in snakemake.output.items():
        evaluation_table(
            table,
            source=snakemake.input[TABLE_SOURCES[table]],
            manifest=snakemake.input.manifest,
            summary=snakemake.input.summary,
            out=out,
            task=snakemake.wildcards.task,
            model=snakemake.wildcards.model,
            task_settings=TaskSettings.from_dict(snakemake.params.task),
            evaluation=EvaluationSettings.from_dict(snakemake.params.evaluation),
            seed=snakemake.params.seed,
        )

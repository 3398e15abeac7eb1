"""Score one model x task into one result table (metrics, layers, efficiency or groups)."""

from medprobe.evaluate import evaluation_table
from medprobe.logs import rule_logging
from medprobe.settings import EvaluationSettings, TaskSettings

with rule_logging(snakemake):
    evaluation_table(
        snakemake.params.table,
        source=snakemake.input.source,
        manifest=snakemake.input.manifest,
        summary=snakemake.input.summary,
        out=snakemake.output[0],
        task=snakemake.wildcards.task,
        model=snakemake.wildcards.model,
        task_settings=TaskSettings.from_dict(snakemake.params.task),
        evaluation=EvaluationSettings.from_dict(snakemake.params.evaluation),
        seed=snakemake.params.seed,
    )

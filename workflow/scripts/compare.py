"""Paired comparisons of the configured model pairs on one task."""

from medprobe.evaluate import compare_models
from medprobe.logs import rule_logging
from medprobe.settings import EvaluationSettings, TaskSettings

with rule_logging(snakemake):
    compare_models(
        task=snakemake.wildcards.task,
        task_settings=TaskSettings.from_dict(snakemake.params.task),
        manifest=snakemake.input.manifest,
        predictions={model: snakemake.input[model] for model in snakemake.params.models},
        pairs=snakemake.params.pairs,
        evaluation=EvaluationSettings.from_dict(snakemake.params.evaluation),
        seed=snakemake.params.seed,
        out_path=snakemake.output[0],
    )

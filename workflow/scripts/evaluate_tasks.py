"""group_tasks: one model's result tables on each of its tasks in turn, as rule evaluate (or
evaluate_efficiency) scores them one task a job."""

from medprobe.evaluate import TABLE_SOURCES, evaluation_table
from medprobe.logs import rule_logging
from medprobe.settings import EvaluationSettings, TaskSettings

with rule_logging(snakemake):
    evaluation = EvaluationSettings.from_dict(snakemake.params.evaluation)
    for index, task in enumerate(snakemake.params.tasks):
        for table, outs in snakemake.output.items():
            evaluation_table(
                table,
                source=snakemake.input[TABLE_SOURCES[table]][index],
                manifest=snakemake.input.manifest[index],
                summary=snakemake.input.summary[index],
                out=outs[index],
                task=task,
                model=snakemake.params.model_name,
                task_settings=TaskSettings.from_dict(snakemake.params.by_task["task"][task]),
                evaluation=evaluation,
                seed=snakemake.params.seed,
            )

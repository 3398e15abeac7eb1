# Helpers only: config validation and the functions rules use to name their inputs.
import functools
import json
import os
import sys
from pathlib import Path

from snakemake.logging import logger

import medprobe.checkpoints as medprobe_checkpoints
import medprobe.config as medprobe_config
import medprobe.contracts as medprobe_contracts
import medprobe.figures as medprobe_figures
import medprobe.io as medprobe_io
import medprobe.rule_params as medprobe_rule_params

medprobe_config.resolve_extends(config, workflow.basedir)
medprobe_config.validate(config, workflow.source_path("../schemas/config.schema.yaml"))
# Files the config names that no rule makes, and fixed layers, before any job runs (or deletes anything).
medprobe_config.check_paths(config, Path.cwd())

# Damaged activations and probe outputs stop a run that executes jobs before any job deletes outputs
# (medprobe.contracts.check_result_files); commands that only find or tidy (verify, --unlock, --touch) run.
if workflow.is_main_process and medprobe_config.checks_result_files(sys.argv):
    medprobe_contracts.check_result_files(medprobe_config.model_task_pairs(config))

if workflow.is_main_process and medprobe_config.dry_run_requested(sys.argv):
    # The plan says how much disk the activations will take before anything runs.
    import medprobe.cost as medprobe_cost

    logger.info(medprobe_cost.planned_activations(config, Path.cwd()))

if not workflow.is_main_process:
    # A cluster job: offline hub when checkpoints were fetched; say which devices the scheduler gave it.
    print(medprobe_checkpoints.prepare_compute_job(config), file=sys.stderr)

TASKS = list(config["tasks"])
MODELS = list(config["models"])
TABLES = ["metrics", "layers", "efficiency", "groups"]
ENV = "../../envs/medprobe.yaml"
ENV_FETCH = "../../envs/fetch.yaml"


wildcard_constraints:
    task="|".join(TASKS),
    model="|".join(MODELS),
    table="|".join(TABLES + ["comparisons"]),
    figure="|".join(medprobe_figures.FIGURES),


def rule_params(rule):
    """The params of a computing rule, each a function of the job's wildcards: medprobe.rule_params.RULES, which
    holds only what the rule's output depends on (labels and resources never rerun a computation).
    """
    return {
        name: functools.partial(_rule_param, rule, name)
        for name in medprobe_rule_params.RULES[rule]
    }


def _rule_param(rule, name, wildcards):
    function = medprobe_rule_params.RULES[rule][name]
    return function(config, wildcards.get("model"), wildcards.get("task"))


def raw_metadata(wildcards):
    """The task's raw table and, when a dataset recipe makes it (rule raw_dataset), the recipe's counts."""
    raw = medprobe_config.raw_dir(config, wildcards.task)
    entry = config["tasks"][wildcards.task]
    if entry["dataset"] == "demo" or "raw_dir" in entry:
        return {"metadata": f"{raw}/metadata.csv"}
    return {"metadata": f"{raw}/metadata.csv", "counts": f"{raw}/counts.json"}


def raw_files(wildcards):
    """The raw images a user's own raw table names, as the size and time of each (a digest): adding, removing or
    replacing one reruns prepare. Tables the workflow makes (demo, dataset recipes) change through their rules.
    """
    entry = config["tasks"][wildcards.task]
    if "raw_dir" not in entry:
        return "made by the workflow"
    raw = entry["raw_dir"]
    return medprobe_io.listed_files_digest(f"{raw}/metadata.csv", raw)


def dataset_download(wildcards):
    return f"{dataset_folder(wildcards)}/download.json"


def dataset_receipt(wildcards):
    """The download receipt and, for a task with `landmarks` (T8), the knee landmarks: those rule
    kneel_landmarks makes (`kneel`) or the user's own file (a path)."""
    inputs = {"receipt": dataset_download(wildcards)}
    landmarks = config["tasks"][wildcards.task].get("landmarks")
    if landmarks == "kneel":
        raw = f"resources/raw/{wildcards.task}"
        inputs.update(
            landmarks=f"{raw}/landmarks.csv",
            undetected=f"{raw}/landmarks_undetected.csv",
        )
    elif landmarks is not None:
        inputs["landmarks"] = landmarks
    return inputs


def dataset_folder(wildcards):
    """The folder of the task's dataset files (for T8: knees.csv and/or the OAI release under oai/)."""
    return f"resources/datasets/{config['tasks'][wildcards.task]['dataset']}"


def dataset_knees(wildcards):
    """T8: every knee of knees.csv and of the OAI release, listed by rule oai_most_files (KNEEL's input)."""
    return f"{dataset_folder(wildcards)}/knees_all.csv"


def oai_most_checksums(wildcards):
    """SHA-256 pinned for T8's files (knees.csv, the release's tables), as JSON for rule oai_most_files."""
    return json.dumps(
        medprobe_config.pinned_checksums(config, "oai_most"), sort_keys=True
    )


def dataset_checksums(wildcards):
    """SHA-256 values pinned in the config for the files of one dataset (tasks.<task>.checksums)."""
    return medprobe_config.pinned_checksums(config, wildcards.dataset)


def model_checkpoint(wildcards):
    """The local checkpoint folder (built by rule demo_model, fetched, or the user's); hub ids need no input."""
    return checkpoint_inputs(wildcards.model)


def checkpoint_inputs(model):
    entry = config["models"][model]
    if entry["fetch"]:
        return [medprobe_checkpoints.checkpoint_dir(model)]
    if "demo_build" in entry or os.path.isdir(entry["checkpoint"]):
        return [entry["checkpoint"]]  # a local folder is an input Snakemake sees
    return []


def model_gpus(wildcards):
    return config["models"][wildcards.model]["gpus"]


def extraction_section(model):
    """The extraction section with the model's own batch_size, shards and layers (models.<model>) laid over it."""
    entry = config["models"][model]
    own = {
        key: entry[key] for key in ("batch_size", "shards", "layers") if key in entry
    }
    return config["extraction"] | own


def models_matching(names):
    """A wildcard constraint matching exactly ``names`` (none: a pattern that matches nothing)."""
    return "|".join(names) or "(?!)"


# How each model's activations files are made (medprobe.config.extraction_jobs): merge_shards writes them
# (several extraction jobs per task, or int8 storage quantised with scales over every row), one job over all
# the model's tasks writes them (group_tasks), or each task's one job writes its own.
MERGED_MODELS = [
    model
    for model in MODELS
    if medprobe_config.extraction_jobs(config, model) == "merged"
]
GROUPED_MODELS = [
    model
    for model in MODELS
    if medprobe_config.extraction_jobs(config, model) == "grouped"
]


def model_files(pattern, model):
    """``pattern`` (with {model} and {task}) for each task the model joins: a group_tasks job's files."""
    return expand(pattern, model=model, task=medprobe_config.model_tasks(config, model))


def shard_files(wildcards):
    """The model's extraction jobs of one task (one shard each), which merge_shards joins."""
    return [
        f"results/activations/{wildcards.model}/{wildcards.task}.shards/{shard}.h5"
        for shard in range(extraction_section(wildcards.model)["shards"])
    ]


def task_predictions(wildcards):
    """Test predictions of the models compared on this task."""
    compared = {model for pair in comparison_pairs(wildcards) for model in pair}
    return {
        model: f"results/probes/{model}/{wildcards.task}/predictions.h5"
        for model in medprobe_config.task_models(config, wildcards.task)
        if model in compared
    }


def compare_inputs(wildcards):
    return {
        "manifest": f"results/manifests/{wildcards.task}.csv",
        **task_predictions(wildcards),
    }


def task_metrics(wildcards):
    """Every model's headline table of one task (results/tables/by_task)."""
    return [
        f"results/evaluation/{model}/{wildcards.task}/metrics.csv"
        for model in medprobe_config.task_models(config, wildcards.task)
    ]


def model_metrics(wildcards):
    """One model's headline table of every task it runs (results/tables/by_model)."""
    return [
        f"results/evaluation/{wildcards.model}/{task}/metrics.csv"
        for task in medprobe_config.model_tasks(config, wildcards.model)
    ]


def table_inputs(wildcards):
    if wildcards.table == "comparisons":
        return [f"results/evaluation/comparisons/{task}.csv" for task in TASKS]
    return [
        f"results/evaluation/{model}/{task}/{wildcards.table}.csv"
        for model, task in medprobe_config.model_task_pairs(config)
    ]


def all_tables():
    extra = ["comparisons", "efficiency_summary", "efficiency_retained"]
    if any(entry["kind"] == "multilabel" for entry in config["tasks"].values()):
        extra.append("findings")
    return [f"results/tables/{table}.csv" for table in TABLES + extra]


def comparison_pairs(wildcards):
    """[model, reference] pairs compared on this task (both models must run it)."""
    return medprobe_config.comparison_pairs(config, wildcards.task)


def all_figures():
    """Every figure whose tables this config writes (Figure 1d: when the NEJM evaluation runs)."""
    tables = TABLES + (["nejm"] if all_nejm() else [])
    return [
        f"results/figures/{name}.{extension}"
        for name in medprobe_config.figures(config, tables)
        for extension in ("pdf", "png")
    ]


def figure_tables(wildcards):
    """The result tables a figure reads, by name (medprobe.figures.FIGURES)."""
    return {
        table: f"results/tables/{table}.csv"
        for table in medprobe_figures.FIGURES[wildcards.figure].tables
    }


def figure_tasks(wildcards):
    """Only the tasks a figure draws, so that editing another task's entry does not redraw it."""
    return medprobe_figures.figure_tasks(wildcards.figure, config)


def figure_caption(wildcards):
    return medprobe_figures.FIGURES[wildcards.figure].caption


def nejm_answer_files():
    return [f"results/nejm/{model}/answers.jsonl" for model in config["nejm"]["models"]]


@functools.cache  # the default target and all_figures both ask; warn once
def all_nejm():
    """The NEJM table when the config names models and the cases are there (or the demo makes them);
    user-supplied cases that are missing skip it, and Figure 1d, with a warning."""
    if not config["nejm"]["models"]:
        return []
    cases_dir = config["nejm"]["cases_dir"]
    if cases_dir != "resources/demo/nejm" and not os.path.isdir(cases_dir):
        logger.warning(
            f"nejm.cases_dir {cases_dir} not found: skipping the NEJM evaluation and Figure 1d "
            "(the cases are user-supplied, see docs/nejm.md)"
        )
        return []
    return ["results/tables/nejm.csv"]


def model_labels():
    """Only what figures need of each model, so resource or checkpoint changes do not redraw them."""
    return {
        model: {"label": entry["label"]} for model, entry in config["models"].items()
    }

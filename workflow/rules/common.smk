# Helpers only: config validation and the functions rules use to name their inputs.
import medprobe.config as medprobe_config

medprobe_config.validate(config, workflow.source_path("../schemas/config.schema.yaml"))

TASKS = list(config["tasks"])
MODELS = list(config["models"])
TABLES = ["metrics", "layers", "efficiency", "groups"]
ENV = "../../envs/medprobe.yaml"


wildcard_constraints:
    task="|".join(TASKS),
    model="|".join(MODELS),
    table="|".join(TABLES + ["comparisons"]),
    figure="|".join(medprobe_config.FIGURE_TASKS),


def task_config(wildcards):
    return config["tasks"][wildcards.task]


def model_config(wildcards):
    return config["models"][wildcards.model]


def raw_metadata(wildcards):
    return f"{medprobe_config.raw_dir(config, wildcards.task)}/metadata.csv"


def model_checkpoint(wildcards):
    """The local checkpoint directory when the workflow builds it (demo); hub ids need no input."""
    entry = config["models"][wildcards.model]
    return [entry["checkpoint"]] if "demo_build" in entry else []


def model_gpus(wildcards):
    return config["models"][wildcards.model]["gpus"]


def evaluation_files(model, task):
    return [f"results/evaluation/{model}/{task}/{table}.csv" for table in TABLES]


def task_predictions(wildcards):
    return {
        model: f"results/probes/{model}/{wildcards.task}/predictions.h5"
        for model in medprobe_config.task_models(config, wildcards.task)
    }


def table_inputs(wildcards):
    if wildcards.table == "comparisons":
        return [f"results/evaluation/comparisons/{task}.csv" for task in TASKS]
    return [
        f"results/evaluation/{model}/{task}/{wildcards.table}.csv"
        for model, task in medprobe_config.model_task_pairs(config)
    ]


def all_tables():
    return [f"results/tables/{table}.csv" for table in TABLES + ["comparisons"]]


def all_figures():
    return [
        f"results/figures/{name}.{extension}"
        for name in medprobe_config.figures(config)
        for extension in ("pdf", "png")
    ]

"""The params of the workflow's computing rules: exactly the config keys each one's output depends on.

Snakemake reruns a job when its params change. So a rule's params hold what its result depends on and
nothing else: display names and labels, where and how a job runs (GPUs, cluster resources, DataLoader
workers, sharding, probe batching, ``device_map``) never rerun a computation. A script that needs such a key
reads it from the config (:func:`load_entry`, :func:`extraction_settings`). ``tests/test_rule_params.py``
changes every key of the schema, one at a time, and checks which rules' params the change reaches against
:data:`RERUNS` (docs/running.md, "What a config change reruns").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medprobe.checkpoints import compute_model_config

__all__ = [
    "RERUNS",
    "data_task",
    "evaluation_task",
    "extraction_model",
    "extraction_run",
    "extraction_settings",
    "BY_TASK",
    "grouped_params",
    "load_entry",
    "nejm_settings",
    "probe_settings",
    "probe_task",
    "reruns",
    "RULES",
]

# What a task's raw table, manifest and images do not depend on: display keys, what later stages read, the
# download's checksums (rule download_dataset's own) and the raw folder (an input path already).
_NOT_DATA = ("name", "discipline", "prompt", "metric", "graded", "min_test_positives", "checksums", "raw_dir")
# What the probes read of a task (the manifest, an input, holds the rest).
_PROBE_TASK = ("kind", "classes", "min_test_positives")
# ... and the evaluation: which metric is the headline, graded tasks' extra metrics.
_EVALUATION_TASK = (*_PROBE_TASK, "metric", "graded")
# What the stored activations depend on, of a model entry (after compute_model_config).
_EXTRACTION_MODEL = (
    "adapter",
    "checkpoint",
    "revision",
    "torch_dtype",
    "quantization",
    "attn_implementation",
    "trust_remote_code",
    "pooling",
    "max_pixels",
    "min_pixels",
    "model_args",
    "demo_build",
)
# Loading keys that place the model but leave its outputs alone: read from the config by the jobs.
_LOAD_ONLY = ("device_map",)
# Of the extraction section (with a model's own batch_size and layers laid over it): the stored values
# depend on these; num_workers, prefetch_factor and shards only say how the rows are fed and split.
_EXTRACTION = ("batch_size", "dtype", "compression", "compression_level", "prompt_format", "layers")
_EXTRACTION_RUN = ("num_workers", "prefetch_factor", "shards")
_PROBE_RUN = ("gpus", "layer_batch", "resources")

# Which computing rules' params a change of each config key reaches (``<T>``: a task, ``<M>``: a model; a key
# stands for everything under it). A rule not listed keeps its params; its jobs still rerun when a file they
# read changes (a new manifest reruns what follows it). Tables and figures, cheap, follow labels and names.
_DATA = frozenset({"demo_data", "raw_dataset", "prepare"})
_PROBES = frozenset({"probe", "efficiency"})
_SCORES = frozenset({"evaluate", "compare"})
_MODEL = frozenset({"extract", "nejm_answers"})
_NONE: frozenset[str] = frozenset()
RERUNS: dict[str, frozenset[str]] = {
    "seed": _DATA - {"raw_dataset"} | _PROBES | _SCORES | {"nejm_answers"},
    "on_bad_image": frozenset({"prepare"}),
    "demo.images_per_patient": frozenset({"demo_data"}),
    "demo.nejm_cases": _NONE,  # rule demo_nejm's own
    "kneel": _NONE,  # the KNEEL rules' own (t8.smk)
    "protocol": frozenset({"probe"}),  # recorded in probe.json
    "extends": _NONE,  # resolved before anything reads the config
    "baseline_model": frozenset({"compare"}),
    "comparisons": frozenset({"compare"}),
    "threads": _NONE,
    "split": frozenset({"prepare"}),
    "tasks.<T>.name": _NONE,
    "tasks.<T>.discipline": _NONE,
    "tasks.<T>.raw_dir": _NONE,  # the raw table's path is an input
    "tasks.<T>.checksums": _NONE,  # rule download_dataset's own
    "tasks.<T>.prompt": frozenset({"extract"}),
    "tasks.<T>.dataset": _DATA,
    "tasks.<T>.test_fraction": _DATA,
    "tasks.<T>.label_rule": _DATA,
    "tasks.<T>.landmarks": _DATA,
    "tasks.<T>.demo_patients": _DATA,
    "tasks.<T>.kind": _DATA | _PROBES | _SCORES,
    "tasks.<T>.classes": _DATA | _PROBES | _SCORES,
    "tasks.<T>.min_test_positives": _PROBES | _SCORES,
    "tasks.<T>.metric": _SCORES,
    "tasks.<T>.graded": _SCORES,
    **{f"models.<M>.{key}": _NONE for key in ("label", "gpus", "resources", "shards", "device_map")},
    "models.<M>.tasks": frozenset({"compare"}),  # the models compared on the tasks it joins or leaves
    "models.<M>.layer": frozenset({"probe"}),
    "models.<M>.probe_mode": _PROBES,
    **{f"models.<M>.{key}": _MODEL for key in _EXTRACTION_MODEL},
    "models.<M>.fetch": _MODEL,  # the fetched folder replaces the hub id as the checkpoint
    # How the jobs are cut, not what they compute (a grouped job's params are the rule's, by task: see
    # grouped_params); switching it makes other rules the files' makers, whose params Snakemake has not
    # recorded: one rerun of extraction, probes and sweeps.
    "models.<M>.group_tasks": _NONE,
    "group_tasks": _NONE,
    "models.<M>.batch_size": frozenset({"extract"}),
    "models.<M>.layers": frozenset({"extract"}),
    **{f"extraction.{key}": frozenset({"extract"}) for key in _EXTRACTION},
    **{f"extraction.{key}": _NONE for key in _EXTRACTION_RUN},
    "probe": _PROBES,
    **{f"probe.{key}": _NONE for key in _PROBE_RUN},
    "evaluation.bootstrap": _SCORES,
    "evaluation.ci": _SCORES,
    "evaluation.auc_thresholds": _NONE,  # findings.csv, a table
    "efficiency.fractions": frozenset({"efficiency"}),
    "efficiency.seeds": frozenset({"efficiency"}),
    "efficiency.sampling": frozenset({"efficiency"}),
    "efficiency.summary_tasks": _NONE,
    "efficiency.gpus": _NONE,
    "figures": _NONE,
    "nejm": frozenset({"nejm_answers"}),
    "nejm.models": _NONE,  # another model's answers are its own job
}


# The params of each rule a model's group_tasks job can stand for, that differ from task to task.
BY_TASK: dict[str, tuple[str, ...]] = {
    "extract": ("prompt",),
    "probe": ("task",),
    "efficiency": ("task",),
    "evaluate": ("task",),
}


def grouped_params(rule: str, config: Mapping[str, Any], model: str, tasks: list[str]) -> dict[str, Any]:
    """The params of a model's one job of ``rule`` over ``tasks`` (``group_tasks``): the rule's params
    (:data:`RULES`) that every task shares once, and under ``by_task`` those in :data:`BY_TASK` as
    ``{name: {task: value}}``. A change that reruns one task's job of ``rule`` reruns this one."""
    params = RULES[rule]
    shared = {name: function(config, model, None) for name, function in params.items() if name not in BY_TASK[rule]}
    by_task = {name: {task: params[name](config, model, task) for task in tasks} for name in BY_TASK[rule]}
    return {**shared, "by_task": by_task}


def reruns(key: str) -> frozenset[str]:
    """The computing rules whose params a change of config key ``key`` (dotted, ``<T>``/``<M>`` placeholders)
    reaches: :data:`RERUNS` of its longest listed prefix."""
    parts = key.split(".")
    for length in range(len(parts), 0, -1):
        prefix = ".".join(parts[:length])
        if prefix in RERUNS:
            return RERUNS[prefix]
    raise KeyError(f"config key {key!r} is not classified in medprobe.rule_params.RERUNS")


def _pick(entry: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: entry[key] for key in keys if key in entry}


def data_task(config: Mapping[str, Any], task: str) -> dict[str, Any]:
    """The task entry as rules demo_data, raw_dataset and prepare depend on it."""
    return {key: value for key, value in config["tasks"][task].items() if key not in _NOT_DATA}


def probe_task(config: Mapping[str, Any], task: str) -> dict[str, Any]:
    """The task entry as rules probe and efficiency depend on it."""
    return _pick(config["tasks"][task], _PROBE_TASK)


def evaluation_task(config: Mapping[str, Any], task: str) -> dict[str, Any]:
    """The task entry as rules evaluate and compare depend on it."""
    return _pick(config["tasks"][task], _EVALUATION_TASK)


def extraction_model(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The model entry the stored activations (and NEJM answers) depend on: what loads which weights and how
    their states are pooled; the fetched local copy's folder when ``fetch`` is on."""
    return _pick(compute_model_config(model, config["models"][model]), _EXTRACTION_MODEL)


def load_entry(params_model: Mapping[str, Any], config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The entry a job loads: its params' entry with the placing keys (``device_map``) from the config."""
    return {**params_model, **_pick(config["models"][model], _LOAD_ONLY)}


def _extraction_section(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    entry = config["models"][model]
    return {**config["extraction"], **_pick(entry, ("batch_size", "shards", "layers"))}


def extraction_settings(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The extraction section with the model's own ``batch_size`` and ``layers`` laid over it, as the stored
    values depend on it."""
    return _pick(_extraction_section(config, model), _EXTRACTION)


def extraction_run(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """How an extraction job feeds and splits its rows (``num_workers``, ``prefetch_factor``, ``shards``, the
    model's own ``shards`` laid over): read from the config by the job, no param."""
    return _pick(_extraction_section(config, model), _EXTRACTION_RUN)


def probe_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The probe section without where and how the probes run (``gpus``, ``layer_batch``, ``resources``)."""
    return {key: value for key, value in config["probe"].items() if key not in _PROBE_RUN}


def nejm_settings(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The nejm section as one model's answers depend on it: the other models (``models``, their
    ``max_images``) are left out."""
    section = dict(config["nejm"])
    section["models"] = [model]
    section["max_images"] = _pick(section.get("max_images", {}), (model,))
    return section


def _compared(config: Mapping[str, Any], task: str) -> tuple[list[str], list[list[str]]]:
    from medprobe.config import comparison_pairs, task_models

    pairs = comparison_pairs(dict(config), task)
    compared = {model for pair in pairs for model in pair}
    return [model for model in task_models(dict(config), task) if model in compared], pairs


def _probe_mode(config: Mapping[str, Any], model: str) -> str:
    return config["models"][model].get("probe_mode", config["probe"]["mode"])


# The params of every computing rule, by name: functions of (config, model, task), the job's wildcards (None
# where the rule has no such wildcard). The rules take them with ``params: **rule_params("<rule>")``
# (common.smk); scripts read the keys that only say how a job runs from the config.
Param = Any
RULES: dict[str, dict[str, Param]] = {
    "demo_data": {
        "task": lambda config, model, task: data_task(config, task),
        "seed": lambda config, model, task: config["seed"],
        "images_per_patient": lambda config, model, task: config["demo"]["images_per_patient"],
    },
    "raw_dataset": {"task": lambda config, model, task: data_task(config, task)},
    "prepare": {
        "task": lambda config, model, task: data_task(config, task),
        "split": lambda config, model, task: config["split"],
        "seed": lambda config, model, task: config["seed"],
        "on_bad_image": lambda config, model, task: config["on_bad_image"],
    },
    "extract": {
        "model": lambda config, model, task: extraction_model(config, model),
        "prompt": lambda config, model, task: config["tasks"][task]["prompt"],
        "extraction": lambda config, model, task: extraction_settings(config, model),
    },
    "probe": {
        "task": lambda config, model, task: probe_task(config, task),
        "probe": lambda config, model, task: probe_settings(config),
        "layer": lambda config, model, task: config["models"][model]["layer"],
        "mode": lambda config, model, task: _probe_mode(config, model),
        "protocol": lambda config, model, task: config["protocol"],
        "seed": lambda config, model, task: config["seed"],
    },
    "efficiency": {
        "task": lambda config, model, task: probe_task(config, task),
        "probe": lambda config, model, task: probe_settings(config),
        "efficiency": lambda config, model, task: _pick(config["efficiency"], ("fractions", "seeds", "sampling")),
        "mode": lambda config, model, task: _probe_mode(config, model),
        "seed": lambda config, model, task: config["seed"],
    },
    "evaluate": {
        "task": lambda config, model, task: evaluation_task(config, task),
        "evaluation": lambda config, model, task: _pick(config["evaluation"], ("bootstrap", "ci")),
        "seed": lambda config, model, task: config["seed"],
    },
    "compare": {
        "task": lambda config, model, task: evaluation_task(config, task),
        "models": lambda config, model, task: _compared(config, task)[0],
        "pairs": lambda config, model, task: _compared(config, task)[1],
        "evaluation": lambda config, model, task: _pick(config["evaluation"], ("bootstrap", "ci")),
        "seed": lambda config, model, task: config["seed"],
    },
    "nejm_answers": {
        "model": lambda config, model, task: extraction_model(config, model),
        "nejm": lambda config, model, task: nejm_settings(config, model),
        "seed": lambda config, model, task: config["seed"],
    },
}

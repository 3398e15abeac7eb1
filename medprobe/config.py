"""Configuration: schema validation with defaults, cross-reference checks, and lookups used by the rules.

The JSON schema (``workflow/schemas/config.schema.yaml``) says what each key is and fills defaults; the
checks here cover what a schema cannot express (references between sections).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


def validate(config: dict[str, Any], schema_path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    """Validate ``config`` in place against the schema (filling defaults), then check cross-references.

    Uses ``snakemake.utils.validate`` so that the workflow and the package agree on what is valid.
    Returns the same dict for convenience.
    """
    from snakemake.utils import validate as snakemake_validate

    if not config:
        raise ConfigError(
            "no configuration given: run from the repository root (profiles/default supplies "
            "config/config.yaml) or pass --configfile config/paper.yaml"
        )
    try:
        snakemake_validate(config, str(schema_path), set_default=True)
    except Exception as error:  # WorkflowError wraps jsonschema's ValidationError
        raise ConfigError(_describe_schema_error(config, schema_path) or str(error)) from None
    check_references(config)
    return config


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` laid over ``base``: mappings merge key by key, any other value replaces the base's."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_extends(config: dict[str, Any], root: str | Path = ".") -> dict[str, Any]:
    """Lay ``config`` over the file its ``extends`` key names (relative to ``root``), recursively.

    Modifies ``config`` in place (Snakemake's global config object stays the same object) and returns it;
    the resolved config no longer has an ``extends`` key. A missing or circular base is a ConfigError.
    """
    chain: list[Path] = []
    resolved = {key: value for key, value in config.items()}
    while "extends" in resolved:
        base_path = Path(root) / str(resolved.pop("extends"))
        if base_path.resolve() in chain:
            raise ConfigError(f"extends: {base_path} is extended twice (a loop through {[str(p) for p in chain]})")
        chain.append(base_path.resolve())
        if not base_path.is_file():
            raise ConfigError(
                f"extends: the base config {base_path} does not exist (paths are relative to the "
                "workflow root, e.g. config/paper.yaml)"
            )
        resolved = merge(_read_mapping(base_path, "extends: "), resolved)
    config.clear()
    config.update(resolved)
    return config


def known_adapters() -> list[str]:
    """The adapter names a model entry may give (``medprobe.models.ADAPTER_NAMES``; importing that package
    does not import torch, and its adapters can register no other name)."""
    from medprobe.models import ADAPTER_NAMES

    return sorted(ADAPTER_NAMES)


def _describe_schema_error(config: dict[str, Any], schema_path: str | Path) -> str | None:
    """One line naming the offending key and what was expected (jsonschema's own text is long)."""
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if error is None:
        return None
    key = ".".join(str(part) for part in error.absolute_path) or "(top level)"
    expected = error.schema.get("description") if isinstance(error.schema, dict) else None
    hint = f" ({expected.strip()})" if expected and error.validator in ("enum", "type", "pattern") else ""
    return f"invalid config key {key}: {error.message}{hint}"


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML config file, apply ``overrides`` (top-level keys), validate and return it."""
    path = Path(path)
    config = _read_mapping(path)
    config.update(overrides or {})
    resolve_extends(config, _workflow_root(path))
    return validate(config)


def _read_mapping(path: Path, key: str = "") -> dict[str, Any]:
    """A YAML config file's mapping; ``key`` (e.g. ``extends: ``) starts the message of an error."""
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{key}{path}: not valid YAML: {error}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{key}{path}: the top level must be a mapping of keys, got {type(config).__name__}")
    return config


def pinned_checksums(config: dict[str, Any], dataset: str) -> dict[str, str]:
    """The SHA-256 values pinned for one dataset's files, over every task that uses it (``tasks.<T>.checksums``)."""
    pinned: dict[str, str] = {}
    for entry in config["tasks"].values():
        if entry["dataset"] == dataset:
            pinned.update(entry.get("checksums", {}))
    return pinned


def _workflow_root(config_path: Path) -> Path:
    """The workflow root of a config file: the folder above ``config/`` for the shipped layout, else its own."""
    folder = config_path.resolve().parent
    return folder.parent if folder.name == "config" else folder


def check_references(config: dict[str, Any]) -> None:
    """Checks the schema cannot express: names that refer to other sections must exist."""
    _check_models(config["models"], config["tasks"])
    _check_model_names(config)
    _check_tasks(config["tasks"])
    _check_efficiency(config.get("efficiency", {}), config["tasks"])
    for model in config["models"]:
        extraction_jobs(config, model)  # refuses group_tasks with shards or int8 storage


def _unknown_model(key: str, name: str, models: dict[str, Any]) -> ConfigError:
    return ConfigError(f"{key}: unknown model {name!r}; configured models are {sorted(models)}")


def _check_models(models: dict[str, Any], tasks: dict[str, Any]) -> None:
    adapters = known_adapters()
    for model_name, model in models.items():
        if adapters and model["adapter"] not in adapters:
            raise ConfigError(
                f"models.{model_name}.adapter: unknown adapter {model['adapter']!r}; registered adapters are {adapters}"
            )
        for task in model.get("tasks", []):
            if task not in tasks:
                raise ConfigError(
                    f"models.{model_name}.tasks: unknown task {task!r}; configured tasks are {sorted(tasks)}"
                )
        if "demo_build" in model and model["checkpoint"] != f"resources/models/{model['demo_build']}":
            raise ConfigError(
                f"models.{model_name}.checkpoint: a demo_build model is built into "
                f"resources/models/{model['demo_build']}, got {model['checkpoint']!r}"
            )


def _check_model_names(config: dict[str, Any]) -> None:
    """Model names used outside ``models``: the baseline, the NEJM models, the comparison pairs."""
    models = config["models"]
    baseline = config.get("baseline_model")
    if baseline is not None and baseline not in models:
        raise _unknown_model("baseline_model", baseline, models)
    for model_name in config.get("nejm", {}).get("models", []):
        if model_name not in models:
            raise _unknown_model("nejm.models", model_name, models)
    for model_name in config.get("nejm", {}).get("max_images", {}):
        if model_name not in models:
            raise _unknown_model("nejm.max_images", model_name, models)
    for index, pair in enumerate(config.get("comparisons", [])):
        for name in pair:
            if name not in models:
                raise _unknown_model(f"comparisons[{index}]", name, models)
        if pair[0] == pair[1]:
            raise ConfigError(f"comparisons[{index}]: a model is compared with itself ({pair[0]!r})")


def _check_tasks(tasks: dict[str, Any]) -> None:
    for task_name, task in tasks.items():
        if task["kind"] == "binary" and len(task["classes"]) != 2:
            raise ConfigError(
                f"tasks.{task_name}.classes: a binary task needs exactly two classes "
                f"(negative, positive), got {task['classes']}"
            )
        if task["classes"] == "all" and task["kind"] != "multilabel":
            raise ConfigError(
                f"tasks.{task_name}.classes: `all` (every finding of the data) is for multilabel tasks; "
                f"a {task['kind']} task lists its classes"
            )
        if task["dataset"] == "demo" and "demo_patients" not in task:
            raise ConfigError(f"tasks.{task_name}.demo_patients: required for the demo dataset")


def _check_efficiency(efficiency: dict[str, Any], tasks: dict[str, Any]) -> None:
    for discipline, task in efficiency.get("summary_tasks", {}).items():
        if task in tasks and tasks[task]["discipline"] != discipline:
            raise ConfigError(
                f"efficiency.summary_tasks.{discipline}: task {task!r} belongs to {tasks[task]['discipline']!r}"
            )
    fractions = efficiency.get("fractions", [])
    if fractions and max(fractions) != 1.0:
        raise ConfigError(
            f"efficiency.fractions: must include 1.0 (the full-data reference the retained share is "
            f"computed against), got {fractions}"
        )


# A Hugging Face hub id: "org/name" (what from_pretrained fetches when no such local folder exists).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_paths(config: dict[str, Any], root: str | Path = ".") -> None:
    """Every file or folder the config names that no rule makes must exist under ``root`` (the working
    directory): local checkpoints, a task's own ``raw_dir`` and ``landmarks`` file (the NEJM cases are optional:
    common.smk skips the evaluation, saying so, when their folder is absent); and a fixed
    ``layer`` must be one the model stores, where its config.json (or the paper models' table) says how many
    hidden states it has. Run before any job, so that nothing is deleted or rerun for a typo; raises one
    ConfigError naming every key and value at fault."""
    root = Path(root)
    problems = [
        *_checkpoint_problems(config, root),
        *_task_path_problems(config, root),
        *_layer_problems(config, root),
    ]
    if problems:
        raise ConfigError("; ".join(problems))


def _checkpoint_problems(config: dict[str, Any], root: Path) -> list[str]:
    problems = []
    for name, entry in config["models"].items():
        checkpoint = str(entry["checkpoint"])
        if "demo_build" in entry or entry.get("fetch", False) or (root / checkpoint).exists():
            continue  # built or fetched by a rule, or a local folder
        if entry["adapter"] in ("timm", "open_clip") and checkpoint.startswith("hf-hub:"):
            checkpoint = checkpoint.removeprefix("hf-hub:")
        if _HUB_ID.fullmatch(checkpoint) is None and not (entry["adapter"] == "timm" and "/" not in checkpoint):
            problems.append(
                f"models.{name}.checkpoint: {entry['checkpoint']!r} is neither an existing folder (relative to "
                f"{root.resolve()}) nor a hub id (org/name)"
            )
    return problems


def _task_path_problems(config: dict[str, Any], root: Path) -> list[str]:
    problems = []
    for name, task in config["tasks"].items():
        if "raw_dir" in task and not (root / task["raw_dir"] / "metadata.csv").is_file():
            folder = root / task["raw_dir"]
            what = "has no metadata.csv" if folder.is_dir() else "does not exist"
            problems.append(f"tasks.{name}.raw_dir: {task['raw_dir']!r} {what} (relative to {root.resolve()})")
        landmarks = task.get("landmarks")
        if isinstance(landmarks, str) and landmarks != "kneel" and not (root / landmarks).is_file():
            problems.append(f"tasks.{name}.landmarks: file {landmarks!r} does not exist (relative to {root.resolve()})")
    return problems


def _layer_problems(config: dict[str, Any], root: Path) -> list[str]:
    from medprobe.extract.plan import resolve_layers
    from medprobe.layers import EMBEDDINGS_LAYER, resolve_layer

    problems = []
    for name, entry in config["models"].items():
        layer = entry.get("layer", "validation")
        n_hidden = _hidden_states(entry, root)
        if layer == "validation" or n_hidden is None:
            continue
        selection = entry.get("layers", config["extraction"].get("layers", "all"))
        try:
            stored = [f"hidden.{index}" for index in resolve_layers(selection, n_hidden)]
        except ValueError as error:
            problems.append(f"models.{name}.layers: {selection!r}: {error}")
            continue
        # Image encoders may store their projected embedding as well (the job checks that it has one).
        names = stored + ([EMBEDDINGS_LAYER] if entry["adapter"] not in ("idefics", "hf_vlm") else [])
        try:
            resolve_layer(layer, names, "", n_hidden)
        except ValueError:
            shown = ", ".join(stored) if len(stored) <= 8 else f"{stored[0]}, {stored[1]}, ..., {stored[-1]}"
            problems.append(
                f"models.{name}.layer: {layer!r} is not among the {len(stored)} stored layers ({shown}) of a model "
                f"with {n_hidden} hidden states (models.{name}.layers / extraction.layers: {selection!r})"
            )
    return problems


def _hidden_states(entry: dict[str, Any], root: Path) -> int | None:
    """The model's number of hidden states (layers + embedding output) from its local config.json, else the
    paper models' table; None where neither is at hand offline (the job checks then)."""
    import json

    folder = root / str(entry["checkpoint"])
    if (folder / "config.json").is_file():
        model_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        part = {
            "idefics": model_config,
            "clip": model_config.get("vision_config", {}),
            "hf_vision": model_config.get("vision_config", model_config),
            "hf_vlm": model_config.get("text_config", {}),
        }.get(entry["adapter"], {})
        layers = part.get("num_hidden_layers")
        return int(layers) + 1 if isinstance(layers, int) else None
    from medprobe.cost import ARCHITECTURES

    known = ARCHITECTURES.get(str(entry["checkpoint"]))
    return known.hidden_states if known is not None else None


def probe_mode(config: dict[str, Any], model: str) -> str:
    """The probe a model gets: its own ``probe_mode`` or the config's ``probe.mode``."""
    return config["models"][model].get("probe_mode", config["probe"]["mode"])


def comparison_pairs(config: dict[str, Any], task: str) -> list[list[str]]:
    """The ``[model, reference]`` pairs compared on ``task``: ``comparisons`` (default: every model against
    ``baseline_model``), kept where both models run the task."""
    runs = task_models(config, task)
    pairs = config.get("comparisons") or [
        [model, config["baseline_model"]]
        for model in config["models"]
        if config.get("baseline_model") and model != config["baseline_model"]
    ]
    return [list(pair) for pair in pairs if pair[0] in runs and pair[1] in runs]


def model_tasks(config: dict[str, Any], model: str) -> list[str]:
    """Tasks a model runs on, in config order."""
    selected = config["models"][model].get("tasks")
    return [task for task in config["tasks"] if selected is None or task in selected]


def groups_tasks(config: dict[str, Any], model: str) -> bool:
    """Whether the model's extraction, probes and label-efficiency sweep run as one job each over all its
    tasks (``models.<M>.group_tasks``, default the top-level ``group_tasks``)."""
    return bool(config["models"][model].get("group_tasks", config.get("group_tasks", False)))


def extraction_jobs(config: dict[str, Any], model: str) -> str:
    """How the model's activations files are made: ``"merged"`` (``shards`` > 1 or ``dtype: int8``: one job
    per shard, then merge_shards, which quantises), ``"grouped"`` (``group_tasks``: one job over all the
    model's tasks) or ``"whole"`` (one job per task writes its file). The model's own ``shards`` is laid over
    the extraction section's.

    Raises:
        ConfigError: ``group_tasks`` with ``shards`` > 1 or int8 storage (both keys named).
    """
    entry, section = config["models"][model], config.get("extraction", {})
    shards = entry.get("shards", section.get("shards", 1))
    int8 = section.get("dtype") == "int8"
    if not groups_tasks(config, model):
        return "merged" if shards > 1 or int8 else "whole"
    if shards > 1 or int8:
        grouped_by = f"models.{model}.group_tasks" if "group_tasks" in entry else "group_tasks"
        if shards > 1:
            conflict = f"{'models.' + model if 'shards' in entry else 'extraction'}.shards: {shards}"
        else:
            conflict = "extraction.dtype: int8"
        raise ConfigError(
            f"{grouped_by}: one extraction job over all of {model}'s tasks cannot be combined with {conflict} "
            f"(those need one job per shard and merge_shards); set models.{model}.group_tasks: false"
        )
    return "grouped"


def model_task_pairs(config: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (model, task) pair the config asks for."""
    return [(model, task) for model in config["models"] for task in model_tasks(config, model)]


def task_models(config: dict[str, Any], task: str) -> list[str]:
    """Models that run on a task, in config order."""
    return [model for model in config["models"] if task in model_tasks(config, model)]


def figures(
    config: dict[str, Any], tables: tuple[str, ...] | list[str] = ("metrics", "layers", "efficiency", "groups")
) -> list[str]:
    """Figures drawn for ``config`` when the workflow writes the result ``tables`` (by default those of the
    probes, without the NEJM table of Figure 1d): see :data:`medprobe.figures.FIGURES`."""
    from medprobe.figures import planned  # not at the top: the figures package imports pandas

    return planned(config, tables)


def raw_dir(config: dict[str, Any], task: str) -> str:
    """Folder that holds a task's raw ``metadata.csv``."""
    entry = config["tasks"][task]
    if "raw_dir" in entry:
        return entry["raw_dir"]
    if entry["dataset"] == "demo":
        return f"resources/demo/raw/{task}"
    return f"resources/raw/{task}"


def dry_run_requested(argv: Sequence[str]) -> bool:
    """Whether a Snakemake command line asks for a dry run (``-n``, ``--dry-run``, ``--dryrun``, or ``n`` among
    combined short flags such as ``-np``): the Snakefile cannot ask Snakemake itself while it is parsed."""
    return any(
        arg in ("--dry-run", "--dryrun") or (re.fullmatch(r"-[A-Za-z]+", arg) is not None and "n" in arg[1:])
        for arg in argv
    )


# Snakemake commands that only inspect or tidy a run: a damaged result file must not stop them (``verify`` is
# how a user finds every damaged file; ``--unlock``, ``--touch`` and ``--cleanup-metadata`` are how one recovers).
_INSPECTING = {
    "verify",
    "--unlock",
    "--touch",
    "-t",
    "--summary",
    "-S",
    "--detailed-summary",
    "-D",
    "--lint",
    "--cleanup-metadata",
    "--cm",
    "--delete-all-output",
    "--delete-temp-output",
    "--list-rules",
    "-l",
    "--list-target-rules",
    "--lt",
    "--report",
}


def checks_result_files(argv: Sequence[str]) -> bool:
    """Whether a Snakemake command line runs jobs, so that damaged result files must stop it before any job
    deletes outputs; commands that only inspect or tidy a run (``verify``, ``--unlock``, ``--touch``, summaries,
    ``--lint``, ``--report``) are not stopped by them."""
    return not any(arg in _INSPECTING or arg.split("=", 1)[0] in _INSPECTING for arg in argv[1:])

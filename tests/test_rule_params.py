"""What a config change reruns (medprobe.rule_params): key by key over the whole schema, the computing rules
whose params a change reaches are exactly those medprobe.rule_params.RERUNS names; labels, names and
resources reach none. The dry-run tests (test_partial_reruns.py) check that the rules take these params."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from test_config_docs import schema_keys

from medprobe import config as medprobe_config
from medprobe import rule_params

MODEL, TASK = "idefics_80b", "T1"
PLACES = {"<M>": MODEL, "<T>": TASK}


@pytest.fixture(scope="module")
def demo(repo):
    return medprobe_config.validate(yaml.safe_load((repo / "config" / "config.yaml").read_text()))


@pytest.fixture(scope="module")
def keys(repo):
    schema = yaml.safe_load((repo / "workflow" / "schemas" / "config.schema.yaml").read_text())
    return sorted(key for key in schema_keys(schema) if key != "extends")


def all_params(config):
    """{(rule, model, task): params as JSON} of every job of every computing rule."""
    jobs = {
        "demo_data": [(None, task) for task in config["tasks"]],
        "raw_dataset": [(None, task) for task in config["tasks"]],
        "prepare": [(None, task) for task in config["tasks"]],
        "compare": [(None, task) for task in config["tasks"]],
        "nejm_answers": [(model, None) for model in config["nejm"]["models"]],
    }
    pairs = medprobe_config.model_task_pairs(config)
    found = {}
    for rule, params in rule_params.RULES.items():
        for model, task in jobs.get(rule, pairs):
            values = {name: function(config, model, task) for name, function in params.items()}
            found[(rule, model, task)] = json.dumps(values, sort_keys=True, default=str)
    return found


def changed_value(key, value):
    """A different value of the same kind (a string where the key is unset)."""
    special = {
        "comparisons": [[MODEL, "idefics_9b"]],
        "baseline_model": "idefics_9b",
        "nejm.max_images": {MODEL: 2},
        "models.<M>.tasks": [TASK],
        "models.<M>.layers": "every:2",
        "extraction.layers": "every:2",
    }
    if key in special:
        return special[key]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    if isinstance(value, list):
        return [*value, value[-1]] if value else ["x"]
    if isinstance(value, dict):
        return {**value, "x": 1}
    return f"{value}-changed" if isinstance(value, str) else "changed"


def with_change(config, key):
    changed = copy.deepcopy(config)
    *parents, leaf = [PLACES.get(part, part) for part in key.split(".")]
    node = changed
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = changed_value(key, node.get(leaf))
    return changed


def test_every_schema_key_is_classified(keys):
    for key in keys:
        rule_params.reruns(key)  # KeyError names an unclassified key
    assert set().union(*rule_params.RERUNS.values()) <= set(rule_params.RULES)


def test_each_key_reaches_exactly_the_rules_it_should(demo, keys):
    wrong = {}
    for key in keys:
        base = copy.deepcopy(demo)
        if key == "models.<M>.fetch":  # fetch and demo_build exclude each other
            del base["models"][MODEL]["demo_build"]
            base["models"][MODEL]["checkpoint"] = "HuggingFaceM4/idefics-80b-instruct"
        before, after = all_params(base), all_params(with_change(base, key))
        # Jobs a change adds or removes (another model's tasks) run or go; a rerun is a kept job whose params change.
        reached = {job[0] for job in set(before) & set(after) if before[job] != after[job]}
        if reached != rule_params.reruns(key):
            wrong[key] = (sorted(reached), sorted(rule_params.reruns(key)))
    assert not wrong, "key: (reached, expected)\n" + "\n".join(f"{k}: {v}" for k, v in wrong.items())


def test_labels_and_resources_never_rerun_a_computation(keys):
    """The issue's cases: renaming a model's label or a task's name, a model's resources or GPUs, or its
    headline layer (only the probe) plan no extraction."""
    for key in ("models.<M>.label", "tasks.<T>.name", "tasks.<T>.discipline", "models.<M>.gpus"):
        assert rule_params.reruns(key) == frozenset(), key
    assert all(not rule_params.reruns(key) for key in keys if ".resources." in key or key.startswith("threads."))
    assert rule_params.reruns("models.<M>.layer") == {"probe"}


@pytest.mark.parametrize("rule", sorted(rule_params.BY_TASK))
def test_a_grouped_job_holds_each_tasks_params(demo, rule):
    """group_tasks: one job's params are the rule's params of every task it runs (what differs by task under
    by_task), so a key that reruns one task's job (RERUNS) reruns the grouped job."""
    tasks = medprobe_config.model_tasks(demo, "dinov2")
    grouped = rule_params.grouped_params(rule, demo, "dinov2", tasks)
    for task in tasks:
        alone = {name: function(demo, "dinov2", task) for name, function in rule_params.RULES[rule].items()}
        rebuilt = {name: value for name, value in grouped.items() if name != "by_task"}
        rebuilt |= {name: values[task] for name, values in grouped["by_task"].items()}
        assert rebuilt == alone
    # What differs from task to task is exactly by_task's.
    varies = {
        name
        for name, function in rule_params.RULES[rule].items()
        if function(demo, "dinov2", "T1") != function(demo, "dinov2", "T8")
    }
    assert varies == set(rule_params.BY_TASK[rule]) == set(grouped["by_task"])
    key = {
        "extract": "tasks.<T>.prompt",
        "probe": "tasks.<T>.min_test_positives",
        "efficiency": "tasks.<T>.min_test_positives",
        "evaluate": "tasks.<T>.metric",
    }[rule]
    assert rule_params.grouped_params(rule, with_change(demo, key), "dinov2", tasks) != grouped

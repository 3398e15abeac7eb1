"""Config validation: defaults, messages that name the key, cross-references, paper config."""

import copy
from pathlib import Path

import pytest
import yaml

from medprobe import config as medprobe_config
from medprobe.config import ConfigError


@pytest.fixture()
def demo(repo):
    return yaml.safe_load((repo / "config" / "config.yaml").read_text())


def test_demo_config_validates_and_fills_defaults(demo):
    del demo["evaluation"]
    config = medprobe_config.validate(demo)
    assert config["evaluation"] == {"bootstrap": 1000, "ci": 0.95, "auc_thresholds": [0.9, 0.7]}
    assert config["models"]["clip"]["revision"] == "main"
    assert config["models"]["clip"]["trust_remote_code"] is False
    assert config["tasks"]["T1"]["graded"] is False


def test_paper_config_follows_the_authors_protocol(repo):
    config = medprobe_config.load(repo / "config" / "paper.yaml")
    assert config["protocol"] == "paper"
    assert config["probe"]["mode"] == "adam"
    assert config["probe"]["adam"] == {"epochs": 80, "lr": 0.0001, "batch_size": 512, "standardise": False}
    assert config["probe"]["sgd"] == {"alpha": 0.001, "max_iter": 10000, "class_weight": "balanced", "random_state": 1}
    assert medprobe_config.probe_mode(config, "clip") == medprobe_config.probe_mode(config, "plip") == "sgd"
    assert config["models"]["clip"]["layer"] == config["models"]["plip"]["layer"] == "image_embeds"
    assert medprobe_config.probe_mode(config, "idefics_80b") == "adam"
    assert {config["models"][m]["quantization"] for m in ("idefics_80b", "idefics_9b")} == {"8bit"}
    assert config["extraction"]["prompt_format"] == "question_answer"
    assert config["tasks"]["T1"]["prompt"] == "What can you seen on this histological picture?"
    assert config["tasks"]["T7"]["classes"] == "all" and config["tasks"]["T7"]["min_test_positives"] == 50
    assert config["tasks"]["T5"]["test_fraction"] == 0.17 and config["tasks"]["T2"]["label_rule"] == "huang_code"
    assert config["efficiency"]["sampling"] == "images" and config["efficiency"]["seeds"] == [1]
    assert config["nejm"]["template"] == "figure_s2" and config["figures"]["figureS5_order"] == "authors"
    assert medprobe_config.comparison_pairs(config, "T6") == [
        ["idefics_80b", "clip"],
        ["idefics_9b", "clip"],
        ["idefics_80b", "idefics_9b"],
    ]
    assert ["idefics_80b", "plip"] in medprobe_config.comparison_pairs(config, "T1")


def test_rigorous_config_shares_the_paper_tasks_and_changes_the_analysis(repo):
    paper = medprobe_config.load(repo / "config" / "paper.yaml")
    rigorous = medprobe_config.load(repo / "config" / "rigorous.yaml")
    assert rigorous["protocol"] == "rigorous" and "extends" not in rigorous
    assert rigorous["tasks"] == paper["tasks"] and rigorous["extraction"] == paper["extraction"]
    for model in paper["models"]:  # same checkpoints and loading: the same activations serve both protocols
        for key in ("checkpoint", "revision", "quantization", "torch_dtype", "tasks"):
            assert rigorous["models"][model].get(key) == paper["models"][model].get(key)
        assert rigorous["models"][model]["layer"] == "validation"
        assert medprobe_config.probe_mode(rigorous, model) == "regularised"
    assert rigorous["probe"]["refit"] is True and rigorous["efficiency"]["sampling"] == "patients"
    assert rigorous["efficiency"]["seeds"] == 5


def test_extends_merges_mappings_and_reports_a_missing_base(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "base.yaml").write_text("a: {b: 1, c: [1, 2]}\nd: 1\n")
    config = {"extends": "config/base.yaml", "a": {"c": [3]}, "e": 2}
    assert medprobe_config.resolve_extends(config, tmp_path) == {"a": {"b": 1, "c": [3]}, "d": 1, "e": 2}
    with pytest.raises(ConfigError, match="extends: the base config .*missing.yaml does not exist"):
        medprobe_config.resolve_extends({"extends": "config/missing.yaml"}, tmp_path)
    (tmp_path / "config" / "loop.yaml").write_text("extends: config/loop.yaml\n")
    with pytest.raises(ConfigError, match="extended twice"):
        medprobe_config.resolve_extends({"extends": "config/loop.yaml"}, tmp_path)


def test_paper_config_states_the_paper(repo):
    config = medprobe_config.load(repo / "config" / "paper.yaml")
    tasks, models = config["tasks"], config["models"]
    assert list(tasks) == [f"T{i}" for i in range(1, 9)]
    assert {t: tasks[t]["metric"] for t in tasks} == {"T1": "f1", "T2": "f1", **{f"T{i}": "auc" for i in range(3, 9)}}
    assert tasks["T7"]["kind"] == "multilabel" and tasks["T2"]["kind"] == "binary"
    assert tasks["T1"]["classes"] == ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
    assert models["idefics_80b"]["checkpoint"] == "HuggingFaceM4/idefics-80b-instruct"
    assert models["idefics_80b"]["layer"] == "authors:32"
    assert models["idefics_9b"]["checkpoint"] == "HuggingFaceM4/idefics-9b-instruct"
    assert models["clip"]["checkpoint"] == "openai/clip-vit-base-patch32"
    assert models["plip"]["checkpoint"] == "vinid/plip" and models["plip"]["tasks"] == ["T1", "T2"]
    assert config["evaluation"]["bootstrap"] == 1000
    assert config["efficiency"]["fractions"] == [0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0]
    assert config["nejm"]["shots"] == 2 and config["nejm"]["models"] == ["idefics_80b"]
    assert medprobe_config.task_models(config, "T3") == ["idefics_80b", "idefics_9b", "clip"]
    assert medprobe_config.task_models(config, "T1") == ["idefics_80b", "idefics_9b", "clip", "plip"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["tasks"]["T1"].update(kind="multi"), "tasks.T1.kind"),
        (lambda c: c["probe"].update(C_grid="x"), "probe.C_grid"),
        (lambda c: c["efficiency"].update(fractions=[0.1, 1.5]), "efficiency.fractions"),
        (lambda c: c["efficiency"].update(fractions=[0.0, 1.0]), "efficiency.fractions"),
        (lambda c: c.update(bogus=1), "'bogus' was unexpected"),
        (lambda c: c["models"]["clip"].update(layer="middle"), "models.clip.layer"),
        (lambda c: c.update(baseline_model="gpt"), "baseline_model: unknown model 'gpt'"),
        (lambda c: c["models"]["clip"].update(tasks=["T9"]), "models.clip.tasks: unknown task 'T9'"),
        (lambda c: c["tasks"]["T2"].update(classes=["a", "b", "c"]), "tasks.T2.classes"),
        (lambda c: c["models"]["clip"].update(checkpoint="elsewhere"), "models.clip.checkpoint"),
        (lambda c: c["efficiency"].update(fractions=[0.1, 0.5]), "must include 1.0"),
        (lambda c: c["tasks"]["T1"].update(classes="all"), "tasks.T1.classes: `all`"),
        (lambda c: c.update(comparisons=[["clip", "gpt"]]), "comparisons\\[0\\]: unknown model 'gpt'"),
        (lambda c: c["models"]["clip"].update(probe_mode="lbfgs"), "models.clip.probe_mode"),
        (lambda c: c["efficiency"].update(summary_tasks={"pathology": "T3"}), "efficiency.summary_tasks.pathology"),
        (lambda c: c.update(seed="zero"), "invalid config key seed: 'zero' is not of type 'integer'"),
        (lambda c: c["evaluation"].update(bootstrap=1.5), "evaluation.bootstrap"),
        (lambda c: c["models"]["clip"].update(trust_remote_code="yes"), "models.clip.trust_remote_code"),
        (lambda c: c["tasks"]["T1"].update(bogus=1), "tasks.T1: Additional properties"),
        (lambda c: c["split"].update(val_fraction=1.5), "split.val_fraction"),
        (lambda c: c.update(on_bad_image="ignore"), "on_bad_image"),
        (lambda c: c["nejm"].update(models=["gpt4"]), "nejm.models: unknown model 'gpt4'"),
        (lambda c: c["models"]["clip"].update(adapter="gpt"), "models.clip.adapter: unknown adapter 'gpt'"),
        (
            lambda c: c["models"]["clip"].update(shards=2),
            "group_tasks: one extraction job over all of clip's tasks cannot be combined with models.clip.shards: 2",
        ),
        (
            lambda c: c["extraction"].update(dtype="int8"),
            "group_tasks: one extraction job over all of idefics_80b's tasks cannot be combined with "
            "extraction.dtype: int8",
        ),
        (
            lambda c: (
                c.update(group_tasks=False)
                or c["extraction"].update(shards=3)
                or c["models"]["clip"].update(group_tasks=True)
            ),
            "models.clip.group_tasks: one extraction job over all of clip's tasks cannot be combined with "
            "extraction.shards: 3",
        ),
    ],
)
def test_bad_values_name_the_key(demo, change, message):
    config = copy.deepcopy(demo)
    change(config)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        medprobe_config.validate(config)


def test_how_each_models_activations_files_are_made(demo):
    """One job per model over its tasks (the demo's group_tasks), per task, or per shard and merged; a
    model's own keys lay over the extraction section's."""
    config = medprobe_config.validate(copy.deepcopy(demo))
    assert {medprobe_config.extraction_jobs(config, model) for model in config["models"]} == {"grouped"}
    config["models"]["clip"]["group_tasks"] = False
    assert medprobe_config.extraction_jobs(config, "clip") == "whole"
    config["models"]["clip"]["shards"] = 2
    assert medprobe_config.extraction_jobs(config, "clip") == "merged"
    config["group_tasks"] = False
    config["extraction"]["dtype"] = "int8"
    assert medprobe_config.extraction_jobs(config, "idefics_9b") == "merged"
    config["extraction"]["dtype"] = "float16"
    assert medprobe_config.extraction_jobs(config, "idefics_9b") == "whole"


def test_empty_config_says_what_to_do():
    with pytest.raises(ConfigError, match="--configfile"):
        medprobe_config.validate({})


def test_figures_follow_configured_tasks(demo):
    config = medprobe_config.validate(demo)
    assert medprobe_config.figures(config) == ["figure3", "figure4", "figure5", "figure6", "figureS5", "figureS6"]
    only_t5 = copy.deepcopy(demo)
    only_t5["tasks"] = {"T5": demo["tasks"]["T5"]}
    del only_t5["models"]["dinov2"]  # it runs on T1, T3, T6 and T8 only
    config = medprobe_config.validate(only_t5)
    assert medprobe_config.figures(config) == ["figure4", "figure6", "figureS5"]


def test_known_adapters_match_the_registry():
    from medprobe.models import ADAPTERS

    assert medprobe_config.known_adapters() == sorted(ADAPTERS)


def test_snakemake_stops_on_a_bad_config_before_any_job(repo, demo, tmp_path):
    import subprocess
    import sys

    bad = copy.deepcopy(demo)
    bad["efficiency"]["fractions"] = [0.5, 1.0, 2.0]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "--directory",
            str(tmp_path),
            "--configfile",
            str(tmp_path / "bad.yaml"),
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "invalid config key efficiency.fractions.2: 2.0 is greater than the maximum of 1" in output, output[-2000:]
    assert "Job stats" not in output and not (tmp_path / "results").exists()


def test_the_curated_model_list_lays_over_both_study_configs(repo):
    extra = yaml.safe_load((repo / "config" / "models.yaml").read_text())
    for study in ("paper.yaml", "rigorous.yaml"):
        base = yaml.safe_load((repo / "config" / study).read_text())
        merged = medprobe_config.merge(base, extra)
        config = medprobe_config.validate(medprobe_config.resolve_extends(merged, repo))
        for name in extra["models"]:
            assert config["models"][name]["adapter"] in medprobe_config.known_adapters(), name
        assert {"idefics_80b", "clip"} <= set(config["models"])  # the paper's models stay
        assert medprobe_config.model_tasks(config, "phikon") == ["T1", "T2"]


def test_dry_run_requested_reads_snakemakes_flags():
    for argv in (["snakemake", "-n"], ["snakemake", "-np"], ["x", "--dry-run"], ["x", "--dryrun"], ["x", "-pn"]):
        assert medprobe_config.dry_run_requested(argv), argv
    for argv in (
        ["snakemake", "--cores", "all"],
        ["x", "-p", "-j2"],
        ["x", "--configfile", "n.yaml"],
        ["x", "-j", "n"],
    ):
        assert not medprobe_config.dry_run_requested(argv), argv


def test_paths_the_config_names_are_checked_before_any_job(demo, tmp_path):
    """check_paths (run by common.smk after validation): local checkpoints, a task's own raw_dir and landmarks
    must exist; hub ids, demo builds and fetched checkpoints are made by rules; every fault named at once."""
    config = medprobe_config.validate(copy.deepcopy(demo))
    medprobe_config.check_paths(config, tmp_path)  # the demo's paths are all made by its rules
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "raw" / "T2").mkdir(parents=True)
    config["models"]["clip"] = {**config["models"]["clip"], "checkpoint": "ckpt"}
    del config["models"]["clip"]["demo_build"]
    medprobe_config.check_paths(config, tmp_path)  # an existing folder
    config["models"]["clip"]["checkpoint"] = "openai/clip-vit-base-patch32"
    medprobe_config.check_paths(config, tmp_path)  # a hub id: fetched by from_pretrained
    config["models"]["clip"]["checkpoint"] = "/nonexistent/clip"
    config["tasks"]["T1"]["raw_dir"] = "data/typo"
    config["tasks"]["T2"]["raw_dir"] = "raw/T2"  # exists, without metadata.csv
    config["tasks"]["T8"]["landmarks"] = "mine/landmarks.csv"
    with pytest.raises(medprobe_config.ConfigError) as caught:
        medprobe_config.check_paths(config, tmp_path)
    message = str(caught.value)
    assert "models.clip.checkpoint: '/nonexistent/clip' is neither an existing folder" in message
    assert "tasks.T1.raw_dir: 'data/typo' does not exist" in message
    assert "tasks.T2.raw_dir: 'raw/T2' has no metadata.csv" in message
    assert "tasks.T8.landmarks: file 'mine/landmarks.csv' does not exist" in message


def test_a_fixed_layer_the_model_does_not_store_is_refused_before_any_job(demo, tmp_path):
    import json

    config = medprobe_config.validate(copy.deepcopy(demo))
    folder = tmp_path / "resources" / "models" / "tiny-idefics-large"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 6}))  # 7 hidden states
    entry = config["models"]["idefics_80b"]
    for good in (6, "hidden.0", "authors:2", "validation"):
        entry["layer"] = good
        medprobe_config.check_paths(config, tmp_path)
    entry["layer"] = 999
    with pytest.raises(medprobe_config.ConfigError, match=r"models.idefics_80b.layer: 999 is not among the 7 stored"):
        medprobe_config.check_paths(config, tmp_path)
    entry["layer"], entry["layers"] = 3, "every:2"  # stores 0, 2, 4, 6
    with pytest.raises(medprobe_config.ConfigError, match=r"layer: 3 is not among the 4 stored layers .*'every:2'"):
        medprobe_config.check_paths(config, tmp_path)
    # The paper's models are known without their files: IDEFICS-80B has 81 hidden states.
    paper = medprobe_config.validate(
        medprobe_config.resolve_extends(
            yaml.safe_load((Path(__file__).parents[1] / "config" / "paper.yaml").read_text()), Path(__file__).parents[1]
        )
    )
    paper["models"]["idefics_80b"]["layer"] = 81
    with pytest.raises(medprobe_config.ConfigError, match="81 hidden states"):
        medprobe_config.check_paths(paper, tmp_path)


def test_commands_that_inspect_or_tidy_a_run_are_not_stopped_by_damaged_files():
    for argv in (["snakemake", "--cores", "all"], ["snakemake", "-n"], ["snakemake", "results/tables/metrics.csv"]):
        assert medprobe_config.checks_result_files(argv), argv
    for argv in (["snakemake", "verify"], ["snakemake", "--unlock"], ["snakemake", "--touch", "--cores", "1"],
                 ["snakemake", "--summary"], ["snakemake", "--report=r.html"], ["snakemake", "--lint"]):  # fmt: skip
        assert not medprobe_config.checks_result_files(argv), argv

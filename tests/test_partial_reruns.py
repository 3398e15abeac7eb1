"""Partial reruns (docs/running.md): which jobs a change or a target schedules, from Snakemake's dry-run.

A working directory holds a complete, up-to-date run of a reduced demo (two tasks, two models) whose
outputs are empty files marked done with `snakemake --touch` (which records the provenance: params,
code, inputs); the dry-run job lists then show what a changed setting, an added model or a target reruns.
"""

import re
import subprocess
import sys

import pytest
import yaml

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
TASKS = ["T1", "T2"]
MODELS = ["clip", "idefics_9b"]
UPSTREAM = {
    "demo_data",
    "demo_model",
    "prepare",
    "extract",
    "extract_whole",
    "merge_shards",
    "raw_dataset",
    "fetch_model",
    *(f"extract_tasks_{model}" for model in ("idefics_80b", "idefics_9b", "clip", "dinov2")),  # group_tasks
}


def snakemake(repo, workdir, *arguments):
    result = subprocess.run(
        SNAKEMAKE + ["--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), *arguments],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def dry_run_jobs(repo, workdir, *arguments):
    """(rule, wildcards) of every job a dry run schedules."""
    out = snakemake(repo, workdir, "--dry-run", *arguments)
    jobs = []
    for block in re.split(r"\n(?=(?:local)?(?:rule|checkpoint) \w+:)", "\n" + out):
        head = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", block)
        if head:
            found = re.search(r"^\s+wildcards: (.*)$", block, flags=re.MULTILINE)
            wildcards = dict(item.split("=", 1) for item in found.group(1).split(", ")) if found else {}
            jobs.append((head.group(1), wildcards))
    return jobs


def write_config(workdir, repo, change=None):
    config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    config["tasks"] = {task: config["tasks"][task] for task in TASKS}
    config["models"] = {model: config["models"][model] for model in MODELS}
    config.pop("nejm", None)  # the NEJM evaluation is not part of these job lists
    # One job per model and task, as a study runs (the demo's group_tasks: test_grouped_jobs_*).
    config["group_tasks"] = False
    if change:
        change(config)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return config


def complete(repo, workdir):
    """Mark every job of ``workdir``'s config done: its outputs as empty files, recorded by ``--touch``."""
    summary = snakemake(repo, workdir, "--summary")
    for line in summary.splitlines()[1:]:
        path = workdir / line.split("\t")[0]
        if not line.strip() or "\t" not in line:
            continue
        if path.suffix:  # files; the directory outputs (images, demo models) have no suffix
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            path.mkdir(parents=True, exist_ok=True)
    # --forceall: every job is touched and its provenance (params, inputs) recorded, so later changes compare.
    snakemake(repo, workdir, "--touch", "--forceall", "--cores", "1")
    assert dry_run_jobs(repo, workdir) == [], "the touched run should be complete"


@pytest.fixture(scope="module")
def done(repo, tmp_path_factory):
    """A working directory where every job of the reduced demo is complete."""
    workdir = tmp_path_factory.mktemp("reruns")
    config = write_config(workdir, repo)
    complete(repo, workdir)
    return workdir, config


def changed(workdir, tmp_path, section, **values):
    """--configfile arguments: the run's config with keys of one section changed."""
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config[section].update(values)
    path = tmp_path / f"{section}.yaml"
    path.write_text(yaml.safe_dump(config))
    return "--configfile", str(path)


def test_probe_settings_rerun_probes_and_what_follows_never_extraction(repo, done, tmp_path):
    workdir, _ = done
    jobs = dry_run_jobs(repo, workdir, *changed(workdir, tmp_path, "probe", C_grid=[0.1, 1.0]))
    rules = {rule for rule, _ in jobs}
    assert not rules & UPSTREAM, rules
    pairs = {(wc["model"], wc["task"]) for rule, wc in jobs if rule == "probe"}
    assert pairs == {(model, task) for model in MODELS for task in TASKS}
    assert {"efficiency", "evaluate", "compare", "collect_table", "figure"} <= rules


def test_statistics_settings_rerun_evaluation_not_probes(repo, done, tmp_path):
    workdir, _ = done
    jobs = dry_run_jobs(repo, workdir, *changed(workdir, tmp_path, "evaluation", bootstrap=200))
    rules = {rule for rule, _ in jobs}
    assert not rules & (UPSTREAM | {"probe", "efficiency"}), rules
    assert len([1 for rule, _ in jobs if rule == "evaluate"]) == len(MODELS) * len(TASKS)
    assert len([1 for rule, _ in jobs if rule == "compare"]) == len(TASKS)


def test_an_added_model_runs_only_its_jobs_and_the_shared_tables(repo, done, tmp_path):
    workdir, _ = done
    base = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    added = {**yaml.safe_load((workdir / "config.yaml").read_text())}
    added["models"]["idefics_80b"] = base["models"]["idefics_80b"]
    configfile = tmp_path / "added.yaml"
    configfile.write_text(yaml.safe_dump(added))
    jobs = dry_run_jobs(repo, workdir, "--configfile", str(configfile))
    per_model = [(rule, wc) for rule, wc in jobs if "model" in wc]
    assert {wc["model"] for _, wc in per_model} == {"idefics_80b"}
    assert {(rule, wc["task"]) for rule, wc in per_model if rule.startswith("extract")} == {
        ("extract_whole", t) for t in TASKS
    }
    assert {rule for rule, _ in jobs} & {"prepare", "demo_data"} == set()
    assert [wc for rule, wc in jobs if rule == "demo_model"] == [{"build": "tiny-idefics-large"}]
    shared = {rule for rule, wc in jobs if "model" not in wc} - {"demo_model"}
    assert {"compare", "collect_table", "figure"} <= shared


@pytest.mark.parametrize(
    ("target", "key", "value"),
    [("results/tables/by_task/T1.csv", "task", "T1"), ("results/tables/by_model/clip.csv", "model", "clip")],
)
def test_one_task_or_one_model_target(repo, tmp_path, target, key, value):
    write_config(tmp_path, repo)
    jobs = dry_run_jobs(repo, tmp_path, target)
    scoped = [wc[key] for _, wc in jobs if key in wc]
    assert scoped and set(scoped) == {value}
    assert "figure" not in {rule for rule, _ in jobs}


def test_one_figure_target(repo, tmp_path):
    write_config(tmp_path, repo)
    jobs = dry_run_jobs(repo, tmp_path, "results/figures/figure3.pdf")
    figures = [wc["figure"] for rule, wc in jobs if rule == "figure"]
    assert figures == ["figure3"]


def test_where_probes_run_never_reruns_them(repo, done, tmp_path):
    """probe.gpus, probe.layer_batch, probe.resources and efficiency.gpus say where and how probes run, not
    what they compute: changing them plans no job."""
    workdir, _ = done
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["probe"].update(gpus=1, layer_batch=4, resources={"mem_mb": 1234, "runtime": 5, "gpu_model": "h200"})
    config["efficiency"]["gpus"] = 2
    path = tmp_path / "where.yaml"
    path.write_text(yaml.safe_dump(config))
    assert dry_run_jobs(repo, workdir, "--configfile", str(path)) == []


def test_paper_config_plans_probes_on_a_gpu(repo, tmp_path):
    """config/paper.yaml fits its probes on GPUs: the probe and efficiency jobs claim probe.gpus /
    efficiency.gpus and probe.resources (the SLURM request); the plan prints each activations file's size."""
    out = subprocess.run(
        SNAKEMAKE + ["results/probes/idefics_80b/T1/probe.json", "results/probes/idefics_80b/T1/efficiency.h5",
                     "--dry-run", "--directory", str(tmp_path), "--configfile", str(repo / "config" / "paper.yaml")],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # The plan states the disk the activations will take, file by file, before anything runs.
    planned = re.search(r"projected activations files: ([\d.]+) (GB|TB) in all", out.stdout + out.stderr)
    assert planned and planned.group(2) == "GB" and 500 < float(planned.group(1)) < 1000, planned
    line = "results/activations/idefics_80b/T1.h5: 142 GB (107,180 images x 81 layers x 8192, float16)"
    assert line in out.stdout + out.stderr
    for rule in ("probe", "efficiency"):
        block = re.search(rf"^rule {rule}:\n(?:    .*\n)+", out.stdout + out.stderr, flags=re.MULTILINE)
        assert block, rule
        resources = re.search(r"resources: (.*)", block.group(0)).group(1)
        assert "gpu=1" in resources.split(", ") and "mem_mb=64000" in resources.split(", "), resources


def test_a_label_rename_plans_nothing_and_a_layer_change_only_the_probes(repo, done, tmp_path):
    """Renaming a model's label or a task's name reruns no computation (the tables and figures that show them
    do rerun); a model's headline layer reruns its probes and what follows them, never its extraction."""
    workdir, _ = done
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["models"]["clip"]["label"] = "Another name"
    config["tasks"]["T1"]["name"] = "Another task name"
    config["models"]["clip"]["resources"] = {"mem_mb": 999}
    path = tmp_path / "renamed.yaml"
    path.write_text(yaml.safe_dump(config))
    rules = {rule for rule, _ in dry_run_jobs(repo, workdir, "--configfile", str(path))}
    assert not rules & (UPSTREAM | {"probe", "efficiency", "evaluate", "evaluate_efficiency", "compare"}), rules
    config["models"]["clip"]["layer"] = 1
    path.write_text(yaml.safe_dump(config))
    jobs = dry_run_jobs(repo, workdir, "--configfile", str(path))
    assert not {rule for rule, _ in jobs} & UPSTREAM
    assert {(rule, wc.get("model")) for rule, wc in jobs if rule == "probe"} == {("probe", "clip")}


def test_grouped_jobs_rerun_all_of_a_models_tasks_and_only_for_what_reruns_one(repo, tmp_path):
    """group_tasks (the demo's setting): one extraction, probe, efficiency and two evaluation jobs per model
    make its tasks' files; one task's prompt reruns the model's jobs, a probe setting its probe, efficiency
    and evaluation jobs, a statistics setting its evaluation jobs, a label or a model's resources no
    computation."""
    workdir = tmp_path / "grouped"
    write_config(workdir, repo, change=lambda config: config.update(group_tasks=True))
    complete(repo, workdir)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["models"]["clip"].update(label="Another name", resources={"mem_mb": 999})
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(config))
    assert {rule for rule, _ in dry_run_jobs(repo, workdir, "--configfile", str(path))} <= {
        "collect_table",
        "figure",
        "all",
    }
    kinds = ("extract", "probe", "efficiency", "evaluate", "evaluate_efficiency")
    grouped = {f"{kind}_tasks_{model}" for kind in kinds for model in MODELS}
    config["evaluation"]["bootstrap"] = 200
    path.write_text(yaml.safe_dump(config))
    rules = {rule for rule, _ in dry_run_jobs(repo, workdir, "--configfile", str(path))}
    assert rules & grouped == {rule for rule in grouped if rule.startswith("evaluate")}, rules
    config["probe"]["C_grid"] = [0.1, 1.0]
    path.write_text(yaml.safe_dump(config))
    rules = {rule for rule, _ in dry_run_jobs(repo, workdir, "--configfile", str(path))}
    assert rules & (UPSTREAM | grouped) == {rule for rule in grouped if not rule.startswith("extract")}, rules
    config["tasks"]["T2"]["prompt"] = "What is this?"
    path.write_text(yaml.safe_dump(config))
    rules = {rule for rule, _ in dry_run_jobs(repo, workdir, "--configfile", str(path))}
    assert rules & (UPSTREAM | grouped) == grouped
    assert not rules & {"probe", "efficiency", "evaluate", "evaluate_efficiency"}


def test_a_replaced_added_or_removed_raw_image_reruns_prepare(repo, tmp_path):
    """A user's own raw table (tasks.<T>.raw_dir): prepare sees the size and time of every image it names, so
    replacing, adding (e.g. one skipped as missing) or removing one reruns it and what follows."""
    workdir = tmp_path / "run"
    raw = workdir / "mydata"
    (raw / "images").mkdir(parents=True)
    (raw / "metadata.csv").write_text("image_id,file\na,images/a.png\nb,images/b.png\n")
    (raw / "images" / "a.png").write_bytes(b"first")
    write_config(workdir, repo, change=lambda config: config["tasks"]["T1"].update(raw_dir="mydata"))
    complete(repo, workdir)
    for change in (
        lambda: (raw / "images" / "a.png").write_bytes(b"replaced"),
        lambda: (raw / "images" / "b.png").write_bytes(b"added"),
        lambda: (raw / "images" / "a.png").unlink(),
    ):
        change()
        jobs = dry_run_jobs(repo, workdir)
        assert [wc for rule, wc in jobs if rule == "prepare"] == [{"task": "T1"}], jobs
        assert "probe" in {rule for rule, _ in jobs}
        snakemake(repo, workdir, "--touch", "--cores", "1")
        assert dry_run_jobs(repo, workdir) == []

"""SLURM integration: a real one-node cluster (Debian's munge, slurmctld, slurmd; fake GPUs as GRES) runs a
reduced demo through `--executor slurm` with profiles/slurm: prepare -> extract (GPU jobs) -> probe ->
efficiency -> evaluate -> the task table.  Checks the results, the resources SLURM granted (sized from the
model config) and that each extraction job saw the GPU SLURM assigned it.

Needs root and apt (or the packages already installed); skips with the reason otherwise.  About a minute.
"""

import os
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow
SCRIPT = "tests/slurm/local_cluster.sh"
MODELS = ["clip", "idefics_9b"]
TASK = "T2"


def _skip_reason():
    if sys.platform != "linux":
        return "SLURM test needs Linux"
    if os.geteuid() != 0:
        return "SLURM test needs root to start munged, slurmctld and slurmd"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed (requirements-test.txt)"
    return None


@pytest.fixture(scope="module")
def cluster(repo):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    # Advertise 8 CPUs so a few one-CPU jobs run side by side on a small CI machine.
    env = {**os.environ, "MEDPROBE_SLURM_GPUS": "4", "MEDPROBE_SLURM_CPUS": str(max(8, os.cpu_count() or 1))}
    result = subprocess.run(["bash", SCRIPT, "start"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode in (3, 4):
        pytest.skip(f"SLURM cannot be installed or started here: {result.stderr.strip()[-500:]}")
    assert result.returncode == 0, result.stderr[-4000:]
    assert shutil.which("sbatch") and shutil.which("squeue")
    return repo


def reduced_config(repo, path):
    """The demo config cut to one task and two models, small resources, few bootstrap replicates."""
    config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    config["tasks"] = {TASK: config["tasks"][TASK]}
    config["models"] = {name: config["models"][name] for name in MODELS}
    config["models"]["clip"]["resources"] = {"mem_mb": 1500, "runtime": 15}
    config["models"]["idefics_9b"]["resources"] = {"mem_mb": 2500, "runtime": 20}
    # One job per model and task, as a study on a cluster runs (not the demo's group_tasks):
    config["group_tasks"] = False
    config["models"]["clip"]["shards"] = 2  # two extraction jobs and merge_shards; IDEFICS runs as one job
    config["baseline_model"] = "clip"
    if "nejm" in config:  # the NEJM evaluation is not among the targets; keep its model list valid
        config["nejm"]["models"] = [name for name in config["nejm"]["models"] if name in MODELS]
    config["evaluation"]["bootstrap"] = 50
    config["efficiency"] = {"fractions": [0.5, 1.0], "seeds": 1}
    path.write_text(yaml.safe_dump(config))
    return config


def scontrol_job(job_id):
    out = subprocess.run(["scontrol", "-d", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out)), out


@pytest.fixture(scope="module")
def run(cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm")
    configfile = workdir / "config.yaml"
    config = reduced_config(cluster, configfile)
    command = [
        sys.executable, "-m", "snakemake", "--workflow-profile", "profiles/slurm", "--directory", str(workdir),
        "--configfile", str(configfile), "--executor", "slurm", "--jobs", "6",
        "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
        "--seconds-between-status-checks", "2", "--slurm-keep-successful-logs", "--latency-wait", "5",
        f"results/tables/by_task/{TASK}.csv",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=cluster, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return workdir, config, result.stdout + result.stderr


def extract_logs(workdir):
    logs = {}
    for model in MODELS:
        logs_dir = workdir / ".snakemake" / "slurm_logs"
        found = sorted(
            path
            for rule in ("rule_extract", "rule_extract_whole")
            for path in (logs_dir / rule).glob(f"*{model}*{TASK}*/*.log")
        )
        assert found, f"no SLURM log of extract {model}/{TASK} under {workdir}/.snakemake/slurm_logs"
        logs[model] = found[-1]
    return logs


def test_results_of_the_reduced_demo(run):
    workdir, config, _ = run
    table = pd.read_csv(workdir / "results" / "tables" / "by_task" / f"{TASK}.csv", dtype={"class": str})
    assert set(table["model"]) == set(MODELS) and set(table["task"]) == {TASK}
    headline = table[table["metric"] == config["tasks"][TASK]["metric"]]
    assert set(headline["model"]) == set(MODELS)
    assert headline["value"].notna().all() and headline["value"].between(0, 1).all()
    for model in MODELS:
        assert (workdir / "results" / "activations" / model / f"{TASK}.h5").stat().st_size > 0


def test_jobs_went_through_slurm(run):
    workdir, _, log = run
    # by_task/T2.csv needs the headline tables only: the label-efficiency sweep is no part of it.
    for rule in ["prepare", "extract", "extract_whole", "merge_shards", "probe", "evaluate"]:
        assert list((workdir / ".snakemake" / "slurm_logs" / f"rule_{rule}").rglob("*.log")), rule
    assert "sbatch" in log or "SLURM" in log


def job_environments(log_file):
    """The job environment lines of a SLURM log: the batch script's, then the job step's (srun)."""
    text = log_file.read_text()
    lines = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in re.findall(r"medprobe job environment: (.*)", text)]
    assert lines, f"{log_file} lacks the job environment line:\n{text[-2000:]}"
    return lines


def test_gpu_jobs_saw_the_devices_slurm_assigned(run):
    workdir, config, _ = run
    for model, log_file in extract_logs(workdir).items():
        batch, *steps = job_environments(log_file)
        assert steps, f"{log_file}: no job step ran the rule"
        job, details = scontrol_job(batch["SLURM_JOB_ID"])
        # SLURM's record: one GPU of the fake GRES; memory and time limit from the model's config entry.
        assert "JOB_GRES=gpu:1" in details and job["TresPerJob"] == "gres:gpu:1", details
        resources = config["models"][model]["resources"]
        assert job["MinMemoryNode"] == f"{resources['mem_mb']}M"
        assert job["TimeLimit"] == f"00:{resources['runtime']:02d}:00"
        # The GPU SLURM gave the job is the one its batch script and the step running the rule see.
        device = batch["SLURM_JOB_GPUS"]
        assert device in {"0", "1", "2", "3"}, batch
        assert batch["CUDA_VISIBLE_DEVICES"] == device
        for step in steps:
            assert step["SLURM_JOB_ID"] == batch["SLURM_JOB_ID"]
            assert step["SLURM_STEP_GPUS"] == device and step["CUDA_VISIBLE_DEVICES"] == device, step


def test_cpu_jobs_get_no_gpu(run):
    workdir, _, _ = run
    log_file = sorted((workdir / ".snakemake" / "slurm_logs" / "rule_probe").rglob("*.log"))[0]
    for env in job_environments(log_file):
        assert env["SLURM_JOB_ID"] and env["SLURM_JOB_GPUS"] == env["CUDA_VISIBLE_DEVICES"] == "", env

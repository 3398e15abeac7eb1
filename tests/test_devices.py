"""GPU assignment for concurrent local jobs (medprobe.devices) and the GPU-job loader (medprobe.gpu_job); no GPU needed."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from medprobe.devices import DeviceClaim, claim_devices, device_pool
from medprobe.gpu_job import GpuJob

# A job: claim N devices, report CUDA_VISIBLE_DEVICES, hold them until the release file appears.
JOB = """
import os, sys, time
from pathlib import Path
from medprobe.devices import claim_devices
claim = claim_devices(int(sys.argv[1]), timeout=float(sys.argv[3]), poll_interval=0.05)
print(os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
release = Path(sys.argv[2])
while not release.exists():
    time.sleep(0.02)
"""


def local_env(tmp_path: Path, pool: str = "0,1,2,3") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES"}}
    env.update(MEDPROBE_GPUS=pool, MEDPROBE_GPU_LOCK_DIR=str(tmp_path / "locks"))
    return env


def start_job(n: int, release: Path, env: dict[str, str], timeout: float = 30.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", JOB, str(n), str(release), str(timeout)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_concurrent_jobs_get_distinct_devices_and_locks_die_with_a_killed_job(tmp_path):
    env = local_env(tmp_path)
    release = tmp_path / "release"
    jobs = [start_job(n, release, env) for n in (2, 1, 1)]  # gpu=4 in all, started at once
    try:
        assigned = [job.stdout.readline().strip().split(",") for job in jobs]
        assert [len(devices) for devices in assigned] == [2, 1, 1]
        flat = [device for devices in assigned for device in devices]
        assert sorted(flat) == ["0", "1", "2", "3"]  # four jobs' worth of GPUs, no device twice
        # The pool is exhausted: one more job waits and then gives up with a clear message.
        extra = start_job(1, release, env, timeout=0.5)
        _, stderr = extra.communicate(timeout=60)
        assert extra.returncode != 0 and "only 0 of the 1 GPU(s) needed were free" in stderr
        # SIGKILL one holder: its device becomes claimable at once (locks die with the process).
        victim = jobs[1]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        after = start_job(1, release, env, timeout=10)
        assert after.stdout.readline().strip() == assigned[1][0]
        jobs.append(after)
    finally:
        release.touch()
        for job in jobs:
            job.wait(timeout=60)
            job.stdout.close()
            job.stderr.close()


def test_in_process_claim_sets_visible_devices_and_release_frees_them(tmp_path):
    env = local_env(tmp_path, pool="3,5")
    with claim_devices(2, env=env) as claim:
        assert claim.devices == ["3", "5"] and claim.source == "locked"
        assert env["CUDA_VISIBLE_DEVICES"] == "3,5"
        other = local_env(tmp_path, pool="3,5")
        with pytest.raises(TimeoutError, match=r"only 0 of the 1 GPU\(s\).*\['3', '5'\]"):
            claim_devices(1, env=other, timeout=0.1, poll_interval=0.02)
    again = local_env(tmp_path, pool="3,5")
    assert claim_devices(1, env=again).devices == ["3"]


def test_scheduler_assignment_is_used_as_is(tmp_path):
    slurm = {"SLURM_JOB_ID": "4711", "CUDA_VISIBLE_DEVICES": "2,7", "MEDPROBE_GPU_LOCK_DIR": str(tmp_path / "l")}
    claim = claim_devices(2, env=slurm)
    assert (claim.devices, claim.source, slurm["CUDA_VISIBLE_DEVICES"]) == (["2", "7"], "scheduler", "2,7")
    assert not (tmp_path / "l").exists()  # nothing locked
    preset = {"CUDA_VISIBLE_DEVICES": "1", "MEDPROBE_GPUS": "0,1,2,3"}
    assert claim_devices(1, env=preset).devices == ["1"] and preset["CUDA_VISIBLE_DEVICES"] == "1"


def test_bad_requests_are_named(tmp_path):
    env = local_env(tmp_path, pool="0,1")
    with pytest.raises(ValueError, match=r"needs 3 GPU\(s\) but the machine has 2 \(MEDPROBE_GPUS='0,1'"):
        claim_devices(3, env=env)
    with pytest.raises(ValueError, match="non-negative"):
        claim_devices(-1, env=env)
    with pytest.raises(ValueError, match="lists a device twice"):
        device_pool({"MEDPROBE_GPUS": "0,0"})
    untouched = dict(env)
    assert claim_devices(0, env=env).devices == [] and env == untouched
    # No GPU on the machine (nvidia-smi absent) and no pool set: the job runs on the CPU.
    cpu_only = {"PATH": str(tmp_path / "empty"), "MEDPROBE_GPU_LOCK_DIR": str(tmp_path / "l2")}
    claim = claim_devices(1, env=cpu_only)
    assert (claim.devices, claim.source, "CUDA_VISIBLE_DEVICES" in cpu_only) == ([], "none", False)
    started = time.monotonic()
    assert device_pool({"MEDPROBE_GPUS": ""}) == []
    assert time.monotonic() - started < 5


def test_several_gpus_spread_the_model_unless_the_entry_says_otherwise():
    entry = {"adapter": "idefics", "checkpoint": "x"}
    assert GpuJob(DeviceClaim(["0", "1"], "locked")).model_entry(entry)["device_map"] == "auto"
    assert "device_map" not in GpuJob(DeviceClaim(["3"], "locked")).model_entry(entry) and "device_map" not in entry
    balanced = entry | {"device_map": "balanced"}
    assert GpuJob(DeviceClaim(["0", "1"], "scheduler")).model_entry(balanced)["device_map"] == "balanced"


def test_a_job_loads_its_model_onto_its_devices(tmp_path, monkeypatch):
    loaded = []

    def load_adapter(entry, device=None):
        loaded.append((entry, device))
        return types.SimpleNamespace(device=device)

    monkeypatch.setattr("medprobe.models.load_adapter", load_adapter)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    entry = {"adapter": "idefics", "checkpoint": "x"}
    with GpuJob.claim_devices(2, env=local_env(tmp_path, pool="4,6")) as job:
        assert job.devices == ["4", "6"] and job.device == "cuda"
        job.load_adapter(entry)
    assert loaded == [(entry | {"device_map": "auto"}, "cuda")]
    assert claim_devices(2, env=local_env(tmp_path, pool="4,6")).devices == ["4", "6"]  # released on exit
    GpuJob.on("cuda:1").load_adapter(entry)
    assert loaded[-1] == (entry, "cuda:1")


def test_a_job_without_gpus_runs_on_the_cpu(tmp_path, monkeypatch):
    assert GpuJob.claim_devices(0, env=local_env(tmp_path)).device == "cpu"
    cpu_only = {"PATH": str(tmp_path / "empty"), "MEDPROBE_GPU_LOCK_DIR": str(tmp_path / "l")}
    assert GpuJob.claim_devices(1, env=cpu_only).device == "cpu"  # no GPU on the machine
    assert GpuJob.claim_devices(1, env={"SLURM_JOB_ID": "1", "CUDA_VISIBLE_DEVICES": ""}).device == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # claimed, but torch has no CUDA
    assert GpuJob.claim_devices(1, env=local_env(tmp_path, pool="0")).device == "cpu"
    assert GpuJob.on(None).device == "cpu" and GpuJob.on("cpu").device == "cpu"


def test_the_loader_claims_without_torch_in_python_3_7_syntax(repo):
    # KNEEL's environment (Python 3.7, no medprobe install) claims its GPU through this module too.
    source = (repo / "medprobe" / "gpu_job.py").read_text()
    for path in ("medprobe/gpu_job.py", "medprobe/devices.py", "medprobe/__init__.py"):
        ast.parse((repo / path).read_text(), feature_version=(3, 7))
    assert "import torch" not in source.split("class GpuJob")[0]
    check = "import sys, medprobe.gpu_job; medprobe.gpu_job.GpuJob.claim_devices(0); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True, cwd=repo)

"""GPU assignment for concurrent local jobs (medprobe.devices); no GPU needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medprobe.devices import DeviceClaim, claim_devices, device_pool, placement

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
    assert placement(entry, DeviceClaim(["0", "1"], "locked"))["device_map"] == "auto"
    assert "device_map" not in placement(entry, DeviceClaim(["3"], "locked")) and "device_map" not in entry
    assert (
        placement(entry | {"device_map": "balanced"}, DeviceClaim(["0", "1"], "scheduler"))["device_map"] == "balanced"
    )

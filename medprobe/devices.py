"""Give every concurrent GPU job of a local run its own GPU(s).

Snakemake's ``gpu`` resource is only a counter: ``--resources gpu=4`` lets jobs asking for 4 GPUs in all
run at once, but does not say *which* GPUs each job gets.  :func:`claim_devices` does: a job claims
``n`` distinct device indices by taking an exclusive OS file lock (``fcntl.flock``) per device in a lock
directory shared by the jobs of one machine, and sets ``CUDA_VISIBLE_DEVICES`` to the claimed indices.
The locks belong to the process, so they are released when it exits, crashes or is killed (SIGKILL
included), and no stale lock can outlive a job.

Where the devices come from, in order:

1. ``SLURM_JOB_ID`` set (a SLURM job/step) or ``CUDA_VISIBLE_DEVICES`` already set: the scheduler has
   assigned the devices; they are used as they are and nothing is locked.
2. ``MEDPROBE_GPUS`` (e.g. ``"0,1,2,3"``): the pool of device indices to claim from.
3. Otherwise every GPU NVML reports (``nvidia-smi``), counted without initialising CUDA in this process.

The lock directory is ``MEDPROBE_GPU_LOCK_DIR`` or ``<tmp>/medprobe-gpu-locks-<uid>``.  Call
:func:`claim_devices` before anything initialises CUDA in the process (CUDA reads
``CUDA_VISIBLE_DEVICES`` once).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["DeviceClaim", "claim_devices", "device_pool", "lock_dir"]

logger = logging.getLogger("medprobe.devices")

POOL_VARIABLE = "MEDPROBE_GPUS"
LOCK_DIR_VARIABLE = "MEDPROBE_GPU_LOCK_DIR"


@dataclass
class DeviceClaim:
    """Devices a job may use; holds the locks until :meth:`release` (or process exit).

    Attributes:
        devices: the device indices (as given in the pool or by the scheduler).
        source: ``scheduler`` (SLURM / pre-set ``CUDA_VISIBLE_DEVICES``), ``locked`` or ``none`` (n = 0).
    """

    devices: list[str]
    source: str
    _handles: list[IO[bytes]] = field(default_factory=list, repr=False)

    def release(self) -> None:
        """Release the device locks (closing the lock file drops its ``flock``)."""
        for handle in self._handles:
            handle.close()
        self._handles.clear()

    def __enter__(self) -> DeviceClaim:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def lock_dir(env: Mapping[str, str] | None = None) -> Path:
    """The directory holding one lock file per device (shared by all jobs of a machine and user)."""
    env = os.environ if env is None else env
    configured = env.get(LOCK_DIR_VARIABLE)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"medprobe-gpu-locks-{os.getuid()}"


def _parse_indices(value: str, variable: str) -> list[str]:
    indices = [part.strip() for part in value.split(",") if part.strip()]
    if len(set(indices)) != len(indices):
        raise ValueError(f"{variable}={value!r} lists a device twice")
    return indices


def _nvml_device_count(env: Mapping[str, str]) -> int:
    """Number of GPUs, from ``nvidia-smi -L`` (does not initialise CUDA in this process); 0 without one."""
    executable = shutil.which("nvidia-smi", path=env.get("PATH"))
    if executable is None:
        return 0
    try:
        listing = subprocess.run([executable, "-L"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("nvidia-smi -L failed (%s); assuming no GPU", error)
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def device_pool(env: Mapping[str, str] | None = None) -> list[str]:
    """The device indices jobs claim from: ``MEDPROBE_GPUS`` if set, else all GPUs of the machine."""
    env = os.environ if env is None else env
    if env.get(POOL_VARIABLE) is not None:
        return _parse_indices(env[POOL_VARIABLE], POOL_VARIABLE)
    return [str(index) for index in range(_nvml_device_count(env))]


def claim_devices(
    n: int,
    *,
    env: MutableMapping[str, str] | None = None,
    timeout: float = 600.0,
    poll_interval: float = 0.5,
) -> DeviceClaim:
    """Claim ``n`` distinct GPUs for this process and set ``CUDA_VISIBLE_DEVICES`` (in ``env``) to them.

    Args:
        n: GPUs the job needs (the rule's ``gpu`` resource); 0 claims nothing and changes nothing, and
            so does a machine without GPUs (the job runs on the CPU; a warning says so).
        env: the environment to read and update (default ``os.environ``).
        timeout: seconds to wait for enough free devices (jobs of other workflows may hold some).
        poll_interval: seconds between attempts while waiting.

    Returns:
        The claim; keep it alive while the devices are in use (its locks end with the process anyway).

    Raises:
        ValueError: ``n`` is negative or larger than the pool (the message names both and the pool).
        TimeoutError: fewer than ``n`` devices became free within ``timeout`` seconds.
    """
    env = os.environ if env is None else env
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"number of GPUs must be a non-negative integer, got {n!r}")
    if n == 0:
        return DeviceClaim([], "none")
    if env.get("SLURM_JOB_ID") or env.get("CUDA_VISIBLE_DEVICES") is not None:
        return _scheduler_claim(n, env)
    pool = device_pool(env)
    if not pool and env.get(POOL_VARIABLE) is None:
        logger.warning("the job asks for %d GPU(s) but this machine has none; running on the CPU", n)
        return DeviceClaim([], "none")
    if n > len(pool):
        source = f"{POOL_VARIABLE}={env[POOL_VARIABLE]!r}" if env.get(POOL_VARIABLE) is not None else "nvidia-smi"
        raise ValueError(f"the job needs {n} GPU(s) but the machine has {len(pool)} ({source}: {pool})")
    directory = lock_dir(env)
    directory.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        claim = _lock_free_devices(pool, n, directory)
        if len(claim.devices) == n:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(claim.devices)
            logger.info("claimed GPU(s) %s (locks in %s)", ",".join(claim.devices), directory)
            return claim
        # Fewer than n free: give back what was taken, so that no two jobs that each hold some wait for ever.
        claim.release()
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"only {len(claim.devices)} of the {n} GPU(s) needed were free after {timeout:.0f} s "
                f"(pool {pool}, locks in {directory}); other jobs hold the rest"
            )
        time.sleep(poll_interval)


def _scheduler_claim(n: int, env: Mapping[str, str]) -> DeviceClaim:
    """The devices the scheduler made visible, taken as they are (nothing is locked)."""
    visible = _parse_indices(env.get("CUDA_VISIBLE_DEVICES", ""), "CUDA_VISIBLE_DEVICES")
    if len(visible) < n:
        logger.warning(
            "the job asks for %d GPU(s) but the scheduler made %d visible (CUDA_VISIBLE_DEVICES=%r)",
            n,
            len(visible),
            env.get("CUDA_VISIBLE_DEVICES", ""),
        )
    logger.info("using the scheduler's GPU assignment CUDA_VISIBLE_DEVICES=%r", env.get("CUDA_VISIBLE_DEVICES", ""))
    return DeviceClaim(visible, "scheduler")


def _lock(directory: Path, index: str) -> IO[bytes] | None:
    """The open lock file of device ``index`` with its exclusive lock taken, or None when another job holds it."""
    handle = open(directory / f"gpu{index}.lock", "ab")  # noqa: SIM115 - held beyond this scope
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _lock_free_devices(pool: list[str], n: int, directory: Path) -> DeviceClaim:
    """Lock free devices of ``pool`` in pool order until ``n`` are held (fewer when fewer are free)."""
    claim = DeviceClaim([], "locked")
    for index in pool:
        handle = _lock(directory, index)
        if handle is not None:
            claim.devices.append(index)
            claim._handles.append(handle)
            if len(claim.devices) == n:
                break
    return claim

"""The devices of one GPU job and the model placed on them: the one way a job reaches its GPUs.

A job claims its devices first, before anything initialises CUDA (CUDA reads ``CUDA_VISIBLE_DEVICES``
once), then loads its model onto them::

    with GpuJob.claim_devices(snakemake.resources.gpu) as job:  # local locks, or the scheduler's
        adapter = job.load_adapter(model_entry)  # on job.device, or device_map over several GPUs
        ...

:meth:`GpuJob.claim_devices` is :func:`medprobe.devices.claim_devices`: under ``--resources gpu=N`` on one
machine it locks devices of its own; under SLURM (or with ``CUDA_VISIBLE_DEVICES`` set) it takes the
scheduler's assignment as it is.  :meth:`GpuJob.on` is a job without a claim, on a device the caller names
(tests, benchmarks, a notebook).

Until a model is loaded this module imports nothing outside the standard library (no torch), and it
stays Python 3.7 compatible, so that jobs in other environments (KNEEL's) claim their devices with it too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from medprobe.devices import DeviceClaim, claim_devices

if TYPE_CHECKING:
    from medprobe.models.base import Adapter

__all__ = ["GpuJob"]

logger = logging.getLogger("medprobe.gpu_job")


class GpuJob:
    """The GPUs one job may use and the torch device its single-device work goes to.

    Attributes:
        claim: the claimed devices (:class:`medprobe.devices.DeviceClaim`), or None for a job made by
            :meth:`on`, which claims nothing.
    """

    def __init__(self, claim: DeviceClaim | None = None, device: str | None = None) -> None:
        self.claim = claim
        self._device = device

    @classmethod
    def claim_devices(cls, gpus: int, *, env: MutableMapping[str, str] | None = None, timeout: float = 600.0) -> GpuJob:
        """Claim ``gpus`` devices for this process (see :func:`medprobe.devices.claim_devices`).

        Call it before anything initialises CUDA.  0 GPUs, or a machine without any, gives a CPU job.
        """
        return cls(claim_devices(int(gpus), env=env, timeout=timeout))

    @classmethod
    def on(cls, device: str | None) -> GpuJob:
        """A job that claims nothing and runs on ``device`` (``cpu``, ``cuda:1``; None: the first CUDA
        device when there is one, else the CPU)."""
        return cls(None, device)

    @property
    def devices(self) -> list[str]:
        """The claimed device indices, as the pool or the scheduler named them (empty: none claimed)."""
        return list(self.claim.devices) if self.claim is not None else []

    @property
    def device(self) -> str:
        """Where single-device work runs: ``cuda`` (the first claimed GPU) or ``cpu``, or the device
        given to :meth:`on`."""
        if self._device is not None:
            return self._device
        if self.claim is not None and not self.claim.devices:
            return "cpu"
        import torch

        if torch.cuda.is_available():
            return "cuda"
        if self.claim is not None:
            logger.warning("GPU(s) %s claimed but torch sees no CUDA device; running on the CPU", self.devices)
        return "cpu"

    def model_entry(self, model_cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The model entry to load on this job's devices: ``device_map: auto`` when the job has several
        GPUs and the entry names no ``device_map``, so that the model is spread over all of them."""
        entry = dict(model_cfg)
        if len(self.devices) > 1 and entry.get("device_map") is None:
            entry["device_map"] = "auto"
        return entry

    def load_adapter(self, model_cfg: Mapping[str, Any]) -> Adapter:
        """Load the model of ``model_cfg`` (a ``models:`` entry) onto this job's devices."""
        from medprobe.models import load_adapter

        started = time.perf_counter()
        adapter = load_adapter(self.model_entry(model_cfg), device=self.device)
        logger.info("loaded %r in %.1f s on %s", adapter, time.perf_counter() - started, adapter.device)
        return adapter

    def release(self) -> None:
        """Release the claimed devices (they are released when the process ends anyway)."""
        if self.claim is not None:
            self.claim.release()

    def __enter__(self) -> GpuJob:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        source = self.claim.source if self.claim is not None else "unclaimed"
        return f"GpuJob(devices={self.devices}, source={source!r}, device={self._device!r})"

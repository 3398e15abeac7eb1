"""Model checkpoints for clusters whose compute nodes have no internet, and the compute job's environment.

With ``fetch: true`` in a model's config entry, the local rule ``fetch_model`` downloads the checkpoint at
its pinned ``revision`` on the submit host (:func:`fetch_checkpoint`, via
``huggingface_hub.snapshot_download``) into ``resources/checkpoints/<model>``; the extraction job then loads
that directory (:func:`compute_model_config`) with ``HF_HUB_OFFLINE=1`` (:func:`prepare_compute_job`).

A token for gated models comes from the environment variable ``HF_TOKEN`` only (never from the config,
never from a token file, never logged).  This module imports nothing heavy: the ``fetch`` conda env holds
only ``huggingface_hub``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "CHECKPOINT_ROOT",
    "DEVICE_VARIABLES",
    "FETCH_RECORD",
    "SCHEDULING_KEYS",
    "checkpoint_dir",
    "compute_model_config",
    "fetch_checkpoint",
    "fetched_models",
    "job_environment",
    "prepare_compute_job",
]

log = logging.getLogger(__name__)

CHECKPOINT_ROOT = "resources/checkpoints"
FETCH_RECORD = ".medprobe-fetch.json"
# What a GPU job was given by the scheduler; logged by every cluster job (see prepare_compute_job).
DEVICE_VARIABLES = ("SLURM_JOB_ID", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE")
# Model keys that say how a job is scheduled, not what it computes.
SCHEDULING_KEYS = ("resources", "fetch")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def checkpoint_dir(model: str, root: str = CHECKPOINT_ROOT) -> str:
    """Where ``fetch_model`` puts the checkpoint of ``model`` (relative to the working directory)."""
    if not model or "/" in model or model.startswith("."):
        raise ValueError(f"model name {model!r} cannot name a directory under {root}")
    return f"{root}/{model}"


def fetched_models(config: Mapping[str, Any]) -> list[str]:
    """Models whose config entry says ``fetch: true``."""
    return [name for name, entry in config["models"].items() if entry.get("fetch", False)]


def compute_model_config(model: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """The model entry a compute job loads from: the fetched local copy when ``fetch`` is on.

    The local directory already holds the pinned revision, so ``revision`` is dropped (``from_pretrained``
    on a directory ignores it anyway).  Keys that only schedule the job (``resources``, ``fetch``) are
    dropped too: the entry is the extraction's params, and changing a memory request must not rerun it.
    """
    resolved = {key: value for key, value in entry.items() if key not in SCHEDULING_KEYS}
    if entry.get("fetch", False):
        if "demo_build" in entry:
            raise ValueError(
                f"models.{model}: 'fetch' and 'demo_build' exclude each other (demo models are built locally)"
            )
        resolved["checkpoint"] = checkpoint_dir(model)
        resolved.pop("revision", None)
    return resolved


def fetch_checkpoint(
    repo_id: str,
    revision: str,
    local_dir: str | Path,
    *,
    allow_patterns: list[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """Download ``repo_id`` at ``revision`` into ``local_dir`` (resumable) and record what was fetched.

    The token is ``HF_TOKEN`` from ``environ`` (default ``os.environ``) or none at all: stored tokens
    (``hf auth login``) are deliberately not used, so that what a run may access is visible in its
    environment.  The token never appears in the log or in the record file.

    Returns the local directory.  Raises ``ValueError`` for a missing repo id or revision and re-raises
    download errors with the repo and revision named (a gated repo without ``HF_TOKEN`` fails here, on
    the submit host, not later on a compute node).
    """
    from huggingface_hub import snapshot_download

    environ = os.environ if environ is None else environ
    if not repo_id:
        raise ValueError("fetch_checkpoint: empty hub repo id (models.<model>.checkpoint)")
    if not revision:
        raise ValueError(f"fetch_checkpoint: {repo_id} has no revision to pin (models.<model>.revision)")
    if not _COMMIT.match(revision):
        log.warning(
            "%s: revision %r is a branch or tag, not a commit hash; pin a commit for a reproducible fetch",
            repo_id,
            revision,
        )
    token = environ.get("HF_TOKEN") or False
    log.info("fetching %s at revision %s into %s (token from HF_TOKEN: %s)", repo_id, revision, local_dir, bool(token))
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    try:
        path = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            local_dir=str(local_dir),
            token=token,
            allow_patterns=allow_patterns,
        )
    except Exception as error:  # network, authentication, unknown revision: say which checkpoint
        raise RuntimeError(_fetch_error(repo_id, revision, local_dir, error, has_token=bool(token))) from error
    record = {"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns}
    (local_dir / FETCH_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    log.info("fetched %s into %s", repo_id, path)
    return local_dir


def _fetch_error(repo_id: str, revision: str, local_dir: Path, error: Exception, *, has_token: bool) -> str:
    """What went wrong, and what to do, for a failed fetch: gated repos get the steps to access them."""
    from huggingface_hub.errors import GatedRepoError

    where = f"could not fetch {repo_id} at revision {revision} into {local_dir}"
    if isinstance(error, GatedRepoError):
        token_step = (
            "the token in HF_TOKEN has no access to it: accept the terms with the account the token belongs to"
            if has_token
            else "set HF_TOKEN in the environment to a token of an account that has accepted them"
        )
        return (
            f"{where}: {repo_id} is a gated repository; request access at https://huggingface.co/{repo_id} "
            f"(accept its terms), then {token_step}. Snakemake removes the incomplete checkpoint folder; "
            "rerun to fetch it again."
        )
    hint = "" if has_token else " (gated models need HF_TOKEN in the environment)"
    return f"{where}: {type(error).__name__}: {error}{hint}"


def job_environment(environ: Mapping[str, str] | None = None) -> str:
    """One line describing what the scheduler gave this job (devices, job id, offline mode)."""
    environ = os.environ if environ is None else environ
    return "medprobe job environment: " + " ".join(f"{name}={environ.get(name, '')}" for name in DEVICE_VARIABLES)


def prepare_compute_job(config: Mapping[str, Any], environ: dict[str, str] | None = None) -> str:
    """Set up the environment of a job running on a compute node and describe it.

    Called by the workflow in every non-main Snakemake process (a cluster job).  When at least one model
    is fetched (``fetch: true``) and no model still loads from the hub by id (every other model is a demo
    build or a local directory), it sets ``HF_HUB_OFFLINE=1`` so nothing on the compute node reaches for
    the network.  Returns :func:`job_environment`'s line, which the workflow prints into the job's log.
    """
    environ = os.environ if environ is None else environ
    models = config["models"]
    if fetched_models(config) and not any(_loads_from_hub(entry) for entry in models.values()):
        environ["HF_HUB_OFFLINE"] = "1"
    return job_environment(environ)


def _loads_from_hub(entry: Mapping[str, Any]) -> bool:
    if entry.get("fetch", False) or "demo_build" in entry:
        return False
    return not Path(str(entry.get("checkpoint", ""))).is_dir()

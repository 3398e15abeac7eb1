"""One extraction job: manifest images (one shard of them) through a model into the activations file.

:func:`extract_activations` reads as its steps: plan (settings, manifest rows, images checked before
the model loads), load the model onto the job's devices, open or resume the file, run the batches, finish.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import medprobe
from medprobe.checks import OomBackoff
from medprobe.extract.files import ActivationsWriter, Layout, format_bytes
from medprobe.extract.plan import ExtractionPlan, ImageReadError, plan_extraction, resolve_layers
from medprobe.gpu_job import GpuJob
from medprobe.models.base import Adapter
from medprobe.settings import ExtractionSettings

__all__ = ["extract_activations", "extract_tasks", "software_version"]

logger = logging.getLogger("medprobe.extract")


def extract_activations(
    manifest: str | Path,
    out_path: str | Path,
    *,
    settings: ExtractionSettings,
    model_name: str,
    model: Mapping[str, Any],
    prompt: str,
    shard: int = 0,
    root: str | Path = ".",
    job: GpuJob | None = None,
    adapter: Adapter | None = None,
    progress: bool | str = True,
) -> Path:
    """Run every manifest image (or shard ``shard`` of them) through the model; store pooled per-layer states.

    Args:
        manifest: manifest CSV with at least ``image_id`` and ``path`` (relative to ``root`` unless absolute).
        out_path: the activations HDF5 (written as ``<out_path>.partial``, renamed when complete).
        settings: the ``extraction`` settings with the model's own ``batch_size`` and ``shards`` laid over
            them; ``shards`` > 1 writes shard ``shard`` (:func:`shard_rows`) for :func:`merge_shards` to join.
        model_name: the config's model key, stored as the ``model`` attribute.
        model: the model's config entry (:func:`medprobe.models.load_adapter`); its ``layers`` (default
            ``settings.layers``: ``all``, ``every:<k>`` or hidden-state indices, :func:`resolve_layers`) are the
            layers stored.
        prompt: the task prompt; the adapter wraps it (attribute ``prompt`` holds the exact text).
        job: the job's devices, the model is loaded onto them (default: no claim, CUDA if any, else CPU).
        adapter: an already loaded adapter (benchmarks); ``model`` still names its checkpoint.
        progress: ``True`` a tqdm bar on stderr, ``"log"`` the same figures (images/s, ETA) as log lines
            every 30 s, ``False`` none.

    Raises:
        FileNotFoundError: the manifest or an image is missing (the message names image_id and path).
        ImageReadError: an image cannot be decoded.
        InsufficientDiskSpaceError: the output folder cannot hold the projected file (both sizes named).
        ValueError: bad manifest, ``dtype``, ``prompt_format``, ``layers``, ``compression``, shard or
            ``batch_size``.
    """
    plan = plan_extraction(Path(manifest), settings, shard, Path(root))
    if adapter is None:
        adapter = (job if job is not None else GpuJob.on(None)).load_adapter(model)
    return _write_planned(plan, out_path, adapter, settings, model_name, model, prompt, progress)


def _write_planned(
    plan: ExtractionPlan,
    out_path: str | Path,
    adapter: Adapter,
    settings: ExtractionSettings,
    model_name: str,
    model: Mapping[str, Any],
    prompt: str,
    progress: bool | str,
) -> Path:
    """The checked plan through the loaded model into its file: open or resume, run the batches, finish."""
    adapter.check_prompt_format(settings.prompt_format)
    layers = resolve_layers(model.get("layers", settings.layers), adapter.num_hidden_states)
    started = time.perf_counter()
    with open_or_resume(plan, Path(out_path), adapter, layers, model_name, model, prompt) as writer:
        resumed_at = writer.rows_done
        run_batches(plan, adapter, layers, writer, prompt, progress=progress, description=model_name)
        out_path = writer.finish()
    _log_finished(plan, adapter, model_name, len(plan.entries) - resumed_at, time.perf_counter() - started, out_path)
    return out_path


def extract_tasks(
    manifests: Mapping[str, str | Path],
    out_paths: Mapping[str, str | Path],
    *,
    settings: ExtractionSettings,
    model_name: str,
    model: Mapping[str, Any],
    prompts: Mapping[str, str],
    root: str | Path = ".",
    job: GpuJob | None = None,
    progress: bool | str = True,
) -> list[Path]:
    """One model over several tasks (``group_tasks``): every task's manifest checked, the model loaded once,
    then each task's activations file written exactly as :func:`extract_activations` writes it alone.

    Args:
        manifests, out_paths, prompts: by task name, the same keys in each.
        settings, model_name, model, root, job, progress: as :func:`extract_activations` (one shard).

    Raises:
        ValueError: the three mappings name different tasks, or ``settings.shards`` > 1 (a grouped job
            writes whole files).
        The errors of :func:`extract_activations`; every task's manifest and images are checked before the
        model loads.
    """
    if not set(manifests) == set(out_paths) == set(prompts):
        raise ValueError(
            f"extract_tasks: manifests {sorted(manifests)}, out_paths {sorted(out_paths)} and prompts "
            f"{sorted(prompts)} must name the same tasks"
        )
    if settings.shards != 1:
        raise ValueError(f"extract_tasks: one job per model writes whole files, got shards={settings.shards}")
    plans = {}
    for task, manifest in manifests.items():
        logger.info("%s: checking %s", task, manifest)
        plans[task] = plan_extraction(Path(manifest), settings, 0, Path(root))
    adapter = (job if job is not None else GpuJob.on(None)).load_adapter(model)
    written = []
    for task, plan in plans.items():
        logger.info("%s: %s", task, out_paths[task])
        written.append(
            _write_planned(plan, out_paths[task], adapter, settings, model_name, model, prompts[task], progress)
        )
    return written


def _log_finished(
    plan: ExtractionPlan, adapter: Adapter, model_name: str, new_rows: int, elapsed: float, out_path: Path
) -> None:
    logger.info(
        "extracted %d images%s (%d new) with %s in %.1f s, %.2f images/s, peak device memory %s -> %s",
        len(plan.entries),
        f" of {plan.describe()}" if plan.describe() else "",
        new_rows,
        model_name,
        elapsed,
        new_rows / elapsed if elapsed > 0 else float("nan"),
        _peak_device_memory(adapter),
        out_path,
    )


def open_or_resume(
    plan: ExtractionPlan,
    out_path: Path,
    adapter: Adapter,
    layers: list[int],
    model_name: str,
    model: Mapping[str, Any],
    prompt: str,
) -> ActivationsWriter:
    """The job's activations file, created, or continued where an interrupted run with the same inputs stopped."""
    settings = plan.settings
    layout = Layout(
        plan.ids, len(layers), adapter.hidden_dim, adapter.embedding_dim, plan.storage_dtype, plan.compression
    )
    attrs = file_attrs(plan, adapter, layers, model_name, model, prompt)
    fingerprint = {
        "manifest_sha256": plan.manifest_sha256,
        "model": model_name,
        "checkpoint": attrs["checkpoint"],
        "revision": attrs["revision"],
        "adapter": adapter.name,
        "prompt": attrs["prompt"],
        "prompt_format": attrs["prompt_format"],
        "layers": layers,
        "dtype": settings.dtype,
        "compression": plan.compression,
        "rows": [plan.row_start, plan.row_stop, settings.batch_size],
        "shape": [layout.n_rows, layout.n_layers, layout.hidden_dim, layout.embedding_dim],
    }
    writer = ActivationsWriter(out_path, layout, attrs, fingerprint)
    writer.open()
    return writer


def file_attrs(
    plan: ExtractionPlan,
    adapter: Adapter,
    layers: list[int],
    model_name: str,
    model: Mapping[str, Any],
    prompt: str,
) -> dict[str, Any]:
    """The attributes of the activations file (``docs/architecture.md``), and the shard's place in the manifest."""
    prompt_format = plan.settings.prompt_format
    attrs: dict[str, Any] = {
        "layer_names": [adapter.layer_names[i] for i in layers],
        # The model's whole hidden_states length, so that layer numberings relative to the model (the
        # paper's files count hidden_states[1:]) still work when only some layers are stored.
        "num_hidden_states": int(adapter.num_hidden_states),
        "model": model_name,
        "checkpoint": str(model["checkpoint"]),
        "revision": str(model.get("revision") or ""),
        "prompt": adapter.prompt_text(prompt, prompt_format),
        # Image-only models see no prompt, so their files do not depend on the format.
        "prompt_format": prompt_format if adapter.prompt_formats else "",
        "pooling": adapter.pooling,
        "dtype": plan.settings.dtype,
        "software_version": software_version(),
        "manifest_sha256": plan.manifest_sha256,
    }
    attrs.update(plan.shard_attrs)
    return attrs


def run_batches(
    plan: ExtractionPlan,
    adapter: Adapter,
    layers: list[int],
    writer: ActivationsWriter,
    prompt: str,
    *,
    progress: bool | str,
    description: str,
) -> None:
    """The rows the file does not hold yet, batch by batch through the model and into the file.

    On CUDA out-of-memory a batch is halved and retried (and the smaller size kept); an image that does
    not fit alone stops the job with its id.
    """
    settings, rows_done = plan.settings, writer.rows_done
    on_cuda = adapter.device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    loader = torch.utils.data.DataLoader(
        _ImageDataset(plan.entries[rows_done:], offset=rows_done),
        batch_size=settings.batch_size,
        shuffle=False,
        num_workers=settings.num_workers,
        collate_fn=_Collate(adapter, prompt, settings.prompt_format),
        pin_memory=on_cuda,
        prefetch_factor=settings.prefetch_factor if settings.num_workers > 0 else None,
    )
    backoff = OomBackoff()
    with _progress_bar(progress, len(plan.entries), rows_done, description) as bar:
        for rows, batch in loader:
            if isinstance(batch, ImageReadError):
                raise batch
            pooled, embedded = backoff.forward(
                lambda inputs: adapter.forward(inputs, layers=layers), batch, [plan.entries[row][0] for row in rows]
            )
            _check_outputs(adapter, pooled, embedded, (len(layers), adapter.hidden_dim), writer.has_embeddings, rows)
            writer.write(rows[0], pooled.numpy(), embedded.numpy() if writer.has_embeddings else None)
            bar.update(len(rows))


def _check_outputs(
    adapter: Adapter,
    pooled: torch.Tensor,
    embedded: torch.Tensor | None,
    expected_shape: tuple[int, int],
    embeddings_expected: bool,
    rows: Sequence[int],
) -> None:
    if tuple(pooled.shape[1:]) != expected_shape:
        raise RuntimeError(
            f"{type(adapter).__name__} returned activations of shape {tuple(pooled.shape)}, "
            f"expected (batch, {expected_shape[0]}, {expected_shape[1]})"
        )
    if embeddings_expected and embedded is None:
        raise RuntimeError(f"{type(adapter).__name__} returned no embeddings for rows {rows[0]}-{rows[-1]}")


def software_version() -> str:
    """medprobe, torch and transformers versions, as recorded in every activations file."""
    import transformers

    return f"medprobe {medprobe.__version__}; torch {torch.__version__}; transformers {transformers.__version__}"


def _peak_device_memory(adapter: Adapter) -> str:
    if not torch.cuda.is_available() or adapter.device.type != "cuda":
        return "n/a (not on CUDA)"
    devices = sorted({p.device.index for p in adapter.model.parameters() if p.device.type == "cuda"})
    return ", ".join(f"cuda:{index} {format_bytes(torch.cuda.max_memory_allocated(index))}" for index in devices)


def _progress_bar(progress: bool | str, total: int, initial: int, description: str) -> Any:
    from tqdm import tqdm

    options: dict[str, Any] = {"disable": not progress, "dynamic_ncols": True}
    if progress == "log":
        options = {"file": _LogStream(logger), "mininterval": 30.0, "ncols": 100, "ascii": True}
    return tqdm(total=total, initial=initial, unit="img", desc=description, **options)


class _LogStream:
    """A file-like object that turns tqdm's refreshes into log lines (for rule log files)."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log

    def write(self, text: str) -> None:
        text = text.strip("\r\n ")
        if text:
            self.log.info("%s", text)

    def flush(self) -> None:
        pass


class _ImageDataset(torch.utils.data.Dataset):
    """Loads manifest images as RGB; item ``i`` is ``(offset + i, image)``."""

    def __init__(self, entries: Sequence[tuple[str, Path]], offset: int = 0) -> None:
        self.entries = list(entries)
        self.offset = offset

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[int, Image.Image | ImageReadError]:
        image_id, path = self.entries[index]
        try:
            with Image.open(path) as image:
                return self.offset + index, image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            # Returned, not raised: an exception raised inside a DataLoader worker reaches the caller
            # re-wrapped, and the abandoned worker then holds up shutdown for seconds.
            return self.offset + index, ImageReadError(f"cannot read image {image_id!r} at {path}: {error}")


class _Collate:
    """Preprocesses a list of ``(row, image)`` into ``(rows, model inputs)``; runs in DataLoader workers."""

    def __init__(self, adapter: Adapter, prompt: str, prompt_format: str) -> None:
        self.adapter = adapter
        self.prompt = prompt
        self.prompt_format = prompt_format

    def __call__(
        self, items: list[tuple[int, Image.Image | ImageReadError]]
    ) -> tuple[list[int], dict[str, torch.Tensor] | ImageReadError]:
        rows = [row for row, _ in items]
        images = [image for _, image in items]
        for image in images:
            if isinstance(image, ImageReadError):
                return rows, image
        return rows, self.adapter.preprocess(images, self.prompt, prompt_format=self.prompt_format)

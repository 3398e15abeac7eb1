"""Integrity checks shared by the stages: finite numbers, class coverage, GPU-memory back-off.

Every check names where the problem is (a file, a split) and which images cause it, so a wrong number is
found at the stage that produced it instead of as a crash (or a silent NaN) further down.
docs/reliability.md lists what the user sees in each case.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

log = logging.getLogger("medprobe.checks")

T = TypeVar("T")
MAX_LISTED = 10  # ids named in a message; the count says how many there are in all


class NonFiniteError(ValueError):
    """An array holds NaN or infinite values; ``ids`` are the images (rows) concerned."""

    def __init__(self, where: str, ids: list[str], n_rows: int, what: str):
        self.where, self.ids = where, ids
        shown = ", ".join(ids[:MAX_LISTED]) + (f", ... ({len(ids) - MAX_LISTED} more)" if len(ids) > MAX_LISTED else "")
        super().__init__(f"{where}: {what} of {len(ids)} of {n_rows} image(s) are NaN or infinite: {shown}")


class ImageTooLargeError(RuntimeError):
    """A single image does not fit in GPU memory even at batch size 1."""

    def __init__(self, image_id: str, error: BaseException):
        self.image_id = image_id
        super().__init__(
            f"image {image_id}: out of GPU memory even at batch size 1 ({error}); use a GPU with more memory, "
            "a lower-precision torch_dtype or quantization for this model, or drop the image from the raw table"
        )


def nonfinite_rows(array: Any) -> np.ndarray:
    """Boolean mask of the first-axis rows of ``array`` that hold any NaN or +-Inf."""
    values = np.asarray(array)
    if values.ndim == 0:
        raise ValueError("nonfinite_rows: expected an array with one row per image, got a scalar")
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"nonfinite_rows: expected a numeric array, got dtype {values.dtype}")
    bad = ~np.isfinite(values)
    return bad.reshape(bad.shape[0], -1).any(axis=1) if bad.ndim > 1 else bad


def check_finite(array: Any, ids: Sequence[str], where: str, what: str = "values") -> None:
    """Raise :class:`NonFiniteError` naming the image ids whose rows of ``array`` hold NaN or Inf.

    ``array`` has one row per image along its first axis (activations ``(N, L, D)``, features ``(N, D)``,
    probabilities ``(N, C)``); ``ids`` are the images in the same order; ``where`` names the file or stage.
    Accepts torch tensors too (anything :func:`numpy.asarray` takes after ``.detach().cpu()``).
    """
    if hasattr(array, "detach"):  # a torch tensor, possibly on the GPU
        array = array.detach().float().cpu().numpy()
    ids = [str(image_id) for image_id in ids]
    bad = nonfinite_rows(array)
    if len(bad) != len(ids):
        raise ValueError(f"{where}: {len(ids)} ids for an array of {len(bad)} rows")
    if bad.any():
        raise NonFiniteError(where, [image_id for image_id, flag in zip(ids, bad) if flag], len(ids), what)


def class_coverage(targets: Any, kind: str, classes: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(positives, negatives) per class of encoded ``targets`` (class indices, or a 0/1 matrix for multilabel)."""
    targets = np.asarray(targets)
    if kind == "multilabel":
        indicator = targets.astype(bool)
    else:
        indicator = targets.reshape(-1, 1) == np.arange(len(classes)).reshape(1, -1)
    positives = indicator.sum(axis=0)
    return {str(name): (int(positives[c]), int(len(targets) - positives[c])) for c, name in enumerate(classes)}


def coverage_warnings(targets: Any, kind: str, classes: Sequence[str], where: str) -> list[str]:
    """Warnings (also logged) for classes/findings without positives or without negatives in ``targets``.

    Such a class has no defined AUC (and a conventional F1): it is reported, the metric rows carry NaN
    and ``n_degenerate`` counts it, but nothing crashes.
    """
    messages = []
    for name, (positives, negatives) in class_coverage(targets, kind, classes).items():
        if positives == 0 or (kind == "multilabel" and negatives == 0):
            missing = "positives" if positives == 0 else "negatives"
            noun = "finding" if kind == "multilabel" else "class"
            messages.append(
                f"{where}: {noun} {name!r} has no {missing} among {len(targets)} image(s); "
                f"its AUC is undefined (NaN) and it is left out of macro averages"
            )
    for message in messages:
        log.warning(message)
    return messages


def run_with_oom_backoff(
    fn: Callable[[Sequence[T]], Any],
    items: Sequence[T],
    batch_size: int,
    *,
    ids: Sequence[str] | None = None,
    on_result: Callable[[Sequence[T], Any], None] | None = None,
    empty_cache: Callable[[], None] | None = None,
) -> tuple[list[Any], int]:
    """Run ``fn`` over ``items`` in batches, halving the batch on ``torch.cuda.OutOfMemoryError``.

    Batches are consecutive slices, so results stay in item order. After an out-of-memory error the cache
    is emptied (``empty_cache``, default ``torch.cuda.empty_cache``), the batch size halved and logged, and
    the same items retried; the smaller size is kept for the rest of the run. An item that fails at batch
    size 1 raises :class:`ImageTooLargeError` naming its id (``ids[i]``, default the item itself).
    ``on_result(batch_items, result)`` is called after each successful batch (e.g. to write it out).
    Returns (the results in order, the batch size that worked last).
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if ids is not None and len(ids) != len(items):
        raise ValueError(f"{len(ids)} ids for {len(items)} items")
    if empty_cache is None:
        empty_cache = torch.cuda.empty_cache if torch.cuda.is_available() else (lambda: None)
    results: list[Any] = []
    start, size = 0, batch_size
    while start < len(items):
        batch = items[start : start + size]
        try:
            result = fn(batch)
        except torch.cuda.OutOfMemoryError as error:
            empty_cache()
            if size == 1:
                image_id = str(ids[start]) if ids is not None else str(items[start])
                raise ImageTooLargeError(image_id, error) from error
            size = max(1, size // 2)
            log.warning("out of GPU memory at item %d; halving the batch size to %d and retrying", start, size)
            continue
        results.append(result)
        if on_result is not None:
            on_result(batch, result)
        start += len(batch)
    return results, size


def slice_batch(batch: Any, start: int, stop: int, n: int) -> Any:
    """Rows ``start:stop`` of a collated batch: tensors/arrays whose first dimension is ``n`` are sliced,
    dicts/lists/tuples recursively, everything else is passed through."""
    if isinstance(batch, dict):
        return type(batch)({key: slice_batch(value, start, stop, n) for key, value in batch.items()})
    if isinstance(batch, (list, tuple)) and len(batch) == n and not isinstance(batch, str):
        return type(batch)(batch[start:stop])
    shape = getattr(batch, "shape", None)
    if shape is not None and len(shape) > 0 and shape[0] == n:
        return batch[start:stop]
    return batch


def _concatenate(parts: list[Any]) -> Any:
    """Join per-chunk results along the first axis (tensors, arrays, tuples of them, or None)."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, tuple):
        return tuple(_concatenate([part[i] for part in parts]) for i in range(len(first)))
    if hasattr(first, "detach"):
        import torch

        return torch.cat(parts, dim=0)
    return np.concatenate(parts, axis=0)


class OomBackoff:
    """Run a model's forward pass on a collated batch, splitting it into halves on GPU out-of-memory.

    One instance per extraction run: the chunk size that fitted is kept for later batches (logged once
    when it shrinks), so a long run pays for finding it once. The result of the split batch is the
    concatenation of the chunks' results, in row order. An image that does not fit alone raises
    :class:`ImageTooLargeError` with its id.
    """

    def __init__(self, empty_cache: Callable[[], None] | None = None) -> None:
        self.chunk_size: int | None = None
        self.empty_cache = empty_cache

    def forward(self, fn: Callable[[Any], Any], batch: Any, ids: Sequence[str]) -> Any:
        n = len(ids)
        size = min(n, self.chunk_size or n)
        rows = list(range(n))
        parts, size = run_with_oom_backoff(
            lambda chunk: fn(slice_batch(batch, chunk[0], chunk[-1] + 1, n) if len(chunk) < n else batch),
            rows,
            size,
            ids=ids,
            empty_cache=self.empty_cache,
        )
        if size < n:
            self.chunk_size = size
        return parts[0] if len(parts) == 1 else _concatenate(parts)

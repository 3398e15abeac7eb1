"""Patient-clustered bootstrap resamples, turned into per-sample count matrices block by block."""

from __future__ import annotations

import numpy as np

from medprobe.stats._checks import _positive_int

# Elements of the (replicates x samples) count matrix processed at once: large enough that numpy's per-call
# overhead vanishes, small enough (8 MiB of float64) to stay in cache and keep memory flat for big test sets.
_BLOCK_ELEMENTS = 1 << 20


def bootstrap_indices(n: int, n_boot: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Bootstrap resample indices, shape ``(n_boot, n)``, dtype int64.

    Without ``groups`` every row is ``n`` draws with replacement from ``range(n)``.

    With ``groups`` (one patient id per sample, any dtype) the bootstrap is clustered: each replicate draws
    patients with replacement and takes all rows of each drawn patient (in their original order), until at
    least ``n`` rows are collected; the row is then cut to exactly ``n`` entries. Every drawn patient is
    therefore whole except possibly the last one of each replicate, which is truncated so that all
    replicates share one fixed shape (this keeps the metric code vectorised). Samples whose group is missing
    (None, NaN or the empty string) are treated as patients of their own.

    The result depends only on ``(n, n_boot, seed, groups)``: scoring two models with the same arguments
    gives them the very same resamples, which is what makes paired comparisons valid.
    """
    n, n_boot = _positive_int(n, "n"), _positive_int(n_boot, "n_boot")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer so that resamples are reproducible; got {seed!r}")
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.integers(0, n, size=(n_boot, n), dtype=np.int64)

    codes = _group_codes(groups, n)
    n_clusters = int(codes.max()) + 1
    rows_by_cluster = np.argsort(codes, kind="stable")  # rows of cluster k are contiguous, in original order
    sizes = np.bincount(codes, minlength=n_clusters)
    cluster_start = np.concatenate(([0], np.cumsum(sizes)[:-1]))

    # Draw clusters in blocks until every replicate has collected n rows; the RNG stream (and so the result)
    # is a deterministic function of the seed.
    block = int(np.ceil(1.2 * n_clusters)) + 8
    draws = rng.integers(0, n_clusters, size=(n_boot, block))
    while (sizes[draws].sum(axis=1) < n).any():
        draws = np.concatenate([draws, rng.integers(0, n_clusters, size=(n_boot, block))], axis=1)

    # Expand draws into rows: each draw contributes its cluster's rows, the draw that crosses n rows is cut
    # and later draws contribute none. Over the flattened (n_boot * n) output, a marker at the first position
    # of every contributing draw and a cumulative sum tell each position its draw: no loop over replicates.
    ends = np.minimum(np.cumsum(sizes[draws], axis=1), n)
    starts = np.concatenate([np.zeros((n_boot, 1), dtype=ends.dtype), ends[:, :-1]], axis=1)
    used = (ends > starts).ravel()
    draw_cluster = draws.ravel()[used]
    draw_start = (starts + (np.arange(n_boot, dtype=np.int64) * n)[:, None]).ravel()[used]
    marker = np.zeros(n_boot * n, dtype=np.int64)
    marker[draw_start] = 1
    draw_of_position = np.cumsum(marker) - 1
    offset = np.arange(n_boot * n, dtype=np.int64) - draw_start[draw_of_position]
    rows = rows_by_cluster[cluster_start[draw_cluster[draw_of_position]] + offset]
    return rows.reshape(n_boot, n).astype(np.int64, copy=False)


def _group_codes(groups: np.ndarray, n: int) -> np.ndarray:
    """Integer cluster codes 0..K-1 for patient ids; missing ids become singleton clusters."""
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) != n:
        raise ValueError(f"groups must be a 1-D array with one patient id per sample (n={n}); got shape {groups.shape}")
    if groups.dtype.kind == "f":
        missing = np.isnan(groups)
    elif groups.dtype.kind in "OUS":
        missing = np.array(
            [
                g is None or (isinstance(g, float) and g != g) or (isinstance(g, (str, bytes)) and len(g) == 0)
                for g in groups.tolist()
            ],
            dtype=bool,
        )
        if groups.dtype.kind == "O":
            groups = np.array([str(g) for g in groups.tolist()])
    else:
        missing = np.zeros(n, dtype=bool)
    codes = np.empty(n, dtype=np.int64)
    if (~missing).any():
        _, present_codes = np.unique(groups[~missing], return_inverse=True)
        codes[~missing] = present_codes
        next_code = int(present_codes.max()) + 1
    else:
        next_code = 0
    codes[missing] = next_code + np.arange(int(missing.sum()))
    return codes


def _check_indices(indices: np.ndarray, n: int) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 2 or indices.shape[1] == 0 or indices.dtype.kind not in "iu":
        raise ValueError(
            f"indices must be an integer array of shape (n_boot, m) with m >= 1; got {indices.dtype} {indices.shape}"
        )
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(
            f"indices must lie in [0, {n}) (the number of samples); got range [{indices.min()}, {indices.max()}]"
        )
    return indices.astype(np.int64, copy=False)


def _count_blocks(indices: np.ndarray, n: int, *, by_sample: bool = False, block_elements: int = _BLOCK_ELEMENTS):
    """Yield ``(slice, counts)``: how often each sample was drawn in each replicate of a block of replicates.

    ``counts`` is float64 ``(block, n)`` (ready for matrix products), or with ``by_sample`` int32 ``(n, block)``:
    sample-major so that gathering samples and cumulating over them touch contiguous rows, and int32 because
    counts are small integers and halving the bytes roughly halves the time of the memory-bound passes.
    """
    block = max(1, block_elements // max(n, indices.shape[1]))
    for start in range(0, indices.shape[0], block):
        rows = indices[start : start + block]
        replicate = np.arange(rows.shape[0], dtype=np.int64)[:, None]
        if by_sample:
            counts = np.bincount((rows * rows.shape[0] + replicate).ravel(), minlength=n * rows.shape[0])
            yield slice(start, start + rows.shape[0]), counts.reshape(n, rows.shape[0]).astype(np.int32)
        else:
            counts = np.bincount((rows + replicate * n).ravel(), minlength=rows.shape[0] * n)
            yield slice(start, start + rows.shape[0]), counts.reshape(rows.shape[0], n).astype(np.float64)

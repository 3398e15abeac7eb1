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
    replicates = _replicate_blocks(n_boot, n, _BLOCK_ELEMENTS)

    # Draw clusters in rounds of (n_boot, round_size) until every replicate has collected n rows; the RNG stream
    # (and so the result) is a deterministic function of the seed. int32 draws are the very values (and leave
    # the generator in the very state) of the default int64 ones: both use numpy's 32-bit bounded generator for
    # ranges below 2**32. Rows collected are summed block by block, so no (n_boot x draws) temporary is built.
    round_size = int(np.ceil(1.2 * n_clusters)) + 8
    rounds, collected = [], np.zeros(n_boot, dtype=np.int64)
    while not rounds or (collected < n).any():
        rounds.append(rng.integers(0, n_clusters, size=(n_boot, round_size), dtype=np.int32))
        for block in replicates:
            collected[block] += sizes[rounds[-1][block]].sum(axis=1)

    # Expand draws into rows, block by block of replicates: each draw contributes its cluster's rows, the draw
    # that crosses n rows is cut and later draws contribute none. Over a block's flattened output, the source of
    # position p of draw d is cluster_start[d] + (p - first position of d): one repeat, one add, one gather.
    out = np.empty((n_boot, n), dtype=np.int64)
    positions = np.arange((replicates[0].stop - replicates[0].start) * n, dtype=np.int64)
    for block in replicates:
        draws = np.concatenate([drawn[block] for drawn in rounds], axis=1) if len(rounds) > 1 else rounds[0][block]
        ends = np.minimum(np.cumsum(sizes[draws], axis=1), n)
        taken = np.diff(ends, axis=1, prepend=0).ravel()  # a draw's size, the crossing draw's rest, then 0
        first = np.cumsum(taken) - taken  # first output position of each draw within the block
        source = np.repeat(cluster_start[draws.ravel()] - first, taken)
        source += positions[: len(source)]
        np.take(rows_by_cluster, source, out=out[block].reshape(-1))
    return out


def _replicate_blocks(n_boot: int, n: int, block_elements: int) -> list[slice]:
    """Consecutive slices of replicates holding about ``block_elements`` (replicate x sample) cells each."""
    block = max(1, block_elements // n)
    return [slice(start, min(start + block, n_boot)) for start in range(0, n_boot, block)]


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


def _count_blocks(indices: np.ndarray, n: int, *, block_elements: int = _BLOCK_ELEMENTS):
    """Yield ``(slice, counts)``: how often each sample was drawn in each replicate of a block of replicates,
    ``counts`` float64 ``(block, n)`` (ready for matrix products)."""
    block = max(1, block_elements // max(n, indices.shape[1]))
    for start in range(0, indices.shape[0], block):
        rows = indices[start : start + block]
        replicate = np.arange(rows.shape[0], dtype=np.int64)[:, None]
        counts = np.bincount((rows + replicate * n).ravel(), minlength=rows.shape[0] * n)
        yield slice(start, start + rows.shape[0]), counts.reshape(rows.shape[0], n).astype(np.float64)


def _packed_count_blocks(indices: np.ndarray, n: int, *, block_elements: int = _BLOCK_ELEMENTS):
    """Yield ``(slice, packed, lane)``: the draw counts of a block of replicates, several replicates per word.

    ``packed`` is uint64 ``(groups, n)``: word ``[k, i]`` holds how often sample i was drawn in each of the
    replicates ``lanes * k .. lanes * k + lanes - 1`` of the block, one ``lane`` (uint16, 4 lanes, when a
    replicate has fewer than 2**16 draws; else uint32, 2 lanes) per replicate: the words are a view of a
    ``(groups, n, lanes)`` array of counts, and ``packed.view(lane).reshape(groups, n, lanes)`` unpacks them.
    Because a lane never exceeds the draws of its replicate, sums of words (cumulative sums over samples above
    all) are the lane-wise sums: one uint64 addition does the work of 2 or 4, and no carry crosses a lane. The
    last group is padded with empty replicates.

    Replicate-major: the metric code permutes and cumulates along a row of n words, so its cost per sample does
    not depend on how many replicates the block holds. A block holds about ``block_elements`` (replicate x
    sample) cells, so memory stays flat as n grows, down to one group of replicates per block (``lanes * n``
    cells, for n above ``block_elements / lanes``).
    """
    n_boot, draws = indices.shape
    lanes, lane = (4, np.uint16) if draws < 1 << 16 else (2, np.uint32)
    block = max(lanes, block_elements // max(n, draws) // lanes * lanes)
    for start in range(0, n_boot, block):
        rows = indices[start : start + block]
        groups = -(-rows.shape[0] // lanes)
        replicate = np.arange(rows.shape[0], dtype=np.int64)
        # cell of (replicate r, sample i) = ((r // lanes) * n + i) * lanes + r % lanes
        cells = rows * lanes
        cells += ((replicate // lanes) * (n * lanes) + replicate % lanes)[:, None]
        counts = np.bincount(cells.ravel(), minlength=groups * n * lanes).astype(lane)
        yield slice(start, start + rows.shape[0]), counts.view(np.uint64).reshape(groups, n), lane

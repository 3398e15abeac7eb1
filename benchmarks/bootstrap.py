"""Bootstrap AUC: medprobe.stats.bootstrap_auc against a loop over sklearn.metrics.roc_auc_score.

The workload is the evaluation's hot spot: 1000 replicates of per-class (one-vs-rest) AUC on a test set of
7000 samples x 9 classes (T1-sized). Scores are softmax outputs of a moderately good classifier rounded to 3
decimals, so ties occur as they do in real probe outputs. The sklearn loop is timed on a subset of the
replicates and extrapolated linearly (each replicate is independent work of identical size).

Usage: python benchmarks/bootstrap.py [--n 7000] [--classes 9] [--replicates 1000] [--baseline-replicates 40]
Prints the timings (wall and the process's CPU seconds, medians), ``cpu_speedup=<x>`` (the same ratio in CPU
seconds, steadier on a shared machine) and, as the last line, ``speedup=<x>`` (baseline wall time / medprobe wall
time, both for all replicates).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medprobe.stats import bootstrap_auc, bootstrap_indices  # noqa: E402


def realistic_scores(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One-hot targets with unequal class frequencies and rounded softmax probabilities (AUC ~0.85)."""
    rng = np.random.default_rng(seed)
    frequencies = rng.dirichlet(np.full(n_classes, 3.0))
    labels = rng.choice(n_classes, size=n, p=frequencies)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), labels] += 1.5
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return np.eye(n_classes, dtype=np.int64)[labels], np.round(probabilities, 3)


def sklearn_loop(targets: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The straightforward baseline: one roc_auc_score call per replicate and class."""
    out = np.full((len(indices), targets.shape[1]), np.nan)
    for b, rows in enumerate(indices):
        for c in range(targets.shape[1]):
            y = targets[rows, c]
            if 0 < y.sum() < len(y):
                out[b, c] = roc_auc_score(y, scores[rows, c])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=7000)
    parser.add_argument("--classes", type=int, default=9)
    parser.add_argument("--replicates", type=int, default=1000)
    parser.add_argument(
        "--baseline-replicates",
        type=int,
        default=40,
        help="replicates the sklearn loop is timed on (extrapolated to --replicates)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    targets, scores = realistic_scores(args.n, args.classes, args.seed)
    indices = bootstrap_indices(args.n, args.replicates, seed=args.seed)
    subset = indices[: min(args.baseline_replicates, args.replicates)]
    print(
        f"workload: {args.replicates} replicates x {args.n} samples x {args.classes} classes "
        f"({len(np.unique(scores))} distinct score values)"
    )

    ours_times, ours_cpu, result = [], [], None
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = bootstrap_auc(targets, scores, indices)
        ours_times.append(time.perf_counter() - start)
        ours_cpu.append(time.process_time() - start_cpu)
    ours = statistics.median(ours_times)

    baseline_times, baseline_cpu, expected = [], [], None
    for _ in range(max(1, args.repeats // 2)):
        start, start_cpu = time.perf_counter(), time.process_time()
        expected = sklearn_loop(targets, scores, subset)
        baseline_times.append(time.perf_counter() - start)
        baseline_cpu.append(time.process_time() - start_cpu)
    baseline = statistics.median(baseline_times) * args.replicates / len(subset)
    baseline_cpu_all = statistics.median(baseline_cpu) * args.replicates / len(subset)

    difference = np.nanmax(np.abs(result[: len(subset)] - expected))
    if not np.array_equal(np.isnan(result[: len(subset)]), np.isnan(expected)) or difference > 1e-10:
        raise SystemExit(f"bootstrap_auc disagrees with the sklearn loop: max |difference| = {difference:.3g}")
    print(
        f"agreement: max |bootstrap_auc - roc_auc_score| = {difference:.2e} over {len(subset)} replicates x "
        f"{args.classes} classes"
    )
    print(
        f"medprobe.stats.bootstrap_auc: {ours:.3f} s for {args.replicates} replicates "
        f"(median of {args.repeats}: {', '.join(f'{t:.3f}' for t in ours_times)}); "
        f"CPU {statistics.median(ours_cpu):.3f} s (median; {', '.join(f'{t:.3f}' for t in ours_cpu)})"
    )
    print(
        f"sklearn roc_auc_score loop: {baseline:.2f} s for {args.replicates} replicates, extrapolated from "
        f"{len(subset)} replicates timed at {statistics.median(baseline_times):.2f} s; CPU {baseline_cpu_all:.2f} s"
    )
    print(f"cpu_speedup={baseline_cpu_all / statistics.median(ours_cpu):.1f}")
    print(f"speedup={baseline / ours:.1f}")


if __name__ == "__main__":
    main()

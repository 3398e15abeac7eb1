"""Benchmark: medprobe's torch L-BFGS probe against scikit-learn's LogisticRegression(lbfgs).

Random multiclass data with a planted linear signal, several "layers" (independent feature matrices),
the same C and tol for both solvers. Both fit on standardised features (the timed scikit-learn run
includes its StandardScaler, as our fit includes its own standardisation). The models must agree:
test log-loss within 1e-3 on every layer, otherwise the script exits with status 1.

    python benchmarks/probe.py --threads 2   # n_train=20000, d=4096, 9 classes, 3 layers (many minutes)
    python benchmarks/probe.py --quick    # small sizes, seconds
    python benchmarks/probe.py --gpu      # one 100,000 x 8,192 x 9 layer on the GPU, float32 vs float64; last line gpu_seconds=<s>

The last line is ``speedup=<x>``: median scikit-learn time per layer / median medprobe ``fit`` time
per layer at ``--dtype`` (default float32, the workflow's default ``probe.dtype``); the other precision
is reported on the line before. Both precisions must match scikit-learn's test log-loss within 1e-3;
each layer's line prints the differences. On a shared machine use ``--threads 2`` (torch and BLAS
alike) and read the medians; results are recorded in docs/benchmarks.md, section "Probes".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medprobe.probe import fit, fit_layers  # noqa: E402


def make_layers(n: int, d: int, n_classes: int, n_layers: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(L, n, d) float32 features and (n,) labels: each layer sees the labels through its own linear
    map with a different signal strength, plus per-feature offsets and scales like real activations."""
    rng = np.random.default_rng(seed)
    signal_rank = 32
    latent = rng.normal(size=(n, signal_rank))
    y = np.argmax(latent @ rng.normal(size=(signal_rank, n_classes)) + rng.gumbel(size=(n, n_classes)), axis=1)
    layers = np.empty((n_layers, n, d), dtype=np.float32)
    for layer in range(n_layers):
        strength = 1.0 + 1.0 * layer
        mixing = rng.normal(size=(signal_rank, d)).astype(np.float32) * strength / np.sqrt(signal_rank)
        noise = rng.standard_normal(size=(n, d), dtype=np.float32)
        scale = rng.uniform(0.2, 5.0, size=d).astype(np.float32)
        offset = rng.normal(scale=3.0, size=d).astype(np.float32)
        layers[layer] = ((latent.astype(np.float32) @ mixing + noise) * scale) + offset
    return layers, y


def make_layer_torch(n: int, d: int, n_classes: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer like :func:`make_layers` (strength 2), generated directly on ``device`` (GPU sizes)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    signal_rank = 32

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device)

    latent = normal(n, signal_rank)
    gumbel = -torch.log(
        -torch.log(torch.rand(n, n_classes, generator=generator, device=device).clamp_(1e-12, 1 - 1e-7))
    )
    y = torch.argmax(latent @ normal(signal_rank, n_classes) + gumbel, dim=1)
    X = latent @ (normal(signal_rank, d) * (2.0 / signal_rank**0.5))
    X += normal(n, d)
    X *= torch.rand(d, generator=generator, device=device) * 4.8 + 0.2
    X += normal(d) * 3.0
    return X, y


def gpu_benchmark(args: argparse.Namespace) -> int:
    """Time the probe solver on one GPU-sized layer (default 100,000 x 8,192 x 9 classes): float32 (the
    workflow's default) against a float64 fit of the same data for agreement. No scikit-learn here: at this
    size it would run for hours on the host."""
    device = args.device
    n_train, d, n_classes = args.gpu_n, args.gpu_d, 9
    n_test = max(n_train // 5, 1)
    X, y = make_layer_torch(n_train + n_test, d, n_classes, args.seed, device)
    X_train, y_train, X_test, y_test = X[:n_train], y[:n_train], X[n_train:], y[n_train:].cpu().numpy()
    print(
        f"device={device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'host'}) n_train={n_train} "
        f"n_test={n_test} d={d} classes={n_classes} C={args.C} tol={args.tol} max_iter={args.max_iter}",
        flush=True,
    )
    labels = np.arange(n_classes)
    results = {}
    for dtype in ("float32", "float64"):
        times = []
        for _ in range(args.repeats or 1):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            probe = fit(
                X_train,
                y_train,
                "multiclass",
                args.C,
                max_iter=args.max_iter,
                tol=args.tol,
                n_classes=n_classes,
                dtype=dtype,
                device=device,
            )
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
        loss = log_loss(y_test, probe.predict_proba(X_test), labels=labels)
        results[dtype] = (statistics.median(times), loss, probe.n_iter)
        print(
            f"{dtype}: {statistics.median(times):.2f} s (median of {len(times)}), {probe.n_iter} iterations, "
            f"{1e3 * statistics.median(times) / max(probe.n_iter, 1):.1f} ms per iteration, test log-loss {loss:.6f}, "
            f"peak device memory {peak:.1f} GiB",
            flush=True,
        )
    agree = abs(results["float32"][1] - results["float64"][1]) <= 1e-3
    print(
        f"float32 - float64 test log-loss {results['float32'][1] - results['float64'][1]:+.2e} {'OK' if agree else 'MISMATCH'}"
    )
    print(f"gpu_seconds={results['float32'][0]:.2f}")
    return 0 if agree else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (n_train=3000, d=512)")
    parser.add_argument("--C", type=float, default=0.1)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per layer (default 3 quick, 1 full)")
    parser.add_argument(
        "--threads", type=int, default=None, help="threads for torch and BLAS alike (default: library defaults)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=3, help="number of layers (independent problems)")
    parser.add_argument(
        "--dtype", choices=["float32", "float64"], default="float32", help="precision of the headline speedup"
    )
    parser.add_argument(
        "--gpu", action="store_true", help="time one GPU-sized layer on --device instead (no scikit-learn)"
    )
    parser.add_argument("--device", default="cuda", help="device of --gpu (cpu runs the same code path at small sizes)")
    parser.add_argument("--gpu-n", type=int, default=100_000, help="training rows of --gpu")
    parser.add_argument("--gpu-d", type=int, default=8192, help="features of --gpu")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
        threadpool_limits(limits=args.threads)  # numpy/scipy BLAS under scikit-learn
    if args.gpu:
        return gpu_benchmark(args)
    if args.quick:
        n_train, n_test, d, n_classes = 3000, 1000, 512, 9
    else:
        n_train, n_test, d, n_classes = 20000, 5000, 4096, 9
    n_layers = args.layers
    repeats = args.repeats or (3 if args.quick else 1)
    print(
        f"n_train={n_train} n_test={n_test} d={d} classes={n_classes} layers={n_layers} C={args.C} tol={args.tol} "
        f"max_iter={args.max_iter} repeats={repeats} torch_threads={torch.get_num_threads()}",
        flush=True,
    )
    layers, y = make_layers(n_train + n_test, d, n_classes, n_layers, args.seed)
    train, test = slice(0, n_train), slice(n_train, None)
    y_train, y_test = y[train], y[test]
    labels = np.arange(n_classes)
    settings = dict(max_iter=args.max_iter, tol=args.tol, n_classes=n_classes)

    times: dict[str, list[float]] = {"ours": [], "ours_float32": [], "sklearn": []}
    failures = 0
    for layer in range(n_layers):
        X_train, X_test = layers[layer, train], layers[layer, test]
        # Interleaved repeats, so that load from other processes hits all solvers alike.
        for _ in range(repeats):
            start = time.perf_counter()
            probe = fit(X_train, y_train, "multiclass", args.C, **settings)
            times["ours"].append(time.perf_counter() - start)

            start = time.perf_counter()
            probe32 = fit(X_train, y_train, "multiclass", args.C, dtype="float32", **settings)
            times["ours_float32"].append(time.perf_counter() - start)

            start = time.perf_counter()
            scaler = StandardScaler().fit(X_train)
            # float64, like our default, so both solve the same problem at the same precision
            reference = LogisticRegression(C=args.C, tol=args.tol, max_iter=args.max_iter).fit(
                scaler.transform(X_train).astype(np.float64), y_train
            )
            times["sklearn"].append(time.perf_counter() - start)
        loss_ours = log_loss(y_test, probe.predict_proba(X_test), labels=labels)
        loss_32 = log_loss(y_test, probe32.predict_proba(X_test), labels=labels)
        loss_ref = log_loss(y_test, reference.predict_proba(scaler.transform(X_test).astype(np.float64)), labels=labels)
        ok = abs(loss_ours - loss_ref) <= 1e-3 and abs(loss_32 - loss_ref) <= 1e-3
        failures += not ok
        print(
            f"layer {layer}: test log-loss sklearn={loss_ref:.6f} float64 diff={loss_ours - loss_ref:+.2e} "
            f"float32 diff={loss_32 - loss_ref:+.2e} {'OK' if ok else 'MISMATCH'}; iterations float64={probe.n_iter} "
            f"float32={probe32.n_iter} sklearn={int(reference.n_iter_[0])}; last times ours={times['ours'][-1]:.2f}s "
            f"float32={times['ours_float32'][-1]:.2f}s sklearn={times['sklearn'][-1]:.2f}s",
            flush=True,
        )

    start = time.perf_counter()
    batched = fit_layers(layers[:, train], y_train, "multiclass", args.C, dtype=args.dtype, **settings)
    batched_per_layer = (time.perf_counter() - start) / n_layers
    batched_losses = [log_loss(y_test, p.predict_proba(layers[i, test]), labels=labels) for i, p in enumerate(batched)]
    print(
        f"fit_layers (all {n_layers} layers in one call, {args.dtype}): {batched_per_layer:.3f}s per layer, "
        f"test log-loss {np.round(batched_losses, 6).tolist()}"
    )

    medians = {name: statistics.median(values) for name, values in times.items()}
    headline, other = ("ours_float32", "ours") if args.dtype == "float32" else ("ours", "ours_float32")
    other_dtype = "float64" if args.dtype == "float32" else "float32"
    print(
        f"median seconds per layer: medprobe fit float64={medians['ours']:.3f} float32={medians['ours_float32']:.3f} "
        f"sklearn lbfgs={medians['sklearn']:.3f} ({other_dtype} speedup={medians['sklearn'] / medians[other]:.2f})"
    )
    if failures:
        print(f"{failures} layer(s) disagree with scikit-learn beyond 1e-3 test log-loss", file=sys.stderr)
    print(f"speedup={medians['sklearn'] / medians[headline]:.2f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Scaling: how the cost of each stage grows with the number of images (the probes also with the feature width).

Each stage is timed (median of ``--repeats``; by default the process's CPU seconds, which other jobs on a shared
machine barely change, ``--clock wall`` for elapsed seconds) at four doubling sizes; the exponent b of seconds ~ size^b is fitted
by least squares on log-log axes. Linear stages give b ~ 1; fixed costs pull b below 1 at small sizes, work that
grows faster than the data above it. One line per stage::

    stage=<name> exponent=<b> sizes=<s1,s2,s3,s4> seconds=<t1,t2,t3,t4> system=<kernel seconds of each> ...

Stages (the package functions the workflow's rules call, on synthetic data written to a temporary folder):

* ``prepare``: :func:`medprobe.prepare.prepare_task` on N raw 256 px RGB PNGs (one thread): read, max-normalise,
  write the preprocessed PNG, split by patient, write the manifest;
* ``extract``: :func:`medprobe.extract.extract_activations` with the demo's tiny IDEFICS (built offline, loaded
  once), N 224 px images, batch 16, in-process loading, every hidden state stored in float16;
* ``probe``: :func:`medprobe.probe.probe_task` (the regularised probe: a 3-value C grid on train, validation
  scores, test predictions, the files) on N images x 2 layers x 1024 features, 5 classes; every fit runs a fixed
  number of L-BFGS iterations (``tol`` far below reach) so that the work per size differs only in N;
* ``probe_width``: the same at fixed N with the feature width doubling;
* ``bootstrap``: :func:`medprobe.stats.bootstrap_indices` (patient-clustered, 3 images per patient) and
  :func:`medprobe.stats.bootstrap_auc` (5 classes) for a test set of N images, 500 replicates (at least 5
  repeats: each call takes a fraction of a second).

    python benchmarks/scale.py                       # every stage, 3 repeats (about 3 minutes on 2 cores)
    python benchmarks/scale.py --stages probe bootstrap --repeats 5

Results are recorded in docs/benchmarks.md, section "Scaling".
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import logging
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medprobe.demo.models import build  # noqa: E402
from medprobe.extract import extract_activations  # noqa: E402
from medprobe.models.idefics import IdeficsAdapter  # noqa: E402
from medprobe.prepare import prepare_task  # noqa: E402
from medprobe.probe import probe_task  # noqa: E402
from medprobe.settings import (  # noqa: E402
    AdamSettings,
    ExtractionSettings,
    ProbeSettings,
    SGDSettings,
    SplitSettings,
    TaskSettings,
)
from medprobe.stats import bootstrap_auc, bootstrap_indices  # noqa: E402

CLASSES = ("0", "1", "2", "3", "4")
TASK = TaskSettings(
    name="scale",
    discipline="test",
    dataset="demo",
    kind="multiclass",
    metric="auc",
    prompt="What can you see on this image?",
    classes=CLASSES,
    graded=False,
    min_test_positives=0,
)
SPLIT = SplitSettings(val_fraction=0.2, test_fraction=0.2)
PROBE_ITERATIONS = 25
PROBE = ProbeSettings(
    mode="regularised",
    C_grid=(0.01, 0.1, 1.0),
    refine=False,
    refit=False,
    max_iter=PROBE_ITERATIONS,
    tol=1e-30,  # never reached: every fit runs max_iter iterations
    class_weight="none",
    dtype="float32",
    adam=AdamSettings(epochs=80, lr=1e-4, batch_size=512, standardise=False),
    sgd=SGDSettings(alpha=0.001, max_iter=10000, class_weight="balanced", random_state=1),
)
EXTRACTION = ExtractionSettings(
    batch_size=16,
    num_workers=0,
    dtype="float16",
    prefetch_factor=2,
    shards=1,
    compression="none",
    compression_level=4,
    prompt_format="chat",
)


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
CLOCK = "cpu"
# Kernel seconds of the timed calls (page faults of fresh allocations, file I/O), per stage and size: printed
# next to the seconds, as they explain most departures from linear growth on this machine.
SYSTEM: list[float] = []


def _system_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def timed(run: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls on :data:`CLOCK`: ``cpu`` = this process's CPU time (user + system, all
    its threads), which other jobs on a shared machine barely change; ``wall`` = elapsed time. The median kernel
    seconds are appended to :data:`SYSTEM`."""
    clock = CLOCKS[CLOCK]
    times, system = [], []
    for _ in range(repeats):
        started, kernel = clock(), _system_seconds()
        run()
        times.append(clock() - started)
        system.append(_system_seconds() - kernel)
    SYSTEM.append(statistics.median(system))
    return statistics.median(times)


def exponent(sizes: Sequence[int], seconds: Sequence[float]) -> float:
    """b of seconds ~ size^b, least squares on log-log axes."""
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def report(stage: str, sizes: Sequence[int], seconds: Sequence[float], extra: str = "") -> None:
    """The stage's line; ``system`` = the kernel's share of each size's seconds (:data:`SYSTEM`)."""
    system = SYSTEM[-len(sizes) :]
    line = (
        f"stage={stage} exponent={exponent(sizes, seconds):.2f} sizes={','.join(map(str, sizes))} "
        f"seconds={','.join(f'{s:.3g}' for s in seconds)} system={','.join(f'{s:.2g}' for s in system)}"
    )
    print(line + (f" {extra}" if extra else ""), flush=True)


def write_pngs(folder: Path, n: int, size: int, seed: int = 0) -> list[str]:
    """``n`` distinct noisy RGB PNGs named img00000.png, ...; returns their names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    for i in range(n):
        pixels = base.copy()
        pixels[: size // 4] = rng.integers(0, 256, (size // 4, size, 3), dtype=np.uint8)  # each image its own
        name = f"img{i:05d}.png"
        Image.fromarray(pixels).save(folder / name)
        names.append(name)
    return names


# ------------------------------------------------------------------------------------------------- prepare


def prepare_stage(root: Path, sizes: Sequence[int], repeats: int) -> None:
    names = write_pngs(root / "raw" / "images", max(sizes), 256)
    labels = np.random.default_rng(1).integers(0, len(CLASSES), len(names))
    seconds = []
    for n in sizes:
        table = pd.DataFrame(
            {
                "image_id": [name.removesuffix(".png") for name in names[:n]],
                "file": [f"images/{name}" for name in names[:n]],
                "patient_id": [f"p{i // 3}" for i in range(n)],  # 3 images per patient
                "label": [CLASSES[k] for k in labels[:n]],
                "labels": "",
                "source": "scale",
                "partition": "",
                "group": "",
            }
        )
        metadata = root / "raw" / f"metadata_{n}.csv"
        table.to_csv(metadata, index=False)
        out = root / f"prepared_{n}"

        def run(metadata: Path = metadata, out: Path = out) -> None:
            shutil.rmtree(out, ignore_errors=True)
            prepare_task(
                "T",
                TASK,
                SPLIT,
                0,
                metadata=metadata,
                manifest=out / "manifest.csv",
                sidecar=out / "manifest.json",
                images=out / "images",
                threads=1,
            )

        seconds.append(timed(run, repeats))
        shutil.rmtree(out, ignore_errors=True)
    report("prepare", sizes, seconds)


# ------------------------------------------------------------------------------------------------- extract


def extract_stage(root: Path, sizes: Sequence[int], repeats: int) -> None:
    checkpoint = build("tiny-idefics-large", root / "model", seed=0)
    adapter = IdeficsAdapter.from_config({"checkpoint": str(checkpoint)}, device="cpu")
    names = write_pngs(root / "images", max(sizes), 224)
    seconds = []
    for n in sizes:
        manifest = root / f"extract_{n}.csv"
        pd.DataFrame(
            {"image_id": [f"img{i:05d}" for i in range(n)], "path": [f"images/{x}" for x in names[:n]]}
        ).to_csv(manifest, index=False)
        out = root / f"extract_{n}.h5"

        def run(manifest: Path = manifest, out: Path = out) -> None:
            out.unlink(missing_ok=True)
            extract_activations(
                manifest,
                out,
                settings=EXTRACTION,
                model_name="tiny",
                model={"checkpoint": str(checkpoint)},
                prompt=TASK.prompt,
                root=root,
                progress=False,
                adapter=adapter,
            )

        seconds.append(timed(run, repeats))
        out.unlink(missing_ok=True)
    report("extract", sizes, seconds)


# ------------------------------------------------------------------------------------------------- probes


def write_probe_inputs(folder: Path, n: int, width: int, n_layers: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """A manifest of ``n`` images (patients of 3, split 60/20/20 by patient) and its activations file
    ``(n, n_layers, width)`` float16 with a planted linear signal of the 5 classes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    patients = np.arange(n) // 3
    split_of_patient = rng.choice(["train", "val", "test"], size=patients.max() + 1, p=[0.6, 0.2, 0.2])
    y = rng.integers(0, len(CLASSES), n)
    ids = [f"img{i:06d}" for i in range(n)]
    manifest = folder / "manifest.csv"
    pd.DataFrame(
        {
            "image_id": ids,
            "path": [f"images/{i}.png" for i in ids],
            "split": split_of_patient[patients],
            "patient_id": [f"p{p}" for p in patients],
            "label": [CLASSES[k] for k in y],
            "labels": "",
            "source": "scale",
            "group": "",
        }
    ).to_csv(manifest, index=False)
    directions = rng.normal(size=(len(CLASSES), width)).astype(np.float32)
    activations = np.empty((n, n_layers, width), dtype=np.float16)
    for layer in range(n_layers):
        noise = rng.standard_normal((n, width), dtype=np.float32)
        activations[:, layer] = noise + (0.3 + 0.3 * layer) * directions[y]
    path = folder / "activations.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        handle.create_dataset("activations", data=activations, chunks=(min(n, 256), 1, width))
        handle.attrs["layer_names"] = [f"hidden.{i}" for i in range(n_layers)]
        handle.attrs["num_hidden_states"] = n_layers
        handle.attrs["dtype"] = "float16"
        handle.attrs["manifest_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    return path, manifest


def time_probe(folder: Path, n: int, width: int, repeats: int) -> tuple[float, int]:
    """Median seconds of probe_task and the L-BFGS iterations of its fits (the same at every size)."""
    activations, manifest = write_probe_inputs(folder, n, width)
    summaries = []

    def run() -> None:
        summaries.append(
            probe_task(
                activations,
                manifest,
                predictions=folder / "predictions.h5",
                layers=folder / "layers.h5",
                summary=folder / "probe.json",
                task=TASK,
                probe=PROBE,
                layer="validation",
                seed=0,
                protocol=None,
            )
        )

    seconds = timed(run, repeats)
    iterations = sum(layer["n_iter"] for layer in summaries[-1]["layers"])
    shutil.rmtree(folder)
    return seconds, iterations


def probe_stage(root: Path, sizes: Sequence[int], width: int, repeats: int) -> None:
    results = [time_probe(root / f"probe_{n}", n, width, repeats) for n in sizes]
    iterations = ",".join(str(i) for _, i in results)
    report("probe", sizes, [s for s, _ in results], f"width={width} iterations={iterations}")


def probe_width_stage(root: Path, widths: Sequence[int], n: int, repeats: int) -> None:
    results = [time_probe(root / f"probe_width_{w}", n, w, repeats) for w in widths]
    iterations = ",".join(str(i) for _, i in results)
    report("probe_width", widths, [s for s, _ in results], f"images={n} iterations={iterations}")


# ------------------------------------------------------------------------------------------------- bootstrap


def bootstrap_stage(sizes: Sequence[int], replicates: int, repeats: int) -> None:
    rng = np.random.default_rng(2)
    seconds = []
    for n in sizes:
        labels = rng.integers(0, len(CLASSES), n)
        targets = np.eye(len(CLASSES), dtype=np.int64)[labels]
        logits = rng.normal(size=(n, len(CLASSES)))
        logits[np.arange(n), labels] += 1.5
        scores = np.round(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), 3)
        patients = np.array([f"p{i // 3}" for i in range(n)])

        def run(n: int = n, targets: np.ndarray = targets, scores: np.ndarray = scores, patients=patients) -> None:
            indices = bootstrap_indices(n, replicates, seed=0, groups=patients)
            bootstrap_auc(targets, scores, indices)

        seconds.append(timed(run, repeats))
    report("bootstrap", sizes, seconds, f"replicates={replicates}")


# ------------------------------------------------------------------------------------------------- main


def doubling(first: int, count: int = 4) -> list[int]:
    return [first * 2**i for i in range(count)]


STAGES = ("prepare", "extract", "probe", "probe_width", "bootstrap")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per size; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="cpu", help="cpu: the process's CPU seconds (default); wall"
    )
    parser.add_argument("--prepare-first", type=int, default=128, help="smallest size of prepare (images)")
    parser.add_argument("--extract-first", type=int, default=64, help="smallest size of extract (images)")
    parser.add_argument("--probe-first", type=int, default=4000, help="smallest size of probe (images)")
    parser.add_argument("--probe-width", type=int, default=1024, help="feature width of the probe stage")
    parser.add_argument("--width-first", type=int, default=256, help="smallest width of probe_width")
    parser.add_argument("--width-images", type=int, default=16000, help="images of probe_width")
    parser.add_argument("--bootstrap-first", type=int, default=4000, help="smallest test set of bootstrap")
    parser.add_argument("--replicates", type=int, default=500, help="bootstrap replicates")
    args = parser.parse_args()

    global CLOCK
    CLOCK = args.clock
    torch.set_num_threads(args.threads)
    logging.getLogger("medprobe").setLevel(logging.ERROR)  # the fixed-iteration fits warn that they stopped early
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"date={datetime.datetime.now().astimezone().isoformat(timespec='minutes')} machine={platform.machine()} "
        f"cpus={os.cpu_count()} load={load} torch={torch.__version__} threads={args.threads} repeats={args.repeats} "
        f"clock={args.clock}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="medprobe-scale-") as tmp:
        root = Path(tmp)
        if "prepare" in args.stages:
            prepare_stage(root / "prepare", doubling(args.prepare_first), args.repeats)
        if "extract" in args.stages:
            extract_stage(root / "extract", doubling(args.extract_first), args.repeats)
        if "probe" in args.stages:
            probe_stage(root, doubling(args.probe_first), args.probe_width, args.repeats)
        if "probe_width" in args.stages:
            probe_width_stage(root, doubling(args.width_first), args.width_images, args.repeats)
        if "bootstrap" in args.stages:
            # a fraction of a second per call: more repeats for a stable median on a shared machine
            bootstrap_stage(doubling(args.bootstrap_first), args.replicates, max(5, args.repeats))


if __name__ == "__main__":
    main()

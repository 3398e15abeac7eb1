"""Benchmark: extraction throughput of the generic adapters (hf_vlm, hf_vision) on the CPU, tiny builds.

For each family, :func:`medprobe.extract.extract_activations` (batched DataLoader, pooling inside the forward,
resumable HDF5) is timed end to end on N images and set against a per-image loop: the same adapter, one image
per forward (``preprocess`` and ``forward`` on a batch of one), what a script without batching does. Both must
give the same vectors (within float tolerance) or the script exits with status 1.

    python benchmarks/extract_families.py                  # 64 images, batch 16, 3 repeats
    python benchmarks/extract_families.py --images 32 --repeats 5

One line per family ``<family>: ours <x> img/s, per-image loop <y> img/s, ratio <x/y>`` (medians over the
repeats), then ``speedup=<median ratio over the families>``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medprobe.demo.models import build  # noqa: E402
from medprobe.demo.vlm_models import build_vlm  # noqa: E402
from medprobe.extract import extract_activations  # noqa: E402
from medprobe.gpu_job import GpuJob  # noqa: E402
from medprobe.models import load_adapter  # noqa: E402
from medprobe.settings import ExtractionSettings  # noqa: E402

PROMPT = "What can you see on this histopathology image?"
# family -> (builder, build name, adapter entry without the checkpoint)
FAMILIES = {
    "idefics3 (hf_vlm, mean_image)": (build_vlm, "tiny-idefics3", {"adapter": "hf_vlm", "pooling": "mean_image"}),
    "llava (hf_vlm, last)": (build_vlm, "tiny-llava", {"adapter": "hf_vlm", "pooling": "last"}),
    "clip (hf_vision, cls)": (build, "tiny-clip", {"adapter": "hf_vision", "pooling": "cls"}),
}


def write_images(root: Path, n: int) -> Path:
    """N random RGB images of mixed sizes and their manifest."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        height, width = (64, 96) if i % 2 else (80, 80)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        rows.append({"image_id": f"img{i:04d}", "path": f"images/{i}.png", "split": "train", "patient_id": f"p{i}",
                     "label": "0", "labels": "", "source": "bench", "group": ""})  # fmt: skip
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def time_ours(manifest: Path, root: Path, entry: dict, batch_size: int, repeat: int) -> tuple[float, np.ndarray]:
    settings = ExtractionSettings(batch_size=batch_size, num_workers=0, dtype="float32", prefetch_factor=2, shards=1,
                                  compression="none", compression_level=4, prompt_format="chat")  # fmt: skip
    out = root / f"ours-{repeat}.h5"
    started = time.perf_counter()
    extract_activations(manifest, out, settings=settings, model_name="bench", model=entry, prompt=PROMPT,
                        job=GpuJob.on("cpu"), root=root, progress=False)  # fmt: skip
    seconds = time.perf_counter() - started
    with h5py.File(out, "r") as handle:
        return seconds, handle["activations"][()]


def time_loop(manifest: Path, root: Path, entry: dict) -> tuple[float, np.ndarray]:
    """The per-image baseline, model loading included as in ours."""
    started = time.perf_counter()
    adapter = load_adapter(entry, device="cpu")
    paths = [root / row["path"] for row in csv.DictReader(manifest.open())]
    pooled = []
    with torch.inference_mode():
        for path in paths:
            with Image.open(path) as image:
                batch = adapter.preprocess([image.convert("RGB")], PROMPT, "chat")
            pooled.append(adapter.forward(batch)[0].float().numpy())
    return time.perf_counter() - started, np.concatenate(pooled)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the CI machine has 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ratios, failed = [], False
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        manifest = write_images(root, args.images)
        for family, (builder, name, entry) in FAMILIES.items():
            entry = {**entry, "checkpoint": str(builder(name, root / "models" / name, seed=0))}
            ours, loop = [], []
            for repeat in range(args.repeats):
                seconds, stored = time_ours(manifest, root, entry, args.batch_size, repeat)
                ours.append(args.images / seconds)
                seconds, expected = time_loop(manifest, root, entry)
                loop.append(args.images / seconds)
            difference = float(np.abs(stored - expected).max())
            failed |= not difference < 1e-3
            ratio = statistics.median(ours) / statistics.median(loop)
            ratios.append(ratio)
            print(f"{family}: ours {statistics.median(ours):.1f} img/s, per-image loop {statistics.median(loop):.1f} "
                  f"img/s, ratio {ratio:.2f} (max |difference| {difference:.2e})")  # fmt: skip
    print(f"speedup={statistics.median(ratios):.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

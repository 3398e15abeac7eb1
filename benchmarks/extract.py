"""Benchmark: medprobe's extractor against a baseline that mirrors the authors' published approach.

The baseline runs one image at a time: the processor is called per image in the main loop, the full
model runs with ``output_hidden_states=True`` and every layer's full hidden-state sequence is copied to
the host, where the last token is taken.  Ours is :func:`medprobe.extract.extract_activations` (batched
DataLoader, pooling on the device, forward stopped after the deepest kept layer, HDF5 written as it goes),
timed end to end on the same model and images.  The two must agree (max |difference| after float16
storage) or the script exits with status 1.

    python benchmarks/extract.py                # CPU, the demo's tiny IDEFICS (tiny-idefics-large)
    python benchmarks/extract.py --gpu          # GPU: random-weight idefics-9b-instruct architecture + CLIP ViT-B/32

The last line is ``speedup=<x>``: median images/s of ours / median images/s of the baseline (CPU mode:
at the chosen batch size; GPU mode: ours at its best batch size vs the baseline, IDEFICS-9B).
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
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medprobe.demo.models import build  # noqa: E402
from medprobe.extract import extract_activations  # noqa: E402
from medprobe.models.clip import ClipAdapter  # noqa: E402
from medprobe.models.idefics import IdeficsAdapter  # noqa: E402
from medprobe.settings import ExtractionSettings  # noqa: E402

PROMPT = "What can you see on this histopathology image?"

# HuggingFaceM4/idefics-9b-instruct (config.json): LLaMA-7B decoder with gated cross-attention every 4
# layers, the OpenCLIP ViT-H/14 vision tower and a 6-layer perceiver resampler with 64 latents.
IDEFICS_9B = dict(
    vocab_size=32000,
    additional_vocab_size=2,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    cross_layer_interval=4,
    qk_layer_norms=False,
    use_resampler=True,
    alpha_initializer="ones",  # open gates, so that the image reaches the text (random weights)
    alpha_type="float",
    vision_config=dict(
        embed_dim=1280,
        image_size=224,
        patch_size=14,
        num_hidden_layers=32,
        num_attention_heads=16,
        intermediate_size=5120,
        hidden_act="gelu",
    ),
    perceiver_config=dict(
        resampler_n_latents=64,
        resampler_depth=6,
        resampler_n_heads=16,
        resampler_head_dim=96,
        qk_layer_norms_perceiver=False,
    ),
)
# openai/clip-vit-base-patch32 (vision tower and projection; the text tower is not used).
CLIP_B32 = dict(
    projection_dim=512,
    vision_config=dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
    ),
    text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
)


def write_images(root: Path, n: int, size: int) -> Path:
    """``n`` distinct RGB PNGs (noise + a shape) and a manifest, like the prepared demo images."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        x, y = rng.integers(0, size // 2, 2)
        ImageDraw.Draw(image).ellipse((x, y, x + size // 3, y + size // 4), fill=(240, 200, 210))
        image.save(root / "images" / f"img{i:04d}.png")
        rows.append({"image_id": f"img{i:04d}", "path": f"images/img{i:04d}.png"})
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image_id", "path"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def baseline(adapter, manifest: Path, root: Path) -> np.ndarray:
    """The published approach: one image at a time, the processor per image, all layers' full sequences to
    the host, last token taken there.  Returns (N, L, D) float32."""
    with manifest.open() as handle:
        paths = [root / row["path"] for row in csv.DictReader(handle)]
    model = adapter.model
    out = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        if isinstance(adapter, IdeficsAdapter):
            inputs = adapter.processor(text=[["User:", image, adapter.prompt_text(PROMPT)]], return_tensors="pt")
            inputs = {
                k: (v.to(adapter.device, adapter.dtype) if v.is_floating_point() else v.to(adapter.device))
                for k, v in inputs.items()
            }
            with torch.no_grad():
                states = model(**inputs, output_hidden_states=True).hidden_states
            host = [state.float().cpu().numpy() for state in states]  # every layer, every token
            out.append(np.stack([state[0, -1] for state in host]))
        else:
            pixels = adapter.processor(images=[image], return_tensors="pt")["pixel_values"].to(
                adapter.device, adapter.dtype
            )
            with torch.no_grad():
                states = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
            host = [state.float().cpu().numpy() for state in states]
            out.append(np.stack([state[0, 0] for state in host]))
    return np.stack(out)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_baseline(adapter, manifest, root, repeats) -> tuple[float, np.ndarray]:
    rates, values = [], None
    n = sum(1 for _ in manifest.open()) - 1
    for _ in range(repeats):
        sync(adapter.device)
        started = time.perf_counter()
        values = baseline(adapter, manifest, root)
        sync(adapter.device)
        rates.append(n / (time.perf_counter() - started))
    return statistics.median(rates), values


def time_ours(adapter, manifest, root, repeats, batch_size, num_workers, model_name) -> tuple[float, np.ndarray]:
    rates, values = [], None
    n = sum(1 for _ in manifest.open()) - 1
    for repeat in range(repeats):
        out = root / f"ours_{batch_size}_{repeat}.h5"
        started = time.perf_counter()
        extract_activations(
            manifest,
            out,
            settings=ExtractionSettings(
                batch_size=batch_size,
                num_workers=num_workers,
                dtype="float16",
                prefetch_factor=2,
                shards=1,
                compression="none",
                compression_level=4,
                prompt_format="chat",
            ),
            model_name=model_name,
            model={"checkpoint": adapter.checkpoint},
            prompt=PROMPT,
            root=root,
            progress=False,
            adapter=adapter,
        )
        sync(adapter.device)
        rates.append(n / (time.perf_counter() - started))
        with h5py.File(out, "r") as handle:
            values = handle["activations"][()].astype(np.float32)
        out.unlink()
    return statistics.median(rates), values


def check_agreement(ours: np.ndarray, reference: np.ndarray, what: str, tolerance: float) -> None:
    scale = np.abs(reference).max()
    difference = np.abs(ours - reference.astype(np.float16).astype(np.float32)).max() / scale
    print(f"{what}: max |ours - baseline| / max|baseline| = {difference:.2e}")
    if not difference <= tolerance:
        print(f"ERROR: {what} disagrees with the baseline (tolerance {tolerance})", file=sys.stderr)
        sys.exit(1)


def cpu_mode(args) -> float:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = build("tiny-idefics-large", root / "model", seed=0)
        manifest = write_images(root, args.images, args.image_size)
        adapter = IdeficsAdapter.from_config({"checkpoint": str(checkpoint)}, device="cpu")
        print(f"model {adapter!r}; {args.images} images of {args.image_size}px; torch threads {args.threads}")
        base_rate, base_values = time_baseline(adapter, manifest, root, args.repeats)
        our_rate, our_values = time_ours(
            adapter, manifest, root, args.repeats, args.batch_size, args.workers, "idefics"
        )
        check_agreement(our_values, base_values, "idefics", 5e-3)
    print(f"baseline (batch 1, processor per image, full sequences to host): median {base_rate:.1f} images/s")
    print(f"medprobe (batch {args.batch_size}, {args.workers} workers): median {our_rate:.1f} images/s")
    return our_rate / base_rate


def flops_per_image(adapter, seq_len: int) -> float:
    """Forward FLOPs per image, 2 x parameters x tokens per component (attention score FLOPs ignored)."""
    model = adapter.model
    if isinstance(adapter, IdeficsAdapter):
        vision = sum(p.numel() for p in model.model.vision_model.parameters())
        resampler = sum(p.numel() for p in model.model.perceiver_resampler.parameters())
        decoder = sum(
            p.numel() for n, p in model.model.named_parameters() if n.startswith(("layers.", "gated_cross_attn"))
        )
        patches = (224 // 14) ** 2 + 1
        return 2 * (vision * patches + resampler * (patches + 64) + decoder * seq_len)
    vision = sum(p.numel() for p in model.vision_model.parameters())
    return 2 * vision * ((224 // 32) ** 2 + 1)


def gpu_mode(args) -> float:
    from transformers import CLIPConfig, CLIPModel, IdeficsConfig, IdeficsForVisionText2Text

    if not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    best = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = write_images(root, args.images, args.image_size)
        # Processors of the tiny demo builds: the same image size (224) and prompt format.
        idefics_processor = IdeficsAdapter.load_processor(str(build("tiny-idefics-small", root / "ti", seed=0)))
        clip_processor = ClipAdapter.load_processor(str(build("tiny-clip", root / "tc", seed=0)))
        for name in args.models:
            torch.manual_seed(0)
            with torch.device(device):
                if name == "idefics_9b":
                    config = IdeficsConfig(**IDEFICS_9B)
                    config._attn_implementation = "sdpa"
                    model = IdeficsForVisionText2Text(config).to(torch.bfloat16).eval()
                    adapter = IdeficsAdapter(
                        model,
                        idefics_processor,
                        checkpoint="random:idefics-9b-instruct",
                        device=device,
                        dtype=torch.bfloat16,
                    )
                else:
                    config = CLIPConfig(**CLIP_B32)
                    config._attn_implementation = "sdpa"
                    model = CLIPModel(config).to(torch.bfloat16).eval()
                    adapter = ClipAdapter(
                        model,
                        clip_processor,
                        checkpoint="random:clip-vit-base-patch32",
                        device=device,
                        dtype=torch.bfloat16,
                    )
            seq_len = int(
                adapter.preprocess([Image.new("RGB", (64, 64))], PROMPT).get("input_ids", torch.zeros(1, 1)).shape[1]
            )
            flops = flops_per_image(adapter, seq_len)
            torch.cuda.reset_peak_memory_stats()
            base_rate, base_values = time_baseline(adapter, manifest, root, 1)
            base_peak = torch.cuda.max_memory_allocated() / 2**30
            print(
                f"{name} baseline: {base_rate:.1f} images/s, peak {base_peak:.1f} GiB, "
                f"{base_rate * flops / (args.peak_tflops * 1e12):.3%} of bf16 peak"
            )
            rates = {}
            for batch_size in args.batch_sizes:
                torch.cuda.reset_peak_memory_stats()
                rate, values = time_ours(adapter, manifest, root, args.repeats, batch_size, args.workers, name)
                peak = torch.cuda.max_memory_allocated() / 2**30
                rates[batch_size] = rate
                print(
                    f"{name} medprobe batch {batch_size}: {rate:.1f} images/s, peak {peak:.1f} GiB, "
                    f"{rate * flops / (args.peak_tflops * 1e12):.2%} of bf16 peak"
                )
            check_agreement(values, base_values, name, 5e-2)  # bf16 batched vs single
            best[name] = max(rates.values()) / base_rate
            print(f"{name}: speedup {best[name]:.1f}x at batch {max(rates, key=rates.get)}")
            del model, adapter
            torch.cuda.empty_cache()
    return best.get("idefics_9b", next(iter(best.values())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--gpu", action="store_true", help="GPU mode (random-weight idefics-9b-instruct, CLIP ViT-B/32)"
    )
    parser.add_argument("--images", type=int, default=None, help="images (default 96 on CPU, 512 on GPU)")
    parser.add_argument("--image-size", type=int, default=512, help="side of the test images in px")
    parser.add_argument("--batch-size", type=int, default=32, help="our batch size (CPU mode)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="GPU mode")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 1 on CPU, 8 on GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU mode)")
    parser.add_argument("--models", nargs="+", default=["idefics_9b", "clip"], choices=["idefics_9b", "clip"])
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)"
    )
    args = parser.parse_args()
    args.images = args.images or (512 if args.gpu else 96)
    args.workers = args.workers if args.workers is not None else (8 if args.gpu else 1)
    speedup = gpu_mode(args) if args.gpu else cpu_mode(args)
    print(f"speedup={speedup:.2f}")


if __name__ == "__main__":
    main()

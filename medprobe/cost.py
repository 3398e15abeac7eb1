"""Cost model of a study: images, FLOPs, GPU-hours and disk per model x task, computed from the config.

    python -m medprobe.cost --configfile config/paper.yaml [--configfile more.yaml] [--out docs/cost.md]

The configs are merged and resolved as the workflow does (later files over earlier ones, then ``extends``, then
the schema's defaults). For every model x task the model computes

* the number of images: from the task's manifest under ``results/`` when it is prepared for the task's dataset,
  else from the paper's Table 1 (the paper's datasets) or the demo's ``demo_patients`` x ``images_per_patient``;
* FLOPs per image from the model's architecture: 2 x (matrix parameters) x (tokens through them), plus the
  attention scores, per component (vision tower, perceiver resampler, decoder, gated cross-attention); the
  architecture is read from a local checkpoint's ``config.json`` where there is one (or a demo build), else
  from :data:`ARCHITECTURES` (the four models of the paper, with their sources);
* extraction GPU-hours: max(FLOPs / peak, weights read per batch / memory bandwidth) / utilisation, the
  utilisation an assumption (:data:`H200`) until a GPU measurement replaces it;
* probe GPU-hours from the ``probe`` section (L-BFGS with its C grid in lockstep, the authors' Adam probe; the
  SGD probe runs in scikit-learn on the CPU and is counted in FLOPs only), the label-efficiency refits included;
* disk: images x (stored layers x width + embedding width) x bytes per value of the storage dtype;

and "what if" rows for the storage dtypes (float32, float16, int8 with a scale per layer and channel) and layer
selections (all, every:<k>, one). :func:`render` writes the Markdown of docs/cost.md.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import math
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from medprobe import config as config_mod
from medprobe.checkpoints import compute_model_config
from medprobe.layers import EMBEDDINGS_LAYER, hidden_index, resolve_layer

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------- assumptions


@dataclasses.dataclass(frozen=True)
class Hardware:
    """The GPU the hours are counted on and the share of its roofline that jobs reach."""

    name: str
    bf16_tflops: float  # dense tensor-core peak (no sparsity); fp16 is the same
    fp32_tflops: float  # without TF32 (torch's default for matmuls)
    fp64_tflops: float
    bandwidth_tbs: float  # memory bandwidth, TB/s
    utilisation: float  # share of the roofline (FLOPs or bytes) a job reaches
    utilisation_source: str
    step_seconds: float  # fixed cost of one optimiser step of a mini-batch probe (kernel launches)
    step_source: str

    def peak_flops(self, dtype: str) -> float:
        tflops = {"float64": self.fp64_tflops, "float32": self.fp32_tflops}.get(dtype, self.bf16_tflops)
        return tflops * 1e12

    def seconds(self, flops: float, bytes_read: float, dtype: str = "bfloat16") -> float:
        """Roofline time of ``flops`` and ``bytes_read`` at :attr:`utilisation`."""
        return max(flops / self.peak_flops(dtype), bytes_read / (self.bandwidth_tbs * 1e12)) / self.utilisation


H200 = Hardware(
    name="NVIDIA H200 SXM",
    bf16_tflops=989.0,
    fp32_tflops=67.0,
    fp64_tflops=34.0,
    bandwidth_tbs=4.8,
    utilisation=0.35,
    utilisation_source=(
        "assumed: docs/benchmarks.md has no GPU measurement yet; replace it by the fraction of the bf16 peak that "
        "`python benchmarks/extract.py --gpu` prints (`--utilisation`)"
    ),
    step_seconds=1e-4,
    step_source="assumed: about 20 CUDA kernel launches (forward, loss, backward, Adam update) of ~5 us each",
)
HARDWARE_SOURCE = "NVIDIA H100/H200 Tensor Core GPU datasheets (SXM; dense, without sparsity)"

# Han et al. 2023, Table 1: (training images, test images) per dataset of the paper (T5: EyePACS 15,078 + APTOS
# 3,662 test images; T8: OAI 39,921 + MOST 16,264 training, 7,108 + 2,796 test images).
PAPER_TABLE1: dict[str, tuple[int, int]] = {
    "nct_crc_he": (100_000, 7_180),
    "pannuke": (4_971, 1_263),
    "isic2018": (10_208, 1_512),
    "isic2020": (26_045, 7_081),
    "eyepacs_aptos": (73_622, 18_740),
    "airogs_odir": (101_442, 7_000),
    "padchest": (86_715, 7_943),
    "oai_most": (56_185, 9_904),
}
# Findings of a `classes: all` task before its manifest exists: the paper's "54 radiographic findings" (Results, T7).
PAPER_FINDINGS: dict[str, int] = {"padchest": 54}
# C values tried between the best grid value's neighbours when the search is refined (as
# medprobe.probe.selection.REFINE_POINTS, which imports torch; tests/test_cost.py checks that the two agree).
REFINE_POINTS = 5
BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
WEIGHT_BYTES = {"8bit": 1.0, "4bit": 0.5}
WHAT_IF_DTYPES = ("float32", "float16", "int8")
WHAT_IF_LAYERS: tuple[tuple[str, Any], ...] = (
    ("all", "all"),
    ("every:2", "every:2"),
    ("every:4", "every:4"),
    ("one", "one"),
)

# ---------------------------------------------------------------------------------------------- architectures


@dataclasses.dataclass(frozen=True)
class Stack:
    """Identical transformer layers: attention (q, k, v, o) and an MLP of two matrices (three when gated, SwiGLU)."""

    layers: int
    width: int
    ffn: int
    gated: bool = False

    def layer_params(self) -> int:
        return 4 * self.width * self.width + (3 if self.gated else 2) * self.width * self.ffn

    def layer_flops(self, tokens: int) -> int:
        """One layer over ``tokens``: 2 x matrix parameters x tokens + the attention scores (QK^T and AV)."""
        return 2 * self.layer_params() * tokens + 4 * tokens * tokens * self.width


@dataclasses.dataclass(frozen=True)
class Vision:
    """A ViT: patch embedding, ``stack``, and optionally a projection of the pooled token (``image_embeds``)."""

    stack: Stack
    image_size: int
    patch_size: int
    extra_tokens: int  # class (and register) tokens
    projection: int | None = None
    channels: int = 3

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        return self.patches + self.extra_tokens

    def params(self) -> int:
        patch = self.channels * self.patch_size**2 * self.stack.width
        return patch + self.stack.layers * self.stack.layer_params() + self.stack.width * (self.projection or 0)

    def flops(self) -> int:
        patch = 2 * self.channels * self.patch_size**2 * self.stack.width * self.patches
        projection = 2 * self.stack.width * (self.projection or 0)
        return patch + self.stack.layers * self.stack.layer_flops(self.tokens) + projection


@dataclasses.dataclass(frozen=True)
class Resampler:
    """IDEFICS's perceiver resampler: ``latents`` queries attend to [vision tokens, latents], ``depth`` blocks."""

    latents: int
    depth: int
    inner: int  # heads x head dimension
    width: int  # the vision tower's width
    ffn: int  # 4 x width, two matrices

    def params(self) -> int:
        return self.depth * (4 * self.width * self.inner + 2 * self.width * self.ffn) + self.latents * self.width

    def flops(self, vision_tokens: int) -> int:
        context = vision_tokens + self.latents
        per_block = (
            2 * self.width * self.inner * self.latents  # q
            + 2 * 2 * self.width * self.inner * context  # k, v
            + 4 * self.latents * context * self.inner  # scores
            + 2 * self.inner * self.width * self.latents  # o
            + 2 * 2 * self.width * self.ffn * self.latents  # MLP
        )
        return self.depth * per_block


@dataclasses.dataclass(frozen=True)
class Decoder:
    """A LLaMA decoder with a gated cross-attention block (q, k, v, o and a SwiGLU MLP) before every
    ``cross_interval``-th layer; the blocks read ``image_tokens`` vectors of width ``image_width``."""

    stack: Stack
    vocab: int
    cross_interval: int
    image_width: int
    image_tokens: int

    def cross_blocks(self, layers_run: int) -> int:
        return math.ceil(max(layers_run, 1) / self.cross_interval)

    def cross_params(self) -> int:
        d = self.stack.width
        return 2 * d * d + 2 * self.image_width * d + 3 * d * self.stack.ffn

    def params(self) -> int:
        """Every weight, the token embedding and the output head included (for the parameter count)."""
        layers = self.stack.layers * self.stack.layer_params()
        return layers + self.cross_blocks(self.stack.layers) * self.cross_params() + 2 * self.vocab * self.stack.width

    def run_params(self, layers_run: int) -> int:
        """The weights a forward through ``layers_run`` layers reads (no embedding matrix, no output head)."""
        return layers_run * self.stack.layer_params() + self.cross_blocks(layers_run) * self.cross_params()

    def flops(self, text_tokens: int, layers_run: int) -> tuple[int, int]:
        """(decoder layers, cross-attention blocks) FLOPs over ``text_tokens`` through ``layers_run`` layers."""
        d, f = self.stack.width, self.stack.ffn
        cross = (
            2 * (2 * d * d + 3 * d * f) * text_tokens  # q, o, MLP on the text
            + 2 * 2 * self.image_width * d * self.image_tokens  # k, v on the image latents
            + 4 * text_tokens * self.image_tokens * d  # scores
        )
        return layers_run * self.stack.layer_flops(text_tokens), self.cross_blocks(layers_run) * cross


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the cost model needs of a model: its components and where the numbers come from."""

    name: str
    source: str
    vision: Vision
    resampler: Resampler | None = None
    decoder: Decoder | None = None
    published: str = ""  # the published parameter count, for comparison with params()
    tokenizer: str | None = None  # a local tokenizer.json to count prompt tokens with

    @property
    def hidden_states(self) -> int:
        return (self.decoder.stack.layers if self.decoder else self.vision.stack.layers) + 1

    @property
    def width(self) -> int:
        return self.decoder.stack.width if self.decoder else self.vision.stack.width

    @property
    def embedding(self) -> int | None:
        return None if self.decoder else self.vision.projection

    def params(self) -> int:
        total = self.vision.params()
        total += self.resampler.params() if self.resampler else 0
        return total + (self.decoder.params() if self.decoder else 0)

    def flops(self, text_tokens: int, deepest: int | None = None) -> dict[str, int]:
        """FLOPs per image by component; ``deepest`` is the deepest stored hidden state (the forward stops there;
        a vision-only model always runs its whole tower)."""
        parts = {"vision tower": self.vision.flops()}
        if self.resampler:
            parts["resampler"] = self.resampler.flops(self.vision.tokens)
        if self.decoder:
            layers_run = self.decoder.stack.layers if deepest is None else deepest
            parts["decoder"], parts["cross-attention"] = self.decoder.flops(text_tokens, layers_run)
        return parts

    def run_params(self, deepest: int | None = None) -> int:
        """The weights one forward reads (a batch reads them once)."""
        total = self.vision.params() + (self.resampler.params() if self.resampler else 0)
        if self.decoder:
            total += self.decoder.run_params(self.decoder.stack.layers if deepest is None else deepest)
        return total


VIT_H14 = Vision(Stack(layers=32, width=1280, ffn=5120), image_size=224, patch_size=14, extra_tokens=1)
IDEFICS_RESAMPLER = Resampler(latents=64, depth=6, inner=16 * 96, width=1280, ffn=4 * 1280)
VIT_B32 = Vision(Stack(layers=12, width=768, ffn=3072), image_size=224, patch_size=32, extra_tokens=1, projection=512)
_IDEFICS_SOURCE = (
    "the checkpoint's config.json (huggingface.co/HuggingFaceM4/{repo}, revision {revision}, read from a stored "
    "copy: the hub is not reachable offline): decoder {width} wide, {layers} layers, MLP {ffn}, vocabulary 32,000 "
    "+ 2, a gated cross-attention block before every 4th layer; perceiver resampler of 64 latents, depth 6, 16 "
    "heads x 96; vision tower 1280 wide, 32 layers, MLP 5120, patch 14 at 224 px. That is LLaMA-{llama} "
    "(Touvron et al. 2023) and OpenCLIP's ViT-H/14 (the paper: 632M parameters)"
)
ARCHITECTURES: dict[str, Architecture] = {
    "HuggingFaceM4/idefics-80b-instruct": Architecture(
        name="IDEFICS-80B (LLaMA-65B + ViT-H/14)",
        source=_IDEFICS_SOURCE.format(
            repo="idefics-80b-instruct", revision="0979cbf", width="8192", layers=80, ffn="22,016", llama="65B"
        ),
        vision=VIT_H14,
        resampler=IDEFICS_RESAMPLER,
        decoder=Decoder(Stack(80, 8192, 22016, gated=True), 32002, 4, 1280, 64),
        published="80B",
    ),
    "HuggingFaceM4/idefics-9b-instruct": Architecture(
        name="IDEFICS-9B (LLaMA-7B + ViT-H/14)",
        source=_IDEFICS_SOURCE.format(
            repo="idefics-9b-instruct", revision="ceb649f", width="4096", layers=32, ffn="11,008", llama="7B"
        ),
        vision=VIT_H14,
        resampler=IDEFICS_RESAMPLER,
        decoder=Decoder(Stack(32, 4096, 11008, gated=True), 32002, 4, 1280, 64),
        published="9B",
    ),
    "openai/clip-vit-base-patch32": Architecture(
        name="CLIP ViT-B/32 (vision tower)",
        source="Radford et al. 2021 (ViT-B/32: 768 wide, 12 layers, patch 32 at 224 px, embedding 512); the "
        "checkpoint's config.json sets projection_dim 512 and leaves the vision tower at transformers' "
        "CLIPVisionConfig defaults, which are these numbers (MLP 3072)",
        vision=VIT_B32,
        published="88M (vision tower)",
    ),
    "vinid/plip": Architecture(
        name="PLIP (CLIP ViT-B/32, vision tower)",
        source="Huang et al. 2023 (Nat. Med.): CLIP ViT-B/32 fine-tuned on pathology image-text pairs from "
        "Twitter; the numbers of CLIP ViT-B/32",
        vision=VIT_B32,
        published="88M (vision tower)",
    ),
}


# ---------------------------------------------------------------------------------------------- reading configs


def load_config(paths: Sequence[str | Path], root: str | Path = ROOT) -> dict[str, Any]:
    """The configs merged as ``snakemake --configfile a --configfile b`` merges them (later over earlier), then
    ``extends`` resolved from the workflow root and the schema's defaults filled in."""
    merged: dict[str, Any] = {}
    for path in paths:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise config_mod.ConfigError(f"{path}: the top level must be a mapping of keys")
        merged = config_mod.merge(merged, data)
    config_mod.resolve_extends(merged, root)
    return config_mod.validate(merged)


def _local_dir(model: str, entry: dict[str, Any], root: Path) -> Path | None:
    checkpoint = Path(compute_model_config(model, entry)["checkpoint"])
    folder = checkpoint if checkpoint.is_absolute() else root / checkpoint
    return folder if (folder / "config.json").is_file() else None


@lru_cache(maxsize=None)
def _demo_build(name: str) -> Path:
    """A demo model built offline into a temporary folder (removed at exit), for its config.json."""
    from medprobe.demo.models import build

    folder = Path(tempfile.mkdtemp(prefix="medprobe-cost-"))
    atexit.register(shutil.rmtree, folder, True)
    return build(name, folder / name, seed=0)


def model_architecture(
    model: str, entry: dict[str, Any], root: Path = ROOT, *, build_demo: bool = True
) -> Architecture | str:
    """The model's architecture, or a sentence saying why it is unknown offline (``build_demo=False``: a demo
    model not built yet under ``root`` is unknown rather than built for the purpose)."""
    local = _local_dir(model, entry, root)
    where = f"config.json of {local.relative_to(root) if local and local.is_relative_to(root) else local}"
    if local is None and "demo_build" in entry and not build_demo:
        return f"demo model {entry['demo_build']} not built yet (rule demo_model)"
    if local is None and "demo_build" in entry:
        local = _demo_build(entry["demo_build"])
        where = f"config.json of the demo build {entry['demo_build']} (built offline for this table)"
    if local is not None:
        return architecture_from_config(local, entry["adapter"], where)
    known = ARCHITECTURES.get(entry["checkpoint"])
    if known is not None:
        return known
    return (
        f"{entry['checkpoint']}: no config.json offline (set `fetch: true` and run rule fetch_model, or point "
        "`checkpoint` at a local folder)"
    )


def architecture_from_config(folder: Path, adapter: str, where: str) -> Architecture | str:
    """An :class:`Architecture` from a checkpoint folder's config.json (transformers' AutoConfig fills the
    defaults), or a sentence saying why the adapter's architectures are not modelled."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder)).to_dict()
    tokenizer = str(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else None
    if adapter == "idefics":
        return _idefics_architecture(config, where, tokenizer)
    if adapter in ("clip", "hf_vision"):
        return _vision_architecture(config, folder, where)
    return f"adapter {adapter!r}: image tokens depend on the processor's tiling; not modelled"


def _idefics_architecture(config: dict[str, Any], where: str, tokenizer: str | None) -> Architecture:
    vision_config, perceiver = config["vision_config"], config["perceiver_config"]
    vision = Vision(
        Stack(vision_config["num_hidden_layers"], vision_config["embed_dim"], vision_config["intermediate_size"]),
        image_size=vision_config["image_size"],
        patch_size=vision_config["patch_size"],
        extra_tokens=1,
        channels=vision_config.get("num_channels", 3),
    )
    width = vision.stack.width
    resampler = None
    if config.get("use_resampler", perceiver.get("use_resampler", True)):
        inner = perceiver["resampler_n_heads"] * perceiver["resampler_head_dim"]
        resampler = Resampler(perceiver["resampler_n_latents"], perceiver["resampler_depth"], inner, width, 4 * width)
    decoder = Decoder(
        Stack(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"], gated=True),
        vocab=config["vocab_size"] + config.get("additional_vocab_size", 0),
        cross_interval=config["cross_layer_interval"],
        image_width=width,
        image_tokens=resampler.latents if resampler else vision.tokens,
    )
    return Architecture("IDEFICS", where, vision, resampler, decoder, tokenizer=tokenizer)


_NO_CLASS_TOKEN = ("siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model")


def _vision_architecture(config: dict[str, Any], folder: Path, where: str) -> Architecture:
    tower = config.get("vision_config") or config
    width = tower["hidden_size"]
    ffn = tower.get("intermediate_size") or int(tower.get("mlp_ratio", 4) * width)
    image_size = _processor_size(folder) or _side(tower["image_size"])
    model_type = tower.get("model_type", config.get("model_type", ""))
    extra = 0 if model_type in _NO_CLASS_TOKEN else 1 + int(tower.get("num_register_tokens", 0) or 0)
    projection = None
    if "vision_config" in config:  # a dual encoder: get_image_features is its image_embeds
        projection = config.get("projection_dim") or (width if model_type in _NO_CLASS_TOKEN else None)
    vision = Vision(
        Stack(tower["num_hidden_layers"], width, ffn),
        image_size=image_size,
        patch_size=_side(tower["patch_size"]),
        extra_tokens=extra,
        projection=projection,
        channels=tower.get("num_channels", 3),
    )
    return Architecture(config.get("model_type", "vision"), where, vision)


def _side(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _processor_size(folder: Path) -> int | None:
    """The side of the images the processor hands the model (its crop, else its resize), if it says so."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    processor = json.loads(path.read_text())
    for key, switch in (("crop_size", "do_center_crop"), ("size", "do_resize")):
        size = processor.get(key) if processor.get(switch, True) else None
        if isinstance(size, dict):
            size = size.get("height", size.get("shortest_edge"))
        if isinstance(size, int):
            return size
    return None


# ---------------------------------------------------------------------------------------------- tokens per image

_WORDS = re.compile(r"\w+|[^\w\s]")
# IDEFICS: <fake_token_around_image><image><fake_token_around_image>
IMAGE_PLACEHOLDER_TOKENS = 3


def text_tokens(prompt: str, prompt_format: str, tokenizer: str | None = None) -> tuple[int, str]:
    """Tokens of an IDEFICS prompt (docs/architecture.md, "The extraction prompt") and how they were counted:
    with the checkpoint's tokenizer.json, else one token per word or punctuation mark (LLaMA's tokenizer
    splits rare words into a few pieces: slightly more)."""
    if prompt_format == "question_answer":
        texts, specials = [f"Question: {prompt} Answer:"], 1 + IMAGE_PLACEHOLDER_TOKENS  # <s>, image
    else:
        texts, specials = ["User:", prompt, "\nAssistant:"], 2 + IMAGE_PLACEHOLDER_TOKENS  # <s>, image, <eou>
    if tokenizer is not None:
        from tokenizers import Tokenizer

        encoder = Tokenizer.from_file(tokenizer)
        return specials + sum(len(encoder.encode(text, add_special_tokens=False).ids) for text in texts), "tokenizer"
    return specials + sum(len(_WORDS.findall(text)) for text in texts), "words"


# ---------------------------------------------------------------------------------------------- images per task


@dataclasses.dataclass(frozen=True)
class Images:
    train: int
    val: int
    test: int
    classes: int  # outputs of a probe before the binary reduction: classes or findings
    source: str

    @property
    def total(self) -> int:
        return self.train + self.val + self.test


def task_images(config: dict[str, Any], task: str, results: Path | None) -> Images | str:
    """The task's images per split: the prepared manifest, else the paper's Table 1 or the demo's config."""
    entry = config["tasks"][task]
    if results is not None:
        counted = _manifest_images(entry, task, results)
        if counted is not None:
            return counted
    val_fraction = config["split"]["val_fraction"]
    if entry["dataset"] in PAPER_TABLE1:
        train, test = PAPER_TABLE1[entry["dataset"]]
        source = "paper Table 1; val = split.val_fraction of train"
    elif entry["dataset"] == "demo":
        per_patient = config.get("demo", {}).get("images_per_patient", 3)
        train, test = (entry["demo_patients"][part] * per_patient for part in ("train", "test"))
        source = "demo config: patients x images_per_patient; val = split.val_fraction of train"
    else:
        return f"no manifest under results/manifests/ and no published count for dataset {entry['dataset']!r}"
    classes = _paper_classes(entry)
    if isinstance(classes, str):
        return classes
    val = round(train * val_fraction)
    return Images(train - val, val, test, classes, source)


def _paper_classes(entry: dict[str, Any]) -> int | str:
    if entry["classes"] != "all":
        return len(entry["classes"])
    if entry["dataset"] in PAPER_FINDINGS:
        return PAPER_FINDINGS[entry["dataset"]]
    return f"classes: all for dataset {entry['dataset']!r}: the findings are known once its manifest is prepared"


def _manifest_images(entry: dict[str, Any], task: str, results: Path) -> Images | None:
    """Counts of a prepared manifest, when its sidecar says it was made from the task's dataset."""
    from medprobe.labels import load_manifest, task_targets

    manifest, sidecar = results / "manifests" / f"{task}.csv", results / "manifests" / f"{task}.json"
    if not manifest.is_file() or not sidecar.is_file():
        return None
    if json.loads(sidecar.read_text()).get("dataset") != entry["dataset"]:
        return None
    frame = load_manifest(manifest)
    _, classes, _ = task_targets(frame, entry, str(manifest))
    counts = frame["split"].value_counts()
    splits = (int(counts.get(split, 0)) for split in ("train", "val", "test"))
    return Images(*splits, classes=len(classes), source=f"manifest {manifest.name}")


# ---------------------------------------------------------------------------------------------- layers stored


def stored_layers(selection: Any, n_hidden: int) -> list[int]:
    """Hidden-state indices a layer selection stores, as extraction resolves it
    (:func:`medprobe.extract.plan.resolve_layers`: ``all``, ``every:<k>`` = 0, k, 2k, ... and the last, or a
    list of indices)."""
    from medprobe.extract.plan import resolve_layers

    return resolve_layers(selection, n_hidden)


def configured_layers(entry: dict[str, Any], extraction: dict[str, Any], n_hidden: int) -> list[int]:
    """The model's ``layers``, else ``extraction.layers`` (default all)."""
    return stored_layers(entry.get("layers", extraction.get("layers", "all")), n_hidden)


def headline_layer(entry: dict[str, Any], arch: Architecture) -> tuple[list[int], bool]:
    """The one layer a fixed ``layer`` names (hidden indices, whether image_embeds); the last hidden state when
    the layer is chosen on validation."""
    names = [f"hidden.{i}" for i in range(arch.hidden_states)]
    if arch.embedding:
        names.append(EMBEDDINGS_LAYER)
    layer = entry.get("layer", "validation")
    if layer == "validation":
        return [arch.hidden_states - 1], False
    name = resolve_layer(layer, names, "the cost model", arch.hidden_states)
    return ([], True) if name == EMBEDDINGS_LAYER else ([hidden_index(name)], False)


# ---------------------------------------------------------------------------------------------- costs


@dataclasses.dataclass(frozen=True)
class Layout:
    """What one model's activations files hold: hidden states stored, whether image_embeds, the dtype."""

    hidden: tuple[int, ...]
    embeddings: bool
    dtype: str

    def values_per_image(self, arch: Architecture) -> int:
        return len(self.hidden) * arch.width + ((arch.embedding or 0) if self.embeddings else 0)

    def deepest(self, arch: Architecture) -> int | None:
        """Decoder layers the forward runs: through the deepest stored hidden state (None: all of them)."""
        if arch.decoder is None or self.embeddings or not self.hidden:
            return None
        return max(self.hidden)

    def probed(self, arch: Architecture) -> list[int]:
        """Width of every layer a probe is fitted on."""
        return [arch.width] * len(self.hidden) + ([arch.embedding] if self.embeddings and arch.embedding else [])


def disk_bytes(images: int, layout: Layout, arch: Architecture) -> int:
    """images x (layers x width + embedding width) x bytes per value; int8 adds one float32 scale per layer and
    channel."""
    values = layout.values_per_image(arch)
    scales = 4 * values if layout.dtype == "int8" else 0
    return images * values * BYTES[layout.dtype] + scales


@dataclasses.dataclass(frozen=True)
class Work:
    """FLOPs, bytes read and roofline seconds of one piece of work."""

    flops: float = 0.0
    bytes_read: float = 0.0
    seconds: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.bytes_read + other.bytes_read, self.seconds + other.seconds)


def extraction_work(
    arch: Architecture, images: int, text: int, layout: Layout, batch_size: int, weight_bytes: float, hardware: Hardware
) -> Work:
    """Every image's forward (FLOPs per image x images) and the weights read once per batch."""
    deepest = layout.deepest(arch)
    flops = images * sum(arch.flops(text, deepest).values())
    bytes_read = math.ceil(images / batch_size) * arch.run_params(deepest) * weight_bytes
    return Work(flops, bytes_read, hardware.seconds(flops, bytes_read, "bfloat16"))


def probe_outputs(mode: str, kind: str, classes: int) -> int:
    """Output columns of a probe: the L-BFGS and SGD probes fit one column for a binary task, Adam two."""
    if kind == "binary":
        return 2 if mode == "adam" else 1
    return classes


@dataclasses.dataclass(frozen=True)
class ProbePlan:
    """The fits of one model x task, each as (rows, fits run in lockstep, rounds), on every probed layer,
    and the label-efficiency fits on the headline layer."""

    mode: str
    outputs: int
    layer_fits: tuple[tuple[int, int, int], ...]
    efficiency_fits: tuple[tuple[int, int, int], ...]
    dtype: str
    note: str
    batch_size: int | None = None  # mini-batch rows (Adam): each step also costs Hardware.step_seconds


def probe_plan(config: dict[str, Any], model: str, kind: str, images: Images) -> ProbePlan:
    """What the probe and efficiency jobs fit under the config's ``probe`` and ``efficiency`` sections."""
    probe, entry = config["probe"], config["models"][model]
    mode = entry.get("probe_mode", probe["mode"])
    fit_rows = images.train + images.val if mode != "regularised" or probe.get("refit", False) else images.train
    outputs = probe_outputs(mode, kind, images.classes)
    if mode == "regularised":
        grid = len(set(probe["C_grid"]))
        rounds = probe["max_iter"]
        fits = [(images.train, grid, rounds)]
        if probe.get("refine", True) and grid > 1:
            fits.append((images.train, REFINE_POINTS, rounds))
        if probe.get("refit", False):
            fits.append((fit_rows, 1, rounds))
        note = f"L-BFGS, {rounds} iterations at most (upper bound; fits stop at tol)"
        dtype, efficiency_rounds = probe.get("dtype", "float32"), rounds
    elif mode == "adam":
        epochs = probe["adam"]["epochs"]
        fits = [(fit_rows, 1, epochs)] + ([(images.train, 1, epochs)] if entry.get("layer") == "validation" else [])
        note, dtype, efficiency_rounds = (
            f"Adam, {epochs} epochs of {probe['adam']['batch_size']} rows",
            "float32",
            epochs,
        )
    else:
        epochs = probe["sgd"]["max_iter"]
        fits = [(fit_rows, 1, epochs)] + ([(images.train, 1, epochs)] if entry.get("layer") == "validation" else [])
        note, dtype, efficiency_rounds = (
            f"scikit-learn SGD on the CPU, {epochs} epochs at most (upper bound)",
            "cpu",
            epochs,
        )
    batch = probe["adam"]["batch_size"] if mode == "adam" else None
    efficiency = _efficiency_fits(config, fit_rows, efficiency_rounds)
    return ProbePlan(mode, outputs, tuple(fits), efficiency, dtype, note, batch)


def _efficiency_fits(config: dict[str, Any], fit_rows: int, rounds: int) -> tuple[tuple[int, int, int], ...]:
    """One fit per (fraction, seed) at the headline layer; the whole training set is fitted once."""
    efficiency = config["efficiency"]
    seeds = efficiency["seeds"] if isinstance(efficiency["seeds"], int) else len(efficiency["seeds"])
    fits = []
    for fraction in efficiency["fractions"]:
        rows = int(fraction * fit_rows)
        fits.append((rows, 1 if fraction >= 1 else seeds, rounds))
    return tuple(fits)


def probe_work(plan: ProbePlan, widths: Sequence[int], headline_width: int, hardware: Hardware) -> tuple[Work, Work]:
    """(probe job, efficiency job): per round every fit costs two passes over the features (the logits X W, then
    the gradient G^T X: 2 x 2 N D K FLOPs); fits run in lockstep share the passes (one read of X per pass)."""

    def work(fits: Sequence[tuple[int, int, int]], width: int) -> Work:
        total = Work()
        for rows, lockstep, rounds in fits:
            flops = rounds * lockstep * 2 * 2 * rows * width * plan.outputs
            bytes_read = rounds * 2 * rows * width * BYTES.get(plan.dtype, 4)
            seconds = 0.0 if plan.dtype == "cpu" else hardware.seconds(flops, bytes_read, plan.dtype)
            if plan.batch_size and plan.dtype != "cpu":
                seconds += lockstep * rounds * math.ceil(rows / plan.batch_size) * hardware.step_seconds
            total = total + Work(flops, bytes_read, seconds)
        return total

    layers = Work()
    for width in widths:
        layers = layers + work(plan.layer_fits, width)
    return layers, work(plan.efficiency_fits, headline_width)


# ---------------------------------------------------------------------------------------------- the study


@dataclasses.dataclass(frozen=True)
class Row:
    """One model x task."""

    model: str
    task: str
    images: Images
    text_tokens: int
    flops_per_image: dict[str, int]
    extraction: Work
    gpus: int
    probe: Work
    efficiency: Work
    plan: ProbePlan
    layout: Layout
    disk: int

    @property
    def held_hours(self) -> float:
        return self.extraction.seconds * self.gpus / 3600

    @property
    def probe_hours(self) -> float:
        return (self.probe.seconds + self.efficiency.seconds) / 3600


@dataclasses.dataclass
class Study:
    config_names: list[str]
    config: dict[str, Any]
    hardware: Hardware
    architectures: dict[str, Architecture | str]
    images: dict[str, Images | str]
    rows: list[Row]
    missing: list[str]  # model x task pairs that could not be costed, with the reason
    token_counts: dict[tuple[str, str], str]
    out: str | None = None  # where the Markdown goes, for the command in its header

    def total(self, attribute: str) -> float:
        return sum(getattr(row, attribute) for row in self.rows)


def study_cost(
    config: dict[str, Any],
    *,
    results: Path | None = ROOT / "results",
    hardware: Hardware = H200,
    root: Path = ROOT,
    config_names: Sequence[str] = (),
    layers: Any = None,
    dtype: str | None = None,
) -> Study:
    """The cost of every model x task of ``config``; ``layers`` / ``dtype`` override the configured layer
    selection and storage dtype (the "what if" rows; ``layers="one"``: each model's headline layer)."""
    architectures = {model: model_architecture(model, entry, root) for model, entry in config["models"].items()}
    images = {task: task_images(config, task, results) for task in config["tasks"]}
    study = Study(list(config_names), config, hardware, architectures, images, [], [], {})
    for model, task in config_mod.model_task_pairs(config):
        arch, counted = architectures[model], images[task]
        if isinstance(arch, str) or isinstance(counted, str):
            study.missing.append(f"{model} x {task}: {arch if isinstance(arch, str) else counted}")
            continue
        study.rows.append(_row(study, model, task, arch, counted, layers, dtype))
    return study


def _layout(config: dict[str, Any], model: str, arch: Architecture, layers: Any, dtype: str | None) -> Layout:
    entry, extraction = config["models"][model], config["extraction"]
    storage = dtype or extraction.get("dtype", "float16")
    if layers == "one":
        hidden, embeddings = headline_layer(entry, arch)
        return Layout(tuple(hidden), embeddings, storage)
    selected = (
        configured_layers(entry, extraction, arch.hidden_states)
        if layers is None
        else stored_layers(layers, arch.hidden_states)
    )
    return Layout(tuple(selected), arch.embedding is not None, storage)


def _row(
    study: Study, model: str, task: str, arch: Architecture, images: Images, layers: Any, dtype: str | None
) -> Row:
    config = study.config
    entry, task_entry = config["models"][model], config["tasks"][task]
    layout = _layout(config, model, arch, layers, dtype)
    text = 0
    if arch.decoder is not None:
        text, how = text_tokens(task_entry["prompt"], config["extraction"]["prompt_format"], arch.tokenizer)
        study.token_counts[(model, task)] = how
    batch = entry.get("batch_size", config["extraction"]["batch_size"])
    weight_bytes = WEIGHT_BYTES.get(
        entry.get("quantization", "none"), BYTES.get(entry.get("torch_dtype") or "bfloat16")
    )
    extraction = extraction_work(arch, images.total, text, layout, batch, weight_bytes, study.hardware)
    plan = probe_plan(config, model, task_entry["kind"], images)
    headline_width = arch.embedding if entry.get("layer") == EMBEDDINGS_LAYER and arch.embedding else arch.width
    probe, efficiency = probe_work(plan, layout.probed(arch), headline_width, study.hardware)
    return Row(
        model=model,
        task=task,
        images=images,
        text_tokens=text,
        flops_per_image=arch.flops(text, layout.deepest(arch)),
        extraction=extraction,
        gpus=max(1, int(entry.get("gpus", 1))),
        probe=probe,
        efficiency=efficiency,
        plan=plan,
        layout=layout,
        disk=disk_bytes(images.total, layout, arch),
    )


# ---------------------------------------------------------------------------------------------- Markdown


def _num(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, thousands separated."""
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}"


def _bytes(value: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{_num(value / size)} {unit}"
    return f"{int(value)} B"


def _count(value: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{_num(value / size)}{unit}"
    return str(int(value))


def _flops(value: float) -> str:
    for unit, size in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= size:
            return f"{_num(value / size)} {unit}"
    return f"{_num(value)} FLOP"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _label(config: dict[str, Any], model: str) -> str:
    return config["models"][model].get("label", model)


def render(study: Study, what_if: Sequence[tuple[str, str, Study]] = ()) -> str:
    """docs/cost.md for ``study``; ``what_if`` holds (layers, dtype, study) of the same config."""
    lines = _header(study)
    lines += _assumptions(study)
    lines += _architectures_section(study)
    lines += _images_section(study)
    lines += _extraction_section(study)
    lines += _probes_section(study)
    lines += _disk_section(study)
    if what_if:
        lines += _what_if_section(study, what_if)
    lines += _not_counted(study)
    return "\n".join(lines) + "\n"


def _command(study: Study) -> str:
    files = " ".join(f"--configfile {name}" for name in study.config_names)
    return f"python -m medprobe.cost {files}" + (f" --out {study.out}" if study.out else "")


def _totals(study: Study) -> tuple[float, float, float, float]:
    """(extraction GPU-hours held, probe GPU-hours, disk bytes, CPU probe FLOPs)."""
    cpu = sum(row.probe.flops + row.efficiency.flops for row in study.rows if row.plan.dtype == "cpu")
    return study.total("held_hours"), study.total("probe_hours"), study.total("disk"), cpu


def summary_sentence(study: Study) -> str:
    """One sentence with the whole study's totals (README.md quotes it)."""
    held, probes, disk, _ = _totals(study)
    return (
        f"about {_num(held + probes)} GPU-hours ({_num(held)} extraction, {_num(probes)} probes) on an "
        f"{study.hardware.name} at an assumed {study.hardware.utilisation:.0%} utilisation, and "
        f"{_bytes(disk)} of activations"
    )


def _header(study: Study) -> list[str]:
    names = " + ".join(f"`{name}`" for name in study.config_names)
    images = sum(images.total for images in study.images.values() if isinstance(images, Images))
    return [
        f"# Cost model: {names}",
        "",
        f"Generated by `{_command(study)}` (`medprobe/cost.py`), to be regenerated, not edited: "
        "`tests/test_cost.py` checks that `docs/cost.md` is the generator's output for `config/paper.yaml` with no "
        "data prepared (once manifests exist under `results/manifests/`, the image counts come from them).",
        "",
        f"**Whole study: {summary_sentence(study)}**, for {images:,} images, {len(study.rows)} model x task pairs.",
        "",
    ]


def _assumptions(study: Study) -> list[str]:
    hw, probe = study.hardware, study.config["probe"]
    gpus = probe.get("gpus", 0)
    return [
        "## Assumptions",
        "",
        *_table(
            ["quantity", "value", "source"],
            [
                ["GPU", hw.name, HARDWARE_SOURCE],
                ["peak, dense bf16/fp16", f"{_num(hw.bf16_tflops)} TFLOP/s", HARDWARE_SOURCE],
                [
                    "peak, fp32 / fp64 (probes)",
                    f"{_num(hw.fp32_tflops)} / {_num(hw.fp64_tflops)} TFLOP/s",
                    HARDWARE_SOURCE,
                ],
                ["memory bandwidth", f"{_num(hw.bandwidth_tbs)} TB/s", HARDWARE_SOURCE],
                ["utilisation of the roofline", f"{hw.utilisation:.0%}", hw.utilisation_source],
                ["fixed cost per Adam step", f"{_num(hw.step_seconds * 1e3)} ms", hw.step_source],
            ],
        ),
        "",
        "- Time of a job = max(FLOPs / peak, bytes read / bandwidth) / utilisation (a roofline). Extraction runs "
        "at the bf16 peak whatever the weights' storage (the IDEFICS models load in 8 bit: bitsandbytes' LLM.int8 "
        "matmuls are usually slower than bf16, so measure before you book); the probes at the peak of their "
        "feature dtype (`probe.dtype`; Adam: float32).",
        "- FLOPs per image = 2 x matrix parameters x tokens through them, per component, plus the attention scores "
        "(4 x tokens x context x width per layer); embeddings, norms and the language-model head (never run: "
        "the forward stops after the deepest stored layer) are left out. IDEFICS's decoder sees the text "
        "tokens only (the image enters through the cross-attention blocks as the resampler's latents).",
        "- GPU-hours *held* = hours x the model's `gpus`: a model spread over several GPUs with `device_map` "
        "runs its layers one GPU after the other.",
        "- Probes: per iteration two passes over the features (the logits X W and the gradient G^T X, "
        "2 x 2 N D K FLOPs; the C grid's fits run in lockstep and share each read of X). L-BFGS and SGD stop "
        "at `tol`, so their counts are upper bounds; Adam's epochs are exact, and each of its mini-batch steps "
        "adds the fixed cost above. "
        + (
            f"With `probe.gpus: {gpus}` the probes of this config run on the CPU; the GPU-hours say what "
            "`probe.gpus: 1` would take."
            if not gpus
            else f"`probe.gpus: {gpus}`: the regularised and Adam probes run on GPUs, the SGD probe on the CPU."
        ),
        "",
    ]


def _architectures_section(study: Study) -> list[str]:
    rows, sources = [], []
    for model, arch in study.architectures.items():
        label = _label(study.config, model)
        if isinstance(arch, str):
            rows.append([label, "—", "—", "—", "—", "—"])
            sources.append(f"- {label}: not modelled: {arch}")
            continue
        stack = arch.decoder.stack if arch.decoder else None
        decoder = (
            f"{stack.layers} x {stack.width} (MLP {stack.ffn:,}), cross-attention every {arch.decoder.cross_interval}"
            if arch.decoder and stack
            else "—"
        )
        vision = arch.vision
        tower = (
            f"{vision.stack.layers} x {vision.stack.width} (MLP {vision.stack.ffn:,}), patch {vision.patch_size} "
            f"at {vision.image_size} px: {vision.tokens} tokens"
        )
        resampler = f"{arch.resampler.latents} latents, depth {arch.resampler.depth}" if arch.resampler else "—"
        stored = f"{arch.hidden_states} x {arch.width}" + (f" + {arch.embedding}" if arch.embedding else "")
        params = _count(arch.params()) + (f" ({arch.published})" if arch.published else "")
        rows.append([label, decoder, tower, resampler, stored, params])
        sources.append(f"- {label}: {arch.source}")
    return [
        "## Architectures",
        "",
        "Stored: `hidden_states` entries x width (+ the projected `image_embeds`). Parameters: computed from "
        "these numbers (the published size in brackets).",
        "",
        *_table(["model", "decoder", "vision tower", "resampler", "stored", "parameters"], rows),
        "",
        "Sources:",
        "",
        *sources,
        "",
    ]


def _images_section(study: Study) -> list[str]:
    rows = []
    for task, images in study.images.items():
        dataset = study.config["tasks"][task]["dataset"]
        if isinstance(images, str):
            rows.append([task, dataset, "—", "—", "—", "—", "—", images])
        else:
            counts = [f"{value:,}" for value in (images.train, images.val, images.test, images.total)]
            rows.append([task, dataset, *counts, images.classes, images.source])
    return [
        "## Images",
        "",
        *_table(["task", "dataset", "train", "val", "test", "total", "classes", "source"], rows),
        "",
    ]


def _extraction_section(study: Study) -> list[str]:
    rows = []
    for row in study.rows:
        per_image = sum(row.flops_per_image.values())
        parts = ", ".join(f"{name} {_flops(value)}" for name, value in row.flops_per_image.items())
        tokens = f"{row.text_tokens}" + (" (words)" if study.token_counts.get((row.model, row.task)) == "words" else "")
        rows.append(
            [
                _label(study.config, row.model),
                row.task,
                f"{row.images.total:,}",
                tokens if row.text_tokens else "—",
                f"{_flops(per_image)} ({parts})",
                _flops(row.extraction.flops),
                _num(row.extraction.seconds / 3600),
                _num(row.held_hours),
            ]
        )
    held = study.total("held_hours")
    rows.append(
        ["**total**", "", "", "", "", _flops(sum(r.extraction.flops for r in study.rows)), "", f"**{_num(held)}**"]
    )
    return [
        "## Extraction",
        "",
        "Text tokens: the prompt in `extraction.prompt_format` with its BOS and three image placeholder tokens, "
        "counted with the checkpoint's tokenizer, or, marked (words), one token per word or punctuation mark when "
        "the tokenizer is not available offline (LLaMA's splits rare words such as *histological* into two or "
        "three pieces, so the decoder's FLOPs are a few per cent low).",
        "",
        *_table(
            ["model", "task", "images", "text tokens", "FLOPs per image", "FLOPs", "GPU-hours", "GPU-hours held"],
            rows,
        ),
        "",
    ]


def _probes_section(study: Study) -> list[str]:
    rows = []
    for row in study.rows:
        widths = row.layout.probed(study.architectures[row.model])  # type: ignore[union-attr]
        hours = "CPU" if row.plan.dtype == "cpu" else _num(row.probe_hours)
        rows.append(
            [
                _label(study.config, row.model),
                row.task,
                row.plan.note,
                f"{len(widths)} x {max(widths) if widths else 0}",
                row.plan.outputs,
                _flops(row.probe.flops),
                _flops(row.efficiency.flops),
                hours,
            ]
        )
    gpu = study.total("probe_hours")
    rows.append(["**total**", "", "", "", "", "", "", f"**{_num(gpu)}**"])
    return [
        "## Probes",
        "",
        "Per model x task: every stored layer's probe (its fits: "
        + _fits_text(study.config)
        + ") and the label-efficiency refits at the headline layer (`efficiency.fractions` x seeds; the full "
        "training set once).",
        "",
        *_table(
            ["model", "task", "probe", "layers x width", "outputs", "FLOPs, layers", "FLOPs, efficiency", "GPU-hours"],
            rows,
        ),
        "",
    ]


def _fits_text(config: dict[str, Any]) -> str:
    probe = config["probe"]
    grid = len(set(probe["C_grid"]))
    return (
        f"regularised: {grid} C values of `probe.C_grid` in lockstep"
        + (f", then {REFINE_POINTS} refined values" if probe.get("refine", True) and grid > 1 else "")
        + (", then a refit on train + val" if probe.get("refit", False) else "")
        + "; adam and sgd: one fit on train + val, and one on train scored on val where the layer is chosen on "
        "validation"
    )


def _disk_section(study: Study) -> list[str]:
    rows = []
    for row in study.rows:
        arch = study.architectures[row.model]
        assert not isinstance(arch, str)
        stored = f"{len(row.layout.hidden)} x {arch.width}" + (
            f" + {arch.embedding}" if row.layout.embeddings and arch.embedding else ""
        )
        rows.append(
            [
                _label(study.config, row.model),
                row.task,
                f"{row.images.total:,}",
                stored,
                row.layout.dtype,
                _bytes(row.disk),
            ]
        )
    rows.append(["**total**", "", "", "", "", f"**{_bytes(study.total('disk'))}**"])
    return [
        "## Disk",
        "",
        "`results/activations/{model}/{task}.h5`: images x (stored layers x width + embedding width) x bytes per "
        "value (uncompressed; ids and HDF5 metadata add kilobytes). Sharded extraction holds the shards and the "
        "merged file at once until the shards are removed.",
        "",
        *_table(["model", "task", "images", "stored per image", "dtype", "disk"], rows),
        "",
    ]


def _what_if_section(study: Study, what_if: Sequence[tuple[str, str, Study]]) -> list[str]:
    held, probes, disk, _ = _totals(study)
    rows = []
    for layers, dtype, other in what_if:
        o_held, o_probes, o_disk, _ = _totals(other)
        rows.append(
            [
                layers,
                dtype,
                _bytes(o_disk),
                _saving(o_disk, disk),
                _num(o_held),
                _num(o_probes),
            ]
        )
    configured = study.config["extraction"].get("dtype", "float16")
    return [
        "## What if",
        "",
        f"The whole study under other storage dtypes and layer selections (configured: "
        f"`extraction.dtype: {configured}`, the layers of each model entry or `extraction.layers`; "
        f"{_bytes(disk)}, {_num(held)} + {_num(probes)} GPU-hours). `every:<k>` stores hidden states 0, k, 2k, ... "
        "and the last (and `image_embeds`); *one* stores the headline layer where the model entry fixes it (`layer`), else the "
        f"last hidden state ({_one_layer_text(study)}), and a decoder's forward stops at that layer. int8 stores "
        "one byte per value and one float32 scale per layer and channel.",
        "",
        *_table(
            ["layers", "storage", "disk", "against configured", "extraction GPU-hours held", "probe GPU-hours"], rows
        ),
        "",
    ]


def _one_layer_text(study: Study) -> str:
    choices = []
    for model, arch in study.architectures.items():
        if isinstance(arch, str):
            continue
        entry = study.config["models"][model]
        hidden, embeddings = headline_layer(entry, arch)
        name = EMBEDDINGS_LAYER if embeddings else f"hidden.{hidden[0]}"
        given = f" = `{entry['layer']}`" if entry.get("layer", "validation") not in ("validation", name) else ""
        choices.append(f"{_label(study.config, model)}: `{name}`{given}")
    return "; ".join(choices)


def _saving(value: float, reference: float) -> str:
    if not reference or value == reference:
        return "—"
    share = 1 - value / reference
    return f"saves {share:.1%}" if share > 0 else f"costs {-share:.0%} more"


def _not_counted(study: Study) -> list[str]:
    _, _, _, cpu = _totals(study)
    lines = ["## Not counted", ""]
    if study.missing:
        lines += [f"- {line}" for line in study.missing]
    if cpu:
        lines.append(
            f"- The SGD probes (scikit-learn, CPU): {_flops(cpu)} at most (their epochs' upper bound, "
            "`probe.sgd.max_iter`; they stop at scikit-learn's `tol` long before)."
        )
    lines += [
        "- Downloads, `prepare` (image decoding and resizing), the KNEEL landmarks of T8, the bootstrap and the "
        "figures: CPU work, measured in docs/benchmarks.md.",
        "- NEJM answering (`nejm.models`): generation, not a single forward.",
    ]
    return lines


# ---------------------------------------------------------------------------------------------- entry point


def what_if_studies(
    config: dict[str, Any], results: Path | None, hardware: Hardware, root: Path
) -> list[tuple[str, str, Study]]:
    studies = []
    for dtype in WHAT_IF_DTYPES:
        for name, layers in WHAT_IF_LAYERS:
            studies.append(
                (
                    name,
                    dtype,
                    study_cost(config, results=results, hardware=hardware, root=root, layers=layers, dtype=dtype),
                )
            )
    return studies


def generate(
    configfiles: Sequence[str | Path],
    *,
    results: Path | None = ROOT / "results",
    hardware: Hardware = H200,
    root: Path = ROOT,
    out: str | None = None,
) -> str:
    """The Markdown of the cost model of ``configfiles`` (docs/cost.md for config/paper.yaml); ``out`` is only
    named in the command its header gives."""
    config = load_config(configfiles, root)
    names = [_display(path, root) for path in configfiles]
    study = study_cost(config, results=results, hardware=hardware, root=root, config_names=names)
    study.out = out
    return render(study, what_if_studies(config, results, hardware, root))


def _display(path: str | Path, root: Path) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(path)


def planned_activations(config: dict[str, Any], workdir: Path) -> str:
    """What a dry run prints: the projected size of every activations file of ``config`` in ``workdir`` and their
    total, from the architecture (a checkpoint folder's config.json, a demo model once rule demo_model has built
    it, or the paper models' table) and the images (the prepared manifest, else the paper's or the demo's
    counts); a file whose size is not known offline says why."""
    lines, total = [], 0
    for model, task in config_mod.model_task_pairs(config):
        path = f"results/activations/{model}/{task}.h5"
        try:
            arch = model_architecture(model, config["models"][model], workdir, build_demo=False)
            images = task_images(config, task, workdir / "results")
        except (OSError, ValueError) as error:  # an unreadable manifest or config.json: the plan still prints
            lines.append(f"  {path}: unknown: {error}")
            continue
        if isinstance(arch, str) or isinstance(images, str):
            lines.append(f"  {path}: unknown: {arch if isinstance(arch, str) else images}")
            continue
        layout = _layout(config, model, arch, None, None)
        size = disk_bytes(images.total, layout, arch)
        total += size
        embeds = f" + image_embeds {arch.embedding}" if layout.embeddings and arch.embedding else ""
        lines.append(
            f"  {path}: {_bytes(size)} ({images.total:,} images x {len(layout.hidden)} layers x {arch.width}"
            f"{embeds}, {layout.dtype})"
        )
    head = f"projected activations files: {_bytes(total)} in all (known sizes; docs/cost.md explains the model)"
    return "\n".join([head, *lines])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", action="append", required=True, help="config file (repeat to lay over)")
    parser.add_argument("--out", help="write the Markdown here (default: standard output)")
    parser.add_argument(
        "--results", default=str(ROOT / "results"), help="results folder whose manifests give the image counts"
    )
    parser.add_argument("--utilisation", type=float, default=H200.utilisation, help="share of the roofline reached")
    args = parser.parse_args(argv)
    hardware = H200
    if args.utilisation != H200.utilisation:
        hardware = dataclasses.replace(H200, utilisation=args.utilisation, utilisation_source="given (--utilisation)")
    text = generate(args.configfile, results=Path(args.results), hardware=hardware, out=args.out)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

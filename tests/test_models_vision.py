"""The generic transformers vision-encoder adapter ``hf_vision`` (medprobe.models.vision).

Tiny random-weight SigLIP, SigLIP2, DINOv2 (with and without register tokens), ViT and CLIP builds, made offline
from their config classes and saved with ``save_pretrained``; the stored vectors are checked against
transformers' own ``hidden_states``, pooled here by hand.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from medprobe.extract import extract_activations
from medprobe.gpu_job import GpuJob
from medprobe.models import load_adapter
from medprobe.models.vision import VisionAdapter
from medprobe.settings import ExtractionSettings

torch.set_num_threads(1)

SIZE, PATCH, LAYERS, WIDTH = 32, 8, 3, 32
N_PATCHES = (SIZE // PATCH) ** 2
VISION = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=37, image_size=SIZE)
TEXT = dict(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99)
# Tokens before the patches: the class token and any register tokens.
PREFIX = {"siglip": 0, "siglip2": 0, "dinov2": 1, "dinov2_registers": 3, "vit": 1, "clip": 1}
FAMILIES = tuple(PREFIX)


def _save(name: str, directory: Path) -> Path:
    import transformers
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    square = {"height": SIZE, "width": SIZE}
    if name == "siglip":
        config = transformers.SiglipConfig(text_config=TEXT, vision_config=dict(VISION, patch_size=PATCH))
        model, processor = transformers.SiglipModel(config), SiglipImageProcessorPil(size=square)
    elif name == "siglip2":  # variable resolution: up to N_PATCHES patches, the rest padding
        vision = {key: value for key, value in VISION.items() if key != "image_size"}
        config = transformers.Siglip2Config(
            text_config=TEXT, vision_config=dict(vision, patch_size=PATCH, num_patches=N_PATCHES)
        )
        model = transformers.Siglip2Model(config)
        processor = Siglip2ImageProcessorPil(patch_size=PATCH, max_num_patches=N_PATCHES)
    elif name == "clip":
        config = transformers.CLIPConfig(
            text_config=TEXT, vision_config=dict(VISION, patch_size=PATCH), projection_dim=24
        )
        model = transformers.CLIPModel(config)
        processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size=square)
    elif name == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(**VISION, patch_size=PATCH))
        processor = ViTImageProcessorPil(size=square)
    else:
        registers = PREFIX[name] - 1
        if registers:
            config = transformers.Dinov2WithRegistersConfig(**VISION, patch_size=PATCH, num_register_tokens=registers)
            model = transformers.Dinov2WithRegistersModel(config)
        else:
            model = transformers.Dinov2Model(transformers.Dinov2Config(**VISION, patch_size=PATCH))
        processor = BitImageProcessorPil(size={"shortest_edge": SIZE + 8}, crop_size=square)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_vision")
    torch.manual_seed(0)
    return {name: _save(name, root / name) for name in FAMILIES}


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        # Different aspect ratios, so that SigLIP2 pads some images with empty patches.
        image = Image.fromarray(rng.integers(0, 256, (30 + 20 * i, 60, 3), dtype=np.uint8))
        ImageDraw.Draw(image).ellipse((i * 7, i * 5, i * 7 + 20, i * 5 + 15), fill=(250, 240, 230))
        images.append(image)
    return images


def reference(directory: Path, images: list[Image.Image]) -> tuple:
    """transformers' own hidden states and (where the model has one) projected image embedding.

    The third value is SigLIP2's ``pixel_attention_mask`` (its real patches; the rest is padding), else None.
    """
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(directory).eval()
    inputs = AutoImageProcessor.from_pretrained(directory)(images=images, return_tensors="pt")
    with torch.no_grad():
        if hasattr(model, "get_image_features"):
            outputs = model.get_image_features(**inputs, output_hidden_states=True, return_dict=True)
            return outputs.hidden_states, outputs.pooler_output, inputs.get("pixel_attention_mask")
        return model(**inputs, output_hidden_states=True, return_dict=True).hidden_states, None, None


def adapter_for(checkpoints, name: str, pooling: str | None = None) -> VisionAdapter:
    cfg = {"adapter": "hf_vision", "checkpoint": str(checkpoints[name])}
    if pooling is not None:
        cfg["pooling"] = pooling
    adapter = load_adapter(cfg, device="cpu")
    assert isinstance(adapter, VisionAdapter)
    return adapter


def poolings(name: str) -> list[str]:
    return ["mean_patch"] if PREFIX[name] == 0 else ["cls", "mean_patch"]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_layer_equals_transformers_hidden_states_pooled_by_hand(checkpoints, name):
    images = make_images(3)
    hidden_states, expected_embeddings, mask = reference(checkpoints[name], images)
    if name == "siglip2":
        assert mask is not None and 0 < mask.sum(dim=1).min() < N_PATCHES  # some padding to leave out
    assert len(hidden_states) == LAYERS + 1 and hidden_states[0].shape[1] == PREFIX[name] + N_PATCHES
    for pooling in poolings(name):
        adapter = adapter_for(checkpoints, name, pooling)
        pooled, embeddings = adapter.forward(adapter.preprocess(images, "ignored prompt"))
        assert pooled.shape == (3, LAYERS + 1, WIDTH) and adapter.pooling == pooling
        for layer, state in enumerate(hidden_states):
            if pooling == "cls":
                by_hand = state[:, 0]
            elif mask is not None:
                weights = mask.to(state.dtype)[:, :, None]
                by_hand = (state * weights).sum(dim=1) / weights.sum(dim=1)
            else:
                by_hand = state[:, PREFIX[name] :].mean(dim=1)
            torch.testing.assert_close(pooled[:, layer], by_hand, rtol=1e-5, atol=1e-5)
        if expected_embeddings is None:
            assert embeddings is None and adapter.embedding_dim is None
        else:
            assert embeddings.shape == (3, adapter.embedding_dim)
            torch.testing.assert_close(embeddings, expected_embeddings, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["siglip", "siglip2", "dinov2_registers", "vit"])
def test_batch_size_does_not_change_the_result(checkpoints, name):
    images = make_images(3, seed=1)
    for pooling in poolings(name):
        adapter = adapter_for(checkpoints, name, pooling)
        batched, batched_embeddings = adapter.forward(adapter.preprocess(images))
        for row, image in enumerate(images):
            single, single_embeddings = adapter.forward(adapter.preprocess([image]))
            torch.testing.assert_close(batched[row], single[0], rtol=1e-5, atol=1e-5)
            if batched_embeddings is not None:
                torch.testing.assert_close(batched_embeddings[row], single_embeddings[0], rtol=1e-5, atol=1e-5)
        # A subset of layers, out of order, is the same columns.
        subset, _ = adapter.forward(adapter.preprocess(images), layers=[3, 0])
        torch.testing.assert_close(subset, batched[:, [3, 0]])


def test_description_and_default_poolings(checkpoints):
    siglip, vit, clip = (adapter_for(checkpoints, name) for name in ("siglip", "vit", "clip"))
    assert (siglip.pooling, vit.pooling, clip.pooling) == ("mean_patch", "cls", "cls")
    assert siglip.layer_names == [f"hidden.{i}" for i in range(LAYERS + 1)] and siglip.hidden_dim == WIDTH
    assert (siglip.embedding_dim, vit.embedding_dim, clip.embedding_dim) == (WIDTH, None, 24)
    assert siglip.prompt_formats == () and siglip.prompt_text("What is this?", "question_answer") == ""
    for prompt_format in ("chat", "question_answer"):
        siglip.check_prompt_format(prompt_format)
    assert "pooling='mean_patch'" in repr(siglip)


def test_cls_is_refused_for_siglip_naming_the_config_key(checkpoints):
    with pytest.raises(ValueError, match=r"models\.<M>\.pooling.*'cls'.*SiglipModel.*no class token.*mean_patch"):
        adapter_for(checkpoints, "siglip", "cls")


@pytest.mark.parametrize("pooling", ["last", "mean_image", "mean"])
def test_language_model_poolings_are_refused(checkpoints, pooling):
    with pytest.raises(ValueError, match=rf"pooling.*'{pooling}'.*hf_vision.*cls, mean_patch"):
        adapter_for(checkpoints, "vit", pooling)


def write_manifest(root: Path, images: list[Image.Image]) -> Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for i, image in enumerate(images):
        image.save(root / "images" / f"img_{i}.png")
        rows.append(
            {
                "image_id": f"img_{i}",
                "path": f"images/img_{i}.png",
                "split": "train",
                "patient_id": f"p{i}",
                "label": str(i % 2),
                "labels": "",
                "source": "demo",
                "group": "",
            }
        )
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


SETTINGS = ExtractionSettings(
    batch_size=2,
    num_workers=0,
    dtype="float32",
    prefetch_factor=2,
    shards=1,
    compression="none",
    compression_level=4,
    prompt_format="chat",
)


@pytest.mark.parametrize(("name", "pooling"), [("siglip", "mean_patch"), ("dinov2_registers", "cls")])
def test_extract_activations_stores_the_pooled_layers_and_embeddings(checkpoints, tmp_path, name, pooling):
    images = make_images(3, seed=2)
    manifest = write_manifest(tmp_path, images)
    cfg = {"adapter": "hf_vision", "checkpoint": str(checkpoints[name]), "pooling": pooling}
    out = extract_activations(
        manifest,
        tmp_path / "act.h5",
        settings=dataclasses.replace(SETTINGS),
        model_name=name,
        model=cfg,
        prompt="What can you see on this image?",
        job=GpuJob.on("cpu"),
        root=tmp_path,
        progress=False,
    )
    with h5py.File(out, "r") as handle:
        attrs = dict(handle.attrs)
        stored = handle["activations"][()]
        stored_embeddings = handle["embeddings"][()] if "embeddings" in handle else None
    assert attrs["pooling"] == pooling and attrs["prompt"] == ""
    assert list(attrs["layer_names"]) == [f"hidden.{i}" for i in range(LAYERS + 1)]
    adapter = load_adapter(cfg, device="cpu")
    with_images = [Image.open(tmp_path / "images" / f"img_{i}.png").convert("RGB") for i in range(3)]
    expected, embeddings = adapter.forward(adapter.preprocess(with_images))
    np.testing.assert_allclose(stored, expected.numpy(), rtol=1e-5, atol=1e-5)
    if name == "siglip":
        np.testing.assert_allclose(stored_embeddings, embeddings.numpy(), rtol=1e-5, atol=1e-5)
    else:
        assert stored_embeddings is None and embeddings is None

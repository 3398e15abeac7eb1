"""The timm and open_clip image-encoder adapters (medprobe.models.timm_encoder, medprobe.models.open_clip_encoder).

timm and open_clip need torchvision, which the pinned environment lacks: the tests that build models skip
there (``pytest.importorskip``); the checkpoint mapping, the option checks and the ImportError of a missing
package are checked everywhere.  Tiny random-weight models are built offline and saved as the hub repos
are laid out (timm: ``save_for_hf``'s ``config.json`` + ``model.safetensors``; open_clip:
``open_clip_config.json`` + ``open_clip_model.safetensors``); the stored vectors are checked against the
in-memory models' own forward passes, pooled here by hand.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from medprobe.extract import extract_activations
from medprobe.gpu_job import GpuJob
from medprobe.models import load_adapter
from medprobe.models.open_clip_encoder import OpenClipAdapter, open_clip_directory
from medprobe.models.timm_encoder import TimmAdapter, timm_model_name
from medprobe.settings import ExtractionSettings

torch.set_num_threads(1)

WIDTH, EMBED = 32, 24
# timm families: create_model arguments, and the tokens before the patches.
TIMM = {
    # ViT with a class token, pooled output = the class token (UNI, Phikon-v2 style).
    "vit": dict(img_size=32, patch_size=8, depth=3, embed_dim=WIDTH, num_heads=2, num_classes=0),
    # Class token + 2 registers (Virchow2, H-optimus style), with a classifier head that the embedding skips.
    "vit_registers": dict(
        img_size=32, patch_size=8, depth=3, embed_dim=WIDTH, num_heads=2, reg_tokens=2, num_classes=5
    ),
    # No class token, attention-pool head (SigLIP style).
    "vit_no_class": dict(
        img_size=32,
        patch_size=8,
        depth=3,
        embed_dim=WIDTH,
        num_heads=2,
        class_token=False,
        global_pool="map",
        num_classes=0,
    ),
    # Virchow2 style: class token + 4 registers, LayerScale, a SwiGLU MLP with SiLU that config.json does not name,
    # no global pool (the final normed tokens are the output).
    "vit_swiglu": dict(
        global_pool="",
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=WIDTH,
        num_heads=2,
        reg_tokens=4,
        num_classes=0,
        mlp_ratio=2,
        init_values=1e-5,
        act_layer="silu",
    ),
    # Eva (rotary position embeddings, mean-pooled output).
    "eva": dict(img_size=28, patch_size=7, depth=2, embed_dim=WIDTH, num_heads=2, num_classes=0),
}
ARCHITECTURE = {"eva": "eva02_tiny_patch14_224"}
PREFIX = {"vit": 1, "vit_registers": 3, "vit_no_class": 0, "vit_swiglu": 5, "eva": 1}
# What the config's model_args give: arguments the saved config.json leaves out (as the hub's of Virchow, UNI).
MODEL_ARGS = {"vit_swiglu": {"mlp_layer": "SwiGLUPacked", "act_layer": "silu", "init_values": 1e-5}}
# open_clip families: its own VisionTransformer (QuiltNet, OpenAI/LAION ViTs) and a timm trunk (BiomedCLIP).
TEXT = {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}
OPEN_CLIP = {
    "vit": {
        "embed_dim": EMBED,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": WIDTH, "patch_size": 8, "head_width": 16},
        "text_cfg": TEXT,
    },
    "timm_trunk": {
        "embed_dim": EMBED,
        "vision_cfg": {
            "timm_model_name": "test_vit",  # timm's 160 px, 6-block test ViT; open_clip builds it at its own size
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 160,
        },
        "text_cfg": TEXT,
    },
}
OPEN_CLIP_LAYERS = {"vit": 3, "timm_trunk": 6}
MEAN, STD = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)


def need(module: str):
    return pytest.importorskip(module, reason=f"{module} (and torchvision) not importable", exc_type=ImportError)


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 256, (30 + 20 * i, 60, 3), dtype=np.uint8))
        ImageDraw.Draw(image).ellipse((i * 7, i * 5, i * 7 + 20, i * 5 + 15), fill=(250, 240, 230))
        images.append(image)
    return images


def write_manifest(root: Path, images: list[Image.Image]) -> Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for i, image in enumerate(images):
        image.save(root / "images" / f"img_{i}.png")
        rows.append(
            {"image_id": f"img_{i}", "path": f"images/img_{i}.png", "split": "train", "patient_id": f"p{i}"}
            | {"label": str(i % 2), "labels": "", "source": "demo", "group": ""}
        )
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


# ---------------------------------------------------------------------------------------------- timm
@pytest.fixture(scope="module")
def timm_models(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Each family saved as a timm hub repo (with mean/std/crop of our own in its pretrained_cfg) and in memory."""
    timm = need("timm")
    from timm.layers import SwiGLUPacked
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("tiny_timm")
    torch.manual_seed(0)
    built = {}
    for name, kwargs in TIMM.items():
        extra = {"mlp_layer": SwiGLUPacked} if name == "vit_swiglu" else {}
        model = timm.create_model(ARCHITECTURE.get(name, "vit_tiny_patch16_224"), pretrained=False, **kwargs, **extra)
        model.eval()
        for key in MODEL_ARGS.get(name, {}):
            del model._model_args[key]  # left out of config.json
        save_for_hf(model, root / name, safe_serialization=True)
        config = json.loads((root / name / "config.json").read_text())
        config["pretrained_cfg"].update(mean=MEAN, std=STD, crop_pct=0.8, interpolation="bilinear")
        (root / name / "config.json").write_text(json.dumps(config))
        built[name] = (root / name, model)
    return built


def timm_adapter(timm_models, name: str, pooling: str | None = None) -> TimmAdapter:
    cfg = {"adapter": "timm", "checkpoint": str(timm_models[name][0])}
    if name in MODEL_ARGS:
        cfg["model_args"] = MODEL_ARGS[name]
    if pooling is not None:
        cfg["pooling"] = pooling
    adapter = load_adapter(cfg, device="cpu")
    assert isinstance(adapter, TimmAdapter)
    return adapter


def timm_pixels(directory: Path, images: list[Image.Image]) -> torch.Tensor:
    """The evaluation transform of the saved pretrained_cfg, written out by hand."""
    from timm.data import create_transform

    size = tuple(json.loads((directory / "config.json").read_text())["pretrained_cfg"]["input_size"])
    assert size[1:] == (TIMM[directory.name]["img_size"],) * 2  # the model's size, not its architecture's 224
    transform = create_transform(size, crop_pct=0.8, interpolation="bilinear", mean=MEAN, std=STD)
    return torch.stack([transform(image.convert("RGB")) for image in images])


def timm_reference(model: torch.nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Every hidden state: the embedding output fed to block 0, then timm's own forward_intermediates."""
    with torch.no_grad():
        embedded = model._pos_embed(model.patch_embed(pixels))
        if isinstance(embedded, tuple):  # Eva: (tokens, rotary embedding)
            embedded = embedded[0]
        states = [model.norm_pre(embedded)]
        blocks = model.forward_intermediates(
            pixels, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True, norm=False
        )
    for block in blocks:
        states.append(torch.cat([block[1], block[0]], dim=1) if isinstance(block, tuple) else block)
    return states


def by_hand(state: torch.Tensor, pooling: str, prefix: int) -> torch.Tensor:
    return state[:, 0] if pooling == "cls" else state[:, prefix:].mean(dim=1)


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_every_layer_equals_the_models_own_forward_pooled_by_hand(timm_models, name):
    directory, model = timm_models[name]
    images = make_images(3)
    pixels = timm_pixels(directory, images)
    states = timm_reference(model, pixels)
    n_patches = (TIMM[name]["img_size"] // TIMM[name]["patch_size"]) ** 2
    assert len(states) == TIMM[name]["depth"] + 1 and states[0].shape[1] == PREFIX[name] + n_patches
    with torch.no_grad():  # the pooled, normed output without the classifier
        final = model.forward_features(pixels)
        expected_embeddings = model.forward_head(final, pre_logits=True)
        if TIMM[name]["num_classes"] == 0:
            torch.testing.assert_close(expected_embeddings, model(pixels))
    for pooling in ["mean_patch"] if PREFIX[name] == 0 else ["cls", "mean_patch"]:
        expected = expected_embeddings
        if TIMM[name].get("global_pool") == "":  # no pooled output: the final normed tokens, pooled as the layers
            assert expected_embeddings.shape == final.shape == states[-1].shape
            expected = by_hand(final, pooling, PREFIX[name])
        adapter = timm_adapter(timm_models, name, pooling)
        batch = adapter.preprocess(images, "ignored prompt")
        torch.testing.assert_close(batch["pixel_values"], pixels)
        pooled, embeddings = adapter.forward(batch)
        assert pooled.shape == (3, len(states), WIDTH) and adapter.pooling == pooling
        for layer, state in enumerate(states):
            torch.testing.assert_close(pooled[:, layer], by_hand(state, pooling, PREFIX[name]), rtol=1e-5, atol=1e-5)
        assert embeddings.shape == (3, adapter.embedding_dim) == (3, WIDTH)
        torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["vit_registers", "eva"])
def test_timm_batch_size_and_layer_subsets_do_not_change_the_result(timm_models, name):
    images = make_images(3, seed=1)
    for pooling in ("cls", "mean_patch"):
        adapter = timm_adapter(timm_models, name, pooling)
        batched, batched_embeddings = adapter.forward(adapter.preprocess(images))
        for row, image in enumerate(images):
            single, single_embeddings = adapter.forward(adapter.preprocess([image]))
            torch.testing.assert_close(batched[row], single[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batched_embeddings[row], single_embeddings[0], rtol=1e-5, atol=1e-5)
        last = adapter.num_hidden_states - 1
        subset, _ = adapter.forward(adapter.preprocess(images), layers=[last, 0, 1])
        torch.testing.assert_close(subset, batched[:, [last, 0, 1]])


def test_timm_description_and_default_poolings(timm_models):
    vit, registers, no_class = (timm_adapter(timm_models, name) for name in ("vit", "vit_registers", "vit_no_class"))
    assert (vit.pooling, registers.pooling, no_class.pooling) == ("cls", "cls", "mean_patch")
    assert vit.layer_names == ["hidden.0", "hidden.1", "hidden.2", "hidden.3"] and vit.hidden_dim == WIDTH
    assert (vit.tower.prefix_tokens, registers.tower.prefix_tokens, no_class.tower.prefix_tokens) == (1, 3, 0)
    assert registers.embedding_dim == WIDTH and registers.model.num_classes == 5  # not the logits
    assert vit.prompt_formats == () and vit.prompt_text("What is this?", "question_answer") == ""
    for prompt_format in ("chat", "question_answer"):
        vit.check_prompt_format(prompt_format)
    assert "pooling='cls'" in repr(vit) and vit.name == "timm"


def test_timm_model_args_supply_what_config_json_lacks(timm_models):
    config = json.loads((timm_models["vit_swiglu"][0] / "config.json").read_text())
    assert not set(MODEL_ARGS["vit_swiglu"]) & set(config["model_args"])
    with pytest.raises(RuntimeError, match="Error.*loading state_dict"):  # a plain MLP, no LayerScale: wrong weights
        load_adapter({"adapter": "timm", "checkpoint": str(timm_models["vit_swiglu"][0])}, device="cpu")
    adapter = timm_adapter(timm_models, "vit_swiglu")
    assert type(adapter.model.blocks[0].mlp).__name__ == "GluMlp" and adapter.tower.prefix_tokens == 5
    # act_layer: gelu names a function of timm.layers too; it stays a name, which timm resolves to the GELU layer.
    cfg = {"adapter": "timm", "checkpoint": str(timm_models["vit"][0]), "model_args": {"act_layer": "gelu"}}
    assert type(load_adapter(cfg, device="cpu").model.blocks[0].mlp.act).__name__ == "GELU"


def test_timm_cls_is_refused_without_a_class_token(timm_models):
    with pytest.raises(ValueError, match=r"models\.<M>\.pooling.*'cls'.*VisionTransformer.*no class token.*mean_patch"):
        timm_adapter(timm_models, "vit_no_class", "cls")


def test_timm_hierarchical_models_are_refused(tmp_path):
    timm = need("timm")
    from timm.models import save_for_hf

    save_for_hf(timm.create_model("test_convnext", pretrained=False), tmp_path, safe_serialization=True)
    with pytest.raises(ValueError, match=r"ConvNeXt.*not a ViT-style timm model.*blocks.*num_prefix_tokens"):
        load_adapter({"adapter": "timm", "checkpoint": str(tmp_path)}, device="cpu")


# ---------------------------------------------------------------------------------------------- open_clip
@pytest.fixture(scope="module")
def open_clip_models(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Each family saved as an open_clip hub repo and kept in memory."""
    need("open_clip")
    need("timm")
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny_open_clip")
    torch.manual_seed(0)
    built = {}
    for name, cfg in OPEN_CLIP.items():
        model = CLIP(**cfg).eval()
        (root / name).mkdir()
        config = {"model_cfg": cfg, "preprocess_cfg": {"mean": MEAN, "std": STD}}
        (root / name / "open_clip_config.json").write_text(json.dumps(config))
        save_file(model.state_dict(), root / name / "open_clip_model.safetensors")
        built[name] = (root / name, model)
    return built


def open_clip_adapter(open_clip_models, name: str, pooling: str | None = None) -> OpenClipAdapter:
    cfg = {"adapter": "open_clip", "checkpoint": str(open_clip_models[name][0])}
    if pooling is not None:
        cfg["pooling"] = pooling
    adapter = load_adapter(cfg, device="cpu")
    assert isinstance(adapter, OpenClipAdapter)
    return adapter


def open_clip_reference(model: torch.nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Every hidden state of the vision tower, stepping through its blocks by hand."""
    visual = model.visual
    with torch.no_grad():
        if hasattr(visual, "trunk"):
            return timm_reference(visual.trunk, pixels)
        state = visual._embeds(pixels)
        states = [state]
        for block in visual.transformer.resblocks:
            state = block(state)
            states.append(state)
    return states


@pytest.mark.parametrize("name", list(OPEN_CLIP))
def test_open_clip_every_layer_equals_the_towers_own_forward_pooled_by_hand(open_clip_models, name):
    from open_clip import image_transform

    model = open_clip_models[name][1]
    images = make_images(3)
    size = OPEN_CLIP[name]["vision_cfg"]["image_size"]
    transform = image_transform(size, is_train=False, mean=MEAN, std=STD)
    pixels = torch.stack([transform(image) for image in images])
    states = open_clip_reference(model, pixels)
    n_patches = (size // (OPEN_CLIP[name]["vision_cfg"].get("patch_size") or 16)) ** 2
    assert len(states) == OPEN_CLIP_LAYERS[name] + 1 and states[0].shape[1] == 1 + n_patches
    with torch.no_grad():
        expected_embeddings = model.encode_image(pixels)
    for pooling in ("cls", "mean_patch"):
        adapter = open_clip_adapter(open_clip_models, name, pooling)
        batch = adapter.preprocess(images, "ignored prompt")
        torch.testing.assert_close(batch["pixel_values"], pixels)
        pooled, embeddings = adapter.forward(batch)
        width = states[0].shape[-1]
        assert pooled.shape == (3, len(states), width) and adapter.hidden_dim == width
        for layer, state in enumerate(states):
            torch.testing.assert_close(pooled[:, layer], by_hand(state, pooling, 1), rtol=1e-5, atol=1e-5)
        assert embeddings.shape == (3, adapter.embedding_dim) == (3, EMBED)
        torch.testing.assert_close(embeddings, expected_embeddings, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(OPEN_CLIP))
def test_open_clip_batch_size_and_layer_subsets_do_not_change_the_result(open_clip_models, name):
    images = make_images(3, seed=1)
    adapter = open_clip_adapter(open_clip_models, name, "mean_patch")
    batched, batched_embeddings = adapter.forward(adapter.preprocess(images))
    for row, image in enumerate(images):
        single, single_embeddings = adapter.forward(adapter.preprocess([image]))
        torch.testing.assert_close(batched[row], single[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched_embeddings[row], single_embeddings[0], rtol=1e-5, atol=1e-5)
    subset, _ = adapter.forward(adapter.preprocess(images), layers=[2, 0])
    torch.testing.assert_close(subset, batched[:, [2, 0]])


def test_open_clip_description(open_clip_models):
    vit, trunk = (open_clip_adapter(open_clip_models, name) for name in OPEN_CLIP)
    assert (vit.pooling, trunk.pooling) == ("cls", "cls") and (vit.name, trunk.name) == ("open_clip", "open_clip")
    assert vit.layer_names == [f"hidden.{i}" for i in range(4)] and len(trunk.layer_names) == 7
    assert vit.architecture == "open_clip VisionTransformer"
    assert trunk.architecture == "open_clip TimmModel (VisionTransformer trunk)"
    assert vit.prompt_text("What is this?") == "" and vit.prompt_formats == ()


def test_open_clip_directory_without_weights_is_refused(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP["vit"]}))
    with pytest.raises(FileNotFoundError, match="without weights"):
        open_clip_directory(str(tmp_path), None)
    (tmp_path / "open_clip_config.json").unlink()
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="without open_clip_config.json"):
        open_clip_directory(str(tmp_path), None)


def test_open_clip_hub_files_come_from_the_configs_commit(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--org--quilt" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_config.json").write_text("{}")
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"weights")  # no safetensors in this repo
    calls = []

    def fake_download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        if not (snapshot / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    for checkpoint in ("org/quilt", "hf-hub:org/quilt"):
        calls.clear()
        assert open_clip_directory(checkpoint, "v1.2") == snapshot.resolve()
        assert calls == [
            ("org/quilt", "open_clip_config.json", "v1.2"),
            ("org/quilt", "open_clip_model.safetensors", commit),
            ("org/quilt", "open_clip_pytorch_model.bin", commit),
        ]
    (snapshot / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="none of the open_clip weight files"):
        open_clip_directory("org/quilt", None)
    with pytest.raises(ValueError, match="no such directory, and not a hub id"):
        open_clip_directory("resources/checkpoints/quilt", None)


# ---------------------------------------------------------------------------------------------- both
def test_timm_checkpoints_map_to_timm_model_names(tmp_path):
    assert timm_model_name("MahmoodLab/UNI", "0123abc") == "hf-hub:MahmoodLab/UNI@0123abc"
    assert timm_model_name("hf-hub:paige-ai/Virchow2", None) == "hf-hub:paige-ai/Virchow2"
    assert timm_model_name("hf-hub:bioptimus/H-optimus-0@v1", "main") == "hf-hub:bioptimus/H-optimus-0@v1"
    assert timm_model_name(str(tmp_path), "main") == f"local-dir:{tmp_path.resolve()}"
    assert timm_model_name("vit_small_patch14_dinov2.lvd142m", "main") == "vit_small_patch14_dinov2.lvd142m"
    with pytest.raises(ValueError, match=r"'revision' is 'abc'.*timm model name.*hf-hub:timm/vit_base_patch16_224"):
        timm_model_name("vit_base_patch16_224", "abc")
    with pytest.raises(ValueError, match="no such directory, and not a hub id"):
        timm_model_name("resources/checkpoints/uni", None)


@pytest.mark.parametrize(
    ("adapter", "module", "package", "checkpoint"),
    [
        ("timm", "timm", "timm", "MahmoodLab/UNI"),
        ("open_clip", "open_clip", "open_clip_torch", "wisdomik/QuiltNet-B-32"),
    ],
)
def test_a_missing_package_names_the_config_key_and_the_install(monkeypatch, adapter, module, package, checkpoint):
    monkeypatch.setitem(sys.modules, module, None)  # `import <module>` now fails, installed or not
    with pytest.raises(
        ImportError, match=rf"models\.<M>\.adapter.*'{adapter}'.*{package} package.*pip install 'medprobe\[{adapter}\]'"
    ):
        load_adapter({"adapter": adapter, "checkpoint": checkpoint}, device="cpu")


@pytest.mark.parametrize("adapter", ["timm", "open_clip"])
def test_poolings_and_transformers_options_are_refused_before_loading(adapter):
    cfg = {"adapter": adapter, "checkpoint": "org/never-downloaded"}
    for pooling in ("last", "mean_image", "mean"):
        with pytest.raises(ValueError, match=rf"pooling.*'{pooling}'.*'{adapter}' adapter.*cls, mean_patch"):
            load_adapter({**cfg, "pooling": pooling}, device="cpu")
    for key, value in (("device_map", "auto"), ("quantization", "4bit"), ("attn_implementation", "eager")):
        with pytest.raises(ValueError, match=rf"'{key}' is '{value}'.*'{adapter}' adapter"):
            load_adapter({**cfg, key: value}, device="cpu")
    with pytest.raises(ValueError, match="'model_args' must be a mapping"):
        load_adapter({**cfg, "model_args": "init_values=1e-5"}, device="cpu")


def test_open_clip_refuses_model_args():
    with pytest.raises(ValueError, match="'model_args'.*'timm' adapter only"):
        load_adapter({"adapter": "open_clip", "checkpoint": "org/name", "model_args": {"init_values": 1}}, device="cpu")


def test_looking_the_adapters_up_imports_neither_package():
    code = (
        "import sys; import medprobe.models as m; m.ADAPTERS.get('timm'); m.ADAPTERS.get('open_clip'); "
        "print(sorted(n for n in ('timm', 'open_clip', 'torchvision') if n in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("adapter", "name", "pooling"), [("timm", "vit_registers", "mean_patch"), ("open_clip", "vit", "cls")]
)
def test_extract_activations_stores_the_pooled_layers_and_embeddings(request, tmp_path, adapter, name, pooling):
    models = request.getfixturevalue("timm_models" if adapter == "timm" else "open_clip_models")
    images = make_images(3, seed=2)
    manifest = write_manifest(tmp_path, images)
    cfg = {"adapter": adapter, "checkpoint": str(models[name][0]), "pooling": pooling}
    out = extract_activations(
        manifest,
        tmp_path / "act.h5",
        settings=ExtractionSettings(
            batch_size=2,
            num_workers=0,
            dtype="float32",
            prefetch_factor=2,
            shards=1,
            compression="none",
            compression_level=4,
            prompt_format="chat",
        ),
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
        stored_embeddings = handle["embeddings"][()]
    loaded = load_adapter(cfg, device="cpu")
    assert attrs["pooling"] == pooling and attrs["prompt"] == ""
    assert list(attrs["layer_names"]) == loaded.layer_names
    with_images = [Image.open(tmp_path / "images" / f"img_{i}.png").convert("RGB") for i in range(3)]
    expected, embeddings = loaded.forward(loaded.preprocess(with_images))
    np.testing.assert_allclose(stored, expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stored_embeddings, embeddings.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("adapter", "name"), [("timm", "vit_registers"), ("open_clip", "vit")])
def test_bfloat16_weights_agree_with_float32_to_bfloat16_precision(request, adapter, name):
    models = request.getfixturevalue("timm_models" if adapter == "timm" else "open_clip_models")
    cfg = {"adapter": adapter, "checkpoint": str(models[name][0]), "pooling": "mean_patch"}
    full, half = load_adapter(cfg, device="cpu"), load_adapter({**cfg, "torch_dtype": "bfloat16"}, device="cpu")
    assert next(half.model.parameters()).dtype == torch.bfloat16 and half.dtype == torch.bfloat16
    images = make_images(3, seed=3)
    (pooled, embeddings), (pooled_half, embeddings_half) = (a.forward(a.preprocess(images)) for a in (full, half))
    assert pooled_half.dtype == embeddings_half.dtype == torch.float32  # stored as float32 whatever the weights
    torch.testing.assert_close(pooled_half, pooled, rtol=0, atol=0.05 * pooled.abs().max().item())
    torch.testing.assert_close(embeddings_half, embeddings, rtol=0, atol=0.05 * embeddings.abs().max().item())

"""Tiny demo models and the model adapters (medprobe.demo.models, medprobe.models)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import medprobe.models
from medprobe.demo.models import MODEL_NAMES, build
from medprobe.models import ADAPTER_NAMES, ADAPTERS, load_adapter
from medprobe.models.base import Adapter, register
from medprobe.models.clip import ClipAdapter
from medprobe.models.idefics import IdeficsAdapter
from medprobe.registry import Registry

torch.set_num_threads(1)

PROMPT = "What can you see on this knee radiograph?"
# The paper's prompt for the pathology tasks, word for word ("seen" sic).
PAPER_PROMPT = "What can you seen on this histological picture?"
PAPER_TEXT = "Question: What can you seen on this histological picture? Answer:"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: build(name, root / name, seed=0) for name in MODEL_NAMES}


def make_images(n: int, seed: int = 0, size: tuple[int, int] = (96, 80)) -> list[Image.Image]:
    """Noise plus a bright ellipse whose place differs per image, so images are clearly distinct."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        x, y = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        ImageDraw.Draw(image).ellipse((x, y, x + size[0] // 3, y + size[1] // 3), fill=(250, 240, 230))
        images.append(image)
    return images


@pytest.fixture(scope="session")
def idefics(tiny_models) -> IdeficsAdapter:
    return load_adapter({"adapter": "idefics", "checkpoint": str(tiny_models["tiny-idefics-large"])}, device="cpu")


@pytest.fixture(scope="session")
def clip(tiny_models) -> ClipAdapter:
    return load_adapter({"adapter": "clip", "checkpoint": str(tiny_models["tiny-clip"])}, device="cpu")


# ---------------------------------------------------------------------------- demo builds
def test_build_rejects_unknown_name_listing_valid_ones(tmp_path):
    with pytest.raises(ValueError) as error:
        build("tiny-gpt", tmp_path / "x")
    for name in ("tiny-gpt", "tiny-idefics-large", "tiny-idefics-small", "tiny-clip", "tiny-dinov2"):
        assert name in str(error.value)
    assert not (tmp_path / "x").exists()


def test_build_is_seeded_and_replaces_atomically(tmp_path, tiny_models):
    first = load_file(tiny_models["tiny-clip"] / "model.safetensors")
    again = build("tiny-clip", tmp_path / "clip", seed=0)
    rebuilt = load_file(again / "model.safetensors")
    assert first.keys() == rebuilt.keys()
    assert all(torch.equal(first[key], rebuilt[key]) for key in first)
    # An existing checkpoint is replaced, and no temporary directory is left behind.
    other_seed = load_file(build("tiny-clip", tmp_path / "clip", seed=1) / "model.safetensors")
    assert not torch.equal(first["visual_projection.weight"], other_seed["visual_projection.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]
    # The caller's global RNG is left alone.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build("tiny-clip", tmp_path / "clip2", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_builds_are_the_hub_layout(tiny_models):
    for name, directory in tiny_models.items():
        files = {p.name for p in directory.iterdir()}
        if name == "tiny-dinov2":  # a vision-only encoder: an image processor, no tokenizer
            assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files, name
            continue
        assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= files, name


# ---------------------------------------------------------------------------- registry
def test_unknown_adapter_names_it_and_the_registered_ones():
    with pytest.raises(ValueError) as error:
        load_adapter({"adapter": "llava", "checkpoint": "x"})
    message = str(error.value)
    assert "'llava'" in message and "clip" in message and "idefics" in message


def test_bad_config_values_are_named(tiny_models):
    with pytest.raises(ValueError, match="torch_dtype.*'float8'"):
        load_adapter({"adapter": "clip", "checkpoint": str(tiny_models["tiny-clip"]), "torch_dtype": "float8"})
    with pytest.raises(ValueError, match="checkpoint"):
        load_adapter({"adapter": "clip"})


def test_declared_adapter_names_are_the_registered_ones(repo):
    # Config validation reads ADAPTER_NAMES without importing torch; the registry is what loads.
    assert sorted(ADAPTER_NAMES) == sorted(ADAPTERS.names())
    check = (
        "import sys, medprobe.config, medprobe.extract.merge; "
        "assert medprobe.config.known_adapters() == sorted(medprobe.models.ADAPTER_NAMES); "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", check], check=True, cwd=repo)


def test_register_adds_an_adapter_that_load_adapter_dispatches_to(monkeypatch, tiny_models):
    # A registry of this test's own, so that the session's registry keeps only the declared adapters.
    registry = Registry("model adapter")
    registry.register("clip", ClipAdapter)
    monkeypatch.setattr(medprobe.models, "ADAPTERS", registry)
    with pytest.raises(ValueError, match="'clip-float16' is not declared.*ADAPTER_NAMES"):
        register("clip-float16")(type("Undeclared", (ClipAdapter,), {}))
    monkeypatch.setattr(medprobe.models, "ADAPTER_NAMES", (*ADAPTER_NAMES, "clip-float16"))

    @register("clip-float16")
    class HalfClip(ClipAdapter):
        pass

    adapter = load_adapter(
        {"adapter": "clip-float16", "checkpoint": str(tiny_models["tiny-clip"]), "torch_dtype": "float16"}
    )
    assert type(adapter) is HalfClip and adapter.name == "clip-float16"
    assert next(adapter.model.parameters()).dtype == torch.float16
    with pytest.raises(TypeError, match="subclass of Adapter"):
        register("not-an-adapter")(int)
    with pytest.raises(ValueError, match="already registered"):
        register("clip")(HalfClip)
    assert registry["clip"] is ClipAdapter and issubclass(ClipAdapter, Adapter)
    monkeypatch.undo()
    assert ADAPTERS["clip"] is ClipAdapter and "clip-float16" not in ADAPTERS and HalfClip.name == "clip-float16"


# ---------------------------------------------------------------------------- IDEFICS
def test_idefics_description(idefics, tiny_models):
    assert idefics.layer_names == [f"hidden.{i}" for i in range(7)]  # 6 layers + embedding output
    assert (idefics.hidden_dim, idefics.embedding_dim, idefics.pooling) == (96, None, "last")
    assert idefics.checkpoint == str(tiny_models["tiny-idefics-large"]) and idefics.revision is None
    assert idefics.prompt_text("Hi?") == "Hi?<end_of_utterance>\nAssistant:"
    assert next(idefics.model.parameters()).dtype == torch.float32  # the CPU default
    small = load_adapter({"adapter": "idefics", "checkpoint": str(tiny_models["tiny-idefics-small"])}, device="cpu")
    assert small.layer_names == [f"hidden.{i}" for i in range(5)] and small.hidden_dim == 64


def test_idefics_prompt_is_the_instruct_format(idefics):
    batch = idefics.preprocess(make_images(1), PROMPT)
    text = idefics.processor.tokenizer.decode(batch["input_ids"][0])
    assert text.replace(" ", "").startswith("<s>User:<fake_token_around_image><image><fake_token_around_image>")
    assert text.replace(" ", "").endswith("radiograph?<end_of_utterance>\nAssistant:")
    assert batch["pixel_values"].shape == (1, 1, 3, 224, 224)


def test_idefics_chat_prompt_is_pinned(idefics):
    # The demo's numbers depend on this exact text and these exact ids: the chat format must not move.
    pinned = f"{PROMPT}<end_of_utterance>\nAssistant:"
    assert idefics.prompt_text(PROMPT) == idefics.prompt_text(PROMPT, "chat") == pinned
    image = make_images(1)[0]
    expected = idefics.processor(text=[["User:", image, pinned]], return_tensors="pt")
    for batch in (idefics.preprocess([image], PROMPT), idefics.preprocess([image], PROMPT, prompt_format="chat")):
        assert batch.keys() == expected.keys()
        for key in expected:
            assert torch.equal(batch[key], expected[key]), key
    tokenizer = idefics.processor.tokenizer
    ids = expected["input_ids"][0].tolist()
    layout = "<s>User:<fake_token_around_image><image><fake_token_around_image>" + pinned
    assert tokenizer.decode(ids).replace(" ", "") == layout.replace(" ", "")
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_idefics_question_answer_prompt_is_the_papers(idefics):
    assert idefics.prompt_text(PAPER_PROMPT, "question_answer") == PAPER_TEXT
    image = make_images(1)[0]
    batch = idefics.preprocess([image], PAPER_PROMPT, prompt_format="question_answer")
    tokenizer = idefics.processor.tokenizer
    ids = batch["input_ids"][0].tolist()
    # Exactly one BOS (the processor's own), the image, then the question; no User/Assistant turns.
    special = tokenizer.convert_tokens_to_ids(["<fake_token_around_image>", "<image>", "<fake_token_around_image>"])
    question = tokenizer(PAPER_TEXT, add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.bos_token_id, *special, *question]
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids[4:]).strip() == PAPER_TEXT
    assert "User" not in tokenizer.decode(ids) and "Assistant" not in tokenizer.decode(ids)
    # The same as the processor given [image, text], as the paper's code called it.
    direct = idefics.processor(text=[[image, PAPER_TEXT]], return_tensors="pt")
    for key in direct:
        assert torch.equal(batch[key], direct[key]), key
    assert batch["attention_mask"].all() and batch["pixel_values"].shape == (1, 1, 3, 224, 224)


def test_unknown_prompt_format_is_named(idefics, clip):
    for call in (
        lambda: idefics.prompt_text(PROMPT, "plain"),
        lambda: idefics.preprocess(make_images(1), PROMPT, prompt_format="plain"),
    ):
        with pytest.raises(ValueError, match="'prompt_format' is 'plain'.*chat, question_answer"):
            call()
    assert IdeficsAdapter.prompt_formats == ("chat", "question_answer") and ClipAdapter.prompt_formats == ()
    clip.check_prompt_format("question_answer")  # image-only: every format is accepted and ignored
    with pytest.raises(ValueError, match="'prompt_format' is 'plain'"):
        clip.check_prompt_format("plain")


def test_a_doubled_bos_is_refused(idefics):
    bos = idefics.processor.tokenizer.bos_token_id
    good = torch.tensor([[0, 0, bos, 5, 6], [bos, 5, 6, 7, 8]])
    mask = (good != 0).long()
    idefics._check_one_bos(good, mask)
    doubled = torch.tensor([[0, bos, bos, 5, 6], [bos, 5, 6, 7, 8]])
    with pytest.raises(RuntimeError, match=r"\[2, 1\] leading BOS tokens per row, expected exactly 1"):
        idefics._check_one_bos(doubled, (doubled != 0).long())
    missing = torch.tensor([[5, 6, 7]])
    with pytest.raises(RuntimeError, match=r"\[0\] leading BOS"):
        idefics._check_one_bos(missing, torch.ones_like(missing))


def test_question_answer_pools_the_last_token_of_the_question(idefics, tiny_models):
    from transformers import IdeficsForVisionText2Text

    images = make_images(2, seed=8)
    batch = idefics.preprocess(images, PAPER_PROMPT, prompt_format="question_answer")
    tokenizer = idefics.processor.tokenizer
    assert tokenizer.decode(batch["input_ids"][0, -1:]).strip() == ":"  # the colon of "Answer:"
    pooled, _ = idefics.forward(batch)
    reference = IdeficsForVisionText2Text.from_pretrained(tiny_models["tiny-idefics-large"]).eval()
    for row, image in enumerate(images):
        inputs = idefics.processor(text=[[image, PAPER_TEXT]], return_tensors="pt")
        with torch.inference_mode():
            states = reference(**inputs, output_hidden_states=True).hidden_states
        expected = torch.stack([state[0, -1] for state in states])
        torch.testing.assert_close(pooled[row], expected, atol=1e-5, rtol=0)
    # Another token of another sequence than the chat format pools.
    chat, _ = idefics.forward(idefics.preprocess(images, PAPER_PROMPT))
    assert (chat - pooled).abs().amax() > 1e-3


def test_idefics_forward_matches_hidden_states_of_the_hf_model(idefics, tiny_models):
    from transformers import IdeficsForVisionText2Text

    images = make_images(3)
    pooled, embeddings = idefics.forward(idefics.preprocess(images, PROMPT))
    assert embeddings is None
    assert pooled.shape == (3, 7, 96) and pooled.dtype == torch.float32 and pooled.device.type == "cpu"
    # Independent: the full HF model, one image at a time (no padding), last position of each state.
    reference = IdeficsForVisionText2Text.from_pretrained(tiny_models["tiny-idefics-large"]).eval()
    for row, image in enumerate(images):
        inputs = idefics.processor(
            text=[["User:", image, f"{PROMPT}<end_of_utterance>\nAssistant:"]], return_tensors="pt"
        )
        with torch.inference_mode():
            states = reference(**inputs, output_hidden_states=True).hidden_states
        expected = torch.stack([state[0, -1] for state in states])
        torch.testing.assert_close(pooled[row], expected, atol=1e-5, rtol=0)
    # Layer selection picks the same vectors.
    subset, _ = idefics.forward(idefics.preprocess(images, PROMPT), layers=[0, 6])
    assert torch.equal(subset, pooled[:, [0, 6]])


def test_the_image_changes_the_last_token_state(idefics):
    first, second = make_images(2, seed=5)
    pooled_first, _ = idefics.forward(idefics.preprocess([first], PROMPT))
    pooled_second, _ = idefics.forward(idefics.preprocess([second], PROMPT))
    difference = (pooled_first - pooled_second).abs().amax(dim=2)[0]  # per layer
    scale = pooled_first.abs().amax(dim=2)[0]
    # The open gates let the image into every text layer (hidden.0 already follows a cross-attention block).
    assert torch.all(difference > 0.01 * scale), (difference, scale)


@pytest.mark.parametrize("prompt_format", ["chat", "question_answer"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_equals_one_at_a_time_with_padding(idefics, padding_side, prompt_format, monkeypatch):
    monkeypatch.setattr(idefics.processor.tokenizer, "padding_side", padding_side)
    images = make_images(3, seed=2)
    prompts = ["Hi?", "What can you see on this chest radiograph? Describe it in detail.", PROMPT]
    batch = idefics.preprocess(images, prompts, prompt_format=prompt_format)
    mask = batch["attention_mask"]
    lengths = mask.sum(dim=1)
    assert len(set(lengths.tolist())) == 3  # really padded
    padded_column = 0 if padding_side == "left" else -1
    assert mask[:, padded_column].tolist() == [int(n == mask.shape[1]) for n in lengths.tolist()]
    batched, _ = idefics.forward(batch)
    for row, (image, prompt) in enumerate(zip(images, prompts)):
        single, _ = idefics.forward(idefics.preprocess([image], prompt, prompt_format=prompt_format))
        assert (batched[row] - single[0]).abs().max().item() <= 1e-5


def test_same_prompt_batch_equals_one_at_a_time(idefics):
    images = make_images(4, seed=3)
    batched, _ = idefics.forward(idefics.preprocess(images, PROMPT))
    singles = torch.cat([idefics.forward(idefics.preprocess([image], PROMPT))[0] for image in images])
    assert (batched - singles).abs().max().item() <= 1e-5


def test_prompt_count_must_match_images(idefics):
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        idefics.preprocess(make_images(3), ["a", "b"])


# ---------------------------------------------------------------------------- CLIP
def test_clip_description(clip):
    assert clip.layer_names == [f"hidden.{i}" for i in range(5)]
    assert (clip.hidden_dim, clip.embedding_dim, clip.pooling) == (64, 32, "cls")
    assert clip.prompt_text(PROMPT) == clip.prompt_text(PROMPT, "question_answer") == ""


def test_clip_ignores_the_prompt_format(clip):
    images = make_images(2, seed=9)
    chat = clip.preprocess(images, PROMPT, prompt_format="chat")
    question_answer = clip.preprocess(images, PAPER_PROMPT, prompt_format="question_answer")
    assert list(question_answer) == ["pixel_values"]
    assert torch.equal(chat["pixel_values"], question_answer["pixel_values"])


def test_clip_forward_is_cls_tokens_and_image_embeds(clip, tiny_models):
    from transformers import CLIPModel

    images = make_images(3, seed=4)
    batch = clip.preprocess(images, PROMPT)
    assert list(batch) == ["pixel_values"] and batch["pixel_values"].shape == (3, 3, 224, 224)
    pooled, embeddings = clip.forward(batch)
    assert pooled.shape == (3, 5, 64) and embeddings.shape == (3, 32)
    assert pooled.dtype == embeddings.dtype == torch.float32
    reference = CLIPModel.from_pretrained(tiny_models["tiny-clip"]).eval()
    with torch.inference_mode():
        vision = reference.vision_model(pixel_values=batch["pixel_values"], output_hidden_states=True)
        features = reference.get_image_features(pixel_values=batch["pixel_values"])
    features = features if torch.is_tensor(features) else features.pooler_output
    torch.testing.assert_close(pooled, torch.stack([s[:, 0] for s in vision.hidden_states], dim=1), atol=1e-6, rtol=0)
    torch.testing.assert_close(embeddings, features, atol=1e-6, rtol=0)
    singles = torch.cat([clip.forward(clip.preprocess([image], ""))[0] for image in images])
    assert (pooled - singles).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------- fewer layers, big models
def test_forward_stops_after_the_deepest_kept_layer_with_identical_values(idefics):
    decoder = idefics.model.model
    batch = idefics.preprocess(make_images(3, seed=6), PROMPT)
    full, _ = idefics.forward(batch)
    ran: list[str] = []
    handles = [
        layer.register_forward_hook(lambda m, a, o, i=i: ran.append(f"layer{i}"))
        for i, layer in enumerate(decoder.layers)
    ]
    handles.append(decoder.norm.register_forward_hook(lambda m, a, o: ran.append("norm")))
    try:
        subset, _ = idefics.forward(batch, layers=[3, 1])
        assert ran == ["layer0", "layer1", "layer2"]  # hidden.3 is layer 2's output: layers 3-5 never run
        assert torch.equal(subset, full[:, [3, 1]])
        ran.clear()
        first, _ = idefics.forward(batch, layers=[0])
        assert ran == [] and torch.equal(first, full[:, [0]])  # hidden.0 is layer 0's input
        ran.clear()
        last, _ = idefics.forward(batch, layers=[6, 2])
        assert ran == [f"layer{i}" for i in range(6)] + ["norm"] and torch.equal(last, full[:, [6, 2]])
    finally:
        for handle in handles:
            handle.remove()
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in decoder.layers)
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        idefics.forward(batch, layers=[7])


def test_quantization_and_device_map_reach_from_pretrained(tiny_models, monkeypatch):
    checkpoint = str(tiny_models["tiny-clip"])
    with pytest.raises(ImportError, match="quantization: 8bit.*bitsandbytes.*quantization: none"):
        load_adapter({"adapter": "clip", "checkpoint": checkpoint, "quantization": "8bit"}, device="cpu")
    with pytest.raises(ValueError, match="'quantization' is '2bit'.*none, 8bit, 4bit"):
        load_adapter({"adapter": "clip", "checkpoint": checkpoint, "quantization": "2bit"}, device="cpu")
    with pytest.raises(ValueError, match="'attn_implementation' is 'flash'"):
        load_adapter({"adapter": "clip", "checkpoint": checkpoint, "attn_implementation": "flash"}, device="cpu")

    # Without a GPU: check what from_pretrained would receive (bitsandbytes config, device_map, SDPA).
    sentinel = object()
    monkeypatch.setattr(
        "medprobe.models.base.quantization_config",
        lambda name, dtype: None if name in (None, "none") else (sentinel, name, dtype),
    )
    seen: dict = {}
    original = ClipAdapter.load_model.__func__

    def load_model(cls, path, **kwargs):
        seen.update(kwargs)
        return original(cls, path, revision=None, trust_remote_code=False, dtype=torch.float32)

    monkeypatch.setattr(ClipAdapter, "load_model", classmethod(load_model))
    with pytest.raises(ValueError, match="'quantization' is '4bit', which needs a CUDA device.*cpu"):
        load_adapter({"adapter": "clip", "checkpoint": checkpoint, "quantization": "4bit"}, device="cpu")
    adapter = load_adapter({"adapter": "clip", "checkpoint": checkpoint, "quantization": "4bit"}, device="cuda:1")
    assert seen["quantization_config"] == (sentinel, "4bit", torch.bfloat16)
    assert seen["device_map"] == {"": 1} and seen["attn_implementation"] == "sdpa" and seen["dtype"] == torch.bfloat16
    assert adapter.device.type == "cpu"  # with a device_map, inputs go where the first weights live
    seen.clear()
    load_adapter({"adapter": "clip", "checkpoint": checkpoint, "device_map": "auto", "torch_dtype": "float16"})
    assert seen["device_map"] == "auto" and "quantization_config" not in seen and seen["dtype"] == torch.float16

"""The generic image-text-to-text adapter hf_vlm (medprobe.models.vlm) on tiny offline builds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medprobe.demo.vlm_models import QWEN_MAX_PIXELS, VLM_NAMES, build_vlm
from medprobe.models import load_adapter
from medprobe.models.vlm import VLM_POOLINGS, VlmAdapter

torch.set_num_threads(1)

PROMPTS = ["What can you see on this knee radiograph?", "What type of tissue is shown?", "Describe this image."]
# Different shapes: Idefics3 splits them into different numbers of tiles, Qwen2.5-VL resizes them to different
# multiples of 28 px, so both give them different numbers of image tokens.
SIZES = [(96, 80), (40, 120), (64, 64)]
# The image's placeholder in the prompt text, and the token the processor repeats for the image features.
PLACEHOLDER = {"tiny-qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>", "tiny-gemma3": "<start_of_image>"}
IMAGE_TOKEN = {"tiny-qwen2_5_vl": "<|image_pad|>", "tiny-gemma3": "<image_soft_token>"}
# The end of each family's chat prompt: its generation prompt.
GENERATION_PROMPT = {
    "tiny-idefics3": "Assistant:",
    "tiny-llava": "ASSISTANT:",
    "tiny-qwen2_5_vl": "<|im_start|>assistant\n",
    "tiny-gemma3": "<start_of_turn>model\n",
}
# Image tokens per image of SIZES. Idefics3: 4 per 32-px tile, 2 x 2 tiles + the global one, 2 x 1 + 1, 2 x 2 + 1;
# Qwen2.5-VL: one per 28 x 28 px of the image resized into 28..56 x 56 px (28 x 56, 112 x 28, 56 x 56 px);
# LLaVA, PaliGemma: (32 / 8) ** 2 patches per image; Gemma 3: its 16 patches average-pooled into 4.
IMAGE_TOKENS_PER_IMAGE = {
    "tiny-idefics3": [4 * 5, 4 * 3, 4 * 5],
    "tiny-llava": [16, 16, 16],
    "tiny-paligemma": [16, 16, 16],
    "tiny-qwen2_5_vl": [2, 4, 4],
    "tiny-gemma3": [4, 4, 4],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_vlms")
    return {name: build_vlm(name, root / name, seed=0) for name in VLM_NAMES}


@pytest.fixture(scope="module")
def adapters(checkpoints) -> dict[tuple[str, str], VlmAdapter]:
    return {
        (name, pooling): load_adapter(
            {"adapter": "hf_vlm", "checkpoint": str(checkpoints[name]), "pooling": pooling}, device="cpu"
        )
        for name in VLM_NAMES
        for pooling in VLM_POOLINGS
    }


def make_images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def family(adapter: VlmAdapter) -> str:
    return Path(adapter.checkpoint).name


def image_token_id(adapter: VlmAdapter) -> int:
    """The id of the token the family's processor repeats for the image's features."""
    return adapter.processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN.get(family(adapter), "<image>"))


def by_hand(adapter: VlmAdapter, batch: dict[str, torch.Tensor], **inputs: torch.Tensor) -> torch.Tensor:
    """transformers' own hidden_states of the language model, pooled here: (B, L, D)."""
    with torch.inference_mode():
        states = adapter.model.model(**batch, **inputs, output_hidden_states=True, use_cache=False).hidden_states
    if adapter.pooling == "last":
        return torch.stack([state[:, -1] for state in states], dim=1)
    mask = batch["attention_mask"].bool()
    if adapter.pooling == "mean_image":
        mask = mask & (batch["input_ids"] == image_token_id(adapter))
    return torch.stack(
        [torch.stack([state[b][mask[b]].mean(dim=0) for b in range(len(mask))]) for state in states], dim=1
    )


def test_loading_keeps_the_pooling_and_describes_the_language_model(adapters):
    for (name, pooling), adapter in adapters.items():
        assert type(adapter) is VlmAdapter and adapter.name == "hf_vlm" and adapter.pooling == pooling
        assert adapter.layer_names == [f"hidden.{i}" for i in range(5)] and adapter.hidden_dim == 64, name
        assert adapter.image_token_ids == [image_token_id(adapter)]


def test_unknown_pooling_is_refused_before_loading():
    with pytest.raises(ValueError, match="pooling.*'cls'.*hf_vlm.*last, mean, mean_image"):
        load_adapter({"adapter": "hf_vlm", "checkpoint": "/nonexistent", "pooling": "cls"})


@pytest.mark.parametrize("name", VLM_NAMES)
def test_chat_prompt_is_the_processors_template(adapters, name):
    adapter = adapters[name, "last"]
    image = make_images()[0]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[0]}]}]
    if name == "tiny-paligemma":  # no chat template: PaliGemma's own layout, the processor adds BOS and "\n"
        assert not adapter.processor.chat_template
        expected = f"<image>{PROMPTS[0]}"
        direct = adapter.processor(text=[expected], images=[[image]], return_tensors="pt")
    else:
        expected = adapter.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        assert expected.endswith(GENERATION_PROMPT[name])
        # Tokenised as transformers' own apply_chat_template(tokenize=True) of the conversation with the image.
        conversation[0]["content"][0]["image"] = image
        direct = adapter.processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
    assert adapter.prompt_text(PROMPTS[0]) == adapter.prompt_text(PROMPTS[0], "chat") == expected
    assert PLACEHOLDER.get(name, "<image>") in expected
    batch = adapter.preprocess([image], PROMPTS[0])
    assert torch.equal(batch["input_ids"], direct["input_ids"])
    if name == "tiny-gemma3":  # the template writes the BOS: the processor adds no second one
        bos = adapter.processor.tokenizer.bos_token_id
        assert expected.startswith("<bos>") and batch["input_ids"][0, 0] == bos
        assert (batch["input_ids"] == bos).sum() == 1
    if name == "tiny-paligemma":  # <image> x 16, BOS, the prompt, "\n": the prefix PaliGemma was trained on
        tokenizer = adapter.processor.tokenizer
        ids = batch["input_ids"][0].tolist()
        assert ids[:17] == [image_token_id(adapter)] * 16 + [tokenizer.bos_token_id]
        assert tokenizer.decode(ids[17:]) == f"{PROMPTS[0]}\n" and "labels" not in batch


def test_a_processor_without_chat_template_or_layout_is_refused(checkpoints):
    adapter = load_adapter({"adapter": "hf_vlm", "checkpoint": str(checkpoints["tiny-llava"])}, device="cpu")
    adapter.processor.chat_template = None
    with pytest.raises(ValueError, match="no chat template.*prompt_format: question_answer"):
        adapter.prompt_text("What is it?", "chat")


@pytest.mark.parametrize("name", VLM_NAMES)
def test_question_answer_prompt_is_the_papers(adapters, name):
    adapter = adapters[name, "last"]
    text = adapter.prompt_text("What is it?", "question_answer")
    assert text == f"{PLACEHOLDER.get(name, '<image>')}Question: What is it? Answer:"
    batch = adapter.preprocess(make_images()[:1], "What is it?", prompt_format="question_answer")
    decoded = adapter.processor.tokenizer.decode(batch["input_ids"][0])
    assert "Question" in decoded and "Answer:" in decoded and "ssistant" not in decoded.lower()
    assert (batch["input_ids"] == image_token_id(adapter)).any()


@pytest.mark.parametrize("pooling", VLM_POOLINGS)
@pytest.mark.parametrize("name", VLM_NAMES)
def test_stored_states_are_transformers_hidden_states_pooled(adapters, name, pooling):
    adapter = adapters[name, pooling]
    for prompt_format in ("chat", "question_answer"):
        batch = adapter.preprocess(make_images(), PROMPTS, prompt_format=prompt_format)
        assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"].all()  # left-padded
        activations, embeddings = adapter(batch)
        assert embeddings is None and activations.shape == (3, 5, 64)
        torch.testing.assert_close(activations, by_hand(adapter, batch), atol=1e-5, rtol=1e-5)
        # A subset of layers is the same columns (the pass stops after the deepest one).
        subset, _ = adapter(batch, layers=[2, 0])
        torch.testing.assert_close(subset, activations[:, [2, 0]], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pooling", VLM_POOLINGS)
@pytest.mark.parametrize("name", VLM_NAMES)
def test_batched_equals_one_at_a_time(adapters, name, pooling):
    adapter = adapters[name, pooling]
    images = make_images(seed=1)
    batched, _ = adapter(adapter.preprocess(images, PROMPTS))
    for i, (image, prompt) in enumerate(zip(images, PROMPTS)):
        single, _ = adapter(adapter.preprocess([image], prompt))
        torch.testing.assert_close(batched[i], single[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", VLM_NAMES)
def test_mean_image_pools_exactly_the_images_tokens(adapters, name):
    adapter = adapters[name, "mean_image"]
    batch = adapter.preprocess(make_images(), PROMPTS)
    weights = adapter.pool_weights(batch["input_ids"], batch["attention_mask"])
    image_positions = batch["input_ids"] == image_token_id(adapter)
    assert adapter.image_token_ids == [image_token_id(adapter)]
    assert torch.equal(weights > 0, image_positions)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    assert image_positions.sum(dim=1).tolist() == IMAGE_TOKENS_PER_IMAGE[name]
    # Those positions are the image's: changing the pixels changes exactly them in the embedding output (not
    # Gemma 3's <start_of_image> / <end_of_image> around them, nor Qwen's <|vision_start|> / <|vision_end|>).
    other = dict(batch, pixel_values=-batch["pixel_values"])  # padding tiles stay zero
    with torch.inference_mode():
        before = adapter.model.model(**batch, output_hidden_states=True).hidden_states[0]
        after = adapter.model.model(**other, output_hidden_states=True).hidden_states[0]
    changed = (before - after).abs().amax(dim=-1) > 0
    assert torch.equal(changed, image_positions)


@pytest.mark.parametrize("pooling", VLM_POOLINGS)
def test_qwen_dynamic_resolution_batch_equals_each_image_alone(adapters, pooling):
    """Two images of different sizes: different grids and image token counts, so different padding; the same
    pooled states as each image alone (M-RoPE positions skip the padding)."""
    adapter = adapters["tiny-qwen2_5_vl", pooling]
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(28, 28), (56, 56)]]
    batch = adapter.preprocess(images, "Describe this image.")
    assert batch["image_grid_thw"].tolist() == [[1, 2, 2], [1, 4, 4]]
    assert (batch["input_ids"] == image_token_id(adapter)).sum(dim=1).tolist() == [1, 4]
    assert batch["attention_mask"].sum(dim=1).tolist()[1] - batch["attention_mask"].sum(dim=1).tolist()[0] == 3
    batched, _ = adapter(batch)
    for i, image in enumerate(images):
        single, _ = adapter(adapter.preprocess([image], "Describe this image."))
        torch.testing.assert_close(batched[i], single[0], atol=1e-4, rtol=1e-4)


def test_qwen_states_use_the_models_3d_positions(adapters):
    """The hooks pool the states of the model's own forward, whose M-RoPE positions come from image_grid_thw:
    the image's tokens share a temporal position, so the text after them is not at its 1-D index."""
    adapter = adapters["tiny-qwen2_5_vl", "last"]
    batch = adapter.preprocess(make_images(), PROMPTS)
    with torch.inference_mode():
        positions, _ = adapter.model.model.get_rope_index(
            batch["input_ids"],
            batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
            attention_mask=batch["attention_mask"],
        )
    real = batch["attention_mask"][2].bool()
    row = positions[:, 2][:, real]  # (3, real tokens) of the 64 x 64 px image, resized to 2 x 2 tokens
    image = batch["input_ids"][2][real] == image_token_id(adapter)
    assert [row[axis][image].unique().numel() for axis in range(3)] == [1, 2, 2]  # one frame, 2 rows, 2 columns
    last = int(row[0, -1])  # the text after the image goes on from its largest extent, 2, not its 4 tokens
    assert row[:, -1].tolist() == [last] * 3 and last == len(row[0]) - 1 - 2
    stored, _ = adapter(batch)
    torch.testing.assert_close(stored, by_hand(adapter, batch), atol=1e-5, rtol=1e-5)
    text_positions = (batch["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)  # 1-D positions instead
    assert not torch.allclose(stored[:, 1:], by_hand(adapter, batch, position_ids=text_positions)[:, 1:], atol=1e-3)


def test_qwen_processor_loads_without_a_video_processor(checkpoints):
    """transformers' video processors need torchvision: AutoProcessor cannot load the Qwen processor here,
    the adapter loads its class without the video part; a checkpoint missing another part still fails."""
    import shutil

    from transformers import AutoProcessor, Qwen2_5_VLProcessor

    checkpoint = checkpoints["tiny-qwen2_5_vl"]
    with pytest.raises((ImportError, OSError)):
        AutoProcessor.from_pretrained(checkpoint)
    processor = VlmAdapter.load_processor(str(checkpoint))
    assert isinstance(processor, Qwen2_5_VLProcessor) and type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert not hasattr(processor, "video_processor") and processor.chat_template
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    broken = checkpoint.parent / "qwen-without-image-processor"
    shutil.copytree(checkpoint, broken)
    (broken / "processor_config.json").unlink()
    with pytest.raises(OSError, match="Can't load image processor"):
        VlmAdapter.load_processor(str(broken))


def test_pixel_budget_changes_the_number_of_image_tokens(checkpoints):
    checkpoint = str(checkpoints["tiny-qwen2_5_vl"])
    image = make_images()[2]  # 64 x 64 px

    def image_tokens(**budget) -> int:
        adapter = load_adapter({"adapter": "hf_vlm", "checkpoint": checkpoint, **budget}, device="cpu")
        batch = adapter.preprocess([image], "Describe this image.")
        count = int((batch["input_ids"] == image_token_id(adapter)).sum())
        assert batch["image_grid_thw"].prod().item() == 4 * count  # 2 x 2 patches merged into each token
        assert adapter(batch)[0].isfinite().all()
        return count

    assert image_tokens() == 4  # the saved budget, 56 x 56 px
    assert image_tokens(max_pixels=28 * 28) == 1
    assert image_tokens(min_pixels=112 * 112, max_pixels=112 * 112) == 16
    assert image_tokens(max_pixels=4 * QWEN_MAX_PIXELS) == 4  # 64 x 64 px: 56 x 56, under any larger budget
    assert image_tokens(min_pixels=84 * 84, max_pixels=4 * QWEN_MAX_PIXELS) == 9


def test_pixel_budget_is_refused_by_other_processors_before_the_model_loads(checkpoints, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the pixel budget was refused")

    monkeypatch.setattr(VlmAdapter, "load_model", classmethod(no_model))
    for name, image_processor in [
        ("tiny-llava", "CLIPImageProcessorPil"),
        ("tiny-idefics3", "Idefics3ImageProcessorPil"),
    ]:
        cfg = {"adapter": "hf_vlm", "checkpoint": str(checkpoints[name]), "max_pixels": 1003520}
        with pytest.raises(ValueError, match=rf"models\.<M>\.max_pixels.*{image_processor}.*does not take"):
            load_adapter(cfg, device="cpu")


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ({"max_pixels": 0}, "max_pixels.*positive integer"),
        ({"min_pixels": "a lot"}, "min_pixels.*positive integer"),
        ({"max_pixels": True}, "max_pixels.*positive integer"),
        ({"min_pixels": 2000, "max_pixels": 1000}, "min_pixels.*2000.*larger than.*max_pixels.*1000"),
    ],
)
def test_invalid_pixel_budgets_are_refused_before_loading(budget, message):
    with pytest.raises(ValueError, match=message):
        load_adapter({"adapter": "hf_vlm", "checkpoint": "/nonexistent", **budget})


@pytest.mark.parametrize("prompt_format", ["chat", "question_answer"])
def test_extraction_stores_what_the_adapter_pools(checkpoints, tmp_path, prompt_format):
    """Through the workflow's extraction (batches of 2, resumable file): the stored states, prompt and pooling."""
    import csv
    import dataclasses

    import h5py

    from medprobe.extract import extract_activations
    from medprobe.gpu_job import GpuJob
    from medprobe.settings import ExtractionSettings

    (tmp_path / "images").mkdir()
    rows = []
    for i, image in enumerate(make_images(seed=5)):
        image.save(tmp_path / "images" / f"img_{i}.png")
        rows.append({"image_id": f"img_{i}", "path": f"images/img_{i}.png", "split": "train", "patient_id": f"p{i}",
                     "label": "0", "labels": "", "source": "demo", "group": ""})  # fmt: skip
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    settings = ExtractionSettings(batch_size=2, num_workers=0, dtype="float32", prefetch_factor=2, shards=1,
                                  compression="none", compression_level=4, prompt_format=prompt_format)  # fmt: skip
    cfg = {"adapter": "hf_vlm", "checkpoint": str(checkpoints["tiny-idefics3"]), "pooling": "mean_image"}
    prompt = "What can you see on this knee radiograph?"
    out = extract_activations(manifest, tmp_path / "act.h5", settings=dataclasses.replace(settings), model_name="t",
                              model=cfg, prompt=prompt, job=GpuJob.on("cpu"), root=tmp_path, progress=False)  # fmt: skip
    adapter = load_adapter(cfg, device="cpu")
    images = [Image.open(tmp_path / "images" / f"img_{i}.png").convert("RGB") for i in range(3)]
    expected = torch.cat([adapter.forward(adapter.preprocess([im], prompt, prompt_format))[0] for im in images])
    with h5py.File(out, "r") as handle:
        np.testing.assert_allclose(handle["activations"][()], expected.numpy(), rtol=1e-4, atol=1e-4)
        assert handle.attrs["pooling"] == "mean_image" and handle.attrs["prompt_format"] == prompt_format
        assert handle.attrs["prompt"] == adapter.prompt_text(prompt, prompt_format)

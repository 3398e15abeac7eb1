"""Extraction into the activations HDF5 (medprobe.extract)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import medprobe
from medprobe.demo.models import build
from medprobe.extract import ImageReadError, extract_activations, extract_tasks, layer_names, read_activations
from medprobe.gpu_job import GpuJob
from medprobe.models import load_adapter
from medprobe.models.base import Adapter
from medprobe.settings import ExtractionSettings

torch.set_num_threads(1)

PROMPT = "What can you see on this fundus photograph?"
# The paper's prompt for the pathology tasks, word for word ("seen" sic).
PAPER_PROMPT = "What can you seen on this histological picture?"
N_IMAGES = 10
# The schema's defaults (workflow/schemas/config.schema.yaml, extraction:).
SETTINGS = ExtractionSettings(
    batch_size=16,
    num_workers=0,
    dtype="float16",
    prefetch_factor=2,
    shards=1,
    compression="none",
    compression_level=4,
    prompt_format="chat",
)
CPU = GpuJob.on("cpu")


def settings(**changes) -> ExtractionSettings:
    return dataclasses.replace(SETTINGS, **changes)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: build(name, root / name, seed=0) for name in ("tiny-idefics-small", "tiny-clip")}


@pytest.fixture(scope="session")
def idefics_cfg(checkpoints) -> dict:
    return {"adapter": "idefics", "checkpoint": str(checkpoints["tiny-idefics-small"]), "label": "ignored"}


@pytest.fixture(scope="session")
def clip_cfg(checkpoints) -> dict:
    return {"adapter": "clip", "checkpoint": str(checkpoints["tiny-clip"]), "revision": "main"}


def write_dataset(root: Path, n: int = N_IMAGES) -> Path:
    """PNG images under root/images and a manifest with relative paths (and the other manifest columns)."""
    rng = np.random.default_rng(7)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 256, (60, 70, 3), dtype=np.uint8))
        ImageDraw.Draw(image).rectangle((i * 5, i * 3, i * 5 + 20, i * 3 + 15), fill=(255, 255, 0))
        # A grey-scale image too: extraction must convert it to RGB.
        if i == 3:
            image = image.convert("L")
        image_id = f"img_{(7 * i) % n:02d}"  # manifest order is not sorted order
        image.save(root / "images" / f"{image_id}.png")
        rows.append(
            {
                "image_id": image_id,
                "path": f"images/{image_id}.png",
                "split": "train",
                "patient_id": f"p{i // 2}",
                "label": "0",
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


def manifest_ids(manifest: Path) -> list[str]:
    with manifest.open() as handle:
        return [row["image_id"] for row in csv.DictReader(handle)]


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path)


def test_idefics_file_matches_the_contract(dataset, tmp_path, idefics_cfg):
    out = extract_activations(
        dataset,
        tmp_path / "act" / "T5.h5",
        settings=settings(batch_size=4),
        model_name="idefics_9b",
        model=idefics_cfg,
        prompt=PROMPT,
        job=CPU,
        root=tmp_path,
        progress=False,
    )
    assert out == tmp_path / "act" / "T5.h5" and sorted(p.name for p in out.parent.iterdir()) == ["T5.h5"]
    with h5py.File(out, "r") as handle:
        assert set(handle) == {"ids", "activations"}
        assert list(handle["ids"].asstr()[()]) == manifest_ids(dataset)
        activations = handle["activations"]
        assert activations.shape == (N_IMAGES, 5, 64) and activations.dtype == np.float16
        assert activations.chunks == (N_IMAGES, 1, 64)
        attrs = dict(handle.attrs)
        stored = activations[()]
    assert list(attrs["layer_names"]) == [f"hidden.{i}" for i in range(5)]
    assert attrs["model"] == "idefics_9b" and attrs["checkpoint"] == idefics_cfg["checkpoint"]
    assert attrs["revision"] == "" and attrs["pooling"] == "last" and attrs["dtype"] == "float16"
    assert attrs["prompt"] == f"{PROMPT}<end_of_utterance>\nAssistant:" and attrs["prompt_format"] == "chat"
    assert attrs["num_hidden_states"] == 5
    assert attrs["manifest_sha256"] == hashlib.sha256(dataset.read_bytes()).hexdigest()
    assert (
        f"medprobe {medprobe.__version__}" in attrs["software_version"] and "transformers" in attrs["software_version"]
    )
    assert set(attrs) == {
        "layer_names",
        "num_hidden_states",
        "model",
        "checkpoint",
        "revision",
        "prompt",
        "prompt_format",
        "pooling",
        "dtype",
        "software_version",
        "manifest_sha256",
    }
    # Independent: each image alone through the adapter, in manifest order, then rounded to float16.
    adapter = load_adapter(idefics_cfg, device="cpu")
    for row, image_id in enumerate(manifest_ids(dataset)):
        single, _ = adapter.forward(adapter.preprocess([load_rgb(tmp_path / "images" / f"{image_id}.png")], PROMPT))
        np.testing.assert_allclose(stored[row].astype(np.float32), single[0].numpy(), rtol=2e-3, atol=1e-4)
    ids, layer2 = read_activations(out, "hidden.2")
    assert list(ids) == manifest_ids(dataset) and layer2.dtype == np.float32
    np.testing.assert_array_equal(layer2, stored[:, 2].astype(np.float32))
    np.testing.assert_array_equal(read_activations(out, -1)[1], stored[:, 4].astype(np.float32))
    assert layer_names(out) == [f"hidden.{i}" for i in range(5)]


def test_question_answer_file_records_the_papers_prompt_and_the_model_depth(dataset, tmp_path, idefics_cfg):
    out = extract_activations(
        dataset,
        tmp_path / "qa.h5",
        settings=settings(prompt_format="question_answer", batch_size=4),
        model_name="idefics_9b",
        model=idefics_cfg | {"layers": [3, 1]},
        prompt=PAPER_PROMPT,
        job=CPU,
        root=tmp_path,
        progress=False,
    )
    with h5py.File(out, "r") as handle:
        attrs = dict(handle.attrs)
        stored = handle["activations"][()]
    assert attrs["prompt"] == "Question: What can you seen on this histological picture? Answer:"
    assert attrs["prompt_format"] == "question_answer"
    # Two layers stored, but the model's depth is kept: 4 decoder layers + the embedding output.
    assert list(attrs["layer_names"]) == ["hidden.1", "hidden.3"] and attrs["num_hidden_states"] == 5
    adapter = load_adapter(idefics_cfg, device="cpu")
    images = [load_rgb(tmp_path / "images" / f"{image_id}.png") for image_id in manifest_ids(dataset)]
    expected, _ = adapter.forward(adapter.preprocess(images[:2], PAPER_PROMPT, "question_answer"), layers=[1, 3])
    np.testing.assert_allclose(stored[:2].astype(np.float32), expected.numpy(), rtol=2e-3, atol=1e-4)
    chat, _ = adapter.forward(adapter.preprocess(images[:2], PAPER_PROMPT), layers=[1, 3])
    assert np.abs(stored[:2].astype(np.float32) - chat.numpy()).max() > 1e-2


def test_clip_files_do_not_depend_on_the_prompt_format(dataset, tmp_path, clip_cfg, monkeypatch):
    common = dict(model_name="clip", model=clip_cfg, job=CPU, root=tmp_path, progress=False)
    qa, chat_settings = settings(batch_size=4, prompt_format="question_answer"), settings(batch_size=4)
    chat = read_all(extract_activations(dataset, tmp_path / "chat.h5", settings=chat_settings, prompt=PROMPT, **common))
    out = tmp_path / "qa.h5"
    # An interrupted question_answer run is resumed by a chat run: an image-only model sees no prompt.
    with monkeypatch.context() as patch:
        count_forwards(patch, fail_after=1)
        with pytest.raises(Interrupt):
            extract_activations(dataset, out, settings=qa, prompt=PAPER_PROMPT, **common)
    with monkeypatch.context() as patch:
        calls = count_forwards(patch)
        extract_activations(dataset, out, settings=chat_settings, prompt=PROMPT, **common)
    assert calls == [4, 2]
    resumed = read_all(out)
    assert resumed["attr:prompt"] == resumed["attr:prompt_format"] == "" and resumed["attr:num_hidden_states"] == 5
    for key in chat:
        np.testing.assert_array_equal(resumed[key], chat[key], err_msg=key)


def test_clip_embeddings_layer_subset_and_float32(dataset, tmp_path, clip_cfg, checkpoints):
    from transformers import CLIPModel

    out = extract_activations(
        dataset,
        tmp_path / "clip.h5",
        settings=settings(batch_size=3, dtype="float32"),
        model_name="clip",
        model=clip_cfg | {"layers": [-1, 0, 2]},
        prompt=PROMPT,
        job=CPU,
        root=tmp_path,
        progress=False,
    )
    with h5py.File(out, "r") as handle:
        assert handle["activations"].shape == (N_IMAGES, 3, 64) and handle["activations"].dtype == np.float32
        assert handle["embeddings"].shape == (N_IMAGES, 32) and handle["embeddings"].dtype == np.float32
        assert handle.attrs["prompt"] == "" and handle.attrs["pooling"] == "cls" and handle.attrs["revision"] == "main"
        assert list(handle.attrs["layer_names"]) == ["hidden.0", "hidden.2", "hidden.4"]
    assert layer_names(out) == ["hidden.0", "hidden.2", "hidden.4", "image_embeds"]
    # Independent: the HF CLIP model on every image.
    model = CLIPModel.from_pretrained(checkpoints["tiny-clip"]).eval()
    adapter = load_adapter(clip_cfg, device="cpu")
    images = [load_rgb(tmp_path / "images" / f"{i}.png") for i in manifest_ids(dataset)]
    pixels = adapter.preprocess(images, "")["pixel_values"]
    with torch.inference_mode():
        states = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
        features = model.get_image_features(pixel_values=pixels)
    features = (features if torch.is_tensor(features) else features.pooler_output).numpy()
    for name, index in (("hidden.0", 0), ("hidden.2", 2), ("hidden.4", 4)):
        ids, values = read_activations(out, name)
        np.testing.assert_allclose(values, states[index][:, 0].numpy(), atol=1e-5, rtol=0)
    assert list(ids) == manifest_ids(dataset)
    np.testing.assert_allclose(read_activations(out, "image_embeds")[1], features, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(read_activations(out, -1)[1], read_activations(out, "image_embeds")[1])
    np.testing.assert_array_equal(read_activations(out, 1)[1], read_activations(out, "hidden.2")[1])
    with pytest.raises(ValueError, match="hidden.3.*hidden.0, hidden.2, hidden.4, image_embeds"):
        read_activations(out, "hidden.3")
    with pytest.raises(ValueError, match="out of range"):
        read_activations(out, 4)
    # Worker processes load and preprocess the same way.
    with_workers = extract_activations(
        dataset,
        tmp_path / "clip_workers.h5",
        settings=settings(batch_size=3, num_workers=2, dtype="float32"),
        model_name="clip",
        model=clip_cfg | {"layers": [-1, 0, 2]},
        prompt=PROMPT,
        job=CPU,
        root=tmp_path,
        progress=False,
    )
    for name in layer_names(out):
        np.testing.assert_array_equal(read_activations(with_workers, name)[1], read_activations(out, name)[1])


class Interrupt(RuntimeError):
    pass


def count_forwards(monkeypatch, fail_after: int | None = None) -> list[int]:
    """Count Adapter.forward calls (batch sizes); raise Interrupt once ``fail_after`` batches are done."""
    calls: list[int] = []
    original = Adapter.forward

    def forward(self, batch, layers=None):
        if fail_after is not None and len(calls) == fail_after:
            raise Interrupt(f"interrupted after {fail_after} batches")
        calls.append(len(next(iter(batch.values()))))
        return original(self, batch, layers)

    monkeypatch.setattr(Adapter, "forward", forward)
    return calls


def read_all(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as handle:
        return {key: handle[key][()] for key in handle} | {f"attr:{k}": v for k, v in handle.attrs.items()}


def test_interrupted_extraction_resumes_to_identical_data(dataset, tmp_path, idefics_cfg, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="medprobe.extract")
    kwargs = dict(
        settings=settings(batch_size=3),
        model_name="idefics_9b",
        model=idefics_cfg,
        prompt=PROMPT,
        job=CPU,
        root=tmp_path,
        progress=False,
    )
    reference = read_all(extract_activations(dataset, tmp_path / "reference.h5", **kwargs))
    out = tmp_path / "resumed.h5"
    partial = tmp_path / "resumed.h5.partial"

    with monkeypatch.context() as patch:
        count_forwards(patch, fail_after=2)
        with pytest.raises(Interrupt):
            extract_activations(dataset, out, **kwargs)
    assert not out.exists() and partial.exists()
    with h5py.File(partial, "r") as handle:
        assert handle.attrs["rows_done"] == 6

    with monkeypatch.context() as patch:
        calls = count_forwards(patch)
        extract_activations(dataset, out, **kwargs)
    assert calls == [3, 1]  # only rows 6..9 were computed again
    assert not partial.exists()
    assert "resuming" in caplog.text and "images/s" in caplog.text
    resumed = read_all(out)
    assert resumed.keys() == reference.keys()
    for key in reference:
        if key != "attr:software_version":
            np.testing.assert_array_equal(resumed[key], reference[key], err_msg=key)


def test_a_partial_file_for_other_settings_is_started_over(dataset, tmp_path, idefics_cfg, monkeypatch, caplog):
    kwargs = dict(settings=settings(batch_size=4), model_name="idefics_9b", job=CPU, root=tmp_path, progress=False)
    out = tmp_path / "act.h5"
    with monkeypatch.context() as patch:
        count_forwards(patch, fail_after=1)
        with pytest.raises(Interrupt):
            extract_activations(
                dataset, out, model=idefics_cfg | {"layers": [0, 1]}, prompt="Another prompt?", **kwargs
            )
    with monkeypatch.context() as patch:
        calls = count_forwards(patch)
        extract_activations(dataset, out, model=idefics_cfg, prompt=PROMPT, **kwargs)
    assert calls == [4, 4, 2]  # everything recomputed
    assert "different manifest, model, prompt, prompt format, layers or dtype; starting over" in caplog.text
    fresh = read_all(extract_activations(dataset, tmp_path / "fresh.h5", model=idefics_cfg, prompt=PROMPT, **kwargs))
    np.testing.assert_array_equal(read_all(out)["activations"], fresh["activations"])


def test_a_partial_of_the_other_prompt_format_starts_over(dataset, tmp_path, idefics_cfg, monkeypatch, caplog):
    kwargs = dict(
        model_name="idefics_9b", model=idefics_cfg, prompt=PAPER_PROMPT, job=CPU, root=tmp_path, progress=False
    )
    out = tmp_path / "act.h5"
    partial = tmp_path / "act.h5.partial"
    for first, second in (("question_answer", "chat"), ("chat", "question_answer")):
        caplog.clear()
        with monkeypatch.context() as patch:
            count_forwards(patch, fail_after=2)
            with pytest.raises(Interrupt):
                extract_activations(dataset, out, settings=settings(batch_size=4, prompt_format=first), **kwargs)
        with h5py.File(partial, "r") as handle:
            assert handle.attrs["rows_done"] == 8 and handle.attrs["prompt_format"] == first
        with monkeypatch.context() as patch:
            calls = count_forwards(patch)
            extract_activations(dataset, out, settings=settings(batch_size=4, prompt_format=second), **kwargs)
        assert calls == [4, 4, 2], (first, second)  # nothing of the other format's rows is kept
        assert "starting over" in caplog.text and "resuming" not in caplog.text
        fresh = read_all(
            extract_activations(
                dataset, tmp_path / f"{second}.h5", settings=settings(batch_size=4, prompt_format=second), **kwargs
            )
        )
        rerun = read_all(out)
        assert rerun["attr:prompt_format"] == second
        np.testing.assert_array_equal(rerun["activations"], fresh["activations"])
        out.unlink()


def subset_manifest(manifest: Path, out: Path, rows: int) -> Path:
    """The manifest's first ``rows`` rows: another task over the same images."""
    lines = manifest.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[: rows + 1]))
    return out


def test_one_job_over_several_tasks_writes_each_file_as_its_own_job(dataset, tmp_path, idefics_cfg, monkeypatch):
    """group_tasks: the model loads once, and each task's file holds what extract_activations writes alone."""
    manifests = {"T1": dataset, "T2": subset_manifest(dataset, tmp_path / "t2.csv", rows=7)}
    prompts = {"T1": PROMPT, "T2": PAPER_PROMPT}
    common = dict(settings=settings(batch_size=3), model_name="idefics_9b", model=idefics_cfg, root=tmp_path)
    alone = {
        task: read_all(extract_activations(manifests[task], tmp_path / f"alone_{task}.h5", prompt=prompts[task],
                                           job=CPU, progress=False, **common))
        for task in manifests
    }  # fmt: skip
    loads = []
    load_adapter = GpuJob.load_adapter
    monkeypatch.setattr(GpuJob, "load_adapter", lambda self, model: loads.append(model) or load_adapter(self, model))
    outs = {task: tmp_path / "grouped" / f"{task}.h5" for task in manifests}
    written = extract_tasks(manifests, outs, prompts=prompts, job=CPU, progress=False, **common)
    assert written == [outs["T1"], outs["T2"]] and len(loads) == 1
    for task in manifests:
        grouped = read_all(outs[task])
        assert grouped.keys() == alone[task].keys()
        assert grouped["attr:prompt"] != alone["T2" if task == "T1" else "T1"]["attr:prompt"]
        for key in alone[task]:
            np.testing.assert_array_equal(grouped[key], alone[task][key], err_msg=f"{task} {key}")


def test_one_job_over_several_tasks_checks_every_manifest_before_the_model_loads(
    dataset, tmp_path, idefics_cfg, monkeypatch
):
    second = subset_manifest(dataset, tmp_path / "t2.csv", rows=7)
    (tmp_path / "images" / "img_07.png").unlink()  # in T1's manifest only (T2 has the first 7 rows)
    monkeypatch.setattr(GpuJob, "load_adapter", lambda *args: pytest.fail("model loaded before the checks"))
    outs = {"T2": tmp_path / "T2.h5", "T1": tmp_path / "T1.h5"}
    with pytest.raises(FileNotFoundError, match=r"'img_07'.*images/img_07\.png"):
        extract_tasks(
            {"T2": second, "T1": dataset}, outs, prompts={"T2": PROMPT, "T1": PROMPT}, settings=SETTINGS,
            model_name="m", model=idefics_cfg, root=tmp_path, job=CPU, progress=False,
        )  # fmt: skip
    assert not any(path.exists() for path in tmp_path.glob("T*.h5*"))
    with pytest.raises(ValueError, match="same tasks"):
        extract_tasks({"T1": dataset}, outs, prompts={"T1": PROMPT}, settings=SETTINGS, model_name="m",
                      model=idefics_cfg, root=tmp_path, job=CPU)  # fmt: skip
    with pytest.raises(ValueError, match="shards=2"):
        extract_tasks({"T1": dataset}, {"T1": outs["T1"]}, prompts={"T1": PROMPT}, settings=settings(shards=2),
                      model_name="m", model=idefics_cfg, root=tmp_path, job=CPU)  # fmt: skip


def test_missing_image_is_named_before_the_model_loads(dataset, tmp_path, idefics_cfg, monkeypatch):
    (tmp_path / "images" / "img_07.png").unlink()

    def must_not_load(*args, **kwargs):
        raise AssertionError("model loaded although an image is missing")

    monkeypatch.setattr("medprobe.models.load_adapter", must_not_load)
    with pytest.raises(FileNotFoundError, match=r"'img_07'.*images/img_07\.png"):
        extract_activations(
            dataset,
            tmp_path / "x.h5",
            settings=SETTINGS,
            model_name="m",
            model=idefics_cfg,
            prompt=PROMPT,
            root=tmp_path,
            progress=False,
        )


@pytest.mark.parametrize("num_workers", [0, 1])
def test_unreadable_image_is_named(dataset, tmp_path, clip_cfg, num_workers):
    (tmp_path / "images" / "img_04.png").write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match=r"'img_04'.*images/img_04\.png"):
        extract_activations(
            dataset,
            tmp_path / "x.h5",
            settings=settings(batch_size=4, num_workers=num_workers),
            model_name="clip",
            model=clip_cfg,
            prompt="",
            job=CPU,
            root=tmp_path,
            progress=False,
        )
    assert not (tmp_path / "x.h5").exists()


def test_bad_arguments_are_named(dataset, tmp_path, clip_cfg):
    common = dict(model_name="clip", prompt="", job=CPU, root=tmp_path, progress=False)
    with pytest.raises(ValueError, match="'bfloat16'.*float16, float32"):
        extract_activations(dataset, tmp_path / "x.h5", settings=settings(dtype="bfloat16"), model=clip_cfg, **common)
    with pytest.raises(ValueError, match="layer 5 is out of range.*5 hidden states"):
        extract_activations(
            dataset, tmp_path / "x.h5", settings=SETTINGS, model=clip_cfg | {"layers": [0, 5]}, **common
        )
    with pytest.raises(ValueError, match="'prompt_format' is 'plain'.*chat, question_answer"):
        extract_activations(
            dataset, tmp_path / "x.h5", settings=settings(prompt_format="plain"), model=clip_cfg, **common
        )
    common |= dict(settings=SETTINGS, model=clip_cfg)
    bad_manifest = tmp_path / "bad.csv"
    bad_manifest.write_text("image_id,file\na,b.png\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*\['path'\]"):
        extract_activations(bad_manifest, tmp_path / "x.h5", **common)
    duplicate = tmp_path / "dup.csv"
    duplicate.write_text("image_id,path\na,images/img_00.png\na,images/img_01.png\n")
    with pytest.raises(ValueError, match="duplicate image_id 'a'"):
        extract_activations(duplicate, tmp_path / "x.h5", **common)
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        read_activations(tmp_path / "nope.h5", 0)


def test_absolute_paths_and_single_row_chunks(tmp_path, clip_cfg):
    image_path = tmp_path / "one.png"
    Image.new("RGB", (30, 40), (10, 200, 30)).save(image_path)
    manifest = tmp_path / "one.csv"
    manifest.write_text(f"image_id,path\nonly,{image_path}\n")
    out = extract_activations(
        manifest,
        tmp_path / "one.h5",
        settings=SETTINGS,
        model_name="clip",
        model=clip_cfg,
        prompt="",
        job=CPU,
        root=tmp_path / "elsewhere",
        progress=False,
    )
    with h5py.File(out, "r") as handle:
        assert handle["activations"].chunks == (1, 1, 64) and handle["embeddings"].chunks == (1, 32)
        assert list(handle["ids"].asstr()[()]) == ["only"]


# ---------------------------------------------------------------------------- SIGKILL, shards, storage
KILLABLE_RUN = """
import sys, time, logging
import torch
from medprobe.extract import extract_activations
from medprobe.gpu_job import GpuJob
from medprobe.models.base import Adapter
from medprobe.settings import ExtractionSettings
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO)
original = Adapter.forward
def slow_forward(self, batch, layers=None):  # slow enough to be killed mid-run; the data is unchanged
    time.sleep(float(sys.argv[5]))
    return original(self, batch, layers)
Adapter.forward = slow_forward
settings = ExtractionSettings(batch_size=2, num_workers=0, dtype="float16", prefetch_factor=2, shards=1,
    compression="none", compression_level=4, prompt_format="chat")
extract_activations(sys.argv[1], sys.argv[2], settings=settings, model_name="idefics_9b", model={"adapter": "idefics",
    "checkpoint": sys.argv[3]}, prompt="What can you see?", job=GpuJob.on("cpu"), root=sys.argv[4], progress=False)
"""


def rows_done(partial: Path) -> int:
    try:
        with h5py.File(partial, "r", locking=False) as handle:
            return int(handle.attrs.get("rows_done", 0))
    except (OSError, KeyError):
        return 0


def test_sigkilled_extraction_resumes_to_an_uninterrupted_runs_data(tmp_path, checkpoints):
    import signal
    import subprocess
    import sys
    import time

    manifest = write_dataset(tmp_path, n=16)
    checkpoint = str(checkpoints["tiny-idefics-small"])
    out, partial = tmp_path / "killed.h5", tmp_path / "killed.h5.partial"

    def run(path: Path, delay: float) -> subprocess.Popen:
        args = [sys.executable, "-c", KILLABLE_RUN, str(manifest), str(path), checkpoint, str(tmp_path), str(delay)]
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    job = run(out, 0.3)
    deadline = time.monotonic() + 120
    while rows_done(partial) < 4 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.communicate()
    assert job.returncode == -signal.SIGKILL and not out.exists()
    done_before = rows_done(partial)
    assert 4 <= done_before < 16

    rerun = run(out, 0.0)
    _, log = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, log
    assert "resuming" in log and f"at row {done_before} of 16" in log
    reference = run(tmp_path / "reference.h5", 0.0)
    assert reference.wait(timeout=300) == 0
    resumed, expected = read_all(out), read_all(tmp_path / "reference.h5")
    assert resumed.keys() == expected.keys() and not partial.exists()
    for key in expected:
        np.testing.assert_array_equal(resumed[key], expected[key], err_msg=key)


def test_shard_rows_are_whole_batches_covering_every_row():
    from medprobe.extract import shard_rows

    assert [shard_rows(10, 3, i, 3) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert [shard_rows(2, 4, i, 3) for i in range(3)] == [(0, 0), (0, 0), (0, 2)]  # more shards than batches
    for n_rows, batch, shards in [(1000, 16, 7), (17, 1, 4), (5, 8, 2)]:
        ranges = [shard_rows(n_rows, batch, i, shards) for i in range(shards)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n_rows
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(start % batch == 0 for start, _ in ranges)
    with pytest.raises(ValueError, match="shard index 3 is out of range for 3 shards"):
        shard_rows(10, 2, 3, 3)


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_sharded_extraction_merges_into_the_unsharded_file(dataset, tmp_path, clip_cfg, compression):
    from medprobe.extract import merge_shards

    whole = settings(batch_size=2, compression=compression or "none")
    in_three = dataclasses.replace(whole, shards=3)
    common = dict(
        model_name="clip", model=clip_cfg | {"layers": [1, 3]}, prompt="", job=CPU, root=tmp_path, progress=False
    )
    unsharded = read_all(extract_activations(dataset, tmp_path / "whole.h5", settings=whole, **common))
    shards = [
        extract_activations(dataset, tmp_path / "T.shards" / f"{i}.h5", settings=in_three, shard=i, **common)
        for i in range(3)
    ]
    # The file of one job over the whole manifest is already the activations file: merging only names it.
    linked = merge_shards(dataset, [tmp_path / "whole.h5"], tmp_path / "linked.h5")
    assert linked.read_bytes() == (tmp_path / "whole.h5").read_bytes()
    with h5py.File(shards[1], "r") as handle:  # 5 batches of 2 over 3 shards: rows 2-5 in shard 1
        assert (handle.attrs["row_start"], handle.attrs["row_stop"], handle["activations"].shape[0]) == (2, 6, 4)
    merged = read_all(merge_shards(dataset, list(reversed(shards)), tmp_path / "merged.h5"))
    assert merged.keys() == unsharded.keys()
    # The attributes that make only some stored layers usable survive the merge.
    assert merged["attr:num_hidden_states"] == 5 and merged["attr:prompt_format"] == ""
    assert list(merged["attr:layer_names"]) == ["hidden.1", "hidden.3"]
    for key in unsharded:
        np.testing.assert_array_equal(merged[key], unsharded[key], err_msg=key)
    with h5py.File(tmp_path / "merged.h5", "r") as m, h5py.File(tmp_path / "whole.h5", "r") as w:
        for name in ("activations", "embeddings"):
            assert (m[name].chunks, m[name].compression) == (w[name].chunks, w[name].compression)
        assert w["activations"].compression == compression and w["activations"].chunks == (N_IMAGES, 1, 64)
    with pytest.raises(ValueError, match=r"expected shards 0..2, got \[0, 2\]"):
        merge_shards(dataset, [shards[0], shards[2]], tmp_path / "bad.h5")
    other = extract_activations(
        dataset,
        tmp_path / "o.shards" / "1.h5",
        settings=in_three,
        shard=1,
        **(common | {"model": clip_cfg | {"layers": [0]}}),
    )
    with pytest.raises(ValueError, match="different run.*layer_names"):
        merge_shards(dataset, [shards[0], other, shards[2]], tmp_path / "bad.h5")
    # An empty shard (more shards than batches) is a valid file and merges too.
    in_nine = dataclasses.replace(whole, shards=9)
    empty = extract_activations(dataset, tmp_path / "e.shards" / "0.h5", settings=in_nine, shard=0, **common)
    with h5py.File(empty, "r") as handle:
        assert handle["activations"].shape == (0, 2, 64)


def test_projected_size_is_logged_and_a_full_disk_refuses_to_start(dataset, tmp_path, clip_cfg, monkeypatch, caplog):
    import shutil
    from collections import namedtuple

    from medprobe.extract import InsufficientDiskSpaceError, projected_size

    caplog.set_level(logging.INFO, logger="medprobe.extract")
    common = dict(
        settings=SETTINGS, model_name="clip", model=clip_cfg, prompt="", job=CPU, root=tmp_path, progress=False
    )
    out = extract_activations(dataset, tmp_path / "a.h5", **common)
    ids = manifest_ids(dataset)
    needed = projected_size(ids, 5, 64, 32, np.dtype(np.float16))
    values = N_IMAGES * (5 * 64 + 32) * 2
    assert values < needed < values + 100_000 and out.stat().st_size < needed  # an upper bound of the real file
    assert f"a.h5 ({N_IMAGES} images) needs about" in caplog.text and "free in" in caplog.text
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(InsufficientDiskSpaceError, match=rf"needs about {needed} bytes .* has 1000 bytes .* free"):
        extract_activations(dataset, tmp_path / "b.h5", **common)
    assert not (tmp_path / "b.h5.partial").exists()


def test_progress_goes_to_the_log_with_rate_and_eta(dataset, tmp_path, clip_cfg, caplog):
    caplog.set_level(logging.INFO, logger="medprobe.extract")
    extract_activations(
        dataset, tmp_path / "p.h5", settings=settings(batch_size=4), model_name="clip", model=clip_cfg, prompt="",
        job=CPU, root=tmp_path, progress="log",
    )  # fmt: skip
    bar_lines = [r.getMessage() for r in caplog.records if "img/s" in r.getMessage()]
    assert bar_lines and bar_lines[-1].startswith("clip: 100%") and f"{N_IMAGES}/{N_IMAGES}" in bar_lines[-1]
    assert "<00:00" in bar_lines[-1]  # the ETA field
    assert "images/s, peak device memory n/a (not on CUDA)" in caplog.text


def test_out_of_memory_halves_the_batch_and_keeps_the_data(dataset, tmp_path, clip_cfg, monkeypatch, caplog):
    """A CUDA OOM (simulated: forwards of more than 2 images raise) halves the batch; the file is unchanged."""
    kwargs = dict(
        settings=settings(batch_size=8),
        model_name="clip",
        model=clip_cfg,
        prompt="",
        job=CPU,
        root=tmp_path,
        progress=False,
    )
    reference = read_all(extract_activations(dataset, tmp_path / "reference.h5", **kwargs))
    original = Adapter.forward
    sizes: list[int] = []

    def forward(self, batch, layers=None):
        size = len(next(iter(batch.values())))
        if size > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        sizes.append(size)
        return original(self, batch, layers)

    monkeypatch.setattr(Adapter, "forward", forward)
    caplog.set_level(logging.WARNING)
    halved = read_all(extract_activations(dataset, tmp_path / "halved.h5", **kwargs))
    assert max(sizes) == 2 and sum(sizes) == len(manifest_ids(dataset))
    for key in reference:
        if key != "attr:software_version":
            np.testing.assert_array_equal(halved[key], reference[key], err_msg=key)


def test_layer_selections_all_every_k_and_indices():
    from medprobe.extract.plan import resolve_layers

    assert resolve_layers("all", 4) == resolve_layers(None, 4) == [0, 1, 2, 3]
    assert resolve_layers("every:3", 10) == [0, 3, 6, 9]
    assert resolve_layers("every:3", 11) == [0, 3, 6, 9, 10]  # the last hidden state is always kept
    assert resolve_layers("every:1", 3) == [0, 1, 2] and resolve_layers("every:50", 33) == [0, 32]
    assert resolve_layers([-1, 0, 2], 5) == [0, 2, 4]
    for bad in ("every:0", "every:", "every:x", "some", "every3"):
        with pytest.raises(ValueError, match="valid: 'all', 'every:<k>'"):
            resolve_layers(bad, 5)


def test_int8_storage_is_per_channel_quantised_float16_and_sharding_does_not_change_it(dataset, tmp_path, clip_cfg):
    """extraction.dtype int8: the jobs write float16, merge_shards stores round(x / s) with s = max|x| / 127 per
    layer and channel over every image; readers get q * s back, within s / 2 of the float16 values; one job or
    three shards give the same file contents; extraction.layers every:2 stores 0, 2, 4 of the 5 hidden states."""
    from medprobe.extract import merge_shards

    common = dict(model_name="clip", model=clip_cfg, prompt="", job=CPU, root=tmp_path, progress=False)
    reference = extract_activations(dataset, tmp_path / "f16.h5", settings=settings(batch_size=2), **common)
    int8 = settings(batch_size=2, dtype="int8", layers="every:2")
    whole = extract_activations(dataset, tmp_path / "one.shards" / "0.h5", settings=int8, **common)
    one = merge_shards(dataset, [whole], tmp_path / "one.h5")
    shards = [
        extract_activations(
            dataset, tmp_path / "T.shards" / f"{i}.h5", settings=dataclasses.replace(int8, shards=3), shard=i, **common
        )
        for i in range(3)
    ]
    three = merge_shards(dataset, shards, tmp_path / "three.h5")
    with h5py.File(whole) as shard:
        assert shard["activations"].dtype == np.float16 and shard.attrs["dtype"] == "int8"
    with h5py.File(reference) as f16, h5py.File(one) as q, h5py.File(three) as q3:
        assert q["activations"].dtype == np.int8 and q["embeddings"].dtype == np.int8 and q.attrs["dtype"] == "int8"
        assert list(q.attrs["layer_names"]) == ["hidden.0", "hidden.2", "hidden.4"]
        assert q["scales"].shape == (3, 64) and q["embedding_scales"].shape == (q["embeddings"].shape[1],)
        for name in ("activations", "embeddings", "scales", "embedding_scales"):
            np.testing.assert_array_equal(q[name][()], q3[name][()], err_msg=name)
        for stored, layer in enumerate([0, 2, 4]):
            x = f16["activations"][:, layer, :].astype(np.float32)
            scale = np.abs(x).max(axis=0) / 127
            np.testing.assert_allclose(q["scales"][stored], np.where(scale > 0, scale, 1), rtol=1e-6)
            expected = np.clip(np.rint(x / q["scales"][stored]), -127, 127).astype(np.int8)
            np.testing.assert_array_equal(q["activations"][:, stored, :], expected)
    for stored, name in enumerate(["hidden.0", "hidden.2", "hidden.4"]):
        _, values = read_activations(one, name)
        _, exact = read_activations(reference, ["hidden.0", "hidden.1", "hidden.2", "hidden.3", "hidden.4"].index(name))
        with h5py.File(one) as q:
            assert np.all(np.abs(values - exact) <= q["scales"][stored] / 2 + 1e-6), name
    _, embeds = read_activations(one, "image_embeds")
    _, exact = read_activations(reference, "image_embeds")
    assert np.abs(embeds - exact).max() <= np.abs(exact).max() / 127

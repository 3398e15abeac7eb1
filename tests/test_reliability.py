"""Fault injection (docs/reliability.md): bad numbers, GPU memory, kills, integrity, determinism, security.

Image faults are in tests/test_images.py and tests/test_prepare.py, config faults in tests/test_config.py.
The workflow-level tests run a reduced demo (task T2, the tiny CLIP, few bootstrap resamples) through
Snakemake in temporary directories.
"""

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import evaluate_all, task_settings

from medprobe import checks
from medprobe.checks import ImageTooLargeError, NonFiniteError, OomBackoff, check_finite, run_with_oom_backoff
from medprobe.evaluate import compare_models, load_predictions
from medprobe.prepare import _write_atomic
from medprobe.settings import EvaluationSettings
from medprobe.tables import write_table

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
FAKE_TOKENS = {"HF_TOKEN": "hf_FAKEtoken1234567890abcdef", "KAGGLE_KEY": "kagglefakekey0987654321"}


# ----------------------------------------------------------------------------------------------- numbers
def test_check_finite_names_the_images():
    values = np.ones((6, 2, 3), dtype=np.float32)
    values[1, 0, 2] = np.nan
    values[4, 1, 0] = -np.inf
    ids = ["a", "b", "c", "d", "e", "f"]
    with pytest.raises(NonFiniteError, match=r"features.h5: activations of 2 of 6 image\(s\).*: b, e$") as error:
        check_finite(values, ids, "features.h5", "activations")
    assert error.value.ids == ["b", "e"]
    check_finite(np.ones((3, 2)), ["x", "y", "z"], "fine")  # no error
    with pytest.raises(NonFiniteError, match=": y"):
        check_finite(torch.tensor([[0.0], [float("inf")], [1.0]], dtype=torch.float16), ["x", "y", "z"], "tensor")
    with pytest.raises(ValueError, match="2 ids for an array of 3 rows"):
        check_finite(np.ones(3), ["x", "y"], "where")


def test_check_finite_lists_at_most_ten_ids():
    values = np.full((25, 2), np.nan)
    with pytest.raises(NonFiniteError, match=r"i9, \.\.\. \(15 more\)"):
        check_finite(values, [f"i{i}" for i in range(25)], "p")


def write_probe_dir(folder, manifest_path, probabilities, classes, kind="multiclass", layers=None):
    """A probe output folder (predictions.h5, layers.h5, probe.json) for the test ids of a manifest."""
    manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    ids = manifest.loc[manifest["split"] == "test", "image_id"].tolist()
    folder.mkdir(parents=True, exist_ok=True)
    layers = [probabilities] if layers is None else layers
    for name, data, attrs in [
        ("predictions.h5", probabilities, {"layer": "hidden.0"}),
        ("layers.h5", np.stack(layers), {"layer_names": [f"hidden.{i}" for i in range(len(layers))]}),
    ]:
        with h5py.File(folder / name, "w") as handle:
            handle["ids"] = np.array(ids, dtype=object).astype(h5py.string_dtype())
            handle["probabilities"] = data
            handle.attrs["classes"] = classes
            handle.attrs["kind"] = kind
            for key, value in attrs.items():
                handle.attrs[key] = value
    (folder / "probe.json").write_text(json.dumps({"layer": "hidden.0", "n_train": 10}))
    return ids


def write_manifest(path, labels_by_split, kind="multiclass"):
    rows = []
    for split, labels in labels_by_split.items():
        for i, label in enumerate(labels):
            rows.append(
                {
                    "image_id": f"{split}{i}",
                    "path": f"x/{split}{i}.png",
                    "split": split,
                    "patient_id": f"P{split}{i}",
                    "label": label if kind != "multilabel" else "",
                    "labels": label if kind == "multilabel" else "",
                    "source": "s",
                    "group": "",
                }
            )
    pd.DataFrame(rows).to_csv(path, index=False)


TASK3 = {"kind": "multiclass", "classes": ["a", "b", "c"], "metric": "auc"}
EVALUATION = {"bootstrap": 20, "ci": 0.95}


def test_nan_probabilities_are_reported_with_image_ids(tmp_path):
    manifest = tmp_path / "m.csv"
    write_manifest(manifest, {"train": ["a", "b", "c"], "test": ["a", "b", "c", "a", "b", "c"]})
    probabilities = np.full((6, 3), 1 / 3)
    probabilities[3] = np.nan
    good = np.full((6, 3), 1 / 3)
    ids = write_probe_dir(tmp_path / "probe", manifest, probabilities, TASK3["classes"])
    with pytest.raises(NonFiniteError, match=r"predictions\.h5: probabilities of 1 of 6 image\(s\).*test3"):
        load_predictions(tmp_path / "probe" / "predictions.h5")
    with pytest.raises(NonFiniteError, match="test3"):
        evaluate_all(
            task="T",
            model="m",
            task_config=TASK3,
            manifest=manifest,
            probe_dir=tmp_path / "probe",
            evaluation=EVALUATION,
            seed=0,
            out_dir=tmp_path / "out",
        )
    # a NaN in one layer's probabilities (layers.h5) is caught too, naming the layer
    bad_layer = good.copy()
    bad_layer[0, 1] = np.inf
    write_probe_dir(tmp_path / "probe2", manifest, good, TASK3["classes"], layers=[good, bad_layer])
    with pytest.raises(NonFiniteError, match=r"layers\.h5 layer hidden\.1: probabilities.*test0"):
        evaluate_all(
            task="T",
            model="m",
            task_config=TASK3,
            manifest=manifest,
            probe_dir=tmp_path / "probe2",
            evaluation=EVALUATION,
            seed=0,
            out_dir=tmp_path / "out",
        )
    assert ids[3] == "test3"


def test_class_missing_from_the_test_split_is_reported_not_a_crash(tmp_path, caplog):
    manifest = tmp_path / "m.csv"
    write_manifest(manifest, {"train": ["a", "b", "c"], "test": ["a", "b", "a", "b", "a", "b"]})  # no "c" in test
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(3), size=6)
    write_probe_dir(tmp_path / "probe", manifest, probabilities, TASK3["classes"])
    with caplog.at_level(logging.WARNING, logger="medprobe"):
        tables = evaluate_all(
            task="T",
            model="m",
            task_config=TASK3,
            manifest=manifest,
            probe_dir=tmp_path / "probe",
            evaluation=EVALUATION,
            seed=0,
            out_dir=tmp_path / "out",
        )
    assert any("class 'c' has no positives among 6 image(s)" in record.getMessage() for record in caplog.records)
    metrics = tables["metrics"]
    auc = metrics[metrics["metric"] == "auc"].set_index("class")["value"]
    assert np.isnan(auc["c"]) and np.isfinite(auc["a"]) and np.isfinite(auc["macro"])
    # paired comparisons of two models on such a task run too (DeLong rows are NaN for the class)
    write_probe_dir(tmp_path / "probe_b", manifest, rng.dirichlet(np.ones(3), size=6), TASK3["classes"])
    table = compare_models(
        task="T",
        task_settings=task_settings(TASK3),
        manifest=manifest,
        predictions={"m": tmp_path / "probe" / "predictions.h5", "base": tmp_path / "probe_b" / "predictions.h5"},
        baseline="base",
        evaluation=EvaluationSettings.from_dict(EVALUATION),
        seed=0,
        out_path=tmp_path / "cmp.csv",
    )
    delong = table[(table["test"] == "delong") & (table["class"] == "c")]
    assert len(delong) == 1 and np.isnan(delong["p_value"].iloc[0])


def test_finding_without_positives_is_reported(tmp_path, caplog):
    manifest = tmp_path / "m.csv"
    write_manifest(manifest, {"train": ["x|y"], "test": ["x", "", "x", "", "x|y", ""]}, kind="multilabel")
    task = {"kind": "multilabel", "classes": ["x", "y", "z"], "metric": "auc"}
    write_probe_dir(
        tmp_path / "probe", manifest, np.random.default_rng(1).random((6, 3)), task["classes"], kind="multilabel"
    )
    with caplog.at_level(logging.WARNING, logger="medprobe"):
        tables = evaluate_all(
            task="T",
            model="m",
            task_config=task,
            manifest=manifest,
            probe_dir=tmp_path / "probe",
            evaluation=EVALUATION,
            seed=0,
            out_dir=tmp_path / "out",
        )
    messages = [record.getMessage() for record in caplog.records]
    assert any("finding 'z' has no positives" in message for message in messages), messages
    assert not any("finding 'x'" in message for message in messages)
    auc = tables["metrics"].query("metric == 'auc'").set_index("class")["value"]
    assert np.isnan(auc["z"]) and np.isfinite(auc["x"])


# ------------------------------------------------------------------------------------------ GPU memory
def fake_forward(limit, calls, too_big=()):
    """A forward pass that runs out of GPU memory above ``limit`` items or on any item in ``too_big``."""

    def forward(batch):
        calls.append(list(batch))
        if len(batch) > limit or any(item in too_big for item in batch):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return [item * 10 for item in batch]

    return forward


def test_out_of_memory_halves_the_batch_and_continues(caplog):
    calls, cleared = [], []
    with caplog.at_level(logging.WARNING, logger="medprobe.checks"):
        results, size = run_with_oom_backoff(
            fake_forward(3, calls), list(range(10)), 8, empty_cache=lambda: cleared.append(1)
        )
    assert [value for batch in results for value in batch] == [i * 10 for i in range(10)]
    assert size == 2 and len(cleared) == 2  # 8 -> 4 -> 2
    assert [len(batch) for batch in calls] == [8, 4, 2, 2, 2, 2, 2]
    assert sum("halving the batch size to 4" in record.getMessage() for record in caplog.records) == 1


def test_an_image_that_cannot_fit_alone_stops_with_its_id():
    ids = [f"img{i}" for i in range(6)]
    with pytest.raises(ImageTooLargeError, match="image img4: out of GPU memory even at batch size 1"):
        run_with_oom_backoff(fake_forward(8, [], too_big={4}), list(range(6)), 4, ids=ids, empty_cache=lambda: None)


def test_oom_backoff_splits_a_collated_batch_and_remembers_the_size():
    backoff, seen = OomBackoff(empty_cache=lambda: None), []
    weights = torch.arange(12.0).reshape(3, 4)

    def forward(batch):
        seen.append(batch["pixel_values"].shape[0])
        if batch["pixel_values"].shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("out of memory")
        pooled = batch["pixel_values"] @ weights
        return pooled, pooled.sum(dim=1, keepdim=True)

    batch = {"pixel_values": torch.randn(5, 3), "prompt": "same for all", "lengths": [1, 2, 3, 4, 5]}
    pooled, embedded = backoff.forward(forward, batch, [f"i{i}" for i in range(5)])
    torch.testing.assert_close(pooled, batch["pixel_values"] @ weights)
    torch.testing.assert_close(embedded, (batch["pixel_values"] @ weights).sum(dim=1, keepdim=True))
    assert seen == [5, 2, 2, 1] and backoff.chunk_size == 2
    seen.clear()
    backoff.forward(forward, {"pixel_values": torch.randn(4, 3)}, ["a", "b", "c", "d"])
    assert seen == [2, 2]  # starts at the size that fitted
    assert (
        checks.slice_batch(batch, 1, 3, 5)["lengths"] == [2, 3]
        and checks.slice_batch(batch, 1, 3, 5)["prompt"] == "same for all"
    )


# ----------------------------------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("writer", ["write_table", "prepare_write_atomic"])
def test_writers_leave_the_old_file_when_interrupted(tmp_path, monkeypatch, writer):
    path = tmp_path / "table.csv"
    path.write_text("old\n")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies between writing the temporary file and renaming it

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        if writer == "write_table":
            write_table(pd.DataFrame({"a": [1.5]}), path)
        else:
            _write_atomic(path, "new\n")
    assert path.read_text() == "old\n"
    monkeypatch.undo()
    write_table(pd.DataFrame({"a": [1.5]}), path) if writer == "write_table" else _write_atomic(path, "a\n1.5\n")
    assert path.read_text() == "a\n1.5\n" and sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


# -------------------------------------------------------------------------------------------- integrity
def test_probe_refuses_activations_made_from_another_manifest(tmp_path):
    from medprobe.probe import probe_task
    from medprobe.settings import AdamSettings, ProbeSettings, SGDSettings, TaskSettings

    manifest = tmp_path / "m.csv"
    labels = {"train": ["a", "b"] * 4, "val": ["a", "b"] * 2, "test": ["a", "b"] * 2}
    write_manifest(manifest, labels)
    ids = pd.read_csv(manifest)["image_id"].tolist()
    with h5py.File(tmp_path / "acts.h5", "w") as handle:
        handle["ids"] = np.array(ids, dtype=object).astype(h5py.string_dtype())
        handle["activations"] = np.random.default_rng(0).normal(size=(len(ids), 1, 3)).astype(np.float32)
        handle.attrs["layer_names"] = ["hidden.0"]
        handle.attrs["manifest_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    task = TaskSettings(
        name="t",
        discipline="test",
        dataset="demo",
        kind="binary",
        metric="auc",
        prompt="",
        classes=("a", "b"),
        graded=False,
        min_test_positives=0,
    )
    probe = ProbeSettings(
        mode="regularised",
        C_grid=(1.0,),
        refine=False,
        refit=False,
        max_iter=200,
        tol=1e-6,
        class_weight="none",
        dtype="float64",
        adam=AdamSettings(80, 1e-4, 512, False),
        sgd=SGDSettings(0.001, 10000, "balanced", 1),
    )

    def probe_into(out):
        return probe_task(
            tmp_path / "acts.h5",
            manifest,
            predictions=out / "predictions.h5",
            layers=out / "layers.h5",
            summary=out / "probe.json",
            task=task,
            probe=probe,
            layer="validation",
            seed=0,
            protocol=None,
        )

    summary = probe_into(tmp_path / "ok")
    assert summary["layer"] == "hidden.0"
    labels["test"] = ["b", "a"] * 2  # relabelled after extraction: same ids, different manifest
    write_manifest(manifest, labels)
    with pytest.raises(ValueError, match="extracted from a different manifest.*manifest_sha256"):
        probe_into(tmp_path / "changed")


# ---------------------------------------------------------------------------------------------- security
class _Loaded(Exception):
    pass


@pytest.mark.parametrize(
    ("adapter", "model_class", "processor_class"),
    [
        ("clip", "CLIPModel", "AutoImageProcessor"),
        ("idefics", "IdeficsForVisionText2Text", "AutoProcessor"),
    ],
)
@pytest.mark.parametrize("allowed", [None, False, True])
def test_trust_remote_code_only_when_the_config_allows_it(monkeypatch, adapter, model_class, processor_class, allowed):
    import transformers

    from medprobe.models import load_adapter

    seen = {}

    def model_from_pretrained(checkpoint, **kwargs):
        seen["model"] = kwargs
        return torch.nn.Linear(1, 1)

    def processor_from_pretrained(checkpoint, **kwargs):
        seen["processor"] = kwargs
        raise _Loaded

    monkeypatch.setattr(getattr(transformers, model_class), "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(getattr(transformers, processor_class), "from_pretrained", processor_from_pretrained)
    entry = {"adapter": adapter, "checkpoint": "some/model"}
    if allowed is not None:
        entry["trust_remote_code"] = allowed
    with pytest.raises(_Loaded):
        load_adapter(entry, device="cpu")
    assert seen["model"]["trust_remote_code"] is bool(allowed)
    assert seen["processor"]["trust_remote_code"] is bool(allowed)


def test_demo_checkpoints_are_safetensors(tmp_path):
    from medprobe.demo.models import build

    out = build("tiny-clip", tmp_path / "tiny-clip")
    names = {path.name for path in out.iterdir()}
    assert "model.safetensors" in names, names
    assert not {name for name in names if name.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))}
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", framework="pt") as handle:
        assert len(list(handle.keys())) > 10


# ------------------------------------------------------------------------------- workflow-level faults
def reduced_config(repo, folder):
    """T2 with the tiny CLIP only, a small C grid and few resamples: the whole workflow in about a minute."""
    config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    config["tasks"] = {"T2": config["tasks"]["T2"]}
    config["models"] = {"clip": config["models"]["clip"]}
    config.pop("nejm", None)
    config["evaluation"]["bootstrap"] = 50
    config["efficiency"] = {"fractions": [0.5, 1.0], "seeds": 1}
    config["probe"].update(C_grid=[0.1, 1.0], refine=False)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def snakemake_command(workdir, *targets):
    # targets go first: --configfile takes several values and would swallow them
    return SNAKEMAKE + [
        *targets,
        "--cores",
        "1",
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
    ]


def run_snakemake(repo, workdir, *targets, env=None):
    result = subprocess.run(
        snakemake_command(workdir, *targets), cwd=repo, capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def tree_bytes(root, *folders):
    """{relative path: bytes} of every file under the given folders of ``root``."""
    found = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                found[str(path.relative_to(root))] = path.read_bytes()
    return found


TABLES = ["metrics", "layers", "efficiency", "groups", "comparisons"]


@pytest.fixture(scope="module")
def reference(repo, tmp_path_factory):
    """An uninterrupted run of the reduced demo (all tables), with fake credentials in the environment."""
    workdir = reduced_config(repo, tmp_path_factory.mktemp("reference"))
    run_snakemake(repo, workdir, *[f"results/tables/{name}.csv" for name in TABLES], env={**os.environ, **FAKE_TOKENS})
    return workdir


@pytest.mark.slow
def test_two_runs_give_byte_identical_tables(repo, reference, tmp_path):
    second = reduced_config(repo, tmp_path / "second")
    run_snakemake(repo, second, *[f"results/tables/{name}.csv" for name in TABLES])
    first_tables = tree_bytes(reference, "results/tables")
    assert set(first_tables) >= {f"results/tables/{name}.csv" for name in TABLES}
    assert first_tables == tree_bytes(second, "results/tables")
    assert tree_bytes(reference, "results/manifests", "results/images") == tree_bytes(
        second, "results/manifests", "results/images"
    )


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_results(repo, reference, tmp_path):
    workdir = reduced_config(repo, tmp_path / "killed")
    targets = [f"results/tables/{name}.csv" for name in TABLES]
    process = subprocess.Popen(
        snakemake_command(workdir, *targets),
        cwd=repo,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # kill while extraction writes its partial file (or, at the latest, just after it finished)
    activations = workdir / "results" / "activations" / "clip"
    deadline = time.monotonic() + 300
    try:
        while not (activations / "T2.h5.partial").exists() and not (activations / "T2.h5").exists():
            assert process.poll() is None, "snakemake ended before it could be killed"
            assert time.monotonic() < deadline, "extraction never started"
            time.sleep(0.02)
        assert process.poll() is None, "snakemake ended before it could be killed"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert (workdir / "results" / "manifests" / "T2.csv").exists()
    assert not (workdir / "results" / "tables" / "metrics.csv").exists()
    # what a user does after a kill: Snakemake's lock outlives the process; unlock, then run again
    run_snakemake(repo, workdir, "--unlock")
    rerun = run_snakemake(repo, workdir, *targets)
    assert "steps (100%) done" in rerun.stdout + rerun.stderr
    assert tree_bytes(workdir, "results/manifests", "results/tables") == tree_bytes(
        reference, "results/manifests", "results/tables"
    )


@pytest.mark.slow
def test_tokens_never_reach_logs_configs_or_results(reference):
    assert reference.joinpath("results", "tables", "metrics.csv").exists()
    leaks = []
    for folder in ("logs", "results", ".snakemake", "config.yaml"):
        root = reference / folder
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                leaks += [f"{path}: {name}" for name, token in FAKE_TOKENS.items() if token.encode() in content]
    assert not leaks, leaks
    assert any((reference / "logs").rglob("*.log"))  # there were logs to search


def break_activations(workdir, config):
    activations = workdir / "results" / "activations" / "clip" / "T2.h5"
    os.truncate(activations, activations.stat().st_size // 2)
    config["probe"]["C_grid"] = [0.1, 1.0, 10.0]  # the probes must rerun
    return "activations file results/activations/clip/T2.h5: not a readable HDF5 file", "results/probes"


def break_predictions(workdir, config):
    predictions = workdir / "results" / "probes" / "clip" / "T2" / "predictions.h5"
    os.truncate(predictions, predictions.stat().st_size // 2)
    config["evaluation"]["bootstrap"] = 60  # the evaluation must rerun
    return "probe output results/probes/clip/T2/predictions.h5: not a readable HDF5 file", "results/evaluation"


def break_checkpoint(workdir, config):
    config["models"]["clip"].pop("demo_build")
    config["models"]["clip"]["checkpoint"] = "/nonexistent/clip"  # extraction would rerun
    return "models.clip.checkpoint: '/nonexistent/clip' is neither an existing folder", "results/activations"


@pytest.mark.slow
@pytest.mark.parametrize("damage", [break_checkpoint, break_activations, break_predictions])
def test_a_bad_input_stops_the_run_before_any_output_is_deleted(repo, reference, tmp_path, damage):
    """A missing checkpoint, a truncated activations file or probe output is found when the plan is made: the
    run stops naming it (and how to rebuild a damaged file), and the outputs of the extraction, probe or
    evaluation that would have rerun are still there, byte for byte."""
    workdir = tmp_path / "damaged"
    shutil.copytree(reference, workdir, symlinks=True)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    message, outputs = damage(workdir, config)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    before = tree_bytes(workdir, outputs)
    result = subprocess.run(
        snakemake_command(workdir, "results/tables/metrics.csv"), cwd=repo, capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and message in output, output[-3000:]
    if damage is not break_checkpoint:
        assert "delete it and rebuild it with `rm results/" in output
    assert before and tree_bytes(workdir, outputs) == before

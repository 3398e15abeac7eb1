"""Synthetic demo data: raw layout, task structure, signal, determinism; NEJM cases."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler, label_binarize

from medprobe.demo.data import METADATA_COLUMNS, generate_task
from medprobe.demo.data import files as demo_files
from medprobe.demo.nejm import generate_cases

CONFIG = yaml.safe_load((Path(__file__).resolve().parent.parent / "config" / "config.yaml").read_text())
TASKS = CONFIG["tasks"]
IMAGES_PER_PATIENT = 3
# Small studies for the structural checks; T1, T4 and T7 are big enough for the signal check
# (T4 has ~12 % positives, so it needs more patients for a stable AUC).
PATIENTS = {
    "T1": {"train": 20, "test": 10},
    "T2": {"train": 8, "test": 6},
    "T3": {"train": 10, "test": 8},
    "T4": {"train": 60, "test": 30},
    "T5": {"train": 8, "test": 6},
    "T6": {"train": 8, "test": 6},
    "T7": {"train": 40, "test": 16},
    "T8": {"train": 8, "test": 6},
}
PARTITIONED = {"T1", "T3", "T5", "T6"}  # the others leave the train/test split to the recipe
HAS_LARGE = {"T4", "T5", "T8"}


def _task(task_id: str, patients: dict[str, int]) -> dict:
    return {**TASKS[task_id], "demo_patients": dict(patients)}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, tuple[Path, pd.DataFrame]]:
    root = tmp_path_factory.mktemp("demo_raw")
    out = {}
    for task_id, patients in PATIENTS.items():
        path = generate_task(
            task_id,
            _task(task_id, patients),
            root / task_id / "metadata.csv",
            seed=0,
            images_per_patient=IMAGES_PER_PATIENT,
        )
        assert path == root / task_id / "metadata.csv"
        out[task_id] = (root / task_id, pd.read_csv(path, dtype=str, keep_default_na=False))
    return out


# ---------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("task_id", list(PATIENTS))
def test_metadata_table(generated, task_id):
    folder, table = generated[task_id]
    assert list(table.columns) == METADATA_COLUMNS
    # Read without forcing dtypes too: every column that has values must still be text or empty.
    raw = pd.read_csv(folder / "metadata.csv", keep_default_na=False)
    for column in ("image_id", "file", "patient_id", "source"):
        assert raw[column].map(type).eq(str).all(), column
    patients = PATIENTS[task_id]
    assert len(table) == (patients["train"] + patients["test"]) * IMAGES_PER_PATIENT
    assert table["patient_id"].nunique() == patients["train"] + patients["test"]
    assert table["image_id"].is_unique
    assert (table["file"] == "images/" + table["image_id"] + "." + table["file"].str.rsplit(".", n=1).str[1]).all()
    assert (table["source"] != "").all()
    classes = TASKS[task_id]["classes"]
    if TASKS[task_id]["kind"] == "multilabel":
        assert (table["label"] == "").all()
        for labels in table["labels"]:
            assert set(filter(None, labels.split("|"))) <= set(classes)
    else:
        assert (table["labels"] == "").all()
        assert set(table["label"]) <= set(classes)
        # Every class occurs (the demo guarantees it for each task at these sizes).
        assert set(table["label"]) == set(classes)


@pytest.mark.parametrize("task_id", list(PATIENTS))
def test_files_exist_and_open(generated, task_id):
    folder, table = generated[task_id]
    for file in table["file"]:
        with Image.open(folder / file) as image:
            image.verify()
    leftovers = [p.name for p in (folder / "images").iterdir() if p.name.endswith(".part")]
    assert leftovers == []


@pytest.mark.parametrize("task_id", list(PATIENTS))
def test_partitions(generated, task_id):
    _, table = generated[task_id]
    per_patient = table.groupby("patient_id")["partition"].nunique()
    assert (per_patient == 1).all(), "a patient has images in two partitions"
    if task_id in PARTITIONED:
        assert set(table["partition"]) == {"train", "test"}
        counts = table.drop_duplicates("patient_id")["partition"].value_counts()
        assert counts["train"] == PATIENTS[task_id]["train"] and counts["test"] == PATIENTS[task_id]["test"]
    else:
        assert set(table["partition"]) == {""}


def test_task_sources(generated):
    def sources(task_id, partition=None):
        table = generated[task_id][1]
        return set(table["source"] if partition is None else table.loc[table["partition"] == partition, "source"])

    assert sources("T1", "train") == {"nct_crc_he_100k"} and sources("T1", "test") == {"crc_val_he_7k"}
    assert sources("T5", "train") == {"eyepacs"} and sources("T5", "test") == {"eyepacs", "aptos"}
    assert sources("T6", "train") == {"airogs"} and sources("T6", "test") == {"odir"}
    assert sources("T8") == {"oai", "most"}
    # T2: the organ is a per-patient group with several organs present.
    t2 = generated["T2"][1]
    assert (t2["group"] != "").all()
    assert (t2.groupby("patient_id")["group"].nunique() == 1).all()
    assert t2["group"].nunique() >= 5
    for task_id in ("T1", "T3", "T4", "T5", "T6", "T7", "T8"):
        assert (generated[task_id][1]["group"] == "").all()


def test_label_structure(generated):
    # T3 mirrors HAM10000's imbalance: NV is the most frequent diagnosis; a lesion keeps one label.
    t3 = generated["T3"][1]
    assert t3["label"].value_counts().idxmax() == "NV"
    assert (t3.groupby("patient_id")["label"].nunique() == 1).all()
    # T4: strongly imbalanced melanoma.
    t4 = generated["T4"][1]
    assert 0.08 <= (t4["label"] == "malignant").mean() <= 0.16
    # T1: every class in both partitions; patients show several tissue classes.
    t1 = generated["T1"][1]
    for partition in ("train", "test"):
        assert set(t1.loc[t1["partition"] == partition, "label"]) == set(TASKS["T1"]["classes"])
    assert t1.groupby("patient_id")["label"].nunique().max() > 1
    # T5 and T8: two eyes / knees per patient, named in the image id.
    for task_id in ("T5", "T8"):
        table = generated[task_id][1]
        sides = table["image_id"].str.extract(r"-(left|right)-")[0]
        assert sides.notna().all()
        assert (sides.groupby(table["patient_id"]).nunique() == 2).all()


def test_t7_findings(generated):
    _, table = generated["T7"]
    classes = TASKS["T7"]["classes"]
    assert len(classes) >= 8
    findings = [set(filter(None, labels.split("|"))) for labels in table["labels"]]
    no_finding = sum(1 for f in findings if not f) / len(findings)
    assert 0.15 <= no_finding <= 0.45
    assert any(len(f) >= 2 for f in findings)
    assert sum(1 for f in findings if {"cardiomegaly", "pleural_effusion"} <= f) >= 2
    # A handful of positives for every finding in each half of the patients.
    patients = list(dict.fromkeys(table["patient_id"]))
    first_half = set(patients[: (len(patients) + 1) // 2])
    for name in classes:
        in_first = sum(1 for f, p in zip(findings, table["patient_id"]) if name in f and p in first_half)
        in_second = sum(1 for f, p in zip(findings, table["patient_id"]) if name in f and p not in first_half)
        assert in_first >= 3 and in_second >= 3, (name, in_first, in_second)


@pytest.mark.parametrize("task_id", ["T7", "T8"])
def test_sixteen_bit(generated, task_id):
    folder, table = generated[task_id]
    maxima = []
    for file in table["file"]:
        with Image.open(folder / file) as image:
            assert image.mode == "I;16", file
            maxima.append(int(np.asarray(image).max()))
    assert max(maxima) > 255  # really uses the 16-bit range


@pytest.mark.parametrize("task_id", list(PATIENTS))
def test_image_sizes(generated, task_id):
    folder, table = generated[task_id]
    sizes = []
    for file in table["file"]:
        with Image.open(folder / file) as image:
            sizes.append(image.size)
    large = [s for s in sizes if max(s) > 1024]
    if task_id in HAS_LARGE:
        assert 1 <= len(large) <= max(1, round(0.06 * len(sizes)))
        assert all(w != h for w, h in large)
    else:
        assert large == []
    small = [s for s in sizes if max(s) <= 1024]
    assert all(224 <= min(s) and max(s) <= 256 for s in small)


# ---------------------------------------------------------------------------------------------- signal


def _features(path: Path) -> np.ndarray:
    """Per-channel mean and an 8x8 thumbnail (16-bit images scaled by their maximum)."""
    with Image.open(path) as image:
        if image.mode == "I;16":
            pixels = np.asarray(image, dtype=np.float32)
            pixels /= max(float(pixels.max()), 1.0)
            thumbnail = np.asarray(Image.fromarray(pixels).resize((8, 8), Image.BOX))
            return np.concatenate([[pixels.mean()], thumbnail.ravel()])
        rgb = image.convert("RGB")
        pixels = np.asarray(rgb, dtype=np.float32) / 255
        thumbnail = np.asarray(rgb.resize((8, 8), Image.BOX), dtype=np.float32) / 255
        return np.concatenate([pixels.mean(axis=(0, 1)), thumbnail.ravel()])


@pytest.mark.parametrize("task_id", ["T1", "T4", "T7"])
def test_signal_is_real_but_imperfect(generated, task_id):
    folder, table = generated[task_id]
    features = np.stack([_features(folder / file) for file in table["file"]])
    if task_id in PARTITIONED:
        train = (table["partition"] == "train").to_numpy()
    else:
        patients = list(dict.fromkeys(table["patient_id"]))
        train = table["patient_id"].isin(patients[: int(0.7 * len(patients))]).to_numpy()
    scaler = StandardScaler().fit(features[train])
    x_train, x_test = scaler.transform(features[train]), scaler.transform(features[~train])
    classes = TASKS[task_id]["classes"]
    probe = LogisticRegression(C=0.03, max_iter=2000)
    if TASKS[task_id]["kind"] == "multilabel":
        targets = np.array([[c in labels.split("|") for c in classes] for labels in table["labels"]])
        aucs = []
        for k in range(len(classes)):
            assert len(set(targets[train, k])) == 2
            if len(set(targets[~train, k])) == 2:
                scores = probe.fit(x_train, targets[train, k]).predict_proba(x_test)[:, 1]
                aucs.append(roc_auc_score(targets[~train, k], scores))
        auc = float(np.mean(aucs))
    else:
        y = np.array([classes.index(label) for label in table["label"]])
        probabilities = probe.fit(x_train, y[train]).predict_proba(x_test)
        if len(classes) == 2:
            auc = roc_auc_score(y[~train], probabilities[:, 1])
        else:
            auc = roc_auc_score(label_binarize(y[~train], classes=range(len(classes))), probabilities, average="macro")
    print(f"{task_id} macro AUC {auc:.3f}")
    assert 0.65 <= auc <= 0.995, auc


# ---------------------------------------------------------------------------------------------- determinism, errors


def test_deterministic(tmp_path):
    tiny = {"train": 3, "test": 2}
    for task_id in ("T1", "T3", "T7", "T8"):  # TIFF, JPEG, 16-bit PNG, upsampled large image
        paths = [
            generate_task(
                task_id, _task(task_id, tiny), tmp_path / run / task_id / "metadata.csv", seed=7, images_per_patient=2
            )
            for run in ("a", "b")
        ]
        assert paths[0].read_bytes() == paths[1].read_bytes()
        for file in pd.read_csv(paths[0], dtype=str, keep_default_na=False)["file"]:
            assert (paths[0].parent / file).read_bytes() == (paths[1].parent / file).read_bytes(), file
    other = generate_task("T1", _task("T1", tiny), tmp_path / "c" / "T1" / "metadata.csv", seed=8, images_per_patient=2)
    first = pd.read_csv(other, dtype=str)["file"][0]
    assert (other.parent / first).read_bytes() != (tmp_path / "a" / "T1" / first).read_bytes()


def test_unknown_task_and_bad_entries(tmp_path):
    with pytest.raises(ValueError, match="T9"):
        generate_task("T9", TASKS["T1"], tmp_path / "metadata.csv", seed=0, images_per_patient=1)
    with pytest.raises(ValueError, match=r"demo_patients\.test"):
        generate_task(
            "T1",
            {**TASKS["T1"], "demo_patients": {"train": 2}},
            tmp_path / "metadata.csv",
            seed=0,
            images_per_patient=1,
        )
    with pytest.raises(ValueError, match="XYZ"):
        generate_task(
            "T1", {**TASKS["T1"], "classes": ["ADI", "XYZ"]}, tmp_path / "metadata.csv", seed=0, images_per_patient=1
        )
    with pytest.raises(ValueError, match="images_per_patient"):
        generate_task("T1", TASKS["T1"], tmp_path / "metadata.csv", seed=0, images_per_patient=0)
    with pytest.raises(ValueError, match=r"tasks\.T7\.kind"):
        generate_task("T7", {**TASKS["T7"], "kind": "binary"}, tmp_path / "metadata.csv", seed=0, images_per_patient=1)


def test_interrupted_run_leaves_no_table(tmp_path, monkeypatch):
    task = _task("T2", {"train": 2, "test": 1})
    metadata = generate_task("T2", task, tmp_path / "metadata.csv", seed=0, images_per_patient=2)
    assert metadata.exists()
    real_save = demo_files.save_image
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(demo_files, "save_image", failing_save)
    with pytest.raises(KeyboardInterrupt):
        generate_task("T2", task, tmp_path / "metadata.csv", seed=1, images_per_patient=2)
    assert not metadata.exists()  # never a table pointing at a half-written image set


# ---------------------------------------------------------------------------------------------- NEJM


def test_nejm_cases(tmp_path):
    folders = generate_cases(tmp_path / "a", n_cases=30, seed=0)
    assert len(folders) == 30
    cases = [json.loads((folder / "case.json").read_text()) for folder in folders]
    for folder, case in zip(folders, cases):
        assert set(case) == {"id", "date", "question", "context", "choices", "answer", "reader_shares"}
        assert folder.name == case["id"] and isinstance(case["id"], str)
        assert case["question"].endswith("?") and case["context"].endswith(".")
        assert len(case["choices"]) == 5 and len(set(case["choices"])) == 5
        assert all(isinstance(c, str) and c for c in case["choices"])
        assert case["answer"] in case["choices"]
        assert len(case["reader_shares"]) == 5 and all(0 <= s <= 1 for s in case["reader_shares"])
        assert sum(case["reader_shares"]) == pytest.approx(1.0, abs=1e-9)
        with Image.open(folder / "image.png") as image:
            image.verify()
    dates = sorted(dt.date.fromisoformat(case["date"]) for case in cases)
    assert dates[:2] == [dt.date(2005, 10, 13), dt.date(2005, 10, 20)]
    assert all((b - a).days == 7 for a, b in zip(dates, dates[1:]))
    # The readers' share of the right answer covers every difficulty stratum.
    answer_shares = np.array([c["reader_shares"][c["choices"].index(c["answer"])] for c in cases])
    assert answer_shares.min() == pytest.approx(0.15, abs=0.01) and answer_shares.max() == pytest.approx(0.9, abs=0.01)
    counts, _ = np.histogram(answer_shares, bins=[0.0, 0.4, 0.6, 0.8, 1.0])
    assert (counts > 0).all()
    # Deterministic.
    again = generate_cases(tmp_path / "b", n_cases=30, seed=0)
    for x, y in zip(folders, again):
        assert (x / "case.json").read_bytes() == (y / "case.json").read_bytes()
        assert (x / "image.png").read_bytes() == (y / "image.png").read_bytes()
    with pytest.raises(ValueError, match="n_cases"):
        generate_cases(tmp_path / "c", n_cases=0)

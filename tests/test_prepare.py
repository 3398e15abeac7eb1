"""prepare: raw table -> manifest; splits grouped by patient and stratified; atomic, clear errors."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medprobe.images import BadImageError
from medprobe.prepare import MANIFEST_COLUMNS, assign_splits, check_patients_disjoint, prepare_task
from medprobe.settings import SplitSettings, TaskSettings

TASK = {"kind": "multiclass", "classes": ["a", "b", "c"], "dataset": "demo"}


def write_raw(folder, n_patients=30, per_patient=3, partition=lambda p: "", kind="multiclass", big=False):
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for patient in range(n_patients):
        for image in range(per_patient):
            image_id = f"p{patient:03d}_{image}"
            file = f"images/{image_id}.png"
            size = (1300, 700) if big and patient == 0 and image == 0 else (32, 32)
            Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)).save(folder / file)
            label = "abc"[(patient + image) % 3]
            rows.append(
                {
                    "image_id": image_id,
                    "file": file,
                    "patient_id": f"P{patient}",
                    "label": label if kind != "multilabel" else "",
                    "labels": "|".join(sorted({label, "b"} if image == 0 else {label})) if kind == "multilabel" else "",
                    "source": "s1" if patient % 2 else "s2",
                    "partition": partition(patient),
                    "group": f"g{patient % 2}",
                }
            )
    pd.DataFrame(rows).to_csv(folder / "metadata.csv", index=False)
    return pd.DataFrame(rows)


def task_settings(entry):
    """A task's settings from the keys a test sets (kind, classes, dataset[, test_fraction])."""
    return TaskSettings.from_dict(
        {
            "name": "T",
            "discipline": "pathology",
            "metric": "auc",
            "prompt": "",
            "graded": False,
            "min_test_positives": 0,
            **entry,
        }
    )


def run(tmp_path, raw, task=TASK, val_fraction=0.2, test_fraction=0.25, seed=0, **options):
    return prepare_task(
        "T",
        task_settings(task),
        SplitSettings(val_fraction, test_fraction),
        seed,
        metadata=raw / "metadata.csv",
        manifest=tmp_path / "m.csv",
        sidecar=tmp_path / "m.json",
        images=tmp_path / "images",
        **options,
    )


def test_manifest_contract_and_patient_grouped_splits(tmp_path):
    raw = tmp_path / "raw"
    table = write_raw(raw, big=True)
    manifest = run(tmp_path, raw)
    on_disk = pd.read_csv(tmp_path / "m.csv", dtype=str, keep_default_na=False)
    assert list(on_disk.columns) == MANIFEST_COLUMNS
    assert list(on_disk["image_id"]) == list(table["image_id"])  # stable raw order
    assert set(on_disk["split"]) == {"train", "val", "test"}
    assert (on_disk.groupby("patient_id")["split"].nunique() == 1).all()
    share = on_disk.drop_duplicates("patient_id")["split"].value_counts(normalize=True)
    assert 0.15 <= share["test"] <= 0.35
    for path in on_disk["path"]:
        assert Image.open(path).format == "PNG"
    assert Image.open(on_disk["path"][0]).size == (1024, 551)
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert sum(split["images"] for split in sidecar["counts"].values()) == len(manifest) == 90
    assert sidecar["sources"]["metadata.csv"]["sha256"]
    assert sidecar["skipped"] == []


def test_official_partition_is_respected_and_val_comes_from_train(tmp_path):
    raw = tmp_path / "raw"
    write_raw(raw, partition=lambda p: "test" if p < 8 else "train")
    manifest = run(tmp_path, raw)
    test_patients = set(manifest.loc[manifest["split"] == "test", "patient_id"])
    assert test_patients == {f"P{p}" for p in range(8)}
    assert (manifest["split"] == "val").any()


def test_splits_are_deterministic_and_stratified():
    rng = np.random.default_rng(1)
    table = pd.DataFrame(
        {
            "image_id": [f"i{i}" for i in range(600)],
            "patient_id": [f"P{i // 3}" for i in range(600)],
            "label": rng.choice(["a", "b", "c"], 600, p=[0.6, 0.3, 0.1]),
            "partition": "",
        }
    )
    first = assign_splits(table, "multiclass", 0.2, 0.25, seed=3)
    second = assign_splits(table, "multiclass", 0.2, 0.25, seed=3)
    assert first.equals(second)
    check_patients_disjoint(table.assign(split=first))
    overall = table["label"].value_counts(normalize=True)
    test = table.loc[first == "test", "label"].value_counts(normalize=True)
    assert (abs(test - overall) < 0.08).all()


def test_multilabel_manifest_keeps_findings(tmp_path):
    raw = tmp_path / "raw"
    write_raw(raw, kind="multilabel")
    manifest = run(tmp_path, raw, task={"kind": "multilabel", "classes": ["a", "b", "c"], "dataset": "demo"})
    assert (manifest["labels"].str.contains(r"\|")).any() and (manifest["label"] == "").all()


def test_bad_image_stops_naming_file_and_leaves_no_manifest(tmp_path):
    raw = tmp_path / "raw"
    write_raw(raw, n_patients=12)
    (raw / "images" / "p003_1.png").write_bytes(b"garbage")
    with pytest.raises(BadImageError, match=r"p003_1\.png.*image_id p003_1"):
        run(tmp_path, raw)
    assert not (tmp_path / "m.csv").exists()


def test_skip_policy_lists_skipped_images(tmp_path):
    raw = tmp_path / "raw"
    write_raw(raw, n_patients=12)
    (raw / "images" / "p003_1.png").unlink()
    manifest = run(tmp_path, raw, on_bad_image="skip")
    assert "p003_1" not in set(manifest["image_id"])
    skipped = json.loads((tmp_path / "m.json").read_text())["skipped"]
    assert [entry["image_id"] for entry in skipped] == ["p003_1"]
    assert "does not exist" in skipped[0]["reason"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.assign(label=t["label"].where(t.index != 4, "zebra")), "zebra"),
        (lambda t: pd.concat([t, t.iloc[:1]]), "duplicate image_id"),
        (lambda t: t.drop(columns=["patient_id"]), "missing column"),
        (lambda t: t.assign(partition=["train", "test"] * (len(t) // 2)), "both the train and the test partition"),
    ],
)
def test_bad_raw_tables_name_the_problem(tmp_path, edit, message):
    raw = tmp_path / "raw"
    table = write_raw(raw, n_patients=6)
    edit(table).to_csv(raw / "metadata.csv", index=False)
    with pytest.raises(ValueError, match=message):
        run(tmp_path, raw)


def test_patient_leak_is_detected():
    manifest = pd.DataFrame({"patient_id": ["A", "A", "B"], "split": ["train", "test", "val"]})
    with pytest.raises(ValueError, match="'A'"):
        check_patients_disjoint(manifest)


def test_skip_policy_counts_every_kind_of_bad_image_and_logs_a_summary(tmp_path, caplog):
    import io
    import logging

    raw = tmp_path / "raw"
    write_raw(raw, n_patients=12)
    images = raw / "images"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (images / "p001_0.png").write_bytes(buffer.getvalue()[:300])  # truncated JPEG
    content = (images / "p002_0.png").read_bytes()
    (images / "p002_0.png").write_bytes(content[: len(content) // 2])  # truncated PNG
    (images / "p004_2.png").write_bytes(b"")  # zero bytes
    (images / "p005_1.png").write_text("patient notes, not an image")  # not an image
    (images / "p006_0.png").unlink()  # missing
    bad = {"p001_0", "p002_0", "p004_2", "p005_1", "p006_0"}
    with caplog.at_level(logging.INFO, logger="medprobe"):
        manifest = run(tmp_path, raw, on_bad_image="skip")
    assert not bad & set(manifest["image_id"]) and len(manifest) == 36 - len(bad)
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert sidecar["n_skipped"] == len(bad) == len(sidecar["skipped"])
    reasons = {entry["image_id"]: entry["reason"] for entry in sidecar["skipped"]}
    assert set(reasons) == bad
    assert "empty" in reasons["p004_2"] and "does not exist" in reasons["p006_0"]
    assert "cannot decode" in reasons["p005_1"]
    assert sum(split["images"] for split in sidecar["counts"].values()) == len(manifest)
    summary = [r.getMessage() for r in caplog.records if "skipped 5 of 36 image(s)" in r.getMessage()]
    assert len(summary) == 1 and "p001_0" in summary[0] and "m.json" in summary[0]
    assert not any((tmp_path / "images" / f"{image_id}.png").exists() for image_id in bad)


def test_a_class_missing_from_a_split_is_a_warning_in_the_sidecar(tmp_path, caplog):
    import logging

    raw = tmp_path / "raw"
    table = write_raw(raw, n_patients=20)
    # class "c" only for patients of the official test partition: train and val have none
    table["partition"] = ["test" if int(p[1:]) < 6 else "train" for p in table["patient_id"]]
    table["label"] = [
        ("c" if int(p[1:]) < 3 else "a") if int(p[1:]) < 6 else "ab"[i % 2] for i, p in enumerate(table["patient_id"])
    ]
    table.to_csv(raw / "metadata.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="medprobe"):
        run(tmp_path, raw)
    warnings = json.loads((tmp_path / "m.json").read_text())["warnings"]
    assert any("['c'] have no image in the train split" in w for w in warnings), warnings
    assert any("['c'] have no image in the val split" in w for w in warnings), warnings
    assert [w for w in warnings if "test split" in w and "['b']" in w] and not [
        w for w in warnings if "['c'] have no image in the test" in w
    ]
    assert any("have no image in the train split" in r.getMessage() for r in caplog.records)


def test_duplicate_image_ids_stop_naming_them(tmp_path):
    raw = tmp_path / "raw"
    table = write_raw(raw, n_patients=6)
    table.loc[5, "image_id"] = table.loc[2, "image_id"]
    table.to_csv(raw / "metadata.csv", index=False)
    with pytest.raises(ValueError, match=r"metadata\.csv: duplicate image_id values \['p000_2'\]"):
        run(tmp_path, raw)
    assert not (tmp_path / "m.csv").exists()


def test_rows_without_patient_id_do_not_count_as_one_patient(tmp_path):
    raw = tmp_path / "raw"
    table = write_raw(raw, n_patients=12, partition=lambda p: "test" if p < 4 else "train")
    table.loc[[0, 20], "patient_id"] = ""  # one test row and one train row without a patient id
    table.to_csv(raw / "metadata.csv", index=False)
    manifest = run(tmp_path, raw)
    assert set(manifest.loc[manifest["patient_id"] == "", "split"]) >= {"test"}


def test_recipe_counts_are_copied_into_the_sidecar(tmp_path):
    raw = tmp_path / "raw"
    write_raw(raw, n_patients=12)
    expected = {"expected": {"train": 100}, "found": {"train": 36}}
    (raw / "counts.json").write_text(json.dumps(expected))
    run(tmp_path, raw, recipe_counts=raw / "counts.json")
    assert json.loads((tmp_path / "m.json").read_text())["recipe_counts"] == expected


def test_task_test_fraction_replaces_the_split_default(tmp_path):
    raw = tmp_path / "raw"
    write_raw(raw, n_patients=40, per_patient=1)
    manifest = run(tmp_path, raw, task={**TASK, "test_fraction": 0.5}, test_fraction=0.25)
    share = manifest.drop_duplicates("patient_id")["split"].value_counts(normalize=True)["test"]
    assert abs(share - 0.5) <= 0.05
    settings = json.loads((tmp_path / "m.json").read_text())["split_settings"]
    assert settings["test_fraction"] == 0.5 and settings["test_fraction_from"] == "tasks.T.test_fraction"
    manifest = run(tmp_path, raw, test_fraction=0.25)  # no task setting: split.test_fraction
    assert abs(manifest.drop_duplicates("patient_id")["split"].value_counts(normalize=True)["test"] - 0.25) <= 0.05
    with pytest.raises(ValueError, match=r"tasks\.T\.test_fraction: 1\.5 is not between 0 and 1"):
        run(tmp_path, raw, task={**TASK, "test_fraction": 1.5})


def test_fractions_other_than_one_over_k_are_held_out_as_several_folds():
    from medprobe.prepare import holdout_folds

    assert holdout_folds(0.2, 1000) == (5, 1) and holdout_folds(0.25, 1000) == (4, 1)  # as a single fold
    assert holdout_folds(0.17, 1000) == (6, 1) and holdout_folds(0.05, 1000) == (20, 1)
    assert holdout_folds(0.3, 1000) == (10, 3) and holdout_folds(0.4, 1000) == (5, 2)
    table = pd.DataFrame(
        {
            "image_id": [f"i{i}" for i in range(600)],
            "patient_id": [f"P{i // 2}" for i in range(600)],
            "label": np.random.default_rng(2).choice(["a", "b"], 600),
            "partition": "",
        }
    )
    split = assign_splits(table, "multiclass", 0.2, 0.3, seed=0)
    share = split.groupby(table["patient_id"]).first().value_counts(normalize=True)["test"]
    assert abs(share - 0.3) < 0.01  # one fold of three would hold out a third


def test_patients_with_train_partition_rows_are_never_test(tmp_path):
    raw = tmp_path / "raw"
    table = write_raw(raw, n_patients=40)
    # patients 0-9: image 0 unassigned, images 1-2 training-only (e.g. automatic labels); 10-29 unassigned;
    # 30-39 training-only
    table["partition"] = [
        "" if 10 <= int(p[1:]) < 30 or (int(p[1:]) < 10 and i.endswith("_0")) else "train"
        for p, i in zip(table["patient_id"], table["image_id"])
    ]
    table.to_csv(raw / "metadata.csv", index=False)
    manifest = run(tmp_path, raw, test_fraction=0.25)
    test_patients = set(manifest.loc[manifest["split"] == "test", "patient_id"])
    assert test_patients and test_patients <= {f"P{p}" for p in range(10, 30)}
    assert len(manifest) == len(table)  # nothing dropped
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    assert abs(len(test_patients) / 20 - 0.25) < 0.06


def test_classes_all_takes_every_finding_and_lists_still_name_unknown_ones(tmp_path):
    raw = tmp_path / "raw"
    table = write_raw(raw, kind="multilabel")
    table.loc[3, "labels"] = "a|zebra finding"
    table.to_csv(raw / "metadata.csv", index=False)
    manifest = run(tmp_path, raw, task={"kind": "multilabel", "classes": "all", "dataset": "demo"})
    assert "a|zebra finding" in set(manifest["labels"])
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert sidecar["classes"] == "all" and sorted(sidecar["findings"]) == ["a", "b", "c", "zebra finding"]
    with pytest.raises(
        ValueError, match=r"metadata\.csv: column labels has values \['zebra finding'\] not in the task's classes"
    ):
        run(tmp_path, raw, task={"kind": "multilabel", "classes": ["a", "b", "c"], "dataset": "demo"})
    with pytest.raises(ValueError, match=r"metadata\.csv: classes `all` takes every finding of a multilabel task"):
        run(tmp_path, raw, task={"kind": "multiclass", "classes": "all", "dataset": "demo"})

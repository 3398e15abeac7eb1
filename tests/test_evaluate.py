"""evaluate: tables from saved predictions, checked against scikit-learn on the same numbers."""

import json

import h5py
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from medprobe.evaluate import TABLE_COLUMNS, collect, compare_models, evaluate_model_task

TASK = {"kind": "multiclass", "classes": ["a", "b", "c"], "graded": False, "metric": "auc"}
EVALUATION = {"bootstrap": 200, "ci": 0.95}


def make_probe_dir(folder, ids, probabilities, layers=2, with_efficiency=True):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    with h5py.File(folder / "predictions.h5", "w") as handle:
        handle["ids"] = np.array(ids, dtype=object).astype("S")
        handle["probabilities"] = probabilities
        handle.attrs["classes"] = TASK["classes"]
    stack = np.stack([probabilities] + [rng.dirichlet(np.ones(3), len(ids)) for _ in range(layers - 1)])
    with h5py.File(folder / "layers.h5", "w") as handle:
        handle["ids"] = np.array(ids, dtype=object).astype("S")
        handle["probabilities"] = stack
        handle.attrs["layer_names"] = [f"hidden.{i}" for i in range(layers)]
    if with_efficiency:
        with h5py.File(folder / "efficiency.h5", "w") as handle:
            handle["probabilities"] = np.stack([np.stack([probabilities, probabilities])] * 2)
            handle["n_train"] = np.array([[5, 5], [10, 10]])
            handle.attrs["fractions"] = [0.5, 1.0]
            handle.attrs["seeds"] = [0, 1]
    (folder / "probe.json").write_text(json.dumps({"layer": "hidden.0", "n_train": 10}))


@pytest.fixture()
def setup(tmp_path):
    rng = np.random.default_rng(0)
    n = 120
    labels = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ids = [f"img{i:03d}" for i in range(n)]
    manifest = pd.DataFrame({
        "image_id": ["train0", "val0"] + ids,
        "path": "x.png",
        "split": ["train", "val"] + ["test"] * n,
        "patient_id": ["P-train", "P-val"] + [f"P{i // 2}" for i in range(n)],
        "label": ["a", "b"] + [TASK["classes"][k] for k in labels],
        "labels": "",
        "source": "s",
        "group": ["", ""] + ["g1" if i % 3 else "g2" for i in range(n)],
    })
    manifest_path = tmp_path / "manifest.csv"
    manifest.to_csv(manifest_path, index=False)
    make_probe_dir(tmp_path / "probe_a", ids, probabilities)
    make_probe_dir(tmp_path / "probe_b", ids, rng.dirichlet(np.ones(3), n))
    return tmp_path, manifest_path, labels, probabilities, ids


def test_metrics_agree_with_sklearn(setup):
    tmp_path, manifest_path, labels, probabilities, _ = setup
    tables = evaluate_model_task(task="T", model="m", task_config=TASK, manifest=manifest_path,
                                 probe_dir=tmp_path / "probe_a", evaluation=EVALUATION, seed=0, out_dir=tmp_path / "out")
    metrics = tables["metrics"]
    assert list(metrics.columns) == TABLE_COLUMNS
    value = metrics.set_index(["class", "metric"])["value"]
    assert value["macro", "auc"] == pytest.approx(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))
    assert value["macro", "f1"] == pytest.approx(f1_score(labels, probabilities.argmax(1), average="macro"))
    assert value["b", "auc"] == pytest.approx(roc_auc_score(labels == 1, probabilities[:, 1]))
    assert value["c", "support"] == (labels == 2).sum()
    row = metrics[(metrics["class"] == "macro") & (metrics["metric"] == "auc")].iloc[0]
    assert row["ci_low"] < row["value"] < row["ci_high"] and row["sd"] > 0
    assert row["n_test"] == 120 and row["n_train"] == 10 and row["layer"] == "hidden.0"
    on_disk = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert len(on_disk) == len(metrics)


def test_layers_efficiency_and_groups_tables(setup):
    tmp_path, manifest_path, labels, probabilities, ids = setup
    tables = evaluate_model_task(task="T", model="m", task_config=TASK, manifest=manifest_path,
                                 probe_dir=tmp_path / "probe_a", evaluation=EVALUATION, seed=0, out_dir=tmp_path / "out")
    layers = tables["layers"]
    assert sorted(set(layers["layer"])) == ["hidden.0", "hidden.1"]
    headline = tables["metrics"].set_index(["class", "metric"])["value"]
    layer0 = layers[layers["layer"] == "hidden.0"].set_index(["class", "metric"])["value"]
    pd.testing.assert_series_equal(headline, layer0)  # same predictions, same resamples -> same numbers
    efficiency = tables["efficiency"]
    assert sorted(set(zip(efficiency["fraction"], efficiency["seed"]))) == [(0.5, 0), (0.5, 1), (1.0, 0), (1.0, 1)]
    assert set(efficiency.loc[efficiency["fraction"] == 0.5, "n_train"]) == {5}
    groups = tables["groups"]
    mask = np.array([i % 3 != 0 for i in range(len(ids))])
    g1 = groups[(groups["group"] == "g1") & (groups["class"] == "macro") & (groups["metric"] == "auc")].iloc[0]
    assert g1["value"] == pytest.approx(roc_auc_score(labels[mask], probabilities[mask], multi_class="ovr"))
    assert g1["n_test"] == mask.sum()


def test_reruns_are_byte_identical(setup):
    tmp_path, manifest_path, *_ = setup
    for out in ("out1", "out2"):
        evaluate_model_task(task="T", model="m", task_config=TASK, manifest=manifest_path,
                            probe_dir=tmp_path / "probe_a", evaluation=EVALUATION, seed=0, out_dir=tmp_path / out)
    for name in ("metrics", "layers", "efficiency", "groups"):
        assert (tmp_path / "out1" / f"{name}.csv").read_bytes() == (tmp_path / "out2" / f"{name}.csv").read_bytes()


def test_comparisons_and_collect(setup):
    tmp_path, manifest_path, *_ = setup
    table = compare_models(task="T", task_config=TASK, manifest=manifest_path,
                           predictions={"good": tmp_path / "probe_a" / "predictions.h5",
                                        "random": tmp_path / "probe_b" / "predictions.h5"},
                           baseline="random", evaluation=EVALUATION, seed=0, out_path=tmp_path / "cmp.csv")
    auc = table[(table["class"] == "macro") & (table["metric"] == "auc") & (table["test"] == "bootstrap")].iloc[0]
    assert auc["model"] == "good" and auc["baseline"] == "random"
    assert auc["difference"] > 0.2 and auc["ci_low"] > 0 and auc["p_value"] < 0.05
    assert set(table["test"]) == {"bootstrap", "paired_t"}
    for name in ("a", "b"):
        evaluate_model_task(task="T", model=name, task_config=TASK, manifest=manifest_path,
                            probe_dir=tmp_path / f"probe_{name}", evaluation=EVALUATION, seed=0, out_dir=tmp_path / name)
    combined = collect([tmp_path / "a" / "metrics.csv", tmp_path / "b" / "metrics.csv"], tmp_path / "all.csv")
    assert list(combined["model"].unique()) == ["a", "b"]


def test_prediction_ids_outside_the_test_split_are_refused(setup):
    tmp_path, manifest_path, *_ = setup
    manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    manifest.loc[manifest["image_id"] == "img005", "split"] = "train"
    manifest.to_csv(manifest_path, index=False)
    with pytest.raises(ValueError, match="img005"):
        evaluate_model_task(task="T", model="m", task_config=TASK, manifest=manifest_path,
                            probe_dir=tmp_path / "probe_a", evaluation=EVALUATION, seed=0, out_dir=tmp_path / "out")

"""End to end: the demo workflow as a user runs it, every table and figure checked.

Runs `snakemake --cores 2` once in a fresh working directory (a few minutes on two cores), then checks
the outputs against independent computations (scikit-learn on the stored activations and predictions).
"""

import json
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from medprobe import config as medprobe_config
from medprobe.labels import encode_targets, load_manifest

pytestmark = pytest.mark.slow
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
FIGURES = ["figure1d", "figure3", "figure4", "figure5", "figure6", "figureS5", "figureS6"]
TABLES = ["metrics", "layers", "efficiency", "groups", "comparisons", "efficiency_summary", "nejm"]


def snakemake(repo, workdir, *arguments, timeout=1500):
    return subprocess.run(
        SNAKEMAKE + ["--cores", "2", "--directory", str(workdir), *arguments],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def demo(repo, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    result = snakemake(repo, workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return workdir


@pytest.fixture(scope="module")
def demo_paper(repo, tmp_path_factory):
    """The demo under the paper's protocol (config/demo_paper.yaml), in its own working directory."""
    workdir = tmp_path_factory.mktemp("demo_paper")
    result = snakemake(repo, workdir, "--configfile", str(repo / "config" / "demo_paper.yaml"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return workdir


@pytest.fixture(scope="module")
def config(repo):
    return medprobe_config.load(repo / "config" / "config.yaml")


def test_every_figure_is_drawn(demo):
    for name in FIGURES:
        pdf, png = demo / "results" / "figures" / f"{name}.pdf", demo / "results" / "figures" / f"{name}.png"
        assert pdf.read_bytes()[:5] == b"%PDF-", name
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 300


def test_tables_cover_every_model_and_task(demo, config):
    for name in TABLES:
        assert (demo / "results" / "tables" / f"{name}.csv").stat().st_size > 0, name
    metrics = pd.read_csv(demo / "results" / "tables" / "metrics.csv", dtype={"class": str})
    assert list(metrics.columns[:13]) == [
        "task",
        "model",
        "layer",
        "fraction",
        "seed",
        "class",
        "metric",
        "value",
        "sd",
        "ci_low",
        "ci_high",
        "n_train",
        "n_test",
    ]
    headline = metrics[metrics["class"] == "macro"]
    for model, task in medprobe_config.model_task_pairs(config):
        row = headline[
            (headline["model"] == model)
            & (headline["task"] == task)
            & (headline["metric"] == config["tasks"][task]["metric"])
        ]
        assert len(row) == 1, (model, task)
        row = row.iloc[0]
        assert 0 <= row["ci_low"] <= row["value"] <= row["ci_high"] <= 1, (model, task)
    scores = metrics[(metrics["metric"] == "auc") & (metrics["class"] == "macro")]
    # the synthetic tasks carry real but imperfect signal: most probes must find it
    assert (scores["value"] > 0.6).mean() >= 0.6 and (scores["value"] < 0.999).all()
    efficiency = pd.read_csv(demo / "results" / "tables" / "efficiency.csv")
    assert sorted(efficiency["fraction"].unique()) == config["efficiency"]["fractions"]
    layers = pd.read_csv(demo / "results" / "tables" / "layers.csv")
    assert set(layers.loc[layers["model"] == "clip", "layer"]) >= {"hidden.0", "hidden.4", "image_embeds"}
    comparisons = pd.read_csv(demo / "results" / "tables" / "comparisons.csv")
    assert set(comparisons["baseline"]) == {"clip"} and set(comparisons["test"]) == {"bootstrap", "paired_t", "delong"}
    summary = pd.read_csv(demo / "results" / "tables" / "efficiency_summary.csv")
    full = summary[summary["fraction"] == 1.0]
    assert set(summary["discipline"]) == {"pathology", "dermatology", "ophthalmology", "radiology"}
    assert np.allclose(full["retained_mean"], 1.0)
    nejm = pd.read_csv(demo / "results" / "tables" / "nejm.csv")
    assert set(nejm["model"]) == set(config["nejm"]["models"]) | {"readers", "chance"}
    groups = pd.read_csv(demo / "results" / "tables" / "groups.csv")
    assert set(groups["task"]) == {"T2"} and groups["group"].nunique() >= 5


def test_manifests_keep_patients_in_one_split(demo, config):
    for task in config["tasks"]:
        manifest = load_manifest(demo / "results" / "manifests" / f"{task}.csv")
        assert set(manifest["split"]) == {"train", "val", "test"}
        assert (manifest.groupby("patient_id")["split"].nunique() == 1).all(), task


def test_activations_follow_the_manifest(demo, config):
    for model, task in medprobe_config.model_task_pairs(config):
        manifest = load_manifest(demo / "results" / "manifests" / f"{task}.csv")
        with h5py.File(demo / "results" / "activations" / model / f"{task}.h5", "r") as handle:
            assert [i.decode() for i in handle["ids"][:]] == list(manifest["image_id"])
            assert handle["activations"].shape[0] == len(manifest)
            assert handle["activations"].dtype == np.float16


@pytest.mark.parametrize(("model", "task"), [("idefics_80b", "T4"), ("clip", "T1"), ("idefics_9b", "T7")])
def test_probe_auc_agrees_with_sklearn(demo, config, model, task):
    """Refit the headline probe with scikit-learn at the same C: test AUC within 0.005."""
    entry = config["tasks"][task]
    summary = json.loads((demo / "results" / "probes" / model / task / "probe.json").read_text())
    manifest = load_manifest(demo / "results" / "manifests" / f"{task}.csv")
    with h5py.File(demo / "results" / "activations" / model / f"{task}.h5", "r") as handle:
        names = list(handle.attrs["layer_names"])
        layer = summary["layer"]
        features = (
            handle["embeddings"][:] if layer == "image_embeds" else handle["activations"][:, names.index(layer), :]
        ).astype(np.float64)
    targets = encode_targets(manifest, entry["kind"], entry["classes"])
    train, test = (manifest["split"] == "train").to_numpy(), (manifest["split"] == "test").to_numpy()
    scaler = StandardScaler().fit(features[train])
    C = summary["C"]
    if entry["kind"] == "multilabel":
        probabilities = np.column_stack(
            [
                LogisticRegression(C=C, tol=1e-8, max_iter=10000)
                .fit(scaler.transform(features[train]), targets[train, k])
                .predict_proba(scaler.transform(features[test]))[:, 1]
                for k in range(targets.shape[1])
            ]
        )
        reference = np.nanmean(
            [
                roc_auc_score(targets[test, k], probabilities[:, k])
                for k in range(targets.shape[1])
                if 0 < targets[test, k].sum() < test.sum()
            ]
        )
    else:
        classifier = LogisticRegression(C=C, tol=1e-8, max_iter=10000).fit(
            scaler.transform(features[train]), targets[train]
        )
        probabilities = classifier.predict_proba(scaler.transform(features[test]))
        reference = (
            roc_auc_score(targets[test], probabilities[:, 1])
            if entry["kind"] == "binary"
            else roc_auc_score(targets[test], probabilities, multi_class="ovr", labels=range(len(entry["classes"])))
        )
    metrics = pd.read_csv(demo / "results" / "tables" / "metrics.csv", dtype={"class": str})
    ours = metrics[
        (metrics["model"] == model)
        & (metrics["task"] == task)
        & (metrics["class"] == "macro")
        & (metrics["metric"] == "auc")
    ]["value"].item()
    assert ours == pytest.approx(reference, abs=0.005)


def test_rerun_has_nothing_to_do_and_report_builds(repo, demo):
    result = snakemake(repo, demo, "-n")
    assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr
    result = snakemake(repo, demo, "--report", "results/report.html")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (demo / "results" / "report.html").stat().st_size > 10000


@pytest.mark.parametrize(("damage", "reason"), [("corrupt", "cannot decode"), ("missing", "does not exist")])
def test_bad_image_stops_the_run_naming_the_file(repo, tmp_path, damage, reason):
    result = snakemake(repo, tmp_path, "resources/demo/raw/T2/metadata.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(tmp_path / "resources/demo/raw/T2/metadata.csv", dtype=str, keep_default_na=False)
    victim = tmp_path / "resources/demo/raw/T2" / table["file"][5]
    if damage == "corrupt":
        victim.write_bytes(victim.read_bytes()[:100])
    else:
        victim.unlink()
    result = snakemake(repo, tmp_path, "results/manifests/T2.csv")
    assert result.returncode != 0
    assert str(victim.name) in result.stderr and reason in result.stderr
    assert not (tmp_path / "results/manifests/T2.csv").exists()
    assert not (tmp_path / "results/manifests/T2.json").exists()


def test_the_paper_protocol_runs_on_the_demo(repo, demo_paper):
    from sklearn.linear_model import SGDClassifier

    config = medprobe_config.load(repo / "config" / "demo_paper.yaml")
    results = demo_paper / "results"
    for name in FIGURES:
        assert (results / "figures" / f"{name}.png").stat().st_size > 0, name
    for name in TABLES + ["efficiency_retained", "findings"]:
        assert (results / "tables" / f"{name}.csv").stat().st_size > 0, name

    idefics = json.loads((results / "probes" / "idefics_80b" / "T4" / "probe.json").read_text())
    assert idefics["protocol"] == "paper" and idefics["settings"]["mode"] == "adam"
    assert idefics["layer"] == "hidden.5" and idefics["selection"] == "fixed" and idefics["fit_rows"] == "train+val"

    # The CLIP baseline is scikit-learn's SGDClassifier on the stored projected embeddings, train + val rows.
    task = config["tasks"]["T1"]
    baseline = json.loads((results / "probes" / "clip" / "T1" / "probe.json").read_text())
    assert baseline["settings"]["mode"] == "sgd" and baseline["layer"] == "image_embeds"
    manifest = load_manifest(results / "manifests" / "T1.csv")
    with h5py.File(results / "activations" / "clip" / "T1.h5", "r") as handle:
        embeddings = handle["embeddings"][:].astype(np.float64)
    targets = encode_targets(manifest, task["kind"], task["classes"])
    fit_rows, test = (manifest["split"] != "test").to_numpy(), (manifest["split"] == "test").to_numpy()
    reference = SGDClassifier(
        loss="log_loss", penalty="l2", alpha=0.001, max_iter=10000, class_weight="balanced", random_state=1
    ).fit(embeddings[fit_rows], targets[fit_rows])
    with h5py.File(results / "probes" / "clip" / "T1" / "predictions.h5", "r") as handle:
        np.testing.assert_allclose(handle["probabilities"][:], reference.predict_proba(embeddings[test]), atol=1e-5)

    # T7: the findings with more than 3 positive test images, and only those.
    t7 = load_manifest(results / "manifests" / "T7.csv")
    test_labels = t7.loc[t7["split"] == "test", "labels"].str.split("|").explode()
    counts = test_labels[test_labels != ""].value_counts()
    metrics = pd.read_csv(results / "tables" / "metrics.csv", dtype={"class": str})
    probed = set(metrics.loc[(metrics["task"] == "T7") & (metrics["metric"] == "auc"), "class"]) - {"macro"}
    assert probed == set(counts.index[counts > 3])

    comparisons = pd.read_csv(results / "tables" / "comparisons.csv")
    assert set(zip(comparisons["model"], comparisons["baseline"])) == {
        ("idefics_80b", "clip"),
        ("idefics_9b", "clip"),
        ("idefics_80b", "idefics_9b"),
    }
    efficiency = pd.read_csv(results / "tables" / "efficiency.csv")
    assert set(efficiency["seed"]) == {1}
    retained = pd.read_csv(results / "tables" / "efficiency_retained.csv")
    assert dict(zip(retained["discipline"], retained["task"])) == config["efficiency"]["summary_tasks"]

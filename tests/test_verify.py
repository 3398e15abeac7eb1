"""Damaged result files (docs/reliability.md, "Damaged files"): each reader names the file and the command that
rebuilds it, and ``python -m medprobe.verify`` finds every damaged file of a results tree at once."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from medprobe.contracts import DamagedFileError
from medprobe.evaluate import evaluation_table, load_predictions
from medprobe.extract.files import ActivationsWriter, Layout, read_activations
from medprobe.extract.merge import merge_shards
from medprobe.io import sha256_file, write_text_atomic
from medprobe.labels import load_manifest
from medprobe.prepare import class_counts
from medprobe.probe.efficiency import efficiency_task
from medprobe.probe.files import Activations
from medprobe.probe.task import probe_task
from medprobe.settings import (
    AdamSettings,
    EfficiencySettings,
    EvaluationSettings,
    ProbeSettings,
    SGDSettings,
    TaskSettings,
)
from medprobe.tables import collect
from medprobe.verify import main, snakemake_options, verify

TASK = TaskSettings(
    name="T1",
    discipline="pathology",
    dataset="demo",
    kind="binary",
    metric="auc",
    prompt="",
    classes=("benign", "malignant"),
    graded=False,
    min_test_positives=0,
)
PROBE = ProbeSettings(
    mode="regularised",
    C_grid=(0.1, 1.0),
    refine=False,
    refit=False,
    max_iter=100,
    tol=1e-6,
    class_weight="none",
    dtype="float64",
    adam=AdamSettings(epochs=1, lr=1e-4, batch_size=512, standardise=False),
    sgd=SGDSettings(alpha=0.001, max_iter=100, class_weight="balanced", random_state=1),
)
ACTIVATIONS = "results/activations/tiny/T1.h5"
PROBES = "results/probes/tiny/T1"
METRICS = "results/evaluation/tiny/T1/metrics.csv"


def write_manifest(results: Path) -> pd.DataFrame:
    """A binary manifest of 40 patients (two images each) and its sidecar's counts, as prepare writes them."""
    rng = np.random.default_rng(3)
    patients = np.repeat([f"p{i:02d}" for i in range(40)], 2)
    split = np.repeat(["train"] * 24 + ["val"] * 8 + ["test"] * 8, 2)
    manifest = pd.DataFrame(
        {
            "image_id": [f"img{i:03d}" for i in range(len(patients))],
            "path": [f"images/img{i:03d}.png" for i in range(len(patients))],
            "split": split,
            "patient_id": patients,
            "label": np.array(["benign", "malignant"])[rng.integers(0, 2, len(patients))],
            "labels": "",
            "source": "demo",
            "group": "",
        }
    )
    (results / "manifests").mkdir(parents=True)
    manifest.to_csv(results / "manifests" / "T1.csv", index=False)
    sidecar = {"task": "T1", "counts": class_counts(manifest, "binary")}
    write_text_atomic(results / "manifests" / "T1.json", json.dumps(sidecar, indent=2) + "\n")
    return manifest


def write_activations(path: Path, manifest_csv: Path, ids: list[str], labels: np.ndarray, **layout) -> None:
    """An activations file written by the extraction's own writer: three layers, the second informative."""
    rng = np.random.default_rng(5)
    values = rng.normal(size=(len(ids), 3, 6)).astype(np.float32)
    values[:, 1, 0] += 2.0 * (labels == "malignant") - 1.0
    options = {"embedding_dim": None, "dtype": np.dtype(np.float16), "compression": {}} | layout
    attrs = {
        "layer_names": ["hidden.0", "hidden.1", "hidden.2"],
        "num_hidden_states": 3,
        "model": "tiny",
        "dtype": str(options["dtype"]),
        "manifest_sha256": sha256_file(manifest_csv),
    }
    with ActivationsWriter(path, Layout(ids, n_layers=3, hidden_dim=6, **options), attrs, {}) as writer:
        writer.open()
        writer.write(0, values)
        writer.finish()


def build_tree(root: Path) -> None:
    """A demo-like results tree of one model x task: manifest and sidecar, activations, probe outputs, evaluation
    tables and collected tables, each written by the workflow's own function."""
    results = root / "results"
    manifest = write_manifest(results)
    manifest_csv = results / "manifests" / "T1.csv"
    write_activations(root / ACTIVATIONS, manifest_csv, manifest["image_id"].tolist(), manifest["label"].to_numpy())
    probes = root / PROBES
    probe_task(
        root / ACTIVATIONS,
        manifest_csv,
        predictions=probes / "predictions.h5",
        layers=probes / "layers.h5",
        summary=probes / "probe.json",
        task=TASK,
        probe=PROBE,
        layer="validation",
        seed=0,
        protocol=None,
    )
    efficiency = EfficiencySettings(fractions=(0.5, 1.0), seeds=1, sampling="patients")
    efficiency_task(
        root / ACTIVATIONS,
        manifest_csv,
        probes / "probe.json",
        probes / "efficiency.h5",
        task=TASK,
        probe=PROBE,
        efficiency=efficiency,
        seed=0,
    )
    sources = {"metrics": "predictions", "groups": "predictions", "layers": "layers", "efficiency": "efficiency"}
    for table, source in sources.items():
        evaluation_table(
            table,
            source=probes / f"{source}.h5",
            out=root / f"results/evaluation/tiny/T1/{table}.csv",
            task="T1",
            model="tiny",
            task_settings=TASK,
            evaluation=EvaluationSettings(bootstrap=10, ci=0.95),
            seed=0,
            manifest=manifest_csv,
            summary=probes / "probe.json",
        )
        # groups.csv has no rows (no sub-groups): the collected table is an empty file, as in the demo
        collect([root / f"results/evaluation/tiny/T1/{table}.csv"], results / "tables" / f"{table}.csv")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    build_tree(root)
    return root


@pytest.fixture()
def tree(pristine, tmp_path) -> Path:
    """A fresh copy of the pristine results tree, for a test to damage."""
    root = tmp_path / "run"
    shutil.copytree(pristine, root)
    return root


def truncate(path: Path) -> None:
    """What `truncate -s` to half the size does."""
    os.truncate(path, path.stat().st_size // 2)


def test_a_clean_tree_passes(tree, capsys):
    report = verify(tree)
    assert report.damaged == [] and not report.unchecked
    assert len(report.checked) == 2 + 1 + 4 + 4 + 4  # manifest + sidecar, activations, probes, evaluation, tables
    assert (tree / "results/tables/groups.csv").read_bytes() == b"\n"  # an empty collected table is no damage
    assert main(["--directory", str(tree)]) == 0
    assert capsys.readouterr().out.startswith(f"verify: 15 file(s) under {tree / 'results'} checked, 0 damaged")


def test_every_damaged_file_is_found_and_named_with_its_remedy(tree, capsys):
    truncate(tree / ACTIVATIONS)
    summary = json.loads((tree / PROBES / "probe.json").read_text())
    summary["layer"] = "hidden.7"
    (tree / PROBES / "probe.json").write_text(json.dumps(summary))
    # a second model's activations of T1, extracted for the same manifest file but with two ids swapped
    manifest = load_manifest(tree / "results/manifests/T1.csv")
    ids = manifest["image_id"].tolist()
    ids[3], ids[4] = ids[4], ids[3]
    other = tree / "results/activations/other/T1.h5"
    other.parent.mkdir()
    write_activations(other, tree / "results/manifests/T1.csv", ids, manifest["label"].to_numpy())
    pd.read_csv(tree / METRICS).drop(columns=["ci_low"]).to_csv(tree / METRICS, index=False)

    report = verify(tree)
    found = {damage.path: damage for damage in report.damaged}
    assert set(found) == {ACTIVATIONS, f"{PROBES}/probe.json", "results/activations/other/T1.h5", METRICS}
    assert "not a readable HDF5 file (Unable to synchronously open file (truncated file" in found[ACTIVATIONS].problem
    assert "'hidden.7' is not in layers.h5" in found[f"{PROBES}/probe.json"].problem
    assert "ids do not match manifest" in found["results/activations/other/T1.h5"].problem
    assert "first difference at row 3" in found["results/activations/other/T1.h5"].problem
    assert found[METRICS].problem.startswith("missing column(s) ['ci_low']")

    (tree / "paper.yaml").write_text("seed: 1\n")
    assert main(["--directory", str(tree), "--configfile", str(tree / "paper.yaml")]) == 1
    lines = capsys.readouterr().out.splitlines()
    damaged = {line.split()[1]: line for line in lines if line.startswith("DAMAGED ")}
    assert list(damaged) == ["results/activations/other/T1.h5", ACTIVATIONS, f"{PROBES}/probe.json", METRICS]
    snakemake = f"snakemake --cores all --directory {tree} --configfile {tree / 'paper.yaml'}"
    assert damaged[ACTIVATIONS].startswith(f"DAMAGED {ACTIVATIONS} (activations file): not a readable HDF5 file")
    assert damaged[ACTIVATIONS].endswith(f"| fix: rm {tree / ACTIVATIONS} && {snakemake} {ACTIVATIONS}")
    assert damaged[METRICS].endswith(f"| fix: rm {tree / METRICS} && {snakemake} {METRICS}")
    assert f"verify: 16 file(s) under {tree / 'results'} checked, 4 damaged" in lines
    removed = " ".join(str(tree / path) for path in damaged)
    assert lines[-1] == f"rebuild them all: rm {removed} && {snakemake} {' '.join(damaged)}"


def test_commands_name_paths_as_the_workflow_does_when_run_in_its_folder(tree, monkeypatch, capsys):
    truncate(tree / PROBES / "layers.h5")
    monkeypatch.chdir(tree)
    assert main([]) == 1
    out = capsys.readouterr().out
    assert f"| fix: rm {PROBES}/layers.h5 && snakemake --cores all {PROBES}/layers.h5\n" in out
    assert "verify: 15 file(s) under results checked, 1 damaged" in out


def test_manifest_cut_short_at_a_row_boundary_disagrees_with_its_sidecar(tree):
    manifest = tree / "results/manifests/T1.csv"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[:-2]))  # still a valid CSV: only the sidecar's counts tell
    report = verify(tree)
    assert [damage.path for damage in report.damaged] == ["results/manifests/T1.csv"]
    assert report.damaged[0].problem == (
        "rows per split {'test': 14, 'train': 48, 'val': 16} differ from its sidecar T1.json's counts "
        "{'test': 16, 'train': 48, 'val': 16}"
    )
    # what depends on a damaged manifest is not compared with it (one cause, one line)

    manifest.write_text("".join(lines)[:-20])  # cut inside a row
    assert "its last line is cut short" in verify(tree).damaged[0].problem


def test_read_data_finds_a_damaged_chunk_in_a_file_that_opens(tree):
    manifest = load_manifest(tree / "results/manifests/T1.csv")
    path = tree / ACTIVATIONS
    path.unlink()
    write_activations(
        path,
        tree / "results/manifests/T1.csv",
        manifest["image_id"].tolist(),
        manifest["label"].to_numpy(),
        compression={"compression": "gzip"},
    )
    with h5py.File(path, "r") as handle:
        chunk = handle["activations"].id.get_chunk_info(1)  # layer 1's chunk
    with open(path, "r+b") as handle:
        handle.seek(chunk.byte_offset + 4)
        handle.write(b"\xff" * 16)
    assert verify(tree).damaged == []  # structure intact: only reading the values tells
    damaged = verify(tree, read_data=True).damaged
    assert [damage.path for damage in damaged] == [ACTIVATIONS]
    assert "dataset 'activations' cannot be read" in damaged[0].problem


def write_record(root: Path, output: str, *, start: float, end: float, inputs: dict[str, str] | None = None) -> None:
    """Snakemake's metadata record of ``output`` (.snakemake/metadata), written by Snakemake's own persistence:
    ``endtime`` is the output's mtime when its job ended, ``input_checksums`` the SHA-256 of the job's inputs."""
    from snakemake.persistence import MetadataRecord
    from snakemake.persistence.file import FilePersistence

    checksums = {path: f"sha256:{digest}" for path, digest in (inputs or {}).items()}
    record = MetadataRecord(rule="r", starttime=start, endtime=end, incomplete=False, input_checksums=checksums)
    FilePersistence(path=root / ".snakemake")._write_record(output, record)


def test_a_file_changed_after_snakemake_wrote_it_differs_from_its_recorded_checksum(tmp_path):
    # a table written by one job and read by another, which recorded its checksum; a name long enough for
    # Snakemake to split its record's file name into folders
    scores = "results/tables/" + "s" * 200 + ".csv"
    (tmp_path / scores).parent.mkdir(parents=True)
    (tmp_path / scores).write_text("task,model,layer,fraction,seed,class,metric\nT1,m,h,1,0,a,auc\nT1,m,h,1,0,b,auc\n")
    written = (tmp_path / scores).stat().st_mtime
    write_record(tmp_path, scores, start=written - 5, end=written)
    write_record(
        tmp_path,
        "results/summary.pdf",
        start=written + 1,
        end=written + 2,
        inputs={scores: sha256_file(tmp_path / scores)},
    )
    assert verify(tmp_path).damaged == []

    (tmp_path / scores).write_text("task,model,layer,fraction,seed,class,metric\nT1,m,h,1,0,a,auc\n")  # still valid
    damaged = verify(tmp_path).damaged
    assert [damage.path for damage in damaged] == [scores]
    assert damaged[0].problem.startswith(
        "its SHA-256 differs from the one Snakemake recorded when the job making results/summary.pdf read it"
    )
    # Snakemake wrote the file again after that job read it: the old checksum no longer says what it holds
    write_record(tmp_path, scores, start=written + 3, end=written + 4)
    assert verify(tmp_path).damaged == []


def test_readers_name_the_damaged_file_and_the_command_that_rebuilds_it(tree):
    manifest_csv = tree / "results/manifests/T1.csv"
    truncate(tree / ACTIVATIONS)
    remedy = f"`rm {tree / ACTIVATIONS} && snakemake --cores all {tree / ACTIVATIONS}`"
    for read in (
        lambda: Activations(tree / ACTIVATIONS, manifest_csv),
        lambda: read_activations(tree / ACTIVATIONS, 0),
    ):
        with pytest.raises(DamagedFileError, match=r"^activations file .*T1\.h5: not a readable HDF5 file") as error:
            read()
        assert remedy in str(error.value) and "python -m medprobe.verify" in str(error.value)

    truncate(tree / PROBES / "predictions.h5")
    with pytest.raises(DamagedFileError, match=r"^probe output .*predictions\.h5: not a readable HDF5 file"):
        load_predictions(tree / PROBES / "predictions.h5")
    with h5py.File(tree / PROBES / "layers.h5", "a") as handle:
        del handle.attrs["layer_names"]
    with pytest.raises(DamagedFileError, match=r"layers\.h5: missing attribute 'layer_names'"):
        evaluation_table("layers", source=tree / PROBES / "layers.h5", out=tree / "x.csv")
    with h5py.File(tree / PROBES / "efficiency.h5", "a") as handle:
        handle.attrs["seeds"] = [0, 1]
    with pytest.raises(DamagedFileError, match=r"efficiency\.h5: 'probabilities' has shape \(2, 1, 16, 2\), expected"):
        evaluation_table("efficiency", source=tree / PROBES / "efficiency.h5", out=tree / "x.csv")

    summary = tree / PROBES / "probe.json"
    summary.write_text(summary.read_text()[:40])
    with pytest.raises(DamagedFileError, match=r"^probe summary .*probe\.json: not valid JSON"):
        efficiency_task(
            tree / ACTIVATIONS,
            manifest_csv,
            summary,
            tree / "x.h5",
            task=TASK,
            probe=PROBE,
            efficiency=EfficiencySettings(fractions=(1.0,), seeds=1, sampling="patients"),
            seed=0,
        )

    pd.read_csv(manifest_csv).drop(columns=["split"]).to_csv(manifest_csv, index=False)
    with pytest.raises(DamagedFileError, match=r"^manifest .*T1\.csv: missing required column\(s\) 'split'"):
        load_manifest(manifest_csv)


def test_a_damaged_shard_is_rebuilt_through_its_activations_file(tree):
    manifest_csv = tree / "results/manifests/T1.csv"
    manifest = load_manifest(manifest_csv)
    shard = tree / "results/activations/tiny/T2.shards/0.h5"
    shard.parent.mkdir()
    write_activations(shard, manifest_csv, manifest["image_id"].tolist(), manifest["label"].to_numpy())
    truncate(shard)
    with pytest.raises(DamagedFileError) as error:
        merge_shards(manifest_csv, [shard], tree / "results/activations/tiny/T2.h5")
    assert f"rm {shard} && snakemake --cores all {tree / 'results/activations/tiny/T2.h5'}`" in str(error.value)
    damaged = verify(tree).damaged
    assert [(d.path, d.target) for d in damaged] == [(str(shard.relative_to(tree)), "results/activations/tiny/T2.h5")]


def test_cut_figures_and_answers_are_found(tree):
    from PIL import Image

    figures, answers = tree / "results/figures", tree / "results/nejm/tiny/answers.jsonl"
    figures.mkdir()
    for name in ("figure3.png", "figure3.pdf", "figure4.png", "figure4.pdf"):
        Image.new("RGB", (64, 48), (200, 30, 30)).save(figures / name)
    answers.parent.mkdir(parents=True)
    answers.write_text(
        "".join(json.dumps({"case_id": f"c{i}", "mode": "greedy", "answer": "A"}) + "\n" for i in range(3))
    )
    (answers.parent / "answers.cache.jsonl").write_text('{"case_id": "c0"}\n{"case_')  # a torn cache line is allowed
    assert verify(tree).damaged == []

    truncate(figures / "figure4.png")
    truncate(figures / "figure4.pdf")
    answers.write_text(answers.read_text()[:-10])
    found = {damage.path: damage.problem for damage in verify(tree).damaged}
    assert found == {
        "results/figures/figure4.pdf": "not a complete PDF (no %PDF- header or no %%EOF at its end)",
        "results/figures/figure4.png": found["results/figures/figure4.png"],
        "results/nejm/tiny/answers.jsonl": "its last line is cut short (no line break)",
    }
    assert found["results/figures/figure4.png"].startswith("not a readable PNG image (")
    answers.write_text('{"case_id": "c0"}\n[1, 2]\n')
    assert verify(tree).damaged[-1].problem == "line 2 is not a JSON object"


def test_the_verify_rule_passes_the_runs_directory_and_config_files(tmp_path):
    workflow = tmp_path / "medprobe"
    (workflow / "config").mkdir(parents=True)
    default, paper = workflow / "config" / "config.yaml", workflow / "config" / "paper.yaml"
    assert snakemake_options(workflow, workflow, [default]) == []
    assert snakemake_options(tmp_path / "run", workflow, [paper]) == [
        "--directory",
        str(tmp_path / "run"),
        "--configfile",
        str(paper),
    ]


def test_check_result_files_stops_at_a_damaged_file_and_leaves_empty_ones(tmp_path):
    """What every run checks before any job (common.smk): the configured pairs' activations and probe outputs."""
    import h5py

    from medprobe.contracts import check_result_files

    folder = tmp_path / "results" / "activations" / "m"
    folder.mkdir(parents=True)
    with h5py.File(folder / "T1.h5", "w") as handle:
        handle["ids"], handle["activations"] = [b"a"], [[[0.0]]]
    (folder / "T2.h5").touch()  # empty, as --touch leaves it: the job that reads it checks it
    check_result_files([("m", "T1"), ("m", "T2"), ("m", "T3")], tmp_path)
    with h5py.File(folder / "T3.h5", "w") as handle:
        handle["ids"] = [b"a"]
    with pytest.raises(DamagedFileError, match=r"T3.h5: missing dataset 'activations'"):
        check_result_files([("m", "T3")], tmp_path)
    os.truncate(folder / "T1.h5", (folder / "T1.h5").stat().st_size // 2)
    with pytest.raises(DamagedFileError, match=r"T1.h5: not a readable HDF5 file"):
        check_result_files([("m", "T1")], tmp_path)

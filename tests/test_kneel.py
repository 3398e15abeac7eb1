"""T8 knee landmarks by KNEEL: the script that runs the upstream pipeline (against a fake `kneel` package with
the upstream module path and signatures), the crops the recipe makes from its output, the user's own landmarks,
the snapshot fetch (file:// archive, no network) and the workflow's plan (dry runs)."""

import ast
import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from medprobe import kneel
from medprobe.datasets import build_raw_table, fetch
from medprobe.download import MissingDataError

SCRIPT = kneel.__file__.rsplit("/medprobe/", 1)[0] + "/workflow/scripts/kneel_landmarks.py"

# A fake of github.com/Oulu-IMEDS/KNEEL's kneel.inference.pipeline: same module path, constructor and predict
# signature; predict answers from answers.json (basename -> [[x, y] x 16] for the right and the left knee,
# "none" for an unreadable file, "error" for an exception) and records every call in calls.jsonl.
FAKE_PIPELINE = """
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, os.pardir, os.pardir, os.pardir)


class KneeAnnotatorPipeline(object):
    def __init__(self, lc_snapshot_path, hc_snapshot_path, mean_std_path, device, jit_trace=True, logger=None):
        for path in (lc_snapshot_path, hc_snapshot_path, mean_std_path):
            assert os.path.exists(path), path
        self.device = device
        with open(os.path.join(ROOT, "answers.json")) as handle:
            self.answers = json.load(handle)

    def predict(self, img_name, roi_size_mm=140, pad=300, refine=True):
        assert isinstance(img_name, str)
        with open(os.path.join(ROOT, "calls.jsonl"), "a") as handle:
            handle.write(json.dumps([os.path.basename(img_name), roi_size_mm, pad, refine, self.device]) + "\\n")
        answer = self.answers[os.path.basename(img_name)]
        if answer == "none":
            return None
        if answer == "error":
            raise RuntimeError("cannot reshape array")
        return np.expand_dims(np.array(answer, dtype=float), 0)
"""


def knee_points(x, y):
    """16 landmarks around (x, y), mean exactly (x, y): 9 tibial below, 7 femoral above the joint line."""
    tibia = [[x - 8 + 2 * k, y + 3] for k in range(9)]
    femur = [[x - 6 + 2 * k, y - 27 / 7] for k in range(7)]
    return tibia + femur


def raw_table(raw, data, **inputs):
    """T8's raw table in raw/metadata.csv, with the landmark files of ``inputs``."""
    return build_raw_table(
        "oai_most",
        "T8",
        data,
        raw / "metadata.csv",
        raw / "counts.json",
        classes=["0", "1", "2", "3", "4"],
        inputs=inputs,
    )


@pytest.fixture
def fake_kneel(tmp_path):
    root = tmp_path / "fake"
    package = root / "kneel" / "inference" / "pipeline"
    package.mkdir(parents=True)
    (root / "kneel" / "__init__.py").write_text("")
    (root / "kneel" / "inference" / "__init__.py").write_text("")
    (package / "__init__.py").write_text(FAKE_PIPELINE)
    return root


@pytest.fixture
def snapshots(tmp_path):
    folder = tmp_path / "snapshots_release"
    for name in (kneel.LC_SNAPSHOT, kneel.HC_SNAPSHOT):
        (folder / name).mkdir(parents=True)
        (folder / name / "session.pkl").write_bytes(b"")
        (folder / name / "fold_0.pth").write_bytes(b"")
    np.save(folder / kneel.MEAN_STD, np.zeros((2, 3)))
    return folder


def radiograph(path, right, left, shape=(200, 300)):
    """A 16-bit bilateral radiograph: an asymmetric marker at each joint (bright square + a dimmer bar on the
    image's right of it), so that the crop's centre and its mirroring can be checked."""
    image = np.zeros(shape, dtype=np.uint16)
    for x, y in (right, left):
        image[y - 5 : y + 5, x - 5 : x + 5] = 4000
        image[y - 5 : y + 5, x + 5 : x + 15] = 1000
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


@pytest.fixture
def t8_data(tmp_path, fake_kneel):
    """Three radiographs: one KNEEL annotates, one it cannot read, one it fails on (both knees of each)."""
    data = tmp_path / "data"
    radiograph(data / "oai" / "9000099.png", right=(70, 100), left=(230, 100))
    radiograph(data / "most" / "MB00001.png", right=(80, 90), left=(220, 110))
    radiograph(data / "oai" / "9000100.png", right=(70, 100), left=(230, 100))
    knees = pd.DataFrame({
        "file": ["oai/9000099.png"] * 2 + ["most/MB00001.png"] * 2 + ["oai/9000100.png"],
        "patient_id": ["9000099", "9000099", "MB00001", "MB00001", "9000100"],
        "side": ["R", "L", "R", "L", "R"], "kl": ["2", "0", "4", "1", "3"],
        "source": ["oai", "oai", "most", "most", "oai"], "partition": ["train", "train", "test", "test", "train"],
        "spacing_row": ["0.5"] * 5, "spacing_col": ["0.5"] * 5,
    })  # fmt: skip
    knees.to_csv(data / "knees.csv", index=False)
    answers = {
        "9000099.png": [knee_points(70, 100), knee_points(230, 100)],
        "MB00001.png": "none",
        "9000100.png": "error",
    }
    (fake_kneel / "answers.json").write_text(json.dumps(answers))
    return data


def run_script(fake_kneel, data, snapshots, raw, *extra):
    env = {**os.environ, "PYTHONPATH": str(fake_kneel), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, SCRIPT, "--knees", str(data / "knees.csv"), "--data-dir", str(data), "--snapshots",
         str(snapshots), "--landmarks", str(raw / "landmarks.csv"), "--undetected", str(raw / "landmarks_undetected.csv"),
         *extra],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def calls(fake_kneel):
    return [json.loads(line) for line in (fake_kneel / "calls.jsonl").read_text().splitlines()]


def test_script_writes_kneel_landmarks_and_reports_radiographs_without_joints(tmp_path, fake_kneel, t8_data, snapshots):
    raw = tmp_path / "raw"
    result = run_script(fake_kneel, t8_data, snapshots, raw)
    assert result.returncode == 0, result.stderr
    # each radiograph once, called as upstream's inference script does (140 mm ROI, pad 300, refined)
    assert sorted(call[0] for call in calls(fake_kneel)) == ["9000099.png", "9000100.png", "MB00001.png"]
    assert {tuple(call[1:4]) for call in calls(fake_kneel)} == {(140, 300, True)}
    landmarks = pd.read_csv(raw / "landmarks.csv")
    assert list(landmarks.columns) == ["file", "side", "landmark", "x", "y"]
    right = landmarks[landmarks["side"] == "R"]
    assert len(right) == 16 and right["landmark"].tolist() == list(range(16))
    assert (right["x"].mean(), right["y"].mean()) == pytest.approx((70, 100), abs=0.01)
    assert landmarks.groupby("side")[["x", "y"]].mean().loc["L"].tolist() == pytest.approx([230, 100], abs=0.01)
    undetected = pd.read_csv(raw / "landmarks_undetected.csv")
    assert undetected[["file", "side"]].values.tolist() == [
        ["most/MB00001.png", "R"],
        ["most/MB00001.png", "L"],
        ["oai/9000100.png", "R"],
    ]
    assert "could not read" in undetected["reason"][0] and "RuntimeError: cannot reshape" in undetected["reason"][2]
    for file in ("most/MB00001.png", "oai/9000100.png"):
        assert f"no landmarks for {file}" in result.stderr  # and in the log
    assert not list(raw.glob("*.progress.jsonl")) and not list(raw.glob(".*.tmp"))
    assert calls(fake_kneel)[0][4] == "cpu"  # --device auto on a machine without a GPU

    # the recipe crops the detected knees (140 mm at 0.5 mm/px = 280 px, joint centred, left knee mirrored)
    # and leaves the undetected ones out, counted
    table = pd.read_csv(
        raw_table(raw, t8_data, landmarks=raw / "landmarks.csv", undetected=raw / "landmarks_undetected.csv"),
        dtype=str,
        keep_default_na=False,
    )
    assert table["image_id"].tolist() == ["oai_oai_9000099_R", "oai_oai_9000099_L"]
    assert table["label"].tolist() == ["2", "0"]
    right_crop, left_crop = (np.asarray(Image.open(raw / file)) for file in table["file"])
    assert right_crop.shape == left_crop.shape == (280, 280)
    assert right_crop[140, 140] == left_crop[140, 140] == 4000
    assert right_crop[140, 150] == 1000 and left_crop[140, 129] == 1000  # the left knee is mirrored
    counts = json.loads((raw / "counts.json").read_text())
    assert counts["excluded"] == {"no joint found by KNEEL": 3}


def test_interrupted_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path, t8_data):
    knees = kneel.read_knee_list(t8_data / "knees.csv")
    assert knees == [("oai/9000099.png", ["R", "L"]), ("most/MB00001.png", ["R", "L"]), ("oai/9000100.png", ["R"])]
    answers = {
        "9000099.png": np.array([[knee_points(70, 100), knee_points(230, 100)]]),
        "MB00001.png": None,
        "9000100.png": np.full((1, 2, 16, 2), np.nan),
    }
    seen = []

    def predict(path):
        seen.append(os.path.basename(path))
        if len(seen) == 2 and interrupt:
            raise KeyboardInterrupt
        return answers[os.path.basename(path)]

    whole = tmp_path / "whole"
    interrupt = False
    kneel.annotate(knees, str(t8_data), predict, str(whole / "l.csv"), str(whole / "u.csv"), {"refine": True})
    seen.clear()
    part = tmp_path / "part"
    part.mkdir()
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        kneel.annotate(knees, str(t8_data), predict, str(part / "l.csv"), str(part / "u.csv"), {"refine": True})
    assert not (part / "l.csv").exists() and (part / "l.csv.progress.jsonl").exists()
    interrupt = False
    seen.clear()
    kneel.annotate(knees, str(t8_data), predict, str(part / "l.csv"), str(part / "u.csv"), {"refine": True})
    assert seen == ["MB00001.png", "9000100.png"]  # the first radiograph is not run again
    for name in ("l.csv", "u.csv"):
        assert (part / name).read_text() == (whole / name).read_text()
    assert "no joint found" in (whole / "u.csv").read_text()
    # other settings: the progress of an earlier run is not reused
    (part / "l.csv.progress.jsonl").write_text(
        json.dumps({"refine": False})
        + "\n"
        + json.dumps({"file": "oai/9000099.png", "results": {"R": ["undetected", "x"], "L": ["undetected", "x"]}})
        + "\n"
    )
    seen.clear()
    kneel.annotate(knees, str(t8_data), predict, str(part / "l.csv"), str(part / "u.csv"), {"refine": True})
    assert len(seen) == 3 and (part / "l.csv").read_text() == (whole / "l.csv").read_text()


def test_joint_outside_the_image_and_odd_output_are_reported(tmp_path):
    path = tmp_path / "001"
    path.write_bytes(b"")
    outside = np.array([[knee_points(70, 100), knee_points(330, 100)]])
    results = kneel.knee_results(path, lambda _: outside, image_size=lambda _: (300, 200))
    assert results["R"][0] == "ok" and results["L"] == (
        "undetected",
        "joint centre (330, 100) outside the 300x200 image",
    )
    assert kneel.knee_results(path, lambda _: np.zeros((3, 2)))["R"][1].startswith("unexpected KNEEL output")
    assert kneel.knee_results(tmp_path / "missing", lambda _: outside)["L"] == ("undetected", "file not found")


def test_script_stays_python37_and_checks_its_inputs(tmp_path, snapshots):
    # the KNEEL env runs Python 3.7 and imports these from the source tree
    for path in [SCRIPT, kneel.__file__] + [
        kneel.__file__.replace("kneel.py", name) for name in ("devices.py", "gpu_job.py")
    ]:
        ast.parse(open(path).read(), feature_version=(3, 7))
    bad = tmp_path / "knees.csv"
    bad.write_text("file,side\na.png,X\n")
    with pytest.raises(ValueError, match=r"knees.csv: row 2: side must be R or L, got 'X'"):
        kneel.read_knee_list(bad)
    (snapshots / kneel.HC_SNAPSHOT / "fold_0.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"fold_\*\.pth"):
        kneel.check_snapshots(snapshots)


def test_script_without_kneel_says_where_to_get_it(tmp_path, t8_data, snapshots):
    result = run_script(tmp_path / "nothing", t8_data, snapshots, tmp_path / "raw", "--device", "cpu")
    assert result.returncode != 0 and "envs/kneel.yaml" in result.stderr
    assert not (tmp_path / "raw" / "landmarks.csv").exists()


def test_users_own_landmarks_are_checked_and_used(tmp_path, t8_data):
    given = tmp_path / "mine.csv"
    pd.DataFrame({"file": ["oai/9000099.png"] * 2, "side": ["r", "L"], "x": [70, 230], "y": [100, 100]}).to_csv(
        given, index=False
    )
    raw = tmp_path / "raw"
    table = pd.read_csv(raw_table(raw, t8_data, landmarks=given), dtype=str, keep_default_na=False)
    # the knees without landmarks (and not reported undetected) are taken as ready-made crops
    assert table["file"].tolist()[:2] == ["images/oai_oai_9000099_R.png", "images/oai_oai_9000099_L.png"]
    assert table["file"][2].endswith("data/most/MB00001.png") and len(table) == 5
    assert np.asarray(Image.open(raw / table["file"][0])).shape == (280, 280)
    pd.DataFrame({"file": ["a"], "side": ["R"], "x": ["12"], "y": ["nan"]}).to_csv(given, index=False)
    with pytest.raises(ValueError, match=r"mine.csv, line 2, column y: y must be a finite number of pixels"):
        raw_table(raw, t8_data, landmarks=given)
    pd.DataFrame({"file": ["a"], "x": [1], "y": [2]}).to_csv(given, index=False)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['side'\]"):
        kneel.read_landmarks(given)


def test_no_landmarks_anywhere_is_a_clear_error_and_knees_csv_stays_required(tmp_path, t8_data):
    with pytest.raises(FileNotFoundError, match=r"landmarks: kneel"):
        raw_table(tmp_path / "raw", t8_data)
    with pytest.raises(MissingDataError, match=r"  - knees\.csv") as error:
        fetch("oai_most", tmp_path / "empty", tmp_path / "empty" / "download.json")
    assert "landmarks: kneel" in str(error.value)  # landmarks are the workflow's, not a file to bring
    receipt = fetch("oai_most", t8_data, tmp_path / "download.json")
    assert set(receipt["files"]) == {"knees.csv"}


def test_snapshots_are_fetched_verified_and_unpacked(tmp_path, snapshots):
    archive = tmp_path / "upstream" / kneel.SNAPSHOTS_ARCHIVE
    archive.parent.mkdir()
    with tarfile.open(archive, "w:xz") as handle:
        handle.add(snapshots, arcname=kneel.SNAPSHOTS_DIR)
    target = tmp_path / "resources" / "kneel" / kneel.SNAPSHOTS_DIR
    with pytest.raises(ValueError, match="SHA-256"):
        kneel.fetch_snapshots(target, archive.as_uri(), sha256="0" * 64)
    assert not target.exists()
    paths = kneel.fetch_snapshots(target, archive.as_uri())
    assert paths["hc"] == target / kneel.HC_SNAPSHOT and (paths["lc"] / "session.pkl").exists()
    # the archive stays next to the folder (the corrupt first transfer was set aside, never used)
    assert sorted(p.name for p in target.parent.iterdir()) == [
        kneel.SNAPSHOTS_DIR,
        kneel.SNAPSHOTS_ARCHIVE,
        kneel.SNAPSHOTS_ARCHIVE + ".bad",
    ]


# ---- the workflow's plan -------------------------------------------------------------------------------------


def dry_run(repo, workdir, config_path, target):
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", target, "-n", "--directory", str(workdir), "--configfile", str(config_path)],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", "\n" + result.stdout):
        head = re.match(r"(?:local)?rule (\w+):", block)
        if head:
            jobs[head.group(1)] = block
    return jobs


def paper_workdir(repo, tmp_path, landmarks):
    config = yaml.safe_load((repo / "config" / "paper.yaml").read_text())
    config["tasks"]["T8"]["landmarks"] = landmarks
    config_path = tmp_path / "paper.yaml"
    config_path.write_text(yaml.safe_dump(config))
    data = tmp_path / "work" / "resources" / "datasets" / "oai_most"
    data.mkdir(parents=True)
    (data / "knees.csv").write_text("file,patient_id,side,kl,source,partition\noai/9000099/001,9000099,R,2,oai,train\n")
    return tmp_path / "work", config_path


def test_paper_dry_run_plans_kneel_before_the_t8_raw_table(repo, tmp_path):
    workdir, config_path = paper_workdir(repo, tmp_path, "kneel")
    jobs = dry_run(repo, workdir, config_path, "resources/raw/T8/metadata.csv")
    assert set(jobs) == {"oai_most_files", "kneel_snapshots", "kneel_landmarks", "raw_dataset"}
    job = jobs["kneel_landmarks"]
    assert "gpu=1" in job and "resources/kneel/snapshots_release" in job and "task=T8" in job
    # KNEEL runs on the knee list rule oai_most_files makes from knees.csv (and the OAI release, tests/test_oai.py)
    assert (
        "--knees resources/datasets/oai_most/knees_all.csv" in job
        and "--undetected resources/raw/T8/landmarks_undetected.csv" in job
    )
    assert "resources/datasets/oai_most/knees_all.csv" in jobs["oai_most_files"]
    assert "resources/raw/T8/landmarks.csv" in re.search(r"input: (.*)", jobs["raw_dataset"]).group(1)
    # snapshots unpacked by hand (no internet on the submit host): nothing to fetch
    (workdir / "resources" / "kneel" / "snapshots_release").mkdir(parents=True)
    assert "kneel_snapshots" not in dry_run(repo, workdir, config_path, "resources/raw/T8/metadata.csv")


def test_snapshot_rule_fetches_from_the_configured_mirror(repo, tmp_path, snapshots):
    archive = tmp_path / kneel.SNAPSHOTS_ARCHIVE
    with tarfile.open(archive, "w:xz") as handle:
        handle.add(snapshots, arcname=kneel.SNAPSHOTS_DIR)
    workdir, config_path = paper_workdir(repo, tmp_path, "kneel")
    config = yaml.safe_load(config_path.read_text())
    config["kneel"] = {"snapshots_url": archive.as_uri()}
    config_path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "resources/kneel/snapshots_release", "--cores", "1", "--directory",
         str(workdir), "--configfile", str(config_path)],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    kneel.check_snapshots(workdir / "resources" / "kneel" / "snapshots_release")
    assert "pin sha256" in (workdir / "logs" / "kneel_snapshots.log").read_text()


def test_config_checks_the_kneel_settings(repo):
    from medprobe.config import ConfigError, validate

    config = yaml.safe_load((repo / "config" / "paper.yaml").read_text())
    validate(config)
    assert config["tasks"]["T8"]["landmarks"] == "kneel"
    assert config["kneel"]["refine"] is True and config["kneel"]["resources"]["runtime"] == 720
    config = yaml.safe_load((repo / "config" / "paper.yaml").read_text())
    config["kneel"] = {"snapshots_sha256": "not-a-digest"}
    with pytest.raises(ConfigError, match="snapshots_sha256"):
        validate(config)
    config = yaml.safe_load((repo / "config" / "paper.yaml").read_text())
    config["tasks"]["T7"]["landmarks"] = "kneel"
    with pytest.raises(ConfigError, match=r"tasks\.T7\.landmarks.*oai_most \(T8\) only"):
        validate(config)


def test_own_landmarks_replace_the_kneel_job(repo, tmp_path):
    given = tmp_path / "mine.csv"
    given.write_text("file,side,x,y\n")
    workdir, config_path = paper_workdir(repo, tmp_path, str(given))
    jobs = dry_run(repo, workdir, config_path, "resources/raw/T8/metadata.csv")
    assert set(jobs) == {"oai_most_files", "raw_dataset"}
    assert str(given) in re.search(r"input: (.*)", jobs["raw_dataset"]).group(1)

"""T8 from the OAI release itself: the readings (kXR_SQ_BU<visit>, ASCII and SAS), the image archives
(contents.csv in visit folders, DICOM at <Folder>/001), the knee list KNEEL runs on, the raw table and the
workflow's plan. Fixtures follow the layouts public code reads (medprobe/datasets/oai_most/ names them).

pydicom is not a test dependency: radiographs are PNG bytes at the DICOM's path and the recipe's DICOM reader
is replaced by one that reads them with the spacing a DICOM header would give."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from medprobe import kneel
from medprobe.datasets import build_raw_table, oai_most
from medprobe.download import ChecksumError, MissingDataError
from medprobe.prepare import prepare_task
from medprobe.settings import SplitSettings, TaskSettings

READINGS_DIR = "oai/X-Ray Image Assessments_ASCII/Semi-Quant Scoring_ASCII"
HEADER = "ID|SIDE|READPRJ|VERSION|V{v}BARCDBU|V{v}XRKL|V{v}XRJSM"
CONTENTS = '"Folder","ParticipantID","StudyDate","Barcode","StudyDescription","SeriesDescription"\n'


def radiograph(path):
    """A bilateral radiograph (PNG bytes at a DICOM's path): bright joints at x 60-80 (right knee) and 220-240."""
    pixels = np.zeros((200, 300), dtype=np.uint16)
    pixels[90:110, 60:80] = 4000
    pixels[90:110, 220:240] = 3000
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")


def write_readings(folder, visit, rows, name=None):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [HEADER.format(v=visit)] + ["|".join(row) for row in rows]
    (folder / (name or f"kXR_SQ_BU{visit}.txt")).write_text("\n".join(lines) + "\n")


def write_contents(folder, rows, images=()):
    folder.mkdir(parents=True, exist_ok=True)
    text = CONTENTS + "".join(",".join(f'"{value}"' for value in row) + "\n" for row in rows)
    (folder / "contents.csv").write_text(text)
    for image in images:
        radiograph(folder / image / "001")


@pytest.fixture
def release(tmp_path):
    """Baseline (00m) and 12-month (OAI_12m, KNEEL's naming) archives; readings for visits 00, 01 and 03."""
    data = tmp_path / "resources" / "datasets" / "oai_most"
    readings = data / READINGS_DIR
    write_readings(
        readings,
        "00",
        [
            ["9000099", "1", "15", "1.2", "16600839603", "2", "1"],  # right knee, KL 2
            ["9000099", "2", "15", "1.2", "16600839603", "0", "0"],  # left knee, KL 0
            ["9000099", "1", "37", "1.2", "16600839603", "3", ""],  # a second project's reading: not used
            ["9000100", "1", "15", "1.2", "16600839610", "", ""],  # no grade
            ["9000100", "2", "15", "1.2", "16600839610", "9", ""],  # not a KL grade
            ["9000101", "1", "15", "1.2", "16600839620", "1", "0"],  # a hand radiograph only
            ["9000102", "2", "15", "1.2", "16600839630", "4", "3"],  # listed, file not there
            ["9000103", "3", "15", "1.2", "16600839640", "1", "0"],  # no side
        ],
    )
    write_readings(readings, "00", [["9000099", "1", "15", "1.2", "16600839603", "4", "0"]], name="kxr_sq_rel_bu00.txt")
    write_readings(
        readings,
        "01",
        [
            ["9000099", "1", "15", "1.2", "16601200002", "3", "2"],  # the second of two bilateral PA images
            ["9000099", "2", "15", "1.2", "16601200002", "1", "0"],
        ],
    )
    write_readings(readings, "03", [["9000099", "1", "15", "1.2", "16602400001", "3", "2"]])  # no 24m archive
    write_contents(
        data / "oai" / "00m",
        [
            [
                "0.C.2/9000099/20040909/00839603",
                "9000099",
                "20040909",
                "0839603",
                "OAI^XRAY^KNEE",
                "Bilateral PA Fixed Flexion Knee ",
            ],
            [
                "0.C.2/9000100/20040910/00839610",
                "9000100",
                "20040910",
                "0839610",
                "OAI^XRAY^KNEE",
                "Bilateral PA Fixed Flexion Knee",
            ],
            ["0.C.2/9000101/20040911/00839620", "9000101", "20040911", "0839620", "OAI^XRAY^HAND", "PA Right Hand"],
            [
                "0.C.2/9000102/20040912/00839630",
                "9000102",
                "20040912",
                "0839630",
                "OAI^XRAY^KNEE",
                "Bilateral PA Fixed Flexion Knee",
            ],
        ],
        images=[
            "0.C.2/9000099/20040909/00839603",
            "0.C.2/9000100/20040910/00839610",
            "0.C.2/9000101/20040911/00839620",
        ],
    )
    write_contents(
        data / "oai" / "OAI_12m",
        [
            [
                "1.C.2/9000099/20050913/01200001",
                "9000099",
                "20050913",
                "1200001",
                "OAI^XRAY^KNEE",
                "Bilateral PA Fixed Flexion Knee",
            ],
            [
                "1.C.2/9000099/20050913/01200002",
                "9000099",
                "20050913",
                "1200002",
                "OAI^XRAY^KNEE",
                "Bilateral PA Fixed Flexion Knee",
            ],
        ],
        images=["1.C.2/9000099/20050913/01200001", "1.C.2/9000099/20050913/01200002"],
    )
    return data


BASELINE = "oai/00m/0.C.2/9000099/20040909/00839603/001"
REPEAT = "oai/OAI_12m/1.C.2/9000099/20050913/01200002/001"
EXCLUDED = {
    "OAI: no KL grade": 1,
    "OAI: KL grade not 0-4": 1,
    "OAI: no bilateral PA radiograph at the visit": 1,
    "OAI: radiograph file missing": 1,
    "OAI: SIDE not 1 (right) or 2 (left)": 1,
    "OAI: no image archive for the visit": 1,
}


def test_release_gives_one_row_per_knee_and_visit_with_grade_and_radiograph(release):
    table, excluded = oai_most.oai_knees(release)
    assert table[["file", "patient_id", "side", "kl", "visit"]].values.tolist() == [
        [BASELINE, "9000099", "R", "2", "00"],  # the first reading (project 15), not project 37's KL 3
        [BASELINE, "9000099", "L", "0", "00"],
        [REPEAT, "9000099", "R", "3", "01"],  # two bilateral PA images at 12 months: the one read (barcode)
        [REPEAT, "9000099", "L", "1", "01"],
    ]
    assert set(table["source"]) == {"oai"} and set(table["partition"]) == {""}
    assert excluded == EXCLUDED
    readings, archives = oai_most.find_release(release / "oai")
    assert sorted(readings) == ["00", "01", "03"] and sorted(archives) == ["00", "01"]  # kxr_sq_rel_bu00 ignored


def test_text_coded_values_and_the_sas_release(release, monkeypatch):
    # coded text ("1: Right", "2: Grade 2") and missing codes (".: Missing Form/Incomplete Workbook")
    write_readings(
        release / READINGS_DIR,
        "00",
        [
            ["9000099", "1: Right", "15", "1.2", "016600839603", "2: Grade 2", ""],
            ["9000099", "2: Left", "15", "1.2", "016600839603", ".: Missing Form/Incomplete Workbook", ""],
        ],
    )
    table, excluded = oai_most.oai_knees(release)
    assert table.query("visit == '00'")[["side", "kl"]].values.tolist() == [["R", "2"]]
    assert excluded["OAI: no KL grade"] == 1
    # the SAS release: lower-case names, numbers as floats, text as bytes; a visit's ASCII table wins over it
    sas = {
        "id": [9000099.0, 9000099.0],
        "side": [1.0, 2.0],
        "readprj": [b"15", b"15"],
        "v01barcdbu": [16601200002.0] * 2,
        "v01xrkl": [4.0, np.nan],
    }
    monkeypatch.setattr(pd, "read_sas", lambda path, **kwargs: pd.DataFrame(sas))
    (release / READINGS_DIR / "kXR_SQ_BU01.txt").unlink()
    (release / READINGS_DIR / "kxr_sq_bu01.sas7bdat").write_bytes(b"not read: pandas.read_sas is replaced")
    (release / READINGS_DIR / "kxr_sq_bu03.sas7bdat").write_bytes(b"")
    readings, _ = oai_most.find_release(release / "oai")
    assert readings["01"].suffix == ".sas7bdat" and readings["03"].suffix == ".txt"
    table, excluded = oai_most.oai_knees(release)
    assert table.query("visit == '01'")[["file", "side", "kl"]].values.tolist() == [[REPEAT, "R", "4"]]
    assert excluded["OAI: no KL grade"] == 2


def test_tables_that_do_not_look_like_the_release_are_named(release):
    readings = release / READINGS_DIR
    (readings / "kXR_SQ_BU03.txt").write_text("ID|SIDE|READPRJ|V03XRJSM\n9000099|1|15|2\n")
    with pytest.raises(
        ValueError, match=r"kXR_SQ_BU03.txt: not an OAI kXR_SQ_BU03 table: missing column\(s\) \['V03XRKL'\]"
    ):
        oai_most.oai_knees(release)
    (readings / "kXR_SQ_BU03.txt").write_text("ID,SIDE,READPRJ,V03XRKL\n9000099,1,15,2\n")
    with pytest.raises(
        ValueError, match=r"kXR_SQ_BU03.txt: not an OAI ASCII table \(the release separates columns by '\|'\)"
    ):
        oai_most.oai_knees(release)
    (readings / "kXR_SQ_BU03.txt").unlink()
    (release / "oai" / "00m" / "contents.csv").write_text('"Folder","ParticipantID","Barcode"\n"a","9000099","1"\n')
    with pytest.raises(
        ValueError,
        match=r"00m/contents.csv: not an OAI image archive's contents.csv: missing column\(s\) \['SeriesDescription'\]",
    ):
        oai_most.oai_knees(release)
    (release / "oai" / "00m").rename(release / "oai" / "baseline")
    with pytest.raises(ValueError, match=r"baseline/contents.csv: cannot tell the visit .* \(00m, 12m, 24m"):
        oai_most.oai_knees(release)
    (release / "oai" / "baseline").rename(release / "oai" / "60m")
    with pytest.raises(ValueError, match=r"folder '60m' names month 60, not an OAI imaging visit"):
        oai_most.oai_knees(release)
    for path in readings.iterdir():
        path.unlink()
    (release / "oai" / "60m").rename(release / "oai" / "00m")
    with pytest.raises(FileNotFoundError, match=r"no kXR_SQ_BU<visit>.txt"):
        oai_most.oai_knees(release)


def test_nothing_there_names_both_options_and_where_each_file_goes(tmp_path, repo):
    data = tmp_path / "resources" / "datasets" / "oai_most"
    (data / "oai").mkdir(parents=True)  # an empty oai/ is not the release
    with pytest.raises(MissingDataError) as error:
        oai_most.knee_table(data)
    message = str(error.value)
    for expected in (
        f"into {data.resolve()}/",
        "nda.nih.gov/oai",
        "oai/<visit>/contents.csv",
        "<visit>/<Folder>/001",
        "00m, 12m, 24m, 36m, 48m, 72m, 96m",
        "oai/kXR_SQ_BU<visit>.txt",
        "kxr_sq_bu<visit>.sas7bdat",
        "knees.csv, a table you make (MOST, or everything)",
        "landmarks: kneel",
    ):
        assert expected in message, expected
    # the rule's command: the same message, nothing written
    receipt, knees = data / "download.json", data / "knees_all.csv"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medprobe.datasets.oai_most",
            "--data-dir",
            str(data),
            "--knees-out",
            str(knees),
            "--receipt",
            str(receipt),
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "Put one or both of these into" in result.stderr
    assert not receipt.exists() and not knees.exists()
    # a knees.csv alone is enough
    most_knees(data)
    assert set(oai_most.prepare(data, knees, receipt)["files"]) == {"knees.csv"}
    assert pd.read_csv(knees)["origin"].tolist() == ["knees.csv"] * 2


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


def most_knees(data):
    radiograph(data / "most" / "MB00001.png")
    pd.DataFrame(
        {
            "file": ["most/MB00001.png"] * 2,
            "patient_id": ["MB00001"] * 2,
            "side": ["R", "L"],
            "kl": ["1", "3"],
            "source": ["most"] * 2,
            "partition": ["test"] * 2,
            "spacing_row": ["0.5"] * 2,
            "spacing_col": ["0.5"] * 2,
        }
    ).to_csv(data / "knees.csv", index=False)


def test_release_and_most_table_are_listed_for_kneel_with_a_receipt(release):
    most_knees(release)
    receipt = oai_most.prepare(release, release / "knees_all.csv", release / "download.json")
    knees = pd.read_csv(release / "knees_all.csv", dtype=str, keep_default_na=False)
    assert knees["source"].tolist() == ["most"] * 2 + ["oai"] * 4
    assert knees["origin"].tolist() == ["knees.csv"] * 2 + ["oai release"] * 4
    assert json.loads((release / "download.json").read_text()) == receipt
    assert set(receipt["files"]) == {"knees.csv", "oai/00m/contents.csv", "oai/OAI_12m/contents.csv"} | {
        f"{READINGS_DIR}/kXR_SQ_BU{visit}.txt" for visit in ("00", "01", "03")
    }
    assert receipt["knees"] == 6 and receipt["excluded"] == EXCLUDED
    # KNEEL's script reads the list: each radiograph once, with the sides asked for
    assert kneel.read_knee_list(release / "knees_all.csv") == [
        ("most/MB00001.png", ["R", "L"]),
        (BASELINE, ["R", "L"]),
        (REPEAT, ["R", "L"]),
    ]
    # a pinned checksum that does not match stops before anything is rewritten
    (release / "download.json").unlink()
    with pytest.raises(ChecksumError, match="knees.csv"):
        oai_most.prepare(release, release / "knees_all.csv", release / "download.json", {"knees.csv": "0" * 64})
    assert not (release / "download.json").exists()


def test_knees_without_a_kl_grade_0_to_4_are_left_out_and_counted(tmp_path):
    data = tmp_path / "data"
    radiograph(data / "most" / "MB00001.png")
    grades = ["2", "2.0", "5", "8", "", ".M: missing", "4"]
    pd.DataFrame(
        {
            "file": ["most/MB00001.png"] * 7,
            "patient_id": [f"MB{k}" for k in range(7)],
            "side": ["R"] * 7,
            "kl": grades,
            "source": ["most"] * 7,
            "partition": [""] * 7,
            "spacing_row": ["0.5"] * 7,
            "spacing_col": ["0.5"] * 7,
        }
    ).to_csv(data / "knees.csv", index=False)
    knees, excluded = oai_most.knee_table(data)
    assert knees["kl"].tolist() == ["2", "2", "4"] and knees["patient_id"].tolist() == ["MB0", "MB1", "MB6"]
    assert excluded == {"knees.csv: KL grade not 0-4": 2, "knees.csv: no KL grade": 2}
    receipt = oai_most.prepare(data, data / "knees_all.csv", data / "download.json")
    assert receipt["knees"] == 3 and receipt["excluded"] == excluded
    pd.DataFrame({"file": ["most/MB00001.png"], "side": ["R"], "x": [70], "y": [100]}).to_csv(
        data / "landmarks.csv", index=False
    )
    table = pd.read_csv(raw_table(tmp_path / "raw", data), dtype=str, keep_default_na=False)
    assert table["label"].tolist() == ["2", "2", "4"]
    assert json.loads((tmp_path / "raw" / "counts.json").read_text())["excluded"] == excluded


def test_own_oai_rows_next_to_the_release_are_refused(release):
    pd.DataFrame(
        {
            "file": [BASELINE],
            "patient_id": ["9000099"],
            "side": ["R"],
            "kl": ["2"],
            "source": ["oai"],
            "partition": [""],
        }
    ).to_csv(release / "knees.csv", index=False)
    with pytest.raises(ValueError, match=r"knees.csv has rows with source 'oai' and .*oai/ holds the OAI release"):
        oai_most.knee_table(release)


def fake_dicom(path):
    return np.asarray(Image.open(path)), (0.5, 0.5)


def test_raw_table_crops_release_knees_and_prepare_keeps_patients_together(release, tmp_path, monkeypatch):
    monkeypatch.setattr(kneel, "read_dicom", fake_dicom)
    most_knees(release)
    raw = tmp_path / "raw"
    raw.mkdir()
    landmarks = [[file, side, x, 100] for file in ("most/MB00001.png", BASELINE) for side, x in (("R", 70), ("L", 230))]
    landmarks.append([REPEAT, "R", 70, 100])  # the 12-month left knee: KNEEL found no joint; right one: found
    pd.DataFrame(landmarks, columns=["file", "side", "x", "y"]).to_csv(raw / "landmarks.csv", index=False)
    pd.DataFrame([[REPEAT, "L", "no joint found"]], columns=["file", "side", "reason"]).to_csv(
        raw / "landmarks_undetected.csv", index=False
    )
    table = pd.read_csv(
        raw_table(raw, release, landmarks=raw / "landmarks.csv", undetected=raw / "landmarks_undetected.csv"),
        dtype=str,
        keep_default_na=False,
    )
    assert table["patient_id"].tolist() == ["most_MB00001"] * 2 + ["oai_9000099"] * 3
    assert table["label"].tolist() == ["1", "3", "2", "0", "3"]
    assert table["partition"].tolist() == ["test", "test", "", "", ""]
    assert table["image_id"][2] == "oai_oai_00m_0.C.2_9000099_20040909_00839603_001_R"
    right = np.asarray(Image.open(raw / table["file"][2]))
    left = np.asarray(Image.open(raw / table["file"][3]))
    assert right.shape == (280, 280) and right[140, 140] == 4000 and left[140, 140] == 3000  # 140 mm at 0.5 mm/px
    counts = json.loads((raw / "counts.json").read_text())
    assert counts["excluded"] == {**EXCLUDED, "no joint found by KNEEL": 1}
    # a release knee without landmarks is left out, never taken as a ready-made crop of the whole radiograph
    pd.DataFrame(landmarks[:4], columns=["file", "side", "x", "y"]).to_csv(raw / "landmarks.csv", index=False)
    table = pd.read_csv(
        raw_table(raw, release, landmarks=raw / "landmarks.csv", undetected=raw / "landmarks_undetected.csv"),
        dtype=str,
        keep_default_na=False,
    )
    assert len(table) == 4 and json.loads((raw / "counts.json").read_text())["excluded"]["OAI: no landmarks"] == 1
    # no partition: prepare holds whole patients out (both knees, every visit); each extra patient has its own
    # copy of a crop (one file named by two rows is refused: it could land in two splits)
    crop = (raw / table["file"][2]).read_bytes()
    for patient in range(9000200, 9000230):
        (raw / "images" / f"extra_{patient}.png").write_bytes(crop)
        table.loc[len(table)] = [
            f"oai_{patient}",
            f"images/extra_{patient}.png",
            f"oai_{patient}",
            str(patient % 5),
            "",
            "oai",
            "",
            "",
        ]
    table.to_csv(raw / "metadata.csv", index=False)
    settings = TaskSettings.from_dict(
        {
            "name": "T8",
            "discipline": "radiology",
            "dataset": "oai_most",
            "kind": "multiclass",
            "metric": "auc",
            "prompt": "",
            "classes": ["0", "1", "2", "3", "4"],
            "graded": True,
            "min_test_positives": 0,
        }
    )
    manifest = prepare_task(
        "T8",
        settings,
        SplitSettings(0.2, 0.2),
        0,
        metadata=raw / "metadata.csv",
        recipe_counts=raw / "counts.json",
        manifest=tmp_path / "m.csv",
        sidecar=tmp_path / "m.json",
        images=tmp_path / "img",
    )
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(manifest.loc[manifest["patient_id"] == "most_MB00001", "split"]) == {"test"}
    assert {"train", "val", "test"} <= set(manifest["split"])


def test_paper_dry_run_builds_t8_from_the_release(repo, tmp_path):
    config = yaml.safe_load((repo / "config" / "paper.yaml").read_text())
    assert config["tasks"]["T8"]["landmarks"] == "kneel"
    workdir = tmp_path / "work"
    data = workdir / "resources" / "datasets" / "oai_most"
    write_readings(data / "oai", "00", [["9000099", "1", "15", "1.2", "16600839603", "2", "1"]])
    write_contents(
        data / "oai" / "00m",
        [
            [
                "0.C.2/9000099/20040909/00839603",
                "9000099",
                "20040909",
                "0839603",
                "OAI^XRAY^KNEE",
                "Bilateral PA Fixed Flexion Knee",
            ]
        ],
    )
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "results/manifests/T8.csv", "-n", "-p", "--directory", str(workdir),
         "--configfile", str(repo / "config" / "paper.yaml")],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = set(
        line.split()[-1].rstrip(":") for line in result.stdout.splitlines() if line.startswith(("rule ", "localrule "))
    )
    assert jobs == {"oai_most_files", "kneel_snapshots", "kneel_landmarks", "raw_dataset", "prepare"}
    assert "python -m medprobe.datasets.oai_most --data-dir resources/datasets/oai_most" in result.stdout
    assert "--knees resources/datasets/oai_most/knees_all.csv --data-dir resources/datasets/oai_most" in result.stdout
    # the rule itself, run (with a checksum pinned in the config for one of the release's tables)
    radiograph(data / "oai" / "00m" / "0.C.2/9000099/20040909/00839603" / "001")
    digest = hashlib.sha256((data / "oai" / "kXR_SQ_BU00.txt").read_bytes()).hexdigest()
    config["tasks"]["T8"]["checksums"] = {"oai/kXR_SQ_BU00.txt": digest}
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "resources/datasets/oai_most/download.json", "--cores", "1", "--directory",
         str(workdir), "--configfile", str(tmp_path / "paper.yaml")],
        cwd=repo, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    knees = pd.read_csv(data / "knees_all.csv", dtype=str, keep_default_na=False)
    assert knees[["file", "side", "kl", "origin"]].values.tolist() == [[BASELINE, "R", "2", "oai release"]]
    receipt = json.loads((data / "download.json").read_text())
    assert receipt["files"]["oai/kXR_SQ_BU00.txt"] == {"sha256": digest, "pinned": True}
    assert "1 knee(s)" in (workdir / "logs" / "oai_most_files.log").read_text()

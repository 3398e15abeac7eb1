"""User-written tables (medprobe.user_tables): encoding, shape, identifiers, file names and rows, as prepare, the
T8 landmark reader and the NEJM case reader see them. Every message names the file, and the line and column where
there is one."""

import json
import logging
import re
import unicodedata

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medprobe import kneel, nejm
from medprobe.images import BadImageError
from medprobe.prepare import prepare_task
from medprobe.settings import SplitSettings, TaskSettings
from medprobe.user_tables import FileLookup, UserTableError, normalise_id, read_csv, same_file_groups

HEADER = "image_id,file,patient_id,label,labels,source,partition,group"
NFC, NFD = unicodedata.normalize("NFC", "José"), unicodedata.normalize("NFD", "José")


def raw_rows(n_patients=8, per_patient=2, partition=lambda p: ""):
    return [
        {
            "image_id": f"p{p}_{i}",
            "file": f"images/p{p}_{i}.png",
            "patient_id": f"P{p}",
            "label": "ab"[(p + i) % 2],
            "labels": "",
            "source": "s",
            "partition": partition(p),
            "group": "",
        }
        for p in range(n_patients)
        for i in range(per_patient)
    ]


def write_table(raw, rows, encoding="utf-8"):
    """``rows`` as ``raw/metadata.csv`` (line k + 2 is row k) and a small image for every file they name."""
    (raw / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for row in rows:
        path = raw / row["file"].strip()
        if not path.exists():
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(path)
    pd.DataFrame(rows).to_csv(raw / "metadata.csv", index=False, encoding=encoding)
    return raw / "metadata.csv"


def prepare(tmp_path, raw, test_fraction=0.25, **options):
    settings = TaskSettings.from_dict(
        {
            "name": "T",
            "discipline": "pathology",
            "metric": "auc",
            "prompt": "",
            "graded": False,
            "min_test_positives": 0,
            "kind": "binary",
            "classes": ["a", "b"],
            "dataset": "mine",
        }
    )
    return prepare_task(
        "T",
        settings,
        SplitSettings(0.25, test_fraction),
        0,
        metadata=raw / "metadata.csv",
        manifest=tmp_path / "m.csv",
        sidecar=tmp_path / "m.json",
        images=tmp_path / "images",
        **options,
    )


# ---- 1. empty and header-only files ------------------------------------------------------------------------------


def test_empty_and_header_only_tables_get_their_own_messages_naming_the_file(tmp_path):
    raw = tmp_path / "raw"
    metadata = write_table(raw, raw_rows())
    metadata.write_bytes(b"")
    with pytest.raises(UserTableError, match=rf"{re.escape(str(metadata))}: the file is empty \(0 bytes\)"):
        prepare(tmp_path, raw)
    metadata.write_text("\n \n")
    with pytest.raises(UserTableError, match=r"metadata\.csv: the file is empty \(3 bytes, only blank lines\)"):
        prepare(tmp_path, raw)
    metadata.write_text(HEADER + "\n")
    with pytest.raises(UserTableError, match=rf"{re.escape(str(metadata))}: the file has a header \(line 1: "):
        prepare(tmp_path, raw)
    metadata.write_text("image_id,file,label\nx,images/p0_0.png,a\n")
    with pytest.raises(UserTableError, match=r"metadata\.csv, line 1: missing column\(s\) \['patient_id', 'source'"):
        prepare(tmp_path, raw)
    assert not (tmp_path / "m.csv").exists()
    # a landmarks.csv may be only its header (ready-made crops), but not empty
    landmarks = tmp_path / "landmarks.csv"
    landmarks.write_text("file,side,x,y\n")
    assert kneel.read_landmarks(landmarks).empty
    landmarks.write_bytes(b"")
    with pytest.raises(UserTableError, match=r"landmarks\.csv: the file is empty \(0 bytes\); a landmarks table"):
        kneel.read_landmarks(landmarks)


# ---- 2. encodings ---------------------------------------------------------------------------------------------


def test_a_latin1_table_names_the_file_the_line_and_utf8(tmp_path):
    raw = tmp_path / "raw"
    rows = raw_rows()
    rows[3]["source"] = "hôpital"  # row 3 is line 5
    metadata = write_table(raw, rows, encoding="latin-1")
    with pytest.raises(UserTableError) as error:
        prepare(tmp_path, raw)
    message = str(error.value)
    assert message.startswith(f"{metadata}, line 5, byte ")
    assert "the file must be UTF-8" in message and f"iconv -f latin1 -t utf-8 {metadata}" in message
    assert "hôpital" in message  # the line as Latin-1 shows it
    # UTF-8 with a byte-order mark (Excel's "CSV UTF-8") is read, the BOM not part of the first column's name
    write_table(raw, rows, encoding="utf-8-sig")
    assert (raw / "metadata.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    assert "hôpital" in set(prepare(tmp_path, raw)["source"])
    (raw / "metadata.csv").write_bytes((raw / "metadata.csv").read_text(encoding="utf-8-sig").encode("utf-16"))
    with pytest.raises(UserTableError, match=r"metadata\.csv: the file is UTF-16 .* must be UTF-8"):
        prepare(tmp_path, raw)
    # the NEJM case.json and T8's landmarks go through the same reader
    case = tmp_path / "cases" / "c1"
    case.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(case / "image.png")
    data = {"id": "c1", "date": "2005-10-13", "question": "Diagnosis?", "choices": list("ABCDE"), "answer": "A"}
    (case / "case.json").write_bytes(json.dumps({**data, "context": "Fièvre"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(UserTableError, match=r"c1/case\.json, line 1, byte \d+ .*must be UTF-8"):
        nejm.load_case(case)
    landmarks = tmp_path / "landmarks.csv"
    landmarks.write_bytes("file,side,x,y\nradiographs/genou_é.dcm,R,1,2\n".encode("latin-1"))
    with pytest.raises(UserTableError, match=r"landmarks\.csv, line 2, byte 19 .*must be UTF-8"):
        kneel.read_landmarks(landmarks)


# ---- 3. partitions --------------------------------------------------------------------------------------------


def test_partition_errors_name_metadata_csv_and_the_real_cause(tmp_path):
    raw = tmp_path / "raw"
    rows = raw_rows(n_patients=12, partition=lambda p: "test" if p < 4 else "train")
    rows[1]["partition"] = ""  # patient P0: line 2 is test, line 3 unassigned
    metadata = write_table(raw, rows)
    with pytest.raises(UserTableError) as error:
        prepare(tmp_path, raw)
    assert str(error.value).startswith(
        f"{metadata}: patient(s) have rows with partition 'test' and rows with an empty partition: "
        "'P0' (test: line(s) 2; empty: line(s) 3)"
    )
    assert "cannot hold out" not in str(error.value) and not (tmp_path / "m.csv").exists()
    rows[1]["partition"] = "train"
    write_table(raw, rows)
    with pytest.raises(UserTableError, match=r"metadata\.csv: patient\(s\) appear in both the train and the test "):
        prepare(tmp_path, raw)
    # one patient to draw the test split from: the message names the table, the pool and the patient
    rows = raw_rows(n_patients=6, partition=lambda p: "" if p == 0 else "train")
    metadata = write_table(raw, rows)
    with pytest.raises(ValueError) as error:
        prepare(tmp_path, raw)
    assert str(error.value).startswith(
        f"{metadata}: cannot hold out 25% of the patients whose rows all have an empty partition, from whom the test "
        "split is drawn: there is only 1 such patient ('P0'"
    )
    # a patient leaking into two splits after splitting names the raw table, not a manifest that is never written
    from medprobe.prepare import check_manifest

    manifest = pd.DataFrame({"patient_id": ["A", "A", "B"], "split": ["train", "test", "val"]})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(metadata))} \(task T, before writing m\.csv\): .*'A'"):
        check_manifest(manifest, "T", metadata, "m.csv")


# ---- 4. file names that differ only in normal form or case ----------------------------------------------------


def test_a_missing_file_whose_name_differs_only_in_normal_form_or_case_names_both(tmp_path):
    raw = tmp_path / "raw"
    rows = raw_rows()
    metadata = write_table(raw, rows)
    (raw / rows[0]["file"]).rename(raw / "images" / unicodedata.normalize("NFD", "café.png"))
    rows[0]["file"] = "images/" + unicodedata.normalize("NFC", "café.png")
    (raw / rows[2]["file"]).rename(raw / "images" / "P1_0.PNG")
    pd.DataFrame(rows).to_csv(metadata, index=False)
    with pytest.raises(BadImageError) as error:
        prepare(tmp_path, raw)
    message = str(error.value)
    assert message.startswith(f"{raw / rows[0]['file']}: file does not exist, but {raw / 'images'}/")
    assert "differs from the table's only in Unicode normal form" in message
    assert r"the table writes 'caf\xe9.png', the file system 'cafe\u0301.png'" in message
    assert "image_id p0_0" in message
    manifest = prepare(tmp_path, raw, on_bad_image="skip")
    reasons = {entry["image_id"]: entry for entry in json.loads((tmp_path / "m.json").read_text())["skipped"]}
    assert set(reasons) == {"p0_0", "p1_0"} and set(manifest["image_id"]).isdisjoint(reasons)
    assert "only in letter case" in reasons["p1_0"]["reason"] and "P1_0.PNG" in reasons["p1_0"]["reason"]
    assert reasons["p1_0"]["line"] == 4
    # a name written as it is on disk (NFD in table and on disk) is found: file names are not rewritten
    rows[0]["file"] = "images/" + unicodedata.normalize("NFD", "café.png")
    rows[2]["file"] = "images/P1_0.PNG"
    write_table(raw, rows)
    assert len(prepare(tmp_path, raw)) == len(rows)
    # folders too; and a genuinely missing file gets no hint
    (raw / "Séries").mkdir()
    lookup = FileLookup()
    assert lookup.near_miss(raw / unicodedata.normalize("NFD", "Séries") / "x.png") is None
    (raw / "Séries" / "x.png").write_bytes(b"1")
    found, kinds = lookup.near_miss(raw / unicodedata.normalize("NFD", "séries") / "x.png")
    assert found == raw / "Séries" / "x.png" and kinds == ["Unicode normal form", "letter case"]
    assert FileLookup().near_miss(raw / "séries" / "x.png")[1] == ["letter case"]
    assert FileLookup().hint(raw / "images" / "nothing.png") is None


# ---- 5. identifiers --------------------------------------------------------------------------------------------


def test_two_spellings_of_one_patient_are_one_patient_and_never_split(tmp_path):
    raw = tmp_path / "raw"
    rows = raw_rows(n_patients=24, per_patient=2)
    for row in rows:  # every patient written once in NFC and once in NFD with surrounding spaces
        number = row["patient_id"][1:]
        row["patient_id"] = f"{NFC}{number}" if row["image_id"].endswith("_0") else f" {NFD}{number}\t"
        row["label"] = f" {row['label']} "
    write_table(raw, rows)
    manifest = prepare(tmp_path, raw)
    assert set(manifest["patient_id"]) == {f"{NFC}{p}" for p in range(24)}
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(manifest["label"]) == {"a", "b"}
    assert normalise_id(f" {NFD} ") == NFC
    # a patient in test under one spelling and in train under the other is the train/test conflict it is
    rows = raw_rows(n_patients=8, partition=lambda p: "test" if p < 2 else "train")
    rows[0]["patient_id"], rows[1]["patient_id"] = NFC, f"{NFD} "
    rows[1]["partition"] = "train"
    write_table(raw, rows)
    with pytest.raises(UserTableError, match=rf"both the train and the test partition: '{NFC}' \(train: line\(s\) 3"):
        prepare(tmp_path, raw)


@pytest.mark.parametrize(
    ("row", "column", "value", "message"),
    [
        (2, "patient_id", "P\x001", r"line 4, column patient_id: 'P\\x001' contains the control .* U\+0000"),
        (3, "label", "a\u200b", r"line 5, column label: 'a\\u200b' contains the control or invisible .* U\+200B"),
        (4, "image_id", "scans/p2_0", r"column image_id: values must match .*: line 6 \('scans/p2_0'\)"),
        (5, "image_id", "  ", r"column image_id: empty on line 7; image_id is required"),
        (6, "file", "", r"column file: empty on line 8; file is required"),
        (1, "image_id", "p0_0", r"duplicate image_id values \['p0_0'\] \('p0_0' on lines 2, 3\)"),
        (7, "label", "c", r"column label has values \['c'\] not in the task's classes \['a', 'b'\] \(line 9 \('c'\)\)"),
        (8, "partition", "Test", r"column partition: must be train, test or empty; found line 10 \('Test'\)"),
    ],
)
def test_values_that_cannot_be_identifiers_name_the_file_line_and_column(tmp_path, row, column, value, message):
    raw = tmp_path / "raw"
    rows = raw_rows()
    metadata = write_table(raw, rows)
    rows[row][column] = value
    pd.DataFrame(rows).to_csv(metadata, index=False)
    with pytest.raises(UserTableError, match=rf"^{re.escape(str(metadata))}[:,] .*{message}"):
        prepare(tmp_path, raw)


def test_lines_are_the_editors_and_the_csv_shape_is_checked(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text('id,note\n\na,"two\nlines"\nb,x\n,\nc,y,,\n')
    read = read_csv(table, ["id"], ["extra"], identifiers=["id"])
    assert read.index.tolist() == [3, 5, 7]  # blank line 2 and the empty row on line 6 skipped
    assert read["note"].tolist() == ["two\nlines", "x", "y"] and read["extra"].tolist() == ["", "", ""]
    table.write_text("id,note\na,x\nb,x,oops\n")
    with pytest.raises(UserTableError, match=r"t\.csv, line 3: 3 values, but the header \(line 1\) names 2 columns"):
        read_csv(table, ["id"])
    table.write_text("id,id\na,b\n")
    with pytest.raises(UserTableError, match=r"t\.csv, line 1: column\(s\) \['id'\] appear more than once"):
        read_csv(table, ["id"])
    with pytest.raises(FileNotFoundError, match=r"nothing\.csv: raw table not found"):
        read_csv(tmp_path / "nothing.csv", ["id"], what="raw table")
    # landmarks: the line and column of a bad value
    table.write_text("file,side,x,y\na.dcm,R,1,2\na.dcm,X,1,2\n")
    with pytest.raises(UserTableError, match=r"t\.csv, line 3, column side: side must be R or L, got 'X'"):
        kneel.read_landmarks(table)


def test_nejm_ids_answers_and_shot_ids_are_compared_normalised(tmp_path):
    for number, case_id in enumerate([f" {NFD}1", "c2", "c3"]):
        folder = tmp_path / f"case{number}"
        folder.mkdir()
        Image.new("RGB", (8, 8)).save(folder / "image.png")
        choices = [NFC, "B", "C", "D", "E"]
        data = {"id": case_id, "date": f"2005-10-1{number}", "question": "Q?", "choices": choices, "answer": NFD}
        (folder / "case.json").write_text(json.dumps(data))
    cases = nejm.load_cases(tmp_path)
    assert cases[0].id == f"{NFC}1" and cases[0].answer_index == 0
    shots, test = nejm.split_shots(cases, shot_ids=[f"{NFD}1 "])
    assert [case.id for case in shots] == [f"{NFC}1"] and len(test) == 2
    (tmp_path / "case2" / "case.json").write_text(json.dumps({**data, "id": f"{NFC}1"}))
    with pytest.raises(ValueError, match="case id 'José1' appears twice"):
        nejm.load_cases(tmp_path)
    (tmp_path / "case2" / "case.json").write_text(json.dumps({**data, "id": "c\t3"}))
    with pytest.raises(ValueError, match=r"case2/case\.json: key 'id': 'c\\t3' contains the control .* U\+0009"):
        nejm.load_cases(tmp_path)
    (tmp_path / "case2" / "case.json").write_text("")
    with pytest.raises(ValueError, match=r"case2/case\.json: the file is empty"):
        nejm.load_cases(tmp_path)


# ---- 6. one image file, two rows -------------------------------------------------------------------------------


def test_one_image_file_named_by_two_rows_is_refused_or_both_rows_left_out(tmp_path, caplog):
    raw = tmp_path / "raw"
    rows = raw_rows(n_patients=12, partition=lambda p: "test" if p < 4 else "train")
    rows[20]["file"] = rows[0]["file"]  # line 22 (train) names line 2's (test) image
    rows[21]["file"] = "./images/../" + rows[3]["file"]  # the same file through another spelling
    metadata = write_table(raw, rows)
    with pytest.raises(UserTableError) as error:
        prepare(tmp_path, raw)
    message = str(error.value)
    assert message.startswith(f"{metadata}: 2 image file(s) named by more than one row: ")
    assert "line 2 (image_id p0_0, partition test, file images/p0_0.png) and line 22 (image_id p10_0, " in message
    assert "line 5 (image_id p1_1, partition test" in message and "line 23 (image_id p10_1" in message
    assert "on_bad_image: skip" in message and not (tmp_path / "m.csv").exists()
    with caplog.at_level(logging.WARNING, logger="medprobe"):
        manifest = prepare(tmp_path, raw, on_bad_image="skip")
    left_out = {"p0_0", "p10_0", "p1_1", "p10_1"}
    assert set(manifest["image_id"]).isdisjoint(left_out) and len(manifest) == len(rows) - 4
    skipped = {entry["image_id"]: entry for entry in json.loads((tmp_path / "m.json").read_text())["skipped"]}
    assert set(skipped) == left_out
    assert skipped["p10_0"]["reason"].startswith("the same image file as image_id p0_0 (line 2)")
    assert skipped["p0_0"]["line"] == 2 and skipped["p10_0"]["line"] == 22
    assert any("line 2 (image_id p0_0" in r.getMessage() and "line 22" in r.getMessage() for r in caplog.records)
    # a hard link is the same file too; distinct files are not
    (raw / "images" / "link.png").hardlink_to(raw / "images" / "p5_0.png")
    table = pd.DataFrame({"file": ["images/p5_0.png", "images/link.png", "images/p5_1.png"]}, index=[2, 3, 4])
    assert same_file_groups(table, "file", raw) == [[2, 3]]

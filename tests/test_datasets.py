"""Dataset recipes on fixture archives in the publishers' real layouts; the missing-data messages; KNEEL crops."""

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from medprobe import datasets, kneel
from medprobe.datasets import build_raw_table, fetch
from medprobe.datasets.padchest import normalise_labels
from medprobe.datasets.pannuke import count_nuclei, patch_label
from medprobe.download import MissingDataError
from medprobe.prepare import prepare_task
from medprobe.registry import Registry
from medprobe.settings import SplitSettings, TaskSettings


def jpg(path, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


def read(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def raw_table(dataset, task, raw, data, classes=(), **options):
    """The recipe's raw table in raw/metadata.csv (its counts in raw/counts.json)."""
    return build_raw_table(dataset, task, data, raw / "metadata.csv", raw / "counts.json", classes=classes, **options)


def prepare(task, entry, raw, tmp_path, val_fraction, test_fraction, seed=0):
    """prepare_task on raw/metadata.csv (and the recipe's counts) for a task entry (kind, classes, dataset[, test_fraction])."""
    settings = TaskSettings.from_dict(
        {
            "name": task,
            "discipline": "radiology",
            "metric": "auc",
            "prompt": "",
            "graded": False,
            "min_test_positives": 0,
            **entry,
        }
    )
    return prepare_task(
        task,
        settings,
        SplitSettings(val_fraction, test_fraction),
        seed,
        metadata=raw / "metadata.csv",
        recipe_counts=raw / "counts.json",
        manifest=tmp_path / "m.csv",
        sidecar=tmp_path / "m.json",
        images=tmp_path / "img",
    )


def use_recipe(monkeypatch, recipe):
    """``recipe`` in place of the registered one of its name, for one test."""
    registry = Registry("dataset recipe")
    for name in datasets.RECIPES:
        registry.register(name, recipe if name == recipe.name else datasets.RECIPES[name])
    if recipe.name not in registry:
        registry.register(recipe.name, recipe)
    monkeypatch.setattr(datasets, "RECIPES", registry)


def test_registry_has_the_eight_paper_datasets():
    for name in [
        "nct_crc_he",
        "pannuke",
        "isic2018",
        "isic2020",
        "eyepacs_aptos",
        "airogs_odir",
        "padchest",
        "oai_most",
    ]:
        assert datasets.get(name).name == name


def test_t1_fetch_from_file_urls_extracts_and_converts(tmp_path, monkeypatch):
    build = tmp_path / "build"
    build.mkdir()
    for folder, classes in (("NCT-CRC-HE-100K", ["ADI", "TUM"]), ("CRC-VAL-HE-7K", ["ADI"])):
        with zipfile.ZipFile(build / f"{folder}.zip", "w") as handle:
            for label in classes:
                image = build / "x.tif"
                Image.new("RGB", (4, 4)).save(image)
                handle.write(image, f"{folder}/{label}/{label}-AAA{folder[:3]}.tif")
    recipe = datasets.get("nct_crc_he")
    local = tuple(datasets.Source(s.name, url=(build / s.name).as_uri(), extract=True) for s in recipe.sources)
    use_recipe(monkeypatch, datasets.Dataset(**{**recipe.__dict__, "sources": local}))
    receipt = fetch("nct_crc_he", tmp_path / "data", tmp_path / "data" / "download.json")
    assert set(json.loads((tmp_path / "data" / "download.json").read_text())["files"]) == {
        "NCT-CRC-HE-100K.zip",
        "CRC-VAL-HE-7K.zip",
    }
    assert receipt["files"]["CRC-VAL-HE-7K.zip"]["pinned"] is False
    table = read(raw_table("nct_crc_he", "T1", tmp_path / "raw", tmp_path / "data"))
    assert table[["label", "partition"]].values.tolist() == [["ADI", "train"], ["TUM", "train"], ["ADI", "test"]]
    assert (tmp_path / "raw" / table["file"][0]).exists()
    counts = json.loads((tmp_path / "raw" / "counts.json").read_text())
    assert counts["found"]["train"]["images"] == 2 and "train images: paper 100000, found 2" in counts["differences"]


def test_t1_nested_archive_folder_and_wrong_layout(tmp_path):
    data = tmp_path / "data"
    for folder in ("NCT-CRC-HE-100K/NCT-CRC-HE-100K", "CRC-VAL-HE-7K"):  # some copies nest the 100K folder twice
        (data / folder / "MUS").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(data / folder / "MUS" / "MUS-AAAA.tif")
    table = read(raw_table("nct_crc_he", "T1", tmp_path / "raw", data))
    assert table["partition"].tolist() == ["train", "test"] and table["label"].tolist() == ["MUS", "MUS"]
    assert "NCT-CRC-HE-100K/NCT-CRC-HE-100K/MUS/MUS-AAAA.tif" in table["file"][0]
    (data / "CRC-VAL-HE-7K" / "MUS" / "MUS-AAAA.tif").rename(data / "CRC-VAL-HE-7K" / "MUS-AAAA.tif")
    (data / "CRC-VAL-HE-7K" / "MUS").rmdir()
    with pytest.raises(FileNotFoundError, match="one sub-folder per class"):
        raw_table("nct_crc_he", "T1", tmp_path / "raw2", data)


def test_t1_md5s_are_the_zenodo_values_of_the_normalised_archive():
    md5 = {source.name: source.md5 for source in datasets.get("nct_crc_he").sources}
    # Zenodo record 1214456; 035777cf... is NCT-CRC-HE-100K-NONORM.zip, a different archive (medprobe/datasets/nct_crc_he.py)
    assert md5 == {
        "NCT-CRC-HE-100K.zip": "6fd702d11df6292bc054397ae038a464",
        "CRC-VAL-HE-7K.zip": "2fd1651b4f94ebd818ebf90ad2b6ce06",
    }


def test_checksums_are_well_formed_and_pinned_ones_name_real_files(repo):
    for recipe in map(datasets.get, datasets.RECIPES):
        for source in recipe.sources:
            assert source.md5 is None or re.fullmatch(r"[0-9a-f]{32}", source.md5), (recipe.name, source.name)
            assert source.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", source.sha256), (recipe.name, source.name)
    tasks = yaml.safe_load((repo / "config" / "paper.yaml").read_text())["tasks"]
    assert set(tasks["T2"]["checksums"]) == {"fold_1.zip", "fold_2.zip", "fold_3.zip"}
    for task, entry in tasks.items():
        names = {source.name for source in datasets.get(entry["dataset"]).sources}
        for name, digest in entry.get("checksums", {}).items():
            assert name in names, f"{task}: checksum pinned for {name!r}, which is no source file of {entry['dataset']}"
            assert re.fullmatch(r"[0-9a-f]{64}", digest), (task, name)


def test_published_md5_is_enforced(tmp_path, monkeypatch):
    (tmp_path / "f.zip").write_bytes(b"not the archive")
    source = datasets.Source("f.zip", url=(tmp_path / "f.zip").as_uri(), md5="0" * 32)
    recipe = datasets.Dataset("x", "x", "x", "x", (source,), convert=lambda *a: pd.DataFrame())
    use_recipe(monkeypatch, recipe)
    with pytest.raises(ValueError, match="MD5"):
        fetch("x", tmp_path / "data", tmp_path / "data" / "download.json")
    assert not (tmp_path / "data" / "download.json").exists()


def hand_mask(neoplastic, other, neoplastic_ids=None):
    """(256, 256, 6) PanNuke mask with the given numbers of neoplastic and other nuclei (distinct instance ids
    below 256 unless ``neoplastic_ids`` are given); channel 5 is background (1 where no nucleus)."""
    mask = np.zeros((256, 256, 6), dtype=np.float64)
    for k, instance in enumerate(neoplastic_ids if neoplastic_ids is not None else range(1, neoplastic + 1)):
        mask[k, 0:3, 0] = instance
    for k in range(other):
        mask[k, 10:13, 1 + k % 4] = 100 + k
    mask[..., 5] = mask[..., :5].sum(-1) == 0
    return mask


@pytest.mark.parametrize(
    "neoplastic, other, expected",
    [
        (0, 7, "benign"),
        (3, 2, None),
        (40, 10, "malignant"),
        (0, 0, None),  # no nucleus at all: dropped (Huang et al.'s "purely background"), not benign
        (10, 0, "malignant"),  # exactly ten: n_neoplastic >= 10
        (10, 22, "malignant"),  # 10 / (32 + 1 background) = 30.3%
        (11, 25, None),  # 11 / (36 + 1 background) = 29.7%: the background channel counts in the total
    ],
)
def test_pannuke_huang_code_rule_on_hand_counted_masks(neoplastic, other, expected):
    counts = count_nuclei(hand_mask(neoplastic, other), "huang_code")
    assert counts[0] == neoplastic and counts[:5].sum() == neoplastic + other
    assert counts[5] == (1 if neoplastic + other else 0)  # background holds 0 and 1 wherever there are nuclei
    assert patch_label(hand_mask(neoplastic, other), "huang_code") == expected
    assert patch_label(hand_mask(neoplastic, other)) == expected  # huang_code is the default


@pytest.mark.parametrize(
    "neoplastic, other, expected",
    [
        (0, 7, "benign"),
        (0, 0, None),
        (10, 0, None),
        (11, 0, "malignant"),
        (10, 22, None),
        (11, 25, "malignant"),
        (11, 26, None),  # 11/36 = 30.6%, 11/37 = 29.7% of the nuclei (channels 0-4)
    ],
)
def test_pannuke_paper_text_rule_on_hand_counted_masks(neoplastic, other, expected):
    assert patch_label(hand_mask(neoplastic, other), "paper_text") == expected


def test_pannuke_huang_code_wraps_instance_ids_above_255():
    mask = hand_mask(0, 0, neoplastic_ids=[5, 261, 44, 300, 256])  # as uint8: 5, 5, 44, 44, 0
    assert count_nuclei(mask, "huang_code")[0] == 2 and count_nuclei(mask, "paper_text")[0] == 5
    # a neoplastic nucleus whose id is 256 vanishes: the patch has no neoplastic nucleus left, so it is benign
    lone = hand_mask(0, 7, neoplastic_ids=[256])
    assert patch_label(lone, "huang_code") == "benign" and patch_label(lone, "paper_text") is None
    # nuclei whose ids all wrap to 0 leave a patch that is "purely background" after the cast: dropped
    only = np.zeros((256, 256, 6))
    only[0:4, 0:4, 1] = 256
    assert patch_label(only, "huang_code") is None and patch_label(only, "paper_text") == "benign"


def write_pannuke(data, plan):
    for fold, patches in plan.items():
        root = data / f"Fold {fold}"
        (root / "images" / f"fold{fold}").mkdir(parents=True)
        (root / "masks" / f"fold{fold}").mkdir(parents=True)
        np.save(root / "images" / f"fold{fold}" / "images.npy", np.full((len(patches), 256, 256, 3), 120.0))
        np.save(root / "images" / f"fold{fold}" / "types.npy", np.array([organ for *_, organ in patches]))
        np.save(root / "masks" / f"fold{fold}" / "masks.npy", np.stack([hand_mask(n, o) for n, o, _ in patches]))


def test_t2_pannuke_folds_layout_and_label_rules(tmp_path):
    write_pannuke(
        tmp_path / "data",
        {
            1: [(0, 5, "Breast"), (12, 3, "Colon")],
            2: [(5, 5, "Breast"), (0, 0, "Lung"), (10, 0, "Liver")],
            3: [(20, 1, "Kidney"), (0, 2, "Colon")],
        },
    )
    table = read(raw_table("pannuke", "T2", tmp_path / "raw", tmp_path / "data"))
    assert table["image_id"].tolist() == [
        "pannuke_fold1_00000",
        "pannuke_fold1_00001",
        "pannuke_fold2_00002",
        "pannuke_fold3_00000",
        "pannuke_fold3_00001",
    ]
    assert table["label"].tolist() == ["benign", "malignant", "malignant", "malignant", "benign"]
    assert table["group"].tolist() == ["Breast", "Colon", "Liver", "Kidney", "Colon"]
    assert Image.open(tmp_path / "raw" / table["file"][0]).size == (256, 256)
    counts = json.loads((tmp_path / "raw" / "counts.json").read_text())
    assert counts["label_rule"] == "huang_code"
    assert counts["excluded"] == {"no nucleus in channels 0-4": 1, "neither benign nor malignant (huang_code)": 1}
    assert counts["expected"] == {"total": {"images": 6234, "malignant": 2866, "benign": 3368}}
    table = read(raw_table("pannuke", "T2", tmp_path / "raw2", tmp_path / "data", label_rule="paper_text"))
    assert table["label"].tolist() == [
        "benign",
        "malignant",
        "malignant",
        "benign",
    ]  # ten neoplastic: not "more than ten"
    assert json.loads((tmp_path / "raw2" / "counts.json").read_text())["excluded"] == {
        "no nucleus in channels 0-4": 1,
        "neither benign nor malignant (paper_text)": 2,
    }


@pytest.mark.parametrize(
    "dataset, rule, message",
    [
        (
            "pannuke",
            "huang",
            r"tasks\.T\.label_rule: 'huang' is not a label rule of dataset 'pannuke'; allowed: huang_code, paper_text",
        ),
        ("padchest", "physician", r"tasks\.T\.label_rule: 'physician' .* allowed: all_rows, radiologist_only"),
        ("nct_crc_he", "huang_code", r"tasks\.T\.label_rule: dataset 'nct_crc_he' has a single labelling rule"),
    ],
)
def test_unknown_label_rule_names_the_key_and_the_allowed_values(tmp_path, dataset, rule, message):
    with pytest.raises(ValueError, match=message):
        raw_table(dataset, "T", tmp_path / "raw", tmp_path / "data", label_rule=rule)


def test_t3_isic2018_layout_lesion_grouping_and_prepare(tmp_path):
    data = tmp_path / "data"
    classes = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    parts = {
        "Training": [
            ("ISIC_0000001", "NV"),
            ("ISIC_0000002", "NV"),
            ("ISIC_0000003", "MEL"),
            ("ISIC_0000004", "MEL"),
            ("ISIC_0000005", "NV"),
            ("ISIC_0000006", "MEL"),
        ],
        "Validation": [("ISIC_0000010", "BCC")],
        "Test": [("ISIC_0000020", "MEL"), ("ISIC_0000021", "NV")],
    }
    for part, rows in parts.items():
        truth = pd.DataFrame([{"image": image, **{c: float(c == label) for c in classes}} for image, label in rows])
        (data / f"ISIC2018_Task3_{part}_GroundTruth").mkdir(parents=True)
        truth.to_csv(
            data / f"ISIC2018_Task3_{part}_GroundTruth" / f"ISIC2018_Task3_{part}_GroundTruth.csv", index=False
        )
        for image, _ in rows:
            jpg(data / f"ISIC2018_Task3_{part}_Input" / f"{image}.jpg")
    pd.DataFrame(
        {
            "image": [f"ISIC_000000{k}" for k in range(1, 7)],
            "lesion_id": ["HAM_1", "HAM_1", "HAM_2", "HAM_2", "HAM_3", "HAM_4"],
            "diagnosis_confirm_type": "histopathology",
        }
    ).to_csv(data / "ISIC2018_Task3_Training_LesionGroupings.csv", index=False)
    table = read(raw_table("isic2018", "T3", tmp_path / "raw", data))
    assert table["label"].tolist() == ["NV", "NV", "MEL", "MEL", "NV", "MEL", "BCC", "MEL", "NV"]
    assert table["partition"].tolist() == ["train"] * 7 + ["test"] * 2
    assert table["patient_id"].tolist() == [
        "HAM_1",
        "HAM_1",
        "HAM_2",
        "HAM_2",
        "HAM_3",
        "HAM_4",
        "ISIC_0000010",
        "ISIC_0000020",
        "ISIC_0000021",
    ]
    manifest = prepare(
        "T3",
        {"kind": "multiclass", "classes": classes, "dataset": "isic2018"},
        tmp_path / "raw",
        tmp_path,
        val_fraction=0.34,
        test_fraction=0.2,
    )
    lesion_splits = manifest[manifest["patient_id"] != ""].groupby("patient_id")["split"].nunique()
    assert (lesion_splits == 1).all() and set(manifest["split"]) == {"train", "val", "test"}


def test_t4_isic2020_split_by_patient(tmp_path):
    data = tmp_path / "data"
    rows = [(f"ISIC_{k:07d}", f"IP_{k // 3}", "malignant" if k % 5 == 0 else "benign") for k in range(30)]
    pd.DataFrame(
        {
            "image_name": [r[0] for r in rows],
            "patient_id": [r[1] for r in rows],
            "sex": "male",
            "age_approx": "45",
            "anatom_site_general_challenge": "torso",
            "diagnosis": "unknown",
            "benign_malignant": [r[2] for r in rows],
            "target": [int(r[2] == "malignant") for r in rows],
        }
    ).to_csv(tmp_path / "truth.csv", index=False)
    data.mkdir()
    (tmp_path / "truth.csv").rename(data / "ISIC_2020_Training_GroundTruth.csv")
    for name, *_ in rows:
        jpg(data / "train" / f"{name}.jpg")
    table = read(raw_table("isic2020", "T4", tmp_path / "raw", data))
    assert table["patient_id"].nunique() == 10 and (table["partition"] == "").all()
    assert (table["label"] == "malignant").sum() == 6
    manifest = prepare(
        "T4",
        {"kind": "binary", "classes": ["benign", "malignant"], "dataset": "isic2020"},
        tmp_path / "raw",
        tmp_path,
        val_fraction=0.25,
        test_fraction=0.2,
    )
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    assert manifest.groupby("split")["patient_id"].nunique()["test"] == 2


@pytest.mark.parametrize(
    "dataset, access, files",
    [
        (
            "eyepacs_aptos",
            "diabetic-retinopathy-detection",
            ["eyepacs/trainLabels.csv", "eyepacs/train", "aptos/aptos2019-blindness-detection.zip"],
        ),
        (
            "airogs_odir",
            "odir2019.grand-challenge.org",
            ["odir/ODIR-5K_Training_Annotations(Updated)_V2.xlsx", "odir/ODIR-5K_Training_Dataset"],
        ),
        ("padchest", "bimcv.cipf.es", ["PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", "images"]),
        ("oai_most", "nda.nih.gov/oai", ["knees.csv"]),
    ],
)
def test_missing_credentialed_data_stops_with_instructions(tmp_path, monkeypatch, dataset, access, files):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    recipe = datasets.get(dataset)
    public = tuple(s for s in recipe.sources if s.url)  # public parts (AIROGS) would be downloaded; place them
    for source in public:
        (tmp_path / source.name).parent.mkdir(parents=True, exist_ok=True)
    use_recipe(
        monkeypatch, datasets.Dataset(**{**recipe.__dict__, "sources": tuple(s for s in recipe.sources if not s.url)})
    )
    with pytest.raises(MissingDataError) as error:
        fetch(dataset, tmp_path / "data", tmp_path / "data" / "download.json")
    message = str(error.value)
    assert f"Dataset {dataset!r}" in message and access in message and str((tmp_path / "data").resolve()) in message
    for name in files:
        assert f"  - {name}" in message
    assert not (tmp_path / "data" / "download.json").exists()


def test_refused_public_download_tells_how_to_fetch_it_by_hand(tmp_path, monkeypatch):
    def refuse(url, path, **_):
        raise datasets.AccessDeniedError(url, 403, "Forbidden")

    monkeypatch.setattr(datasets, "download", refuse)
    receipt = tmp_path / "download.json"
    with pytest.raises(MissingDataError) as caught:
        fetch("nct_crc_he", tmp_path, receipt)
    message = str(caught.value)
    assert "'nct_crc_he'" in message and "HTTP 403 Forbidden" in message and "zenodo.org/records/1214456" in message
    assert "NCT-CRC-HE-100K.zip" in message and str(tmp_path.resolve()) in message and "unpacked" in message
    assert not receipt.exists()


def test_t5_eyepacs_aptos_layout(tmp_path):
    data = tmp_path / "data"
    (data / "eyepacs").mkdir(parents=True)
    pd.DataFrame({"image": ["10_left", "10_right", "13_left"], "level": [0, 2, 4]}).to_csv(
        data / "eyepacs" / "trainLabels.csv", index=False
    )
    pd.DataFrame({"image": ["1_left", "1_right"], "level": [1, 3], "Usage": ["Public", "Private"]}).to_csv(
        data / "eyepacs" / "retinopathy_solution.csv", index=False
    )
    (data / "aptos").mkdir()
    pd.DataFrame({"id_code": ["000c1434d8d7"], "diagnosis": [2]}).to_csv(data / "aptos" / "train.csv", index=False)
    table = read(raw_table("eyepacs_aptos", "T5", tmp_path / "raw", data))
    assert table["patient_id"].tolist() == [
        "eyepacs_10",
        "eyepacs_10",
        "eyepacs_13",
        "eyepacs_1",
        "eyepacs_1",
        "aptos_000c1434d8d7",
    ]
    assert table["label"].tolist() == ["0", "2", "4", "1", "3", "2"]
    assert table["partition"].tolist() == [""] * 5 + ["test"]
    assert table["file"][0].endswith("eyepacs/train/10_left.jpeg") and table["file"][3].endswith(
        "eyepacs/test/1_left.jpeg"
    )
    pd.DataFrame({"image": ["1_left"], "level": ["5"], "Usage": ["Public"]}).to_csv(
        data / "eyepacs" / "retinopathy_solution.csv", index=False
    )
    with pytest.raises(ValueError, match=r"retinopathy_solution.csv: column level has value\(s\) \['5'\]"):
        raw_table("eyepacs_aptos", "T5", tmp_path / "raw2", data)


def test_t5_eyepacs_patients_split_by_the_task_test_fraction_and_aptos_is_test(tmp_path):
    data = tmp_path / "data"
    (data / "eyepacs").mkdir(parents=True)
    train = [f"{p}_{side}" for p in range(1, 41) for side in ("left", "right")]
    test = [f"{p}_{side}" for p in range(41, 61) for side in ("left", "right")]
    pd.DataFrame({"image": train, "level": [p % 5 for p in range(len(train))]}).to_csv(
        data / "eyepacs" / "trainLabels.csv", index=False
    )
    pd.DataFrame({"image": test, "level": [p % 5 for p in range(len(test))], "Usage": "Public"}).to_csv(
        data / "eyepacs" / "retinopathy_solution.csv", index=False
    )
    (data / "aptos").mkdir()
    pd.DataFrame({"id_code": ["a1", "a2", "a3"], "diagnosis": [0, 2, 4]}).to_csv(
        data / "aptos" / "train.csv", index=False
    )
    for image in train:
        jpg(data / "eyepacs" / "train" / f"{image}.jpeg")
    for image in test:
        jpg(data / "eyepacs" / "test" / f"{image}.jpeg")
    for code in ("a1", "a2", "a3"):
        jpg(data / "aptos" / "train_images" / f"{code}.png")
    raw_table("eyepacs_aptos", "T5", tmp_path / "raw", data)
    task = {
        "kind": "multiclass",
        "classes": ["0", "1", "2", "3", "4"],
        "dataset": "eyepacs_aptos",
        "test_fraction": 0.17,
    }
    manifest = prepare("T5", task, tmp_path / "raw", tmp_path, val_fraction=0.2, test_fraction=0.2)
    assert set(manifest.loc[manifest["source"] == "aptos", "split"]) == {"test"}
    eyepacs = manifest[manifest["source"] == "eyepacs"]
    assert (eyepacs.groupby("patient_id")["split"].nunique() == 1).all()  # both eyes of a patient together
    share = (eyepacs.drop_duplicates("patient_id")["split"] == "test").mean()
    assert abs(share - 1 / 6) < 0.02  # 0.17 of the 60 pooled patients (Kaggle's train and test alike), not 0.2
    assert {"train", "val"} <= set(eyepacs["split"])


def test_t5_missing_test_labels_point_to_the_forum_attachment(tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    with pytest.raises(MissingDataError) as error:
        fetch("eyepacs_aptos", tmp_path / "data")
    assert "eyepacs/retinopathy_solution.csv" in str(error.value)
    assert "kaggle-forum-message-attachments/90528/2877/retinopathy_solution.csv" in str(error.value)


def test_t6_airogs_odir_keywords(tmp_path):
    data = tmp_path / "data"
    jpg(data / "airogs" / "0" / "TRAIN000000.jpg")
    jpg(data / "airogs" / "1" / "TRAIN000001.JPG")  # found whatever the case of the extension
    pd.DataFrame({"challenge_id": ["TRAIN000000", "TRAIN000001"], "class": ["NRG", "RG"]}).to_csv(
        data / "airogs" / "train_labels.csv", index=False
    )
    (data / "odir" / "ODIR-5K_Training_Dataset").mkdir(parents=True)
    sheet = pd.DataFrame(
        {
            "ID": ["0", "1"],
            "Left-Fundus": ["0_left.jpg", "1_left.jpg"],
            "Right-Fundus": ["0_right.jpg", "1_right.jpg"],
            "Left-Diagnostic Keywords": ["cataract", "suspected glaucoma，moderate non proliferative retinopathy"],
            "Right-Diagnostic Keywords": ["normal fundus", "Glaucoma"],
        }
    )
    sheet.to_csv(data / "odir" / "ODIR-5K_Training_Annotations(Updated)_V2.xlsx.csv", index=False)
    import medprobe.datasets.airogs_odir as module

    original = module.ODIR_SHEET
    try:
        module.ODIR_SHEET = "ODIR-5K_Training_Annotations(Updated)_V2.xlsx.csv"
        table = read(raw_table("airogs_odir", "T6", tmp_path / "raw", data))
    finally:
        module.ODIR_SHEET = original
    assert table["label"].tolist() == ["no_glaucoma", "glaucoma", "no_glaucoma", "glaucoma", "no_glaucoma", "glaucoma"]
    assert table["partition"].tolist() == ["train", "train"] + ["test"] * 4
    assert table["patient_id"].tolist()[2:] == ["odir_0", "odir_1", "odir_0", "odir_1"]


PADCHEST_COLUMNS = ["ImageID", "ImageDir", "PatientID", "MethodLabel", "Labels"]


def write_padchest(data, rows, missing=()):
    data.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=PADCHEST_COLUMNS).to_csv(
        data / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", index=False
    )
    for image, folder, *_ in rows:
        if image not in missing:
            (data / "images" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(data / "images" / folder / image)


def test_t7_padchest_all_rows_automatic_labels_and_every_finding(tmp_path):
    data = tmp_path / "data"
    write_padchest(
        data,
        [
            ("a.png", "0", "P1", "Physician", "['pleural effusion', ' Cardiomegaly', '']"),
            ("b.png", "0", "P1", "RNN_model", "[' normal']"),
            ("c.png", "1", "P2", "Physician", "['normal']"),
            ("d.png", "1", "P3", "Physician", "['unchanged', 'nodule']"),  # image file missing
            ("e.png", "1", "P4", "RNN_model", "['unchanged', ' COPD  signs', 'copd signs']"),
            ("f.png", "1", "P4", "RNN_model", "nan"),  # the four rows below are unlabelled, not "no finding"
            ("g.png", "1", "P5", "RNN_model", "[]"),
            ("h.png", "1", "P5", "RNN_model", "['']"),
            ("i.png", "1", "P6", "RNN_model", ""),
        ],
        missing={"d.png"},
    )
    table = read(raw_table("padchest", "T7", tmp_path / "raw", data, classes="all"))
    assert table["image_id"].tolist() == ["a", "b", "c", "e"]
    assert table["labels"].tolist() == ["pleural effusion|cardiomegaly", "normal", "normal", "unchanged|copd signs"]
    assert table["partition"].tolist() == ["", "train", "", "train"]  # automatic labels: training only
    counts = json.loads((tmp_path / "raw" / "counts.json").read_text())
    assert counts["label_rule"] == "all_rows"
    excluded = counts["excluded"]
    assert excluded["image file missing"] == 1 and excluded["no labels (Labels empty, nan, [] or [''])"] == 4
    assert counts["found"]["train"]["images"] == 2  # the automatic rows
    # a list of findings keeps those (the row stays, with no listed finding)
    table = read(raw_table("padchest", "T7", tmp_path / "raw2", data, classes=["normal", "pleural effusion", "nodule"]))
    assert table["labels"].tolist() == ["pleural effusion", "normal", "normal", ""]
    # radiologist_only: the radiologist-labelled rows, the automatic ones counted as left out
    table = read(raw_table("padchest", "T7", tmp_path / "raw3", data, classes="all", label_rule="radiologist_only"))
    assert table["image_id"].tolist() == ["a", "c"] and (table["partition"] == "").all()
    assert (
        json.loads((tmp_path / "raw3" / "counts.json").read_text())["excluded"][
            "automatic labels (MethodLabel RNN_model; label_rule radiologist_only)"
        ]
        == 6
    )


def test_padchest_label_strings_of_both_methods():
    assert normalise_labels("['  COPD  signs', 'copd signs']") == ["copd signs"] and normalise_labels("") == []
    assert normalise_labels("[' pulmonary fibrosis', ' chronic changes', 'kyphosis']") == [
        "pulmonary fibrosis",
        "chronic changes",
        "kyphosis",
    ]
    for empty in ("nan", "[]", "['']", "[' ']", None):
        assert normalise_labels(empty) == []
    assert normalise_labels("normal") == ["normal"] and normalise_labels("'normal'") == ["normal"]


def test_t7_padchest_to_manifest_tests_radiologist_labels_of_held_out_patients(tmp_path):
    rng = np.random.default_rng(0)
    findings = ["normal", "pleural effusion", "cardiomegaly", "nodule", "scoliosis"]
    rows = []
    for patient in range(60):
        physician = 0 if patient >= 45 else 1 + patient % 2  # patients 45-59: automatic labels only
        automatic = 0 if patient < 30 else 1 + patient % 3
        for k in range(physician + automatic):
            names = [str(name) for name in rng.choice(findings, 1 + k % 2, replace=False)]
            rows.append(
                (
                    f"P{patient:02d}_{k}.png",
                    str(patient % 3),
                    f"P{patient:02d}",
                    "Physician" if k < physician else "RNN_model",
                    str(names),
                )
            )
    data = tmp_path / "data"
    write_padchest(data, rows)
    raw = tmp_path / "raw"
    raw_table("padchest", "T7", raw, data, classes="all")
    task = {"kind": "multilabel", "classes": "all", "dataset": "padchest", "test_fraction": 0.3}
    manifest = prepare("T7", task, raw, tmp_path, val_fraction=0.2, test_fraction=0.2)
    method = {Path(image).stem: label for image, _, _, label, _ in rows}
    test = manifest[manifest["split"] == "test"]
    assert len(test) and {method[i] for i in test["image_id"]} == {"Physician"}
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    test_patients = set(test["patient_id"])
    # test patients have radiologist labels only (patients 0-29): a patient with automatic labels trains
    assert test_patients and test_patients <= {f"P{p:02d}" for p in range(30)}
    assert abs(len(test_patients) / 30 - 0.3) < 0.05
    assert len(manifest) == len(rows)  # nothing dropped, as the paper's counts add up to the whole dataset
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert sidecar["classes"] == "all" and sorted(sidecar["findings"]) == sorted(findings)
    assert sidecar["split_settings"]["test_fraction"] == 0.3
    assert sidecar["split_settings"]["test_fraction_from"] == "tasks.T7.test_fraction"


def test_kneel_crop_geometry_and_flip():
    assert kneel.joint_centre(np.array([[10, 20], [30, 40]])) == (20.0, 30.0)
    assert kneel.crop_box((100, 200), (0.2, 0.14)) == (
        100 - 500,
        200 - 350,
        600,
        550,
    )  # 140/0.14=1000 wide, 140/0.2=700 high
    image = np.arange(100 * 100, dtype=np.uint16).reshape(100, 100)
    right = kneel.crop_knee(image, (50, 50), (1.0, 1.0), "R", size_mm=20)
    assert right.shape == (20, 20) and right[0, 0] == image[40, 40] and right[-1, -1] == image[59, 59]
    left = kneel.crop_knee(image, (50, 50), (1.0, 1.0), "L", size_mm=20)
    assert np.array_equal(left, right[:, ::-1])
    edge = kneel.crop_knee(image, (2, 2), (1.0, 1.0), "R", size_mm=10)
    assert edge[0, 0] == 0 and edge[3, 3] == image[0, 0]
    with pytest.raises(ValueError, match="spacing"):
        kneel.crop_box((0, 0), (0, 1))


def test_t8_crops_from_landmarks(tmp_path):
    data = tmp_path / "data"
    (data / "oai").mkdir(parents=True)
    radiograph = np.zeros((200, 300), dtype=np.uint16)
    radiograph[90:110, 60:80] = 4000  # patient's right knee, on the image's left
    Image.fromarray(radiograph).save(data / "oai" / "9000099.png")
    pd.DataFrame(
        {
            "file": ["oai/9000099.png"] * 2,
            "patient_id": ["9000099"] * 2,
            "side": ["R", "L"],
            "kl": ["2", "0"],
            "source": ["oai"] * 2,
            "partition": ["train"] * 2,
            "spacing_row": ["0.5"] * 2,
            "spacing_col": ["0.5"] * 2,
        }
    ).to_csv(data / "knees.csv", index=False)
    pd.DataFrame(
        {"file": ["oai/9000099.png"] * 3, "side": ["R", "R", "L"], "x": [60, 80, 225], "y": [100, 100, 100]}
    ).to_csv(data / "landmarks.csv", index=False)
    table = read(raw_table("oai_most", "T8", tmp_path / "raw", data))
    assert table["label"].tolist() == ["2", "0"] and table["patient_id"].tolist() == ["oai_9000099"] * 2
    crop = np.asarray(Image.open(tmp_path / "raw" / table["file"][0]))
    assert crop.shape == (280, 280) and crop[140, 140] == 4000  # 140 mm / 0.5 mm, joint in the centre

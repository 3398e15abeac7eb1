"""T2: PanNuke (Gamper et al. 2019/2020), folds 1-3, CC BY-NC-SA 4.0, from the TIA centre, Warwick.

Archive layout (``fold_<k>.zip``): ``Fold <k>/images/fold<k>/images.npy`` (N, 256, 256, 3) RGB patches,
``Fold <k>/images/fold<k>/types.npy`` (N,) tissue names and ``Fold <k>/masks/fold<k>/masks.npy``
(N, 256, 256, 6) instance masks, channels 0 neoplastic, 1 inflammatory, 2 connective/soft tissue, 3 dead,
4 epithelial, 5 background. Each nucleus is one instance id within its channel.

The paper's label: malignant if a patch holds more than 10 neoplastic nuclei and they are more than 30% of
all its nuclei; benign if it holds no neoplastic nucleus; every other patch is excluded. The organ type is
kept as ``group`` (Figure S6). PanNuke has no patient ids (patient_id = image_id); train/test are split by ``prepare``.

Evidence for the layout: the fold README shipped in each archive (``Fold <k>/README.md``: images.npy, masks.npy with
"0: Neoplastic cells, 1: Inflammatory, 2: Connective/Soft tissue cells, 3: Dead Cells, 4: Epithelial", types.npy),
constantinpape/torch-em torch_em/data/datasets/histopathology/pannuke.py (downloads ``fold_<k>.zip`` from the URL
below and reads ``images.npy``/``masks.npy`` (S, H, W, C)) and Jorge-G-P/IHC_HE_GenAI Datasets/Pannuke/config.py
(``Fold 1/images/fold1/images.npy``, ``Fold 1/masks/fold1/masks.npy``).

Checksums: the TIA centre publishes none. The SHA-256 of the three archives are pinned in config/paper.yaml
(``tasks.T2.checksums``) from public code that verifies every download against them (torch-em's ``CHECKSUM``, and
the same three values in other projects' pooch registries for these URLs); a third project reports recomputing the
same values for archives of 700,275,281 / 658,842,552 / 717,969,882 bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medprobe.datasets import Dataset, Source, find_one, register, relative_file

BASE = "https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke"
NUCLEUS_CHANNELS = 5  # channels 0-4 hold nuclei, channel 5 is background
MIN_NEOPLASTIC = 10
MIN_NEOPLASTIC_SHARE = 0.30


def count_nuclei(mask: np.ndarray) -> np.ndarray:
    """Nuclei per channel (instances = distinct non-zero ids) of one (H, W, 6) mask -> (5,) ints."""
    return np.array([np.count_nonzero(np.unique(mask[..., channel])) for channel in range(NUCLEUS_CHANNELS)])


def malignancy_label(counts: np.ndarray) -> str | None:
    """The paper's rule on per-channel nucleus counts: ``malignant``, ``benign`` or None (excluded)."""
    neoplastic, total = int(counts[0]), int(counts.sum())
    if neoplastic == 0:
        return "benign"
    if neoplastic > MIN_NEOPLASTIC and neoplastic / total > MIN_NEOPLASTIC_SHARE:
        return "malignant"
    return None


def convert(data_dir: Path, out_dir: Path, classes: list[str]) -> pd.DataFrame:
    rows, excluded = [], 0
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for fold in (1, 2, 3):
        root = find_one(data_dir, f"Fold {fold}")
        images = np.load(root / "images" / f"fold{fold}" / "images.npy", mmap_mode="r")
        types = np.load(root / "images" / f"fold{fold}" / "types.npy", allow_pickle=True)
        masks = np.load(root / "masks" / f"fold{fold}" / "masks.npy", mmap_mode="r")
        if not (len(images) == len(types) == len(masks)) or masks.shape[-1] != 6:
            raise ValueError(f"{root}: images {images.shape}, types {types.shape}, masks {masks.shape} do not match "
                             "the PanNuke layout (N,256,256,3), (N,), (N,256,256,6)")
        for index in range(len(images)):
            label = malignancy_label(count_nuclei(np.asarray(masks[index])))
            if label is None:
                excluded += 1
                continue
            image_id = f"pannuke_fold{fold}_{index:05d}"
            path = image_dir / f"{image_id}.png"
            if not path.exists():
                Image.fromarray(np.clip(np.asarray(images[index]), 0, 255).astype(np.uint8)).save(path)
            rows.append({"image_id": image_id, "file": relative_file(path, out_dir), "patient_id": image_id, "label": label,
                         "source": "pannuke", "partition": "", "group": str(types[index])})
    table = pd.DataFrame(rows)
    table.attrs["excluded"] = {"neither benign nor malignant by the paper's rule": excluded}
    return table


register(Dataset(
    name="pannuke",
    title="PanNuke folds 1-3 (Gamper et al.)",
    licence="CC BY-NC-SA 4.0",
    access="public, https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke (downloaded automatically; no published "
    "checksum: config/paper.yaml pins the SHA-256 of the three archives under tasks.T2.checksums)",
    sources=tuple(Source(f"fold_{k}.zip", url=f"{BASE}/fold_{k}.zip", extract=True) for k in (1, 2, 3)),
    convert=convert,
    expected={"total": {"images": 6234, "malignant": 2866, "benign": 3368}},
))

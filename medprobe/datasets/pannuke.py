"""T2: PanNuke (Gamper et al. 2019/2020), folds 1-3, CC BY-NC-SA 4.0, from the TIA centre, Warwick.

Archive layout (``fold_<k>.zip``): ``Fold <k>/images/fold<k>/images.npy`` (N, 256, 256, 3) RGB patches,
``Fold <k>/images/fold<k>/types.npy`` (N,) tissue names and ``Fold <k>/masks/fold<k>/masks.npy``
(N, 256, 256, 6) instance masks, channels 0 neoplastic, 1 inflammatory, 2 connective/soft tissue, 3 dead,
4 epithelial, 5 background. Each nucleus is one instance id within its channel.

Labels (``tasks.<task>.label_rule``); the organ type is kept as ``group`` (Figure S6). PanNuke has no patient
ids (patient_id = image_id); train/test are split by ``prepare``.

* ``huang_code`` (default; the paper says T2 was "processed according to the work of Huang et al.", and their
  script, PLIP's ``preprocess_PanNuke.py``, gives the paper's 2,866 malignant / 3,368 benign): the masks are
  cast with ``.astype(np.uint8)`` as that script loads them, so instance ids above 255 wrap (id 256 becomes
  background, id 300 merges with id 44); patches whose channels 0-4 are then all zero are dropped; per channel
  j = 0..5 the count is ``len(np.unique(mask[..., j])) - 1`` and the total is the sum of all six, the
  background channel 5 included (it adds 1 wherever it holds both 0 and 1); malignant if ``n_neoplastic >= 10``
  and ``n_neoplastic / total > 0.3``, benign if ``n_neoplastic == 0``, every other patch left out.
* ``paper_text``: the paper's words. Nuclei are the distinct non-zero instance ids of channels 0-4 as stored
  (no wrap-around); malignant if "more than ten" (``> 10``) are neoplastic and they are "more than 30% of the
  total cells" (channels 0-4 only); benign if no nucleus is neoplastic. A patch without any nucleus is left
  out: it has no cells, so "no neoplastic cells" says nothing about it (and Huang et al. drop it too).

Dropped patches are counted by reason in ``counts.json``.

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
MASK_CHANNELS = 6
LABEL_RULES = ("huang_code", "paper_text")
MIN_NEOPLASTIC_SHARE = 0.30
NO_NUCLEUS = "no nucleus in channels 0-4"


def count_nuclei(mask: np.ndarray, label_rule: str = "huang_code") -> np.ndarray:
    """Per-channel counts of one (H, W, 6) mask under ``label_rule`` -> (6,) ints (channel 5: background).

    ``huang_code``: ``len(np.unique(channel)) - 1`` of the mask cast to uint8, as Huang et al.'s script counts;
    ``paper_text``: the distinct non-zero instance ids of the mask as stored."""
    mask = np.asarray(mask)
    if label_rule == "huang_code":
        mask = mask.astype(np.uint8)
        return np.array([len(np.unique(mask[..., channel])) - 1 for channel in range(MASK_CHANNELS)])
    if label_rule == "paper_text":
        return np.array([np.count_nonzero(np.unique(mask[..., channel])) for channel in range(MASK_CHANNELS)])
    raise ValueError(f"PanNuke label_rule {label_rule!r}; allowed: {', '.join(LABEL_RULES)}")


def has_nuclei(mask: np.ndarray, label_rule: str = "huang_code") -> bool:
    """Whether channels 0-4 hold anything (after the uint8 cast under ``huang_code``, as Huang et al. test it)."""
    cells = np.asarray(mask)[..., :NUCLEUS_CHANNELS]
    return bool(np.any(cells.astype(np.uint8) if label_rule == "huang_code" else cells))


def malignancy_label(counts: np.ndarray, label_rule: str = "huang_code") -> str | None:
    """``malignant``, ``benign`` or None (left out) from the (6,) counts of :func:`count_nuclei` of a patch
    that has nuclei (:func:`has_nuclei`)."""
    counts = np.asarray(counts)
    neoplastic = int(counts[0])
    if label_rule == "huang_code":
        total = int(counts.sum())  # all six channels, background included, as in Huang et al.'s script
        malignant = neoplastic >= 10 and neoplastic / total > MIN_NEOPLASTIC_SHARE
    elif label_rule == "paper_text":
        total = int(counts[:NUCLEUS_CHANNELS].sum())
        if total == 0:
            return None
        malignant = neoplastic > 10 and neoplastic / total > MIN_NEOPLASTIC_SHARE
    else:
        raise ValueError(f"PanNuke label_rule {label_rule!r}; allowed: {', '.join(LABEL_RULES)}")
    if neoplastic == 0:
        return "benign"
    return "malignant" if malignant else None


def patch_label(mask: np.ndarray, label_rule: str = "huang_code") -> str | None:
    """The label of one patch, or None when ``label_rule`` leaves it out."""
    if not has_nuclei(mask, label_rule):
        return None
    return malignancy_label(count_nuclei(mask, label_rule), label_rule)


def convert(data_dir: Path, out_dir: Path, classes: list[str], label_rule: str = LABEL_RULES[0]) -> pd.DataFrame:
    if label_rule not in LABEL_RULES:
        raise ValueError(f"PanNuke label_rule {label_rule!r}; allowed: {', '.join(LABEL_RULES)}")
    rows, no_nucleus, neither = [], 0, 0
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for fold in (1, 2, 3):
        root = find_one(data_dir, f"Fold {fold}")
        images = np.load(root / "images" / f"fold{fold}" / "images.npy", mmap_mode="r")
        types = np.load(root / "images" / f"fold{fold}" / "types.npy", allow_pickle=True)
        masks = np.load(root / "masks" / f"fold{fold}" / "masks.npy", mmap_mode="r")
        if not (len(images) == len(types) == len(masks)) or masks.shape[-1] != MASK_CHANNELS:
            raise ValueError(
                f"{root}: images {images.shape}, types {types.shape}, masks {masks.shape} do not match "
                "the PanNuke layout (N,256,256,3), (N,), (N,256,256,6)"
            )
        for index in range(len(images)):
            mask = np.asarray(masks[index])
            if not has_nuclei(mask, label_rule):
                no_nucleus += 1
                continue
            label = malignancy_label(count_nuclei(mask, label_rule), label_rule)
            if label is None:
                neither += 1
                continue
            image_id = f"pannuke_fold{fold}_{index:05d}"
            path = image_dir / f"{image_id}.png"
            if not path.exists():
                Image.fromarray(np.clip(np.asarray(images[index]), 0, 255).astype(np.uint8)).save(path)
            rows.append(
                {
                    "image_id": image_id,
                    "file": relative_file(path, out_dir),
                    "patient_id": image_id,
                    "label": label,
                    "source": "pannuke",
                    "partition": "",
                    "group": str(types[index]),
                }
            )
    table = pd.DataFrame(rows)
    table.attrs["excluded"] = {NO_NUCLEUS: no_nucleus, f"neither benign nor malignant ({label_rule})": neither}
    return table


register(
    Dataset(
        name="pannuke",
        title="PanNuke folds 1-3 (Gamper et al.)",
        licence="CC BY-NC-SA 4.0",
        access="public, https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke (downloaded automatically; no published "
        "checksum: config/paper.yaml pins the SHA-256 of the three archives under tasks.T2.checksums)",
        sources=tuple(Source(f"fold_{k}.zip", url=f"{BASE}/fold_{k}.zip", extract=True) for k in (1, 2, 3)),
        convert=convert,
        expected={"total": {"images": 6234, "malignant": 2866, "benign": 3368}},
        label_rules=LABEL_RULES,
    )
)

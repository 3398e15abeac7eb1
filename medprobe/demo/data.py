"""Synthetic raw data for the eight demo tasks T1-T8.

Each task is generated as a publisher's archive would look after unpacking: ``<out_dir>/images/*`` and
``<out_dir>/metadata.csv`` with the columns of :data:`METADATA_COLUMNS` (see docs/architecture.md, "Raw
demo data"). The ``prepare`` step turns that table into a manifest exactly as it does for real data.

The pictures are procedural (numpy, vectorised) stand-ins for the real modalities. Every task has a
real but imperfect signal: the class drives a few visual parameters, while per-patient and per-image
nuisance (staining, skin tone, illumination, exposure, position), pixel noise and about 10 % of images
whose appearance does not follow their label keep a linear probe well below perfect.

Determinism: every random draw comes from ``numpy`` generators seeded by ``(seed, task, image index)``
and the encoders run with fixed parameters and no metadata, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

METADATA_COLUMNS = ["image_id", "file", "patient_id", "label", "labels", "source", "partition", "group"]
TASK_IDS = ("T1", "T2", "T3", "T4", "T5", "T6", "T7", "T8")

# Share of images whose appearance is drawn independently of their label (label-independent variation).
APPEARANCE_NOISE = 0.10
# Share of images larger than 1024 px in one dimension, for the tasks whose real data has such images.
LARGE_FRACTION = 0.04
# Renderers draw at most this many pixels on the long side; larger images are upsampled afterwards so that
# a 1400 px image costs about as much as a small one (its purpose is to exercise downsampling).
_MAX_RENDER_SIDE = 320
_JPEG_QUALITY = 92


@dataclass
class _Image:
    """One planned image: its metadata row plus what the renderer needs to draw it."""

    image_id: str
    patient_id: str
    label: str = ""
    labels: str = ""
    source: str = ""
    partition: str = ""
    group: str = ""
    size: tuple[int, int] = (224, 224)  # (height, width)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _TaskSpec:
    kind: str
    extension: str  # file extension, also selects the encoder
    sixteen_bit: bool
    plan: Callable[..., list[_Image]]
    render: Callable[[np.random.Generator, int, int, dict[str, Any]], np.ndarray]


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def generate_task(
    task_id: str, task: dict, out_dir: str | Path, *, seed: int, images_per_patient: int
) -> Path:
    """Generate one synthetic task's raw images and ``metadata.csv`` into ``out_dir``.

    Args:
        task_id: ``T1`` .. ``T8``; selects the task-specific label structure and image modality.
        task: the task's entry of the config (``kind``, ``classes``, ``demo_patients: {train, test}``, ...).
        out_dir: the task's raw folder; images go to ``out_dir/images/``.
        seed: non-negative integer; the same seed gives byte-identical files.
        images_per_patient: images per patient (for T5/T6/T8 they alternate between the two eyes/knees).

    Returns:
        The path of the written ``metadata.csv``.

    Raises:
        ValueError: for an unknown task id or an invalid ``task`` entry (the message names the key).
    """
    if task_id not in _SPECS:
        raise ValueError(f"unknown demo task id {task_id!r}; the demo generator knows {', '.join(TASK_IDS)}")
    spec = _SPECS[task_id]
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{task_id}: seed must be a non-negative integer, got {seed!r}")
    if not isinstance(images_per_patient, (int, np.integer)) or isinstance(images_per_patient, bool) or images_per_patient < 1:
        raise ValueError(f"{task_id}: images_per_patient must be a positive integer, got {images_per_patient!r}")
    classes, n_train, n_test = _validate_task(task_id, task, spec.kind)

    task_number = TASK_IDS.index(task_id) + 1
    plan_rng = np.random.default_rng(np.random.SeedSequence([int(seed), task_number, 0]))
    images = spec.plan(plan_rng, task_id, classes, n_train, n_test, int(images_per_patient))

    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    metadata_path = out_dir / "metadata.csv"
    # A folder whose images are being rewritten must not look complete: drop the old table first.
    metadata_path.unlink(missing_ok=True)

    rows = []
    for index, image in enumerate(images):
        # One generator per image: an image depends on (seed, task, its index), not on drawing order.
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), task_number, index + 1]))
        pixels = _render_at_size(spec.render, rng, image.size, image.params)
        file = f"images/{image.image_id}.{spec.extension}"
        _save_image(pixels, out_dir / file, spec.extension, spec.sixteen_bit, image.params.get("max_value", 65535))
        rows.append(
            {
                "image_id": image.image_id,
                "file": file,
                "patient_id": image.patient_id,
                "label": image.label,
                "labels": image.labels,
                "source": image.source,
                "partition": image.partition,
                "group": image.group,
            }
        )
    _write_metadata(rows, metadata_path)
    return metadata_path


# --------------------------------------------------------------------------------------------------------
# Validation, layout and I/O helpers
# --------------------------------------------------------------------------------------------------------


def _validate_task(task_id: str, task: dict, kind: str) -> tuple[list[str], int, int]:
    if not isinstance(task, dict):
        raise ValueError(f"tasks.{task_id}: expected a mapping, got {type(task).__name__}")
    if task.get("kind", kind) != kind:
        raise ValueError(f"tasks.{task_id}.kind: the demo {task_id} is {kind!r}, got {task.get('kind')!r}")
    classes = task.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ValueError(f"tasks.{task_id}.classes: expected a non-empty list of names, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"tasks.{task_id}.classes: names must be distinct, got {classes!r}")
    patients = task.get("demo_patients")
    if not isinstance(patients, dict):
        raise ValueError(f"tasks.{task_id}.demo_patients: expected a mapping {{train, test}}, got {patients!r}")
    counts = []
    for part in ("train", "test"):
        value = patients.get(part)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"tasks.{task_id}.demo_patients.{part}: expected a positive integer, got {value!r}")
        counts.append(value)
    return list(classes), counts[0], counts[1]


def _patient_ids(task_id: str, n: int) -> list[str]:
    return [f"{task_id}-P{i + 1:04d}" for i in range(n)]


def _large_size(rng: np.random.Generator) -> tuple[int, int]:
    """A 1100-1400 px (long side), never square, mostly landscape image size (height, width)."""
    long_side = int(rng.integers(1100, 1401))
    short_side = int(long_side * rng.uniform(0.66, 0.85))
    return (short_side, long_side) if rng.random() < 0.7 else (long_side, short_side)


def _large_indices(rng: np.random.Generator, n: int) -> np.ndarray:
    """About LARGE_FRACTION of ``n`` image indices (at least one when n > 0)."""
    return rng.choice(n, size=max(1, round(LARGE_FRACTION * n)), replace=False) if n else np.zeros(0, int)


def _image_sizes(rng: np.random.Generator, n: int, lo: int, hi: int, large: bool, square: bool = False) -> list[tuple[int, int]]:
    """Mostly ``lo``..``hi`` px; with ``large``, about 4 % (at least one) 1100-1400 px, never square."""
    sizes = []
    for _ in range(n):
        h = int(rng.integers(lo, hi + 1))
        sizes.append((h, h) if square else (h, int(rng.integers(lo, hi + 1))))
    if large:
        for i in _large_indices(rng, n):
            sizes[int(i)] = _large_size(rng)
    return sizes


def _ensure_each_class(rng: np.random.Generator, labels: np.ndarray, n_classes: int, donor: int | None = None) -> np.ndarray:
    """Overwrite entries so that every class occurs at least once (when there is room).

    Entries are taken from the most frequent class (or ``donor``) so the imbalance survives.
    """
    labels = labels.copy()
    if len(labels) < n_classes:
        return labels
    for c in range(n_classes):
        if np.any(labels == c):
            continue
        counts = np.bincount(labels, minlength=n_classes)
        source = donor if donor is not None and counts[donor] > 1 else int(np.argmax(counts))
        candidates = np.flatnonzero(labels == source)
        labels[rng.choice(candidates)] = c
    return labels


def _noisy_appearance(rng: np.random.Generator, label: int, n_classes: int) -> int:
    """The class an image is drawn as: its label, or with APPEARANCE_NOISE a uniformly random class."""
    return int(rng.integers(n_classes)) if rng.random() < APPEARANCE_NOISE else label


def _render_at_size(render: Callable, rng: np.random.Generator, size: tuple[int, int], params: dict) -> np.ndarray:
    h, w = size
    scale = max(h, w) / _MAX_RENDER_SIDE
    if scale <= 1.0:
        return render(rng, h, w, params)
    small = render(rng, max(8, round(h / scale)), max(8, round(w / scale)), params)
    channels = small[..., None] if small.ndim == 2 else small
    big = np.stack(
        [np.asarray(Image.fromarray(np.ascontiguousarray(channels[..., c], dtype=np.float32)).resize((w, h), Image.BICUBIC)) for c in range(channels.shape[-1])],
        axis=-1,
    )
    # Fine-grained noise at full resolution so that the large image is not just a blurred small one.
    big += rng.normal(0.0, 0.01, size=(h, w, 1)).astype(np.float32)
    return big[..., 0] if small.ndim == 2 else big


def _save_image(pixels: np.ndarray, path: Path, extension: str, sixteen_bit: bool, max_value: int) -> None:
    """Quantise a float image in [0, 1] and write it atomically with fixed encoder settings."""
    pixels = np.clip(np.nan_to_num(pixels, nan=0.0), 0.0, 1.0)
    if sixteen_bit:
        image = Image.fromarray(np.round(pixels * max_value).astype(np.uint16))  # mode I;16
    else:
        image = Image.fromarray(np.round(pixels * 255).astype(np.uint8))
    tmp = path.with_name(f".{path.name}.part")
    if extension == "tif":
        image.save(tmp, format="TIFF", compression="raw")
    elif extension == "png":
        # No pnginfo: Pillow then writes no tEXt/tIME chunks, so the bytes depend on the pixels only.
        image.save(tmp, format="PNG", compress_level=6, optimize=False)
    elif extension == "jpg":
        image.save(tmp, format="JPEG", quality=_JPEG_QUALITY, subsampling=2, optimize=False, progressive=False)
    else:  # pragma: no cover - the specs below only use the three formats
        raise ValueError(f"{path}: unsupported extension {extension!r}")
    os.replace(tmp, path)


def _write_metadata(rows: list[dict[str, str]], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=METADATA_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------
# Drawing primitives (all vectorised)
# --------------------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """A smooth random field with features about ``cell`` px wide, zero mean and unit standard deviation."""
    gh, gw = max(2, math.ceil(h / cell) + 1), max(2, math.ceil(w / cell) + 1)
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    field_ = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
    return (field_ - field_.mean()) / (field_.std() + 1e-6)


def _spots(
    rng: np.random.Generator,
    h: int,
    w: int,
    count: int,
    sigma: float | tuple[float, float],
    mask: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Gaussian spots at random places (inside ``mask`` where given); an isolated spot peaks at its weight."""
    if count <= 0:
        return np.zeros((h, w), np.float32)
    ys = rng.integers(0, h, size=4 * count)
    xs = rng.integers(0, w, size=4 * count)
    if mask is not None:
        keep = mask[ys, xs] > 0.5
        ys, xs = ys[keep], xs[keep]
    ys, xs = ys[:count], xs[:count]
    acc = np.zeros((h, w), np.float32)
    np.add.at(acc, (ys, xs), 1.0 if weights is None else weights[: len(ys)])
    sy, sx = (sigma, sigma) if np.isscalar(sigma) else sigma
    return gaussian_filter(acc, (sy, sx), truncate=3.0) * np.float32(2 * np.pi * sy * sx)


def _soft_inside(signed_distance: np.ndarray, softness: float) -> np.ndarray:
    """1 inside (negative distance), 0 outside, with a logistic edge ``softness`` px wide."""
    return 1.0 / (1.0 + np.exp(np.clip(signed_distance / max(softness, 1e-3), -30, 30)))


def _ellipse_distance(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, a: float, b: float, angle: float = 0.0) -> np.ndarray:
    """Approximate signed distance (px) to an ellipse with semi-axes ``a`` (x) and ``b`` (y)."""
    c, s = math.cos(angle), math.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    return (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * min(a, b)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy, xx


# --------------------------------------------------------------------------------------------------------
# Histopathology (T1, T2): Beer-Lambert mix of haematoxylin and eosin optical densities
# --------------------------------------------------------------------------------------------------------

_HEMATOXYLIN = np.array([0.65, 0.70, 0.29], np.float32)
_EOSIN = np.array([0.07, 0.99, 0.11], np.float32)

# Per-class tissue recipes; densities are nuclei per 1000 px^2, sigmas in px at 224 px.
_T1_TISSUE: dict[str, dict[str, Any]] = {
    "ADI": {"eosin": 0.04, "lattice": 0.9, "lattice_cell": 30, "nuclei": [(0.15, 1.5, 0.8, 2.5, 0.0)]},
    "BACK": {"eosin": 0.05, "hema": 0.03, "eosin_noise": 0.04, "noise_cell": 40, "nuclei": []},
    "DEB": {"eosin": 0.55, "hema": 0.15, "eosin_noise": 0.3, "noise_cell": 14, "nuclei": [(6.0, 0.9, 0.9, 1.0, 0.5), (0.8, 2.6, 0.6, 1.0, 0.5)]},
    "LYM": {"eosin": 0.3, "hema": 0.1, "nuclei": [(14.0, 2.0, 1.3, 1.0, 0.1)]},
    "MUC": {"eosin": 0.12, "hema": 0.3, "eosin_noise": 0.06, "hema_noise": 0.1, "noise_cell": 30, "nuclei": [(0.1, 2.0, 0.8, 1.0, 0.0)]},
    "MUS": {"eosin": 0.85, "stripes": (0.35, 7.0, 0.0), "nuclei": [(0.8, 1.5, 1.0, 3.5, 0.0)]},
    "NORM": {"eosin": 0.6, "glands": 1.0, "nuclei": [(1.0, 1.8, 0.9, 1.0, 0.0)]},
    "STR": {"eosin": 0.5, "stripes": (0.22, 16.0, 1.0), "nuclei": [(0.6, 1.5, 0.9, 3.0, 0.0)]},
    "TUM": {"eosin": 0.45, "hema": 0.2, "glands": 0.35, "nuclei": [(4.5, 3.2, 1.3, 1.0, 0.6)]},
}

_T2_ORGANS: dict[str, dict[str, Any]] = {
    "Breast": {"eosin": 0.5, "stripes": (0.12, 18.0, 1.0), "glands": 0.3},
    "Colon": {"eosin": 0.6, "glands": 0.9},
    "Lung": {"eosin": 0.35, "lattice": 0.7, "lattice_cell": 22},
    "Kidney": {"eosin": 0.7, "glands": 0.6, "gland_cell": 18},
    "Prostate": {"eosin": 0.42, "glands": 0.7, "gland_cell": 34},
    "Esophagus": {"eosin": 0.7, "stripes": (0.15, 30.0, 0.5)},
}


def _render_he(rng: np.random.Generator, h: int, w: int, p: dict[str, Any]) -> np.ndarray:
    """H&E-like tissue: eosin and haematoxylin density maps -> RGB by Beer-Lambert absorption."""
    scale = min(h, w) / 224.0
    yy, xx = _grid(h, w)
    eosin = np.full((h, w), p.get("eosin", 0.5), np.float32)
    hema = np.full((h, w), p.get("hema", 0.05), np.float32)
    cell = p.get("noise_cell", 24) * scale
    if p.get("eosin_noise"):
        eosin += p["eosin_noise"] * _smooth_noise(rng, h, w, cell)
    if p.get("hema_noise"):
        hema += p["hema_noise"] * _smooth_noise(rng, h, w, cell)
    eosin *= 1.0 + 0.12 * _smooth_noise(rng, h, w, 40 * scale)  # uneven section thickness
    lumen = np.zeros((h, w), np.float32)
    ring = np.zeros((h, w), np.float32)
    if p.get("lattice"):
        # Fat / alveoli: white cells separated by thin eosinophilic walls (level lines of a smooth field).
        n = _smooth_noise(rng, h, w, p.get("lattice_cell", 28) * scale)
        walls = np.exp(-((n / 0.12) ** 2))
        eosin = eosin * (1 - walls) + p["lattice"] * walls
    if p.get("stripes"):
        amp, period, wavy = p["stripes"]
        theta = rng.uniform(0, np.pi)
        phase = wavy * 2.5 * _smooth_noise(rng, h, w, 50 * scale) if wavy else 0.0
        coord = xx * math.cos(theta) + yy * math.sin(theta)
        eosin += amp * np.sin(2 * np.pi * coord / (period * scale) + phase)
        p = {**p, "_elong_axis": 0 if abs(math.cos(theta)) > abs(math.sin(theta)) else 1}
    if p.get("glands"):
        n = _smooth_noise(rng, h, w, p.get("gland_cell", 30) * scale)
        level = 1.0 - p["glands"]  # more gland area with a lower level
        lumen = _soft_inside(level + 0.35 - n, 0.08)
        ring = np.exp(-(((n - level) / 0.12) ** 2))
        eosin = eosin * (1 - lumen) + 0.05 * lumen
    nuclei = np.zeros((h, w), np.float32)
    density_scale = p.get("density_scale", 1.0)
    for density, sigma, strength, elong, irregular in p.get("nuclei", []):
        count = int(round(density * density_scale * h * w / 1000.0))
        s = sigma * scale * p.get("size_scale", 1.0)
        axis = p.get("_elong_axis", 0)
        sig = (s * elong, s) if axis == 1 else (s, s * elong)
        spots = _spots(rng, h, w, count, sig)
        if irregular:
            spots *= 1.0 + irregular * _smooth_noise(rng, h, w, max(1.5, s))
        nuclei += strength * np.clip(1.6 * spots - 0.2, 0.0, 1.2)
    if ring.any():
        nuclei += 0.9 * np.clip(1.6 * _spots(rng, h, w, int(6 * h * w / 1000), 1.6 * scale) - 0.2, 0, 1.2) * ring
    hema = hema + nuclei
    eosin = np.clip(eosin, 0, None) * (1 - 0.6 * np.clip(nuclei, 0, 1))
    stain = p["stain"]
    od = (
        np.clip(hema, 0, None)[..., None] * (stain["hematoxylin"] * stain["h_scale"])
        + eosin[..., None] * (stain["eosin"] * stain["e_scale"])
    )
    rgb = np.exp(-od) * p.get("brightness", 1.0)
    return rgb + rng.normal(0.0, p.get("pixel_noise", 0.015), size=rgb.shape).astype(np.float32)


def _draw_stain(rng: np.random.Generator, shift: float = 0.0) -> dict[str, Any]:
    """A patient's staining: perturbed stain vectors and strengths (``shift`` moves a whole centre)."""
    return {
        "hematoxylin": np.clip(_HEMATOXYLIN + rng.normal(0, 0.05, 3) + shift * np.array([0.05, 0.0, -0.08]), 0.05, None).astype(np.float32),
        "eosin": np.clip(_EOSIN + rng.normal(0, 0.04, 3) + shift * np.array([0.06, -0.05, 0.05]), 0.02, None).astype(np.float32),
        "h_scale": float(rng.uniform(0.8, 1.2) * (1 + 0.1 * shift)),
        "e_scale": float(rng.uniform(0.8, 1.2) * (1 - 0.15 * shift)),
    }


def _plan_t1(rng, task_id, classes, n_train, n_test, per_patient) -> list[_Image]:
    unknown = [c for c in classes if c not in _T1_TISSUE]
    if unknown:
        raise ValueError(f"tasks.{task_id}.classes: no demo tissue for {unknown}; known: {sorted(_T1_TISSUE)}")
    images = []
    patients = _patient_ids(task_id, n_train + n_test)
    for partition, members, source, shift in (
        ("train", patients[:n_train], "nct_crc_he_100k", 0.0),
        # CRC-VAL-HE-7K comes from another centre: a stain shift between train and test, as in the paper.
        ("test", patients[n_train:], "crc_val_he_7k", 1.0),
    ):
        # Classes rotate over a shuffled order so each partition is close to balanced, and a patient's
        # images show different tissue types.
        labels = rng.permutation(np.arange(len(members) * per_patient) % len(classes))
        for pi, patient in enumerate(members):
            stain = _draw_stain(rng, shift)
            for j in range(per_patient):
                label = int(labels[pi * per_patient + j])
                look = _noisy_appearance(rng, label, len(classes))
                params = {
                    **_T1_TISSUE[classes[look]],
                    "stain": stain,
                    "density_scale": float(rng.uniform(0.75, 1.3)),
                    "size_scale": float(rng.uniform(0.85, 1.15)),
                    "brightness": float(rng.uniform(0.94, 1.04)),
                }
                images.append(_Image(f"{patient}-{j + 1}", patient, label=classes[label], source=source, partition=partition, size=(224, 224), params=params))
    return images


def _plan_t2(rng, task_id, classes, n_train, n_test, per_patient) -> list[_Image]:
    if len(classes) != 2:
        raise ValueError(f"tasks.{task_id}.classes: a binary task needs 2 classes, got {classes!r}")
    images = []
    organs = list(_T2_ORGANS)
    patients = _patient_ids(task_id, n_train + n_test)
    organ_of = [organs[i % len(organs)] for i in rng.permutation(len(patients))]
    for pi, patient in enumerate(patients):
        stain = _draw_stain(rng)
        propensity = float(rng.beta(1.2, 1.4))  # some patients mostly tumour patches, some mostly normal
        for j in range(per_patient):
            label = int(rng.random() < propensity)
            # Malignancy is a continuous atypia score: overlapping between the classes on purpose.
            atypia = float(np.clip(rng.normal(0.8 if label else 0.15, 0.22), 0.0, 1.1))
            params = {
                **_T2_ORGANS[organ_of[pi]],
                "stain": stain,
                "nuclei": [
                    (2.0 + 2.5 * atypia, 2.0 + 1.2 * atypia, 0.9 + 0.4 * atypia, 1.0, 0.7 * atypia),
                    (0.8 * atypia, 4.5, 1.2, 1.0, 0.6),  # pleomorphic giant nuclei
                ],
                "density_scale": float(rng.uniform(0.8, 1.2)),
                "brightness": float(rng.uniform(0.94, 1.04)),
            }
            images.append(_Image(f"{patient}-{j + 1}", patient, label=classes[label], source="pannuke", group=organ_of[pi], size=(256, 256), params=params))
    return images


# --------------------------------------------------------------------------------------------------------
# Dermatoscopy (T3, T4)
# --------------------------------------------------------------------------------------------------------

# Lesion recipes: radius (fraction of the short side), eccentricity, border irregularity, centre and edge
# colours, colour heterogeneity, blotch colour, blue-white veil, globules (count, colour), red vessels,
# white scale, fine waxy texture, white centre, border softness.
_LESION: dict[str, dict[str, Any]] = {
    "MEL": {"radius": 0.32, "ecc": 0.75, "irregular": 0.16, "centre": (0.25, 0.15, 0.12), "edge": (0.5, 0.33, 0.25), "hetero": 0.6, "blotch": (0.1, 0.1, 0.16), "veil": 0.35, "soft": 0.03},
    "NV": {"radius": 0.22, "ecc": 0.9, "irregular": 0.03, "centre": (0.45, 0.28, 0.18), "edge": (0.62, 0.44, 0.33), "hetero": 0.1, "globules": (6, (0.35, 0.2, 0.13)), "soft": 0.06},
    "BCC": {"radius": 0.22, "ecc": 0.8, "irregular": 0.08, "centre": (0.82, 0.6, 0.62), "edge": (0.88, 0.68, 0.66), "hetero": 0.15, "globules": (8, (0.4, 0.45, 0.55)), "vessels": 0.6, "soft": 0.05},
    "AKIEC": {"radius": 0.26, "ecc": 0.7, "irregular": 0.12, "centre": (0.8, 0.45, 0.42), "edge": (0.85, 0.55, 0.5), "hetero": 0.2, "scale": 0.5, "soft": 0.06},
    "BKL": {"radius": 0.27, "ecc": 0.8, "irregular": 0.07, "centre": (0.6, 0.4, 0.28), "edge": (0.72, 0.52, 0.4), "hetero": 0.2, "waxy": 0.35, "soft": 0.015},
    "DF": {"radius": 0.15, "ecc": 0.9, "irregular": 0.04, "centre": (0.9, 0.85, 0.8), "edge": (0.58, 0.42, 0.32), "hetero": 0.1, "white_centre": 0.5, "soft": 0.06},
    "VASC": {"radius": 0.18, "ecc": 0.85, "irregular": 0.05, "centre": (0.55, 0.12, 0.22), "edge": (0.7, 0.25, 0.3), "hetero": 0.15, "globules": (10, (0.45, 0.08, 0.2)), "soft": 0.02},
}
# HAM10000 class shares (NV dominant).
_HAM_PRIOR = {"MEL": 0.111, "NV": 0.669, "BCC": 0.051, "AKIEC": 0.033, "BKL": 0.11, "DF": 0.011, "VASC": 0.014}


def _render_derm(rng: np.random.Generator, h: int, w: int, p: dict[str, Any]) -> np.ndarray:
    short = min(h, w)
    yy, xx = _grid(h, w)
    skin = np.asarray(p["skin"], np.float32)
    img = skin * (1.0 + 0.04 * _smooth_noise(rng, h, w, 0.15 * short))[..., None]
    img = img + 0.02 * _smooth_noise(rng, h, w, 0.02 * short)[..., None]
    # The lesion: an ellipse whose radius is modulated by random angular harmonics (border irregularity).
    cx = w / 2 + rng.normal(0, 0.06) * w
    cy = h / 2 + rng.normal(0, 0.06) * h
    radius = p["radius"] * short
    angle = rng.uniform(0, np.pi)
    c, s = math.cos(angle), math.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / radius
    v = (-(xx - cx) * s + (yy - cy) * c) / (radius * p["ecc"])
    rho = np.sqrt(u**2 + v**2)
    theta = np.arctan2(v, u)
    border = np.ones_like(rho)
    for k in range(2, 8):
        border += p["irregular"] * rng.normal(0, 1.0) / math.sqrt(k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    inside = _soft_inside((rho - border) * radius, p["soft"] * radius + 0.5)
    t = np.clip(rho / np.maximum(border, 0.2), 0, 1)[..., None]
    lesion = np.asarray(p["centre"], np.float32) * (1 - t) + np.asarray(p["edge"], np.float32) * t
    if p.get("hetero"):
        blotch_weight = np.clip(p["hetero"] * _smooth_noise(rng, h, w, 0.12 * short), 0, 1)[..., None]
        lesion = lesion * (1 - blotch_weight) + np.asarray(p.get("blotch", p["centre"]), np.float32) * blotch_weight
    if p.get("veil"):
        veil = np.clip(p["veil"] * (0.5 + _smooth_noise(rng, h, w, 0.2 * short)), 0, 0.8)[..., None]
        lesion = lesion * (1 - veil) + np.array([0.55, 0.6, 0.72], np.float32) * veil
    if p.get("globules"):
        count, colour = p["globules"]
        g = np.clip(_spots(rng, h, w, count, 0.025 * short, mask=inside), 0, 1)[..., None]
        lesion = lesion * (1 - g) + np.asarray(colour, np.float32) * g
    if p.get("vessels"):
        ridge = np.exp(-((_smooth_noise(rng, h, w, 0.08 * short) / 0.08) ** 2))[..., None] * p["vessels"]
        lesion = lesion * (1 - ridge) + np.array([0.75, 0.15, 0.2], np.float32) * ridge
    if p.get("scale"):
        flake = np.clip(2.5 * (_smooth_noise(rng, h, w, 0.05 * short) - 0.6), 0, 1)[..., None] * p["scale"]
        lesion = lesion * (1 - flake) + np.array([0.95, 0.92, 0.88], np.float32) * flake
    if p.get("waxy"):
        lesion = lesion * (1 + p["waxy"] * 0.3 * _smooth_noise(rng, h, w, 0.015 * short))[..., None]
    if p.get("white_centre"):
        wc = p["white_centre"] * _soft_inside((rho - 0.45) * radius, 0.1 * radius)[..., None]
        lesion = lesion * (1 - wc) + np.array([0.93, 0.9, 0.86], np.float32) * wc
    img = img * (1 - inside[..., None]) + lesion * inside[..., None]
    for _ in range(p.get("hairs", 0)):  # dark hairs: thin slightly curved lines
        a = rng.uniform(0, np.pi)
        offset = rng.uniform(-0.4, 0.4) * short
        bend = rng.normal(0, 0.002)
        d = (xx - w / 2) * math.sin(a) - (yy - h / 2) * math.cos(a) - offset
        along = (xx - w / 2) * math.cos(a) + (yy - h / 2) * math.sin(a)
        hair = np.exp(-(((d - bend * along**2) / (0.004 * short + 0.5)) ** 2))[..., None]
        img = img * (1 - 0.7 * hair) + np.float32(0.12) * 0.7 * hair
    if p.get("vignette"):  # the dark corners of a dermatoscope's round field of view
        r = np.sqrt(((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2)
        img = img * _soft_inside(r - p["vignette"], 0.04)[..., None]
    img = img * p.get("brightness", 1.0)
    return img + rng.normal(0.0, 0.015, size=img.shape).astype(np.float32)


def _skin(rng: np.random.Generator) -> tuple[float, float, float]:
    tone = rng.uniform(0.0, 1.0)  # light to darker skin
    base = np.array([0.92, 0.74, 0.66]) * (1 - tone) + np.array([0.72, 0.52, 0.42]) * tone
    return tuple(float(x) for x in np.clip(base + rng.normal(0, 0.02, 3), 0, 1))


def _jitter_lesion(rng: np.random.Generator, recipe: dict[str, Any]) -> dict[str, Any]:
    out = dict(recipe)
    out["radius"] = recipe["radius"] * rng.uniform(0.75, 1.3)
    out["irregular"] = recipe["irregular"] * rng.uniform(0.6, 1.4)
    # Mostly a shared lightness change, plus a little hue change.
    for key in ("centre", "edge"):
        colour = np.asarray(recipe[key]) * rng.uniform(0.85, 1.15) + rng.normal(0, 0.025, 3)
        out[key] = tuple(float(x) for x in np.clip(colour, 0, 1))
    out["hairs"] = int(rng.choice([0, 0, 0, 1, 2, 4]))
    out["vignette"] = float(rng.uniform(1.0, 1.3)) if rng.random() < 0.25 else 0.0
    out["brightness"] = float(rng.uniform(0.9, 1.08))
    return out


def _plan_t3(rng, task_id, classes, n_train, n_test, per_patient) -> list[_Image]:
    unknown = [c for c in classes if c not in _LESION]
    if unknown:
        raise ValueError(f"tasks.{task_id}.classes: no demo lesion for {unknown}; known: {sorted(_LESION)}")
    prior = np.array([_HAM_PRIOR[c] for c in classes])
    prior /= prior.sum()
    donor = classes.index("NV") if "NV" in classes else None
    images = []
    patients = _patient_ids(task_id, n_train + n_test)
    for partition, members in (("train", patients[:n_train]), ("test", patients[n_train:])):
        # A "patient" is a lesion (HAM10000's lesion_id): all its images share the diagnosis.
        labels = _ensure_each_class(rng, rng.choice(len(classes), size=len(members), p=prior), len(classes), donor)
        for patient, label in zip(members, labels):
            skin = _skin(rng)
            look = _noisy_appearance(rng, int(label), len(classes))
            base = _jitter_lesion(rng, _LESION[classes[look]])
            for j in range(per_patient):
                params = {**base, "skin": skin, "radius": base["radius"] * rng.uniform(0.92, 1.08), "brightness": base["brightness"] * rng.uniform(0.96, 1.04)}
                size = (int(rng.integers(224, 241)), int(rng.integers(240, 257)))
                images.append(_Image(f"{patient}-{j + 1}", patient, label=classes[int(label)], source="ham10000", partition=partition, size=size, params=params))
    return images


def _lerp_lesion(a: dict[str, Any], b: dict[str, Any], t: float) -> dict[str, Any]:
    out = dict(a)
    for key in ("radius", "ecc", "irregular", "hetero", "soft"):
        out[key] = (1 - t) * a.get(key, 0.0) + t * b.get(key, 0.0)
    for key in ("centre", "edge", "blotch"):
        out[key] = tuple((1 - t) * np.asarray(a.get(key, a["centre"])) + t * np.asarray(b.get(key, b["centre"])))
    out["veil"] = t * b.get("veil", 0.0)
    return out


def _plan_t4(rng, task_id, classes, n_train, n_test, per_patient) -> list[_Image]:
    if len(classes) != 2:
        raise ValueError(f"tasks.{task_id}.classes: a binary task needs 2 classes, got {classes!r}")
    patients = _patient_ids(task_id, n_train + n_test)
    n_images = len(patients) * per_patient
    # ~12 % malignant, spread over both halves of the patients so any patient split sees positives.
    half = (len(patients) + 1) // 2 * per_patient
    n_pos = max(2, round(0.12 * n_images))
    first = rng.choice(half, size=min(half, (n_pos + 1) // 2), replace=False)
    second = half + rng.choice(n_images - half, size=min(n_images - half, n_pos // 2), replace=False)
    labels = np.zeros(n_images, int)
    labels[np.concatenate([first, second])] = 1
    sizes = _image_sizes(rng, n_images, 224, 256, large=True)
    images = []
    for pi, patient in enumerate(patients):
        skin = _skin(rng)
        for j in range(per_patient):
            index = pi * per_patient + j
            label = int(labels[index])
            # Atypia: a continuous score, higher for melanoma but overlapping with benign lesions.
            atypia = rng.normal(2.6 * label, 0.7)
            if rng.random() < APPEARANCE_NOISE:
                atypia = rng.normal(1.3, 1.0)
            t = float(1.0 / (1.0 + math.exp(-2.5 * (atypia - 1.3))))
            benign_look = "NV" if rng.random() < 0.85 else str(rng.choice(["BKL", "DF"]))
            recipe = _lerp_lesion(_LESION[benign_look], _LESION["MEL"], t)
            params = {**_jitter_lesion(rng, recipe), "skin": skin}
            images.append(_Image(f"{patient}-{j + 1}", patient, label=classes[label], source="isic2020", size=sizes[index], params=params))
    return images


# --------------------------------------------------------------------------------------------------------
# Fundus photography (T5, T6)
# --------------------------------------------------------------------------------------------------------

# Colour of the lit fundus per source: (fundus red-orange, optic disc, background) and field of view.
_FUNDUS_SOURCE = {
    "eyepacs": {"fundus": (0.78, 0.36, 0.16), "disc": (0.98, 0.88, 0.55), "background": 0.0, "fov": 0.47, "gamma": 1.0},
    "aptos": {"fundus": (0.85, 0.5, 0.22), "disc": (1.0, 0.95, 0.7), "background": 0.04, "fov": 0.56, "gamma": 0.8},
    "airogs": {"fundus": (0.75, 0.33, 0.15), "disc": (0.98, 0.86, 0.52), "background": 0.0, "fov": 0.47, "gamma": 1.0},
    "odir": {"fundus": (0.62, 0.28, 0.2), "disc": (0.92, 0.78, 0.55), "background": 0.02, "fov": 0.5, "gamma": 1.2},
}


def _render_fundus(rng: np.random.Generator, h: int, w: int, p: dict[str, Any]) -> np.ndarray:
    src = _FUNDUS_SOURCE[p["source"]]
    short = min(h, w)
    yy, xx = _grid(h, w)
    cx, cy = w / 2 + rng.normal(0, 0.01) * w, h / 2 + rng.normal(0, 0.01) * h
    r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / short
    fov = _soft_inside((r - src["fov"] * p.get("fov_scale", 1.0)) * short, 1.0)
    side = 1.0 if p["eye"] == "right" else -1.0
    dx, dy = cx + side * 0.2 * short, cy + rng.normal(0, 0.02) * short
    disc_r = p.get("disc_radius", 0.075) * short
    shade = (1.0 - 0.55 * r**2) * (1.0 + 0.08 * _smooth_noise(rng, h, w, 0.2 * short))
    shade = shade * (1.0 + p.get("illumination", 0.0) * (xx - cx) / short)
    img = np.asarray(src["fundus"], np.float32) * np.asarray(p["pigment"], np.float32) * shade[..., None]
    macula = np.exp(-(((xx - (cx - side * 0.05 * short)) ** 2 + (yy - cy) ** 2) / (2 * (0.07 * short) ** 2)))
    img = img * (1 - 0.35 * macula)[..., None]
    # Vessels: wiggly rays leaving the disc, darker red.
    ang = np.arctan2(yy - dy, xx - dx)
    dist = np.sqrt((xx - dx) ** 2 + (yy - dy) ** 2)
    vessels = np.zeros((h, w), np.float32)
    for base_angle in rng.uniform(-np.pi, np.pi, size=6):
        wiggle = 0.25 * np.sin(dist / (0.08 * short) + rng.uniform(0, 6.3))
        delta = np.angle(np.exp(1j * (ang - base_angle - wiggle))) * dist
        vessels = np.maximum(vessels, np.exp(-((delta / (0.008 * short + 0.4)) ** 2)) * (dist > disc_r))
    img = img * (1 - 0.45 * vessels)[..., None] + np.array([0.35, 0.05, 0.05], np.float32) * (0.45 * vessels)[..., None]
    disc = _soft_inside(dist - disc_r, 0.15 * disc_r)
    img = img * (1 - disc[..., None]) + np.asarray(src["disc"], np.float32) * disc[..., None]
    if p.get("cup_ratio"):
        cup = _soft_inside(dist - p["cup_ratio"] * disc_r, 0.1 * disc_r)
        img = img * (1 - cup[..., None]) + np.array([1.0, 1.0, 0.92], np.float32) * cup[..., None]
    field_mask = fov * (1 - disc) * (r < src["fov"] * p.get("fov_scale", 1.0) * 0.95)
    red = np.clip(_spots(rng, h, w, p.get("haemorrhages", 0), 0.015 * short + 0.3, mask=field_mask), 0, 1)
    if p.get("blots", 0):
        red = np.maximum(red, np.clip(_spots(rng, h, w, p["blots"], 0.03 * short, mask=field_mask), 0, 1))
    yellow = np.clip(_spots(rng, h, w, p.get("exudates", 0), 0.016 * short + 0.3, mask=field_mask), 0, 1)
    img = img * (1 - red[..., None]) + np.array([0.4, 0.04, 0.04], np.float32) * red[..., None]
    img = img * (1 - yellow[..., None]) + np.array([0.98, 0.9, 0.45], np.float32) * yellow[..., None]
    if p.get("haze"):  # vitreous haemorrhage in advanced disease veils the whole fundus
        img = img * (1 - p["haze"]) + np.array([0.45, 0.08, 0.05], np.float32) * p["haze"]
    if p.get("neovascular"):
        twigs = np.exp(-((_smooth_noise(rng, h, w, 0.03 * short) / 0.1) ** 2)) * np.exp(-dist / (2.5 * disc_r))
        img = img * (1 - 0.6 * twigs)[..., None] + np.array([0.5, 0.05, 0.05], np.float32) * (0.6 * twigs)[..., None]
    img = np.clip(img * p.get("exposure", 1.0), 0, 1) ** src["gamma"]
    img = img * fov[..., None] + src["background"] * (1 - fov[..., None])
    if p.get("blur"):
        img = gaussian_filter(img, (p["blur"] * short / 224, p["blur"] * short / 224, 0))
    return img + rng.normal(0.0, 0.012, size=img.shape).astype(np.float32)


def _fundus_nuisance(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "exposure": float(rng.uniform(0.88, 1.1)),
        "illumination": float(rng.normal(0, 0.25)),
        "blur": float(rng.choice([0.0, 0.0, 0.0, 0.8, 1.6])),
        "fov_scale": float(rng.uniform(0.95, 1.05)),
    }


# Expected lesion counts per DR grade 0..4 (microaneurysms/haemorrhages, hard exudates, blot haemorrhages).
_DR_LESIONS = [(0.3, 0.0, 0.0), (6.0, 0.0, 0.0), (16.0, 8.0, 1.0), (30.0, 14.0, 5.0), (45.0, 20.0, 9.0)]


def _plan_t5(rng, task_id, classes, n_train, n_test, per_patient) -> list[_Image]:
    n_grades = len(classes)
    if n_grades < 2:
        raise ValueError(f"tasks.{task_id}.classes: a graded task needs at least 2 grades, got {classes!r}")
    prior = np.array([0.42, 0.15, 0.2, 0.12, 0.11][:n_grades] + [0.1] * max(0, n_grades - 5))
    prior /= prior.sum()
    patients = _patient_ids(task_id, n_train + n_test)
    n_eyepacs_test = (n_test + 1) // 2
    images = []
    groups = (
        ("train", patients[:n_train], ["eyepacs"] * n_train),
        ("test", patients[n_train:], ["eyepacs"] * n_eyepacs_test + ["aptos"] * (n_test - n_eyepacs_test)),
    )
    for partition, members, sources in groups:
        base = _ensure_each_class(rng, rng.choice(n_grades, size=len(members), p=prior), n_grades, 0)
        for patient, patient_grade, source in zip(members, base, sources):
            # Both eyes of a patient are graded separately but are similar.
            other = int(np.clip(patient_grade + rng.choice([-1, 0, 0, 0, 1]), 0, n_grades - 1))
            eye_grades = {"right": int(patient_grade), "left": other}
            pigment = tuple(float(x) for x in rng.uniform(0.88, 1.1) * (1 + rng.normal(0, 0.04, 3)))
            sizes = _image_sizes(rng, per_patient, 232, 256, large=False, square=source == "eyepacs")
            for j in range(per_patient):
                eye = ("right", "left")[j % 2]
                grade = eye_grades[eye]
                # Graders disagree between neighbouring grades.
                look = grade if rng.random() >= 2 * APPEARANCE_NOISE else int(np.clip(grade + rng.choice([-1, 1]), 0, n_grades - 1))
                severity = look / (n_grades - 1) * 4
                lo = int(np.floor(severity))
                frac = severity - lo
                counts = np.array(_DR_LESIONS[lo]) * (1 - frac) + np.array(_DR_LESIONS[min(lo + 1, 4)]) * frac
                params = {
                    "source": source,
                    "eye": eye,
                    "pigment": pigment,
                    **_fundus_nuisance(rng),
                    "haemorrhages": int(rng.poisson(counts[0])),
                    "exudates": int(rng.poisson(counts[1])),
                    "blots": int(rng.poisson(counts[2])),
                    "neovascular": severity >= 3.5,
                    "haze": float(max(0.0, severity - 1.0) * 0.1 * rng.uniform(0.6, 1.4)),
                }
                images.append(_Image(f"{patient}-{eye}-{j + 1}", patient, label=classes[grade], source=source, partition=partition, size=sizes[j], params=params))
    # A few large photographs (EyePACS and APTOS both have them) to exercise downsampling.
    for i in _large_indices(rng, len(images)):
        images[int(i)].size = _large_size(rng)
    return images


def _plan_t6(rng, task_id, classes, n_train, n_test, per_patient) -> list[_Image]:
    if len(classes) != 2:
        raise ValueError(f"tasks.{task_id}.classes: a binary task needs 2 classes, got {classes!r}")
    patients = _patient_ids(task_id, n_train + n_test)
    images = []
    for partition, members, source, lo, hi in (("train", patients[:n_train], "airogs", 224, 256), ("test", patients[n_train:], "odir", 224, 236)):
        labels = (rng.random(len(members)) < 0.35).astype(int)
        labels = _ensure_each_class(rng, labels, 2, 0)
        for patient, label in zip(members, labels):
            pigment = tuple(float(x) for x in rng.uniform(0.88, 1.1) * (1 + rng.normal(0, 0.04, 3)))
            disc_radius = float(rng.uniform(0.075, 0.1))
            eye_labels = {"right": int(label), "left": int(label) if rng.random() < 0.85 else 1 - int(label)}
            for j in range(per_patient):
                eye = ("right", "left")[j % 2]
                eye_label = eye_labels[eye]
                look = _noisy_appearance(rng, eye_label, 2)
                cup = rng.uniform(0.6, 0.85) if look else rng.uniform(0.2, 0.48)
                h = int(rng.integers(lo, hi + 1))
                # AIROGS-like square photographs; ODIR-like wider ones (part of the domain shift).
                size = (h, h) if source == "airogs" else (h, min(256, int(h * rng.uniform(1.06, 1.09))))
                params = {"source": source, "eye": eye, "pigment": pigment, "disc_radius": disc_radius, "cup_ratio": float(cup), **_fundus_nuisance(rng)}
                images.append(_Image(f"{patient}-{eye}-{j + 1}", patient, label=classes[eye_label], source=source, partition=partition, size=size, params=params))
    return images


# --------------------------------------------------------------------------------------------------------
# Chest radiographs (T7), 16-bit
# --------------------------------------------------------------------------------------------------------

# Prevalence of each known finding among images that have findings; findings not listed get 0.15.
_CXR_PREVALENCE = {
    "cardiomegaly": 0.3,
    "pleural_effusion": 0.2,
    "pneumonia": 0.2,
    "nodule": 0.18,
    "atelectasis": 0.18,
    "scoliosis": 0.15,
    "emphysema": 0.15,
    "fracture": 0.12,
}
_NO_FINDING = 0.3


def _render_cxr(rng: np.random.Generator, h: int, w: int, p: dict[str, Any]) -> np.ndarray:
    sev = p["severity"]  # finding -> visibility (0 = absent)
    yy, xx = _grid(h, w)
    cx = w / 2 + p["shift"][0] * w
    top = 0.12 * h + p["shift"][1] * h
    thorax_w, thorax_h = 0.4 * w, 0.5 * h
    img = np.full((h, w), 0.04, np.float32)
    body = _soft_inside(_ellipse_distance(xx, yy, cx, top + 0.45 * h, 0.47 * w, 0.6 * h), 3.0)
    img += 0.3 * body
    # Spine and mediastinum; scoliosis bends the spine into an S.
    bend = 0.13 * w * sev.get("scoliosis", 0.0) * p["bend_sign"]
    spine_x = cx + bend * np.sin(np.pi * (yy - top) / (0.8 * h))
    img += 0.25 * _soft_inside(np.abs(xx - spine_x) - 0.045 * w, 1.5)
    # Lungs: two ellipses of air; emphysema makes them larger and darker with a flatter diaphragm.
    emph = sev.get("emphysema", 0.0)
    lung_h = thorax_h * (1 + 0.15 * emph)
    lungs = np.zeros((h, w), np.float32)
    for side in (-1, 1):
        lx = cx + side * 0.2 * w
        d = _ellipse_distance(xx, yy, lx, top + lung_h / 2 + 0.04 * h, 0.17 * w * (1 + 0.08 * emph), lung_h / 2)
        lungs = np.maximum(lungs, _soft_inside(d, 2.0))
    markings = 0.025 * (1 - 0.7 * emph) * _smooth_noise(rng, h, w, 0.035 * w)
    img = img * (1 - lungs) + (0.1 - 0.04 * emph + markings) * lungs
    # Ribs: curved bright bands across the lungs.
    rib_phase = 2 * np.pi * (yy - top - 0.002 * (xx - cx) ** 2 / w * 10) / (0.075 * h)
    ribs = np.clip(np.sin(rib_phase) - 0.55, 0, 1) * 2.2
    if sev.get("fracture"):
        # A step in one rib with a bright callus.
        fy = top + rng.uniform(0.2, 0.55) * lung_h
        fx = cx + rng.choice([-1, 1]) * rng.uniform(0.12, 0.28) * w
        gap = _soft_inside(np.abs(xx - fx) - 0.012 * w, 1.0) * _soft_inside(np.abs(yy - fy) - 0.05 * h, 1.0)
        ribs = ribs * (1 - gap * sev["fracture"])
        img += 0.3 * sev["fracture"] * np.exp(-(((xx - fx - 0.02 * w) ** 2 + (yy - fy) ** 2) / (2 * (0.015 * w) ** 2)))
    img += 0.07 * ribs * lungs
    # Heart: its width relative to the thorax is the cardiothoracic ratio.
    ctr = 0.45 + 0.18 * sev.get("cardiomegaly", 0.0) - 0.05 * emph + p["ctr_jitter"]
    heart = _soft_inside(_ellipse_distance(xx, yy, cx + 0.04 * w + bend * 0.5, top + 0.62 * lung_h, ctr * thorax_w, 0.2 * h), 2.5)
    img = np.maximum(img, (0.4 + 0.05 * _smooth_noise(rng, h, w, 0.1 * w)) * heart)
    base_y = top + lung_h + 0.02 * h
    img += 0.3 * _soft_inside(base_y - yy - 0.01 * h * (1 - emph), 3.0) * body  # abdomen below the diaphragm
    if sev.get("pleural_effusion"):
        # Fluid fills the lung base with a meniscus rising towards the lateral wall.
        level = base_y - 0.16 * h * sev["pleural_effusion"]
        lateral = np.abs(xx - cx) / (0.4 * w)
        fluid = _soft_inside(level - 0.06 * h * lateral**2 - yy, 2.0) * lungs
        img = img * (1 - fluid) + 0.42 * fluid
    if sev.get("pneumonia"):
        zone = np.exp(-(((xx - cx - p["pneumonia_side"] * 0.2 * w) ** 2) / (2 * (0.1 * w) ** 2) + ((yy - top - 0.6 * lung_h) ** 2) / (2 * (0.13 * h) ** 2)))
        patches = np.clip(_smooth_noise(rng, h, w, 0.05 * w) + 0.6, 0, 2) * zone * lungs
        img += 0.2 * sev["pneumonia"] * patches
    if sev.get("nodule"):
        img += 0.3 * sev["nodule"] * np.clip(_spots(rng, h, w, int(rng.integers(2, 5)), 0.025 * w, mask=lungs > 0.9), 0, 1)
    if sev.get("atelectasis"):
        ay = top + 0.75 * lung_h
        tilt = rng.normal(0, 0.15)
        ax = cx + p["atelectasis_side"] * 0.2 * w
        band = np.exp(-(((yy - ay - tilt * (xx - ax)) / (0.03 * h)) ** 2)) * np.exp(-(((xx - ax) / (0.12 * w)) ** 2))
        img += 0.4 * sev["atelectasis"] * band * lungs
    for index, name in enumerate(p["generic"]):  # findings without their own picture: a finding-specific blob
        if sev.get(name):
            gx = cx + (-0.25 + 0.5 * ((index * 0.618) % 1)) * w
            gy = top + (0.2 + 0.6 * ((index * 0.382) % 1)) * lung_h
            img += 0.25 * sev[name] * np.exp(-(((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * (0.05 * w) ** 2)))
    img = np.clip(img, 0, 1) ** p["gamma"]
    return img * p["exposure"] + rng.normal(0.0, 0.012, size=img.shape).astype(np.float32)


def _plan_t7(rng, task_id, classes, n_train, n_test, per_patient) -> list[_Image]:
    n = len(classes)
    patients = _patient_ids(task_id, n_train + n_test)
    n_images = len(patients) * per_patient
    prevalence = np.array([_CXR_PREVALENCE.get(c, 0.15) for c in classes])
    labels = np.zeros((n_images, n), bool)
    for i in range(n_images):
        if rng.random() < _NO_FINDING:
            continue
        while not labels[i].any():
            labels[i] = rng.random(n) < prevalence
    # Co-occurrence as in real reports: effusion often comes with cardiomegaly.
    if "cardiomegaly" in classes and "pleural_effusion" in classes:
        cm, pe = classes.index("cardiomegaly"), classes.index("pleural_effusion")
        labels[:, pe] |= labels[:, cm] & (rng.random(n_images) < 0.45)
    # Every finding gets a handful of positives in each half of the patients (any patient split sees
    # positives); they are added to images that already have findings, keeping the no-finding share.
    half_patients = (len(patients) + 1) // 2
    for lo, hi in ((0, half_patients * per_patient), (half_patients * per_patient, n_images)):
        need = min(3, max(1, (hi - lo) // 10))
        for k in range(n):
            missing = need - int(labels[lo:hi, k].sum())
            if missing <= 0:
                continue
            with_findings = [i for i in range(lo, hi) if labels[i].any() and not labels[i, k]]
            pool = with_findings if len(with_findings) >= missing else [i for i in range(lo, hi) if not labels[i, k]]
            labels[rng.choice(pool, size=min(missing, len(pool)), replace=False), k] = True
    known = set(_CXR_PREVALENCE)
    generic = [c for c in classes if c not in known]
    images = []
    for pi, patient in enumerate(patients):
        patient_shift = rng.normal(0, 0.02, 2)
        bits = int(rng.choice([12, 14, 16]))
        for j in range(per_patient):
            index = pi * per_patient + j
            severity = {}
            for k, name in enumerate(classes):
                if labels[index, k]:
                    # Mostly visible; sometimes (APPEARANCE_NOISE) barely so.
                    severity[name] = 0.12 if rng.random() < APPEARANCE_NOISE else float(rng.uniform(0.55, 1.2))
                elif rng.random() < 0.03:
                    severity[name] = 0.3  # a faint mimic on a negative image
            params = {
                "severity": severity,
                "generic": generic,
                "shift": patient_shift + rng.normal(0, 0.01, 2),
                "bend_sign": float(rng.choice([-1, 1])),
                "ctr_jitter": float(rng.normal(0, 0.03)),
                "pneumonia_side": float(rng.choice([-1, 1])),
                "atelectasis_side": float(rng.choice([-1, 1])),
                "gamma": float(rng.uniform(0.85, 1.2)),
                "exposure": float(rng.uniform(0.8, 1.0)),
                "max_value": int(2**bits - 1),
            }
            size = (int(rng.integers(240, 257)), int(rng.integers(224, 249)))
            found = "|".join(c for k, c in enumerate(classes) if labels[index, k])
            images.append(_Image(f"{patient}-{j + 1}", patient, labels=found, source="padchest", size=size, params=params))
    return images


# --------------------------------------------------------------------------------------------------------
# Knee radiographs (T8), 16-bit
# --------------------------------------------------------------------------------------------------------

_KL_JOINT_SPACE = [1.0, 0.92, 0.75, 0.48, 0.15]  # relative medial joint space width per KL grade
_KL_OSTEOPHYTE = [0.0, 0.35, 0.65, 1.0, 1.35]
_KL_SCLEROSIS = [0.0, 0.0, 0.04, 0.08, 0.14]
_KNEE_SOURCE = {"oai": {"gamma": 1.0, "bits": 16, "contrast": 1.0}, "most": {"gamma": 1.35, "bits": 12, "contrast": 0.85}}


def _render_knee(rng: np.random.Generator, h: int, w: int, p: dict[str, Any]) -> np.ndarray:
    yy, xx = _grid(h, w)
    src = _KNEE_SOURCE[p["source"]]
    severity = p["severity"]  # 0..4, continuous
    cx = w / 2 + p["shift"][0] * w
    jy = h / 2 + p["shift"][1] * h
    half_width = 0.3 * w
    img = 0.06 + 0.18 * _soft_inside(np.abs(xx - cx) - 0.42 * w, 4.0)  # soft tissue of the leg
    x_rel = (xx[0] - cx) / half_width  # -1..1 across the joint, per column
    medial = -p["side"] * x_rel  # >0 on the medial side
    # Joint space: narrows with grade, mostly in the medial compartment.
    narrowing = np.interp(severity, range(5), _KL_JOINT_SPACE)
    space = 0.045 * h * np.where(medial > 0, narrowing, 0.5 + 0.5 * narrowing) * p["jsw_scale"]
    condyles = 0.02 * h * np.cos(np.pi * x_rel) ** 2  # two rounded femoral condyles
    femur_bottom = jy - space / 2 + condyles - 0.02 * h
    tibia_top = jy + space / 2 + 0.004 * h * np.abs(x_rel) * (1 + severity)
    # The bone ends flare from the shaft to the full joint width near the joint line.
    flare = np.exp(-np.abs(yy - jy) / (0.12 * h))
    bone_half_width = 0.55 * half_width + 0.45 * half_width * flare
    in_bone_width = _soft_inside(np.abs(xx - cx) - bone_half_width, 2.0)
    femur = _soft_inside(yy - femur_bottom[None, :], 1.5) * in_bone_width
    tibia = _soft_inside(tibia_top[None, :] - yy, 1.5) * in_bone_width
    bone = np.maximum(femur, tibia)
    trabecular = 0.03 * _smooth_noise(rng, h, w, 0.025 * w)
    # Subchondral sclerosis: a brighter band along the joint surfaces.
    sclerosis = np.interp(severity, range(5), _KL_SCLEROSIS)
    near_joint = np.exp(-np.minimum(np.abs(yy - femur_bottom[None, :]), np.abs(yy - tibia_top[None, :])) / (0.03 * h))
    img = img + bone * (0.42 + trabecular + sclerosis * near_joint)
    fibula = _soft_inside(_ellipse_distance(xx, yy, cx - p["side"] * 0.85 * half_width, jy + 0.2 * h, 0.06 * w, 0.1 * h), 1.5)
    img = np.maximum(img, 0.4 * fibula * (1 - tibia) + img * tibia)
    # Osteophytes: bright spurs growing from the four joint margins.
    spur = np.interp(severity, range(5), _KL_OSTEOPHYTE) * p["spur_scale"]
    if spur > 0:
        for sx in (-1, 1):
            for edge_y, direction in ((jy - 0.01 * h, -1), (jy + 0.01 * h, 1)):
                ox = cx + sx * (half_width + 0.012 * w * spur)
                size = 0.02 * w * spur * (1.3 if sx == -p["side"] else 0.8)
                d = np.sqrt(((xx - ox) / (size + 0.5)) ** 2 + ((yy - edge_y - direction * 0.015 * h) / (1.6 * size + 0.5)) ** 2)
                img = np.maximum(img, 0.5 * _soft_inside(d - 1.0, 0.2))
    img = np.clip(img * src["contrast"] * p["exposure"], 0, 1) ** (src["gamma"] * p["gamma"])
    return img + rng.normal(0.0, 0.012, size=img.shape).astype(np.float32)


def _plan_t8(rng, task_id, classes, n_train, n_test, per_patient) -> list[_Image]:
    n_grades = len(classes)
    if n_grades < 2:
        raise ValueError(f"tasks.{task_id}.classes: a graded task needs at least 2 grades, got {classes!r}")
    prior = np.array([0.35, 0.2, 0.22, 0.15, 0.08][:n_grades] + [0.05] * max(0, n_grades - 5))
    prior /= prior.sum()
    patients = _patient_ids(task_id, n_train + n_test)
    half = (len(patients) + 1) // 2
    base = np.concatenate(
        [_ensure_each_class(rng, rng.choice(n_grades, size=m, p=prior), n_grades, 0) for m in (half, len(patients) - half)]
    )
    sizes = _image_sizes(rng, len(patients) * per_patient, 232, 256, large=True)
    images = []
    for pi, patient in enumerate(patients):
        source = "oai" if rng.random() < 0.6 else "most"
        other = int(np.clip(base[pi] + rng.choice([-1, 0, 0, 1]), 0, n_grades - 1))
        knee_grades = {"right": int(base[pi]), "left": other}
        jsw_scale = float(rng.uniform(0.85, 1.15))
        for j in range(per_patient):
            knee = ("right", "left")[j % 2]
            grade = knee_grades[knee]
            look = grade if rng.random() >= 2 * APPEARANCE_NOISE else int(np.clip(grade + rng.choice([-1, 1]), 0, n_grades - 1))
            params = {
                "source": source,
                "side": 1.0 if knee == "right" else -1.0,
                "severity": float(np.clip(look / (n_grades - 1) * 4 + rng.normal(0, 0.25), 0, 4)),
                "shift": rng.normal(0, 0.025, 2),
                "jsw_scale": jsw_scale * float(rng.uniform(0.92, 1.08)),
                "spur_scale": float(rng.uniform(0.7, 1.3)),
                "exposure": float(rng.uniform(0.85, 1.15)),
                "gamma": float(rng.uniform(0.9, 1.1)),
                "max_value": int(2 ** _KNEE_SOURCE[source]["bits"] - 1),
            }
            images.append(_Image(f"{patient}-{knee}-{j + 1}", patient, label=classes[grade], source=source, size=sizes[pi * per_patient + j], params=params))
    return images


_SPECS: dict[str, _TaskSpec] = {
    "T1": _TaskSpec("multiclass", "tif", False, _plan_t1, _render_he),
    "T2": _TaskSpec("binary", "png", False, _plan_t2, _render_he),
    "T3": _TaskSpec("multiclass", "jpg", False, _plan_t3, _render_derm),
    "T4": _TaskSpec("binary", "jpg", False, _plan_t4, _render_derm),
    "T5": _TaskSpec("multiclass", "jpg", False, _plan_t5, _render_fundus),
    "T6": _TaskSpec("binary", "jpg", False, _plan_t6, _render_fundus),
    "T7": _TaskSpec("multilabel", "png", True, _plan_t7, _render_cxr),
    "T8": _TaskSpec("multiclass", "png", True, _plan_t8, _render_knee),
}

"""Histopathology (T1, T2): a Beer-Lambert mix of haematoxylin and eosin optical densities."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medprobe.demo.data.drawing import gaussian_spots, grid, smooth_noise, soft_inside
from medprobe.demo.data.tasks import (
    PlannedImage,
    TaskSpec,
    noisy_appearance,
    patient_ids,
    patient_image,
    require_binary,
)

_HEMATOXYLIN = np.array([0.65, 0.70, 0.29], np.float32)
_EOSIN = np.array([0.07, 0.99, 0.11], np.float32)

# Per-class tissue recipes; densities are nuclei per 1000 px^2, sigmas in px at 224 px.
_T1_TISSUE: dict[str, dict[str, Any]] = {
    "ADI": {"eosin": 0.04, "lattice": 0.9, "lattice_cell": 30, "nuclei": [(0.15, 1.5, 0.8, 2.5, 0.0)]},
    "BACK": {"eosin": 0.05, "hema": 0.03, "eosin_noise": 0.04, "noise_cell": 40, "nuclei": []},
    "DEB": {
        "eosin": 0.55,
        "hema": 0.15,
        "eosin_noise": 0.3,
        "noise_cell": 14,
        "nuclei": [(6.0, 0.9, 0.9, 1.0, 0.5), (0.8, 2.6, 0.6, 1.0, 0.5)],
    },
    "LYM": {"eosin": 0.3, "hema": 0.1, "nuclei": [(14.0, 2.0, 1.3, 1.0, 0.1)]},
    "MUC": {
        "eosin": 0.12,
        "hema": 0.3,
        "eosin_noise": 0.06,
        "hema_noise": 0.1,
        "noise_cell": 30,
        "nuclei": [(0.1, 2.0, 0.8, 1.0, 0.0)],
    },
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
    yy, xx = grid(h, w)
    eosin = np.full((h, w), p.get("eosin", 0.5), np.float32)
    hema = np.full((h, w), p.get("hema", 0.05), np.float32)
    cell = p.get("noise_cell", 24) * scale
    if p.get("eosin_noise"):
        eosin += p["eosin_noise"] * smooth_noise(rng, h, w, cell)
    if p.get("hema_noise"):
        hema += p["hema_noise"] * smooth_noise(rng, h, w, cell)
    eosin *= 1.0 + 0.12 * smooth_noise(rng, h, w, 40 * scale)  # uneven section thickness
    lumen = np.zeros((h, w), np.float32)
    ring = np.zeros((h, w), np.float32)
    if p.get("lattice"):
        # Fat / alveoli: white cells separated by thin eosinophilic walls (level lines of a smooth field).
        n = smooth_noise(rng, h, w, p.get("lattice_cell", 28) * scale)
        walls = np.exp(-((n / 0.12) ** 2))
        eosin = eosin * (1 - walls) + p["lattice"] * walls
    if p.get("stripes"):
        amp, period, wavy = p["stripes"]
        theta = rng.uniform(0, np.pi)
        phase = wavy * 2.5 * smooth_noise(rng, h, w, 50 * scale) if wavy else 0.0
        coord = xx * math.cos(theta) + yy * math.sin(theta)
        eosin += amp * np.sin(2 * np.pi * coord / (period * scale) + phase)
        p = {**p, "_elong_axis": 0 if abs(math.cos(theta)) > abs(math.sin(theta)) else 1}
    if p.get("glands"):
        n = smooth_noise(rng, h, w, p.get("gland_cell", 30) * scale)
        level = 1.0 - p["glands"]  # more gland area with a lower level
        lumen = soft_inside(level + 0.35 - n, 0.08)
        ring = np.exp(-(((n - level) / 0.12) ** 2))
        eosin = eosin * (1 - lumen) + 0.05 * lumen
    nuclei = np.zeros((h, w), np.float32)
    density_scale = p.get("density_scale", 1.0)
    for density, sigma, strength, elong, irregular in p.get("nuclei", []):
        count = int(round(density * density_scale * h * w / 1000.0))
        s = sigma * scale * p.get("size_scale", 1.0)
        axis = p.get("_elong_axis", 0)
        sig = (s * elong, s) if axis == 1 else (s, s * elong)
        spots = gaussian_spots(rng, h, w, count, sig)
        if irregular:
            spots *= 1.0 + irregular * smooth_noise(rng, h, w, max(1.5, s))
        nuclei += strength * np.clip(1.6 * spots - 0.2, 0.0, 1.2)
    if ring.any():
        nuclei += (
            0.9 * np.clip(1.6 * gaussian_spots(rng, h, w, int(6 * h * w / 1000), 1.6 * scale) - 0.2, 0, 1.2) * ring
        )
    hema = hema + nuclei
    eosin = np.clip(eosin, 0, None) * (1 - 0.6 * np.clip(nuclei, 0, 1))
    stain = p["stain"]
    od = np.clip(hema, 0, None)[..., None] * (stain["hematoxylin"] * stain["h_scale"]) + eosin[..., None] * (
        stain["eosin"] * stain["e_scale"]
    )
    rgb = np.exp(-od) * p.get("brightness", 1.0)
    return rgb + rng.normal(0.0, p.get("pixel_noise", 0.015), size=rgb.shape).astype(np.float32)


def _draw_stain(rng: np.random.Generator, shift: float = 0.0) -> dict[str, Any]:
    """A patient's staining: perturbed stain vectors and strengths (``shift`` moves a whole centre)."""
    return {
        "hematoxylin": np.clip(
            _HEMATOXYLIN + rng.normal(0, 0.05, 3) + shift * np.array([0.05, 0.0, -0.08]), 0.05, None
        ).astype(np.float32),
        "eosin": np.clip(_EOSIN + rng.normal(0, 0.04, 3) + shift * np.array([0.06, -0.05, 0.05]), 0.02, None).astype(
            np.float32
        ),
        "h_scale": float(rng.uniform(0.8, 1.2) * (1 + 0.1 * shift)),
        "e_scale": float(rng.uniform(0.8, 1.2) * (1 - 0.15 * shift)),
    }


def _plan_t1(rng, task_id, classes, n_train, n_test, per_patient) -> list[PlannedImage]:
    unknown = [c for c in classes if c not in _T1_TISSUE]
    if unknown:
        raise ValueError(f"tasks.{task_id}.classes: no demo tissue for {unknown}; known: {sorted(_T1_TISSUE)}")
    images = []
    patients = patient_ids(task_id, n_train + n_test)
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
                look = noisy_appearance(rng, label, len(classes))
                params = {
                    **_T1_TISSUE[classes[look]],
                    "stain": stain,
                    "density_scale": float(rng.uniform(0.75, 1.3)),
                    "size_scale": float(rng.uniform(0.85, 1.15)),
                    "brightness": float(rng.uniform(0.94, 1.04)),
                }
                images.append(
                    patient_image(
                        patient, j, params, label=classes[label], source=source, partition=partition, size=(224, 224)
                    )
                )
    return images


def _plan_t2(rng, task_id, classes, n_train, n_test, per_patient) -> list[PlannedImage]:
    require_binary(task_id, classes)
    images = []
    organs = list(_T2_ORGANS)
    patients = patient_ids(task_id, n_train + n_test)
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
            images.append(
                patient_image(
                    patient, j, params, label=classes[label], source="pannuke", group=organ_of[pi], size=(256, 256)
                )
            )
    return images


T1 = TaskSpec("multiclass", "tif", False, _plan_t1, _render_he)
T2 = TaskSpec("binary", "png", False, _plan_t2, _render_he)

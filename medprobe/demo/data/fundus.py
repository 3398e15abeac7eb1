"""Fundus photography (T5, T6): retinopathy lesions by grade, the optic cup by glaucoma."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from medprobe.demo.data.drawing import gaussian_spots, grid, smooth_noise, soft_inside
from medprobe.demo.data.tasks import (
    PlannedImage,
    TaskSpec,
    ensure_each_class,
    grade_prior,
    image_sizes,
    large_indices,
    large_size,
    neighbour_grade,
    noisy_appearance,
    patient_ids,
    patient_image,
    require_binary,
    require_grades,
)

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
    yy, xx = grid(h, w)
    cx, cy = w / 2 + rng.normal(0, 0.01) * w, h / 2 + rng.normal(0, 0.01) * h
    r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / short
    fov = soft_inside((r - src["fov"] * p.get("fov_scale", 1.0)) * short, 1.0)
    side = 1.0 if p["eye"] == "right" else -1.0
    dx, dy = cx + side * 0.2 * short, cy + rng.normal(0, 0.02) * short
    disc_r = p.get("disc_radius", 0.075) * short
    shade = (1.0 - 0.55 * r**2) * (1.0 + 0.08 * smooth_noise(rng, h, w, 0.2 * short))
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
    disc = soft_inside(dist - disc_r, 0.15 * disc_r)
    img = img * (1 - disc[..., None]) + np.asarray(src["disc"], np.float32) * disc[..., None]
    if p.get("cup_ratio"):
        cup = soft_inside(dist - p["cup_ratio"] * disc_r, 0.1 * disc_r)
        img = img * (1 - cup[..., None]) + np.array([1.0, 1.0, 0.92], np.float32) * cup[..., None]
    field_mask = fov * (1 - disc) * (r < src["fov"] * p.get("fov_scale", 1.0) * 0.95)
    red = np.clip(gaussian_spots(rng, h, w, p.get("haemorrhages", 0), 0.015 * short + 0.3, mask=field_mask), 0, 1)
    if p.get("blots", 0):
        red = np.maximum(red, np.clip(gaussian_spots(rng, h, w, p["blots"], 0.03 * short, mask=field_mask), 0, 1))
    yellow = np.clip(gaussian_spots(rng, h, w, p.get("exudates", 0), 0.016 * short + 0.3, mask=field_mask), 0, 1)
    img = img * (1 - red[..., None]) + np.array([0.4, 0.04, 0.04], np.float32) * red[..., None]
    img = img * (1 - yellow[..., None]) + np.array([0.98, 0.9, 0.45], np.float32) * yellow[..., None]
    if p.get("haze"):  # vitreous haemorrhage in advanced disease veils the whole fundus
        img = img * (1 - p["haze"]) + np.array([0.45, 0.08, 0.05], np.float32) * p["haze"]
    if p.get("neovascular"):
        twigs = np.exp(-((smooth_noise(rng, h, w, 0.03 * short) / 0.1) ** 2)) * np.exp(-dist / (2.5 * disc_r))
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


def _plan_t5(rng, task_id, classes, n_train, n_test, per_patient) -> list[PlannedImage]:
    n_grades = len(classes)
    require_grades(task_id, classes)
    prior = grade_prior([0.42, 0.15, 0.2, 0.12, 0.11], n_grades, 0.1)
    patients = patient_ids(task_id, n_train + n_test)
    n_eyepacs_test = (n_test + 1) // 2
    images = []
    groups = (
        ("train", patients[:n_train], ["eyepacs"] * n_train),
        ("test", patients[n_train:], ["eyepacs"] * n_eyepacs_test + ["aptos"] * (n_test - n_eyepacs_test)),
    )
    for partition, members, sources in groups:
        base = ensure_each_class(rng, rng.choice(n_grades, size=len(members), p=prior), n_grades, 0)
        for patient, patient_grade, source in zip(members, base, sources):
            # Both eyes of a patient are graded separately but are similar.
            other = int(np.clip(patient_grade + rng.choice([-1, 0, 0, 0, 1]), 0, n_grades - 1))
            eye_grades = {"right": int(patient_grade), "left": other}
            pigment = tuple(float(x) for x in rng.uniform(0.88, 1.1) * (1 + rng.normal(0, 0.04, 3)))
            sizes = image_sizes(rng, per_patient, 232, 256, large=False, square=source == "eyepacs")
            for j in range(per_patient):
                eye = ("right", "left")[j % 2]
                grade = eye_grades[eye]
                severity = neighbour_grade(rng, grade, n_grades) / (n_grades - 1) * 4
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
                images.append(
                    patient_image(
                        patient,
                        j,
                        params,
                        side=eye,
                        label=classes[grade],
                        source=source,
                        partition=partition,
                        size=sizes[j],
                    )
                )
    # A few large photographs (EyePACS and APTOS both have them) to exercise downsampling.
    for i in large_indices(rng, len(images)):
        images[int(i)].size = large_size(rng)
    return images


def _plan_t6(rng, task_id, classes, n_train, n_test, per_patient) -> list[PlannedImage]:
    require_binary(task_id, classes)
    patients = patient_ids(task_id, n_train + n_test)
    images = []
    for partition, members, source, lo, hi in (
        ("train", patients[:n_train], "airogs", 224, 256),
        ("test", patients[n_train:], "odir", 224, 236),
    ):
        labels = (rng.random(len(members)) < 0.35).astype(int)
        labels = ensure_each_class(rng, labels, 2, 0)
        for patient, label in zip(members, labels):
            pigment = tuple(float(x) for x in rng.uniform(0.88, 1.1) * (1 + rng.normal(0, 0.04, 3)))
            disc_radius = float(rng.uniform(0.075, 0.1))
            eye_labels = {"right": int(label), "left": int(label) if rng.random() < 0.85 else 1 - int(label)}
            for j in range(per_patient):
                eye = ("right", "left")[j % 2]
                eye_label = eye_labels[eye]
                look = noisy_appearance(rng, eye_label, 2)
                cup = rng.uniform(0.6, 0.85) if look else rng.uniform(0.2, 0.48)
                h = int(rng.integers(lo, hi + 1))
                # AIROGS-like square photographs; ODIR-like wider ones (part of the domain shift).
                size = (h, h) if source == "airogs" else (h, min(256, int(h * rng.uniform(1.06, 1.09))))
                params = {
                    "source": source,
                    "eye": eye,
                    "pigment": pigment,
                    "disc_radius": disc_radius,
                    "cup_ratio": float(cup),
                    **_fundus_nuisance(rng),
                }
                images.append(
                    patient_image(
                        patient,
                        j,
                        params,
                        side=eye,
                        label=classes[eye_label],
                        source=source,
                        partition=partition,
                        size=size,
                    )
                )
    return images


T5 = TaskSpec("multiclass", "jpg", False, _plan_t5, _render_fundus)
T6 = TaskSpec("binary", "jpg", False, _plan_t6, _render_fundus)

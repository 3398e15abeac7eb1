"""Dermatoscopy (T3, T4): a lesion on skin, its border, colours and structures by diagnosis."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medprobe.demo.data.drawing import gaussian_spots, grid, smooth_noise, soft_inside
from medprobe.demo.data.tasks import (
    APPEARANCE_NOISE,
    PlannedImage,
    TaskSpec,
    ensure_each_class,
    image_sizes,
    noisy_appearance,
    patient_ids,
    patient_image,
    require_binary,
)


def _lesion(
    radius: float,
    ecc: float,
    irregular: float,
    centre: tuple[float, float, float],
    edge: tuple[float, float, float],
    hetero: float,
    soft: float,
    **features: Any,
) -> dict[str, Any]:
    """A lesion recipe: what every lesion has, then the ``features`` only some show."""
    return dict(
        radius=radius, ecc=ecc, irregular=irregular, centre=centre, edge=edge, hetero=hetero, soft=soft, **features
    )


# Lesion recipes: radius (fraction of the short side), eccentricity, border irregularity, centre and edge colours,
# colour heterogeneity, border softness; then blotch colour, blue-white veil, globules (count, colour), red
# vessels, white scale, fine waxy texture, white centre.
_LESION: dict[str, dict[str, Any]] = {
    "MEL": _lesion(
        0.32, 0.75, 0.16, (0.25, 0.15, 0.12), (0.5, 0.33, 0.25), 0.6, 0.03, blotch=(0.1, 0.1, 0.16), veil=0.35
    ),
    "NV": _lesion(0.22, 0.9, 0.03, (0.45, 0.28, 0.18), (0.62, 0.44, 0.33), 0.1, 0.06, globules=(6, (0.35, 0.2, 0.13))),
    "BCC": _lesion(
        0.22, 0.8, 0.08, (0.82, 0.6, 0.62), (0.88, 0.68, 0.66), 0.15, 0.05, globules=(8, (0.4, 0.45, 0.55)), vessels=0.6
    ),
    "AKIEC": _lesion(0.26, 0.7, 0.12, (0.8, 0.45, 0.42), (0.85, 0.55, 0.5), 0.2, 0.06, scale=0.5),
    "BKL": _lesion(0.27, 0.8, 0.07, (0.6, 0.4, 0.28), (0.72, 0.52, 0.4), 0.2, 0.015, waxy=0.35),
    "DF": _lesion(0.15, 0.9, 0.04, (0.9, 0.85, 0.8), (0.58, 0.42, 0.32), 0.1, 0.06, white_centre=0.5),
    "VASC": _lesion(
        0.18, 0.85, 0.05, (0.55, 0.12, 0.22), (0.7, 0.25, 0.3), 0.15, 0.02, globules=(10, (0.45, 0.08, 0.2))
    ),
}
# HAM10000 class shares (NV dominant).
_HAM_PRIOR = {"MEL": 0.111, "NV": 0.669, "BCC": 0.051, "AKIEC": 0.033, "BKL": 0.11, "DF": 0.011, "VASC": 0.014}


def _render_derm(rng: np.random.Generator, h: int, w: int, p: dict[str, Any]) -> np.ndarray:
    short = min(h, w)
    yy, xx = grid(h, w)
    skin = np.asarray(p["skin"], np.float32)
    img = skin * (1.0 + 0.04 * smooth_noise(rng, h, w, 0.15 * short))[..., None]
    img = img + 0.02 * smooth_noise(rng, h, w, 0.02 * short)[..., None]
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
    inside = soft_inside((rho - border) * radius, p["soft"] * radius + 0.5)
    t = np.clip(rho / np.maximum(border, 0.2), 0, 1)[..., None]
    lesion = np.asarray(p["centre"], np.float32) * (1 - t) + np.asarray(p["edge"], np.float32) * t
    if p.get("hetero"):
        blotch_weight = np.clip(p["hetero"] * smooth_noise(rng, h, w, 0.12 * short), 0, 1)[..., None]
        lesion = lesion * (1 - blotch_weight) + np.asarray(p.get("blotch", p["centre"]), np.float32) * blotch_weight
    if p.get("veil"):
        veil = np.clip(p["veil"] * (0.5 + smooth_noise(rng, h, w, 0.2 * short)), 0, 0.8)[..., None]
        lesion = lesion * (1 - veil) + np.array([0.55, 0.6, 0.72], np.float32) * veil
    if p.get("globules"):
        count, colour = p["globules"]
        g = np.clip(gaussian_spots(rng, h, w, count, 0.025 * short, mask=inside), 0, 1)[..., None]
        lesion = lesion * (1 - g) + np.asarray(colour, np.float32) * g
    if p.get("vessels"):
        ridge = np.exp(-((smooth_noise(rng, h, w, 0.08 * short) / 0.08) ** 2))[..., None] * p["vessels"]
        lesion = lesion * (1 - ridge) + np.array([0.75, 0.15, 0.2], np.float32) * ridge
    if p.get("scale"):
        flake = np.clip(2.5 * (smooth_noise(rng, h, w, 0.05 * short) - 0.6), 0, 1)[..., None] * p["scale"]
        lesion = lesion * (1 - flake) + np.array([0.95, 0.92, 0.88], np.float32) * flake
    if p.get("waxy"):
        lesion = lesion * (1 + p["waxy"] * 0.3 * smooth_noise(rng, h, w, 0.015 * short))[..., None]
    if p.get("white_centre"):
        wc = p["white_centre"] * soft_inside((rho - 0.45) * radius, 0.1 * radius)[..., None]
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
        img = img * soft_inside(r - p["vignette"], 0.04)[..., None]
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


def _plan_t3(rng, task_id, classes, n_train, n_test, per_patient) -> list[PlannedImage]:
    unknown = [c for c in classes if c not in _LESION]
    if unknown:
        raise ValueError(f"tasks.{task_id}.classes: no demo lesion for {unknown}; known: {sorted(_LESION)}")
    prior = np.array([_HAM_PRIOR[c] for c in classes])
    prior /= prior.sum()
    donor = classes.index("NV") if "NV" in classes else None
    images = []
    patients = patient_ids(task_id, n_train + n_test)
    for partition, members in (("train", patients[:n_train]), ("test", patients[n_train:])):
        # A "patient" is a lesion (HAM10000's lesion_id): all its images share the diagnosis.
        labels = ensure_each_class(rng, rng.choice(len(classes), size=len(members), p=prior), len(classes), donor)
        for patient, label in zip(members, labels):
            skin = _skin(rng)
            look = noisy_appearance(rng, int(label), len(classes))
            base = _jitter_lesion(rng, _LESION[classes[look]])
            for j in range(per_patient):
                params = {
                    **base,
                    "skin": skin,
                    "radius": base["radius"] * rng.uniform(0.92, 1.08),
                    "brightness": base["brightness"] * rng.uniform(0.96, 1.04),
                }
                size = (int(rng.integers(224, 241)), int(rng.integers(240, 257)))
                images.append(
                    patient_image(
                        patient, j, params, label=classes[int(label)], source="ham10000", partition=partition, size=size
                    )
                )
    return images


def _lerp_lesion(a: dict[str, Any], b: dict[str, Any], t: float) -> dict[str, Any]:
    out = dict(a)
    for key in ("radius", "ecc", "irregular", "hetero", "soft"):
        out[key] = (1 - t) * a.get(key, 0.0) + t * b.get(key, 0.0)
    for key in ("centre", "edge", "blotch"):
        out[key] = tuple((1 - t) * np.asarray(a.get(key, a["centre"])) + t * np.asarray(b.get(key, b["centre"])))
    out["veil"] = t * b.get("veil", 0.0)
    return out


def _plan_t4(rng, task_id, classes, n_train, n_test, per_patient) -> list[PlannedImage]:
    require_binary(task_id, classes)
    patients = patient_ids(task_id, n_train + n_test)
    n_images = len(patients) * per_patient
    # ~12 % malignant, spread over both halves of the patients so any patient split sees positives.
    half = (len(patients) + 1) // 2 * per_patient
    n_pos = max(2, round(0.12 * n_images))
    first = rng.choice(half, size=min(half, (n_pos + 1) // 2), replace=False)
    second = half + rng.choice(n_images - half, size=min(n_images - half, n_pos // 2), replace=False)
    labels = np.zeros(n_images, int)
    labels[np.concatenate([first, second])] = 1
    sizes = image_sizes(rng, n_images, 224, 256, large=True)
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
            images.append(patient_image(patient, j, params, label=classes[label], source="isic2020", size=sizes[index]))
    return images


T3 = TaskSpec("multiclass", "jpg", False, _plan_t3, _render_derm)
T4 = TaskSpec("binary", "jpg", False, _plan_t4, _render_derm)

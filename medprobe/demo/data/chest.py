"""Chest radiographs (T7), 16-bit: the anatomy and one picture per finding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medprobe.demo.data.drawing import ellipse_distance, gaussian_spots, grid, smooth_noise, soft_inside
from medprobe.demo.data.tasks import APPEARANCE_NOISE, PlannedImage, TaskSpec, patient_ids, patient_image

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


@dataclass(frozen=True)
class _Frame:
    """The pixel grid of one radiograph and where the thorax lies in it."""

    h: int
    w: int
    xx: np.ndarray
    yy: np.ndarray
    cx: float  # midline
    top: float  # lung apices
    lung_h: float

    @property
    def base_y(self) -> float:
        """The diaphragm."""
        return self.top + self.lung_h + 0.02 * self.h


def _render_cxr(rng: np.random.Generator, h: int, w: int, p: dict[str, Any]) -> np.ndarray:
    sev = p["severity"]  # finding -> visibility (0 = absent)
    yy, xx = grid(h, w)
    # Emphysema makes the lungs taller (a flatter diaphragm).
    lung_h = 0.5 * h * (1 + 0.15 * sev.get("emphysema", 0.0))
    frame = _Frame(h, w, xx, yy, cx=w / 2 + p["shift"][0] * w, top=0.12 * h + p["shift"][1] * h, lung_h=lung_h)
    img, lungs = _thorax(rng, frame, sev, p)
    img = _findings(rng, frame, img, lungs, sev, p)
    img = np.clip(img, 0, 1) ** p["gamma"]
    return img * p["exposure"] + rng.normal(0.0, 0.012, size=img.shape).astype(np.float32)


def _thorax(
    rng: np.random.Generator, f: _Frame, sev: dict[str, float], p: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Body, spine, lungs with markings and ribs (a fractured one too), heart and abdomen; and the lung mask."""
    h, w, xx, yy, cx, top, lung_h = f.h, f.w, f.xx, f.yy, f.cx, f.top, f.lung_h
    img = np.full((h, w), 0.04, np.float32)
    body = soft_inside(ellipse_distance(xx, yy, cx, top + 0.45 * h, 0.47 * w, 0.6 * h), 3.0)
    img += 0.3 * body
    # Spine and mediastinum; scoliosis bends the spine into an S.
    bend = 0.13 * w * sev.get("scoliosis", 0.0) * p["bend_sign"]
    spine_x = cx + bend * np.sin(np.pi * (yy - top) / (0.8 * h))
    img += 0.25 * soft_inside(np.abs(xx - spine_x) - 0.045 * w, 1.5)
    # Lungs: two ellipses of air; emphysema makes them larger and darker.
    emph = sev.get("emphysema", 0.0)
    lungs = np.zeros((h, w), np.float32)
    for side in (-1, 1):
        lx = cx + side * 0.2 * w
        d = ellipse_distance(xx, yy, lx, top + lung_h / 2 + 0.04 * h, 0.17 * w * (1 + 0.08 * emph), lung_h / 2)
        lungs = np.maximum(lungs, soft_inside(d, 2.0))
    markings = 0.025 * (1 - 0.7 * emph) * smooth_noise(rng, h, w, 0.035 * w)
    img = img * (1 - lungs) + (0.1 - 0.04 * emph + markings) * lungs
    # Ribs: curved bright bands across the lungs.
    rib_phase = 2 * np.pi * (yy - top - 0.002 * (xx - cx) ** 2 / w * 10) / (0.075 * h)
    ribs = np.clip(np.sin(rib_phase) - 0.55, 0, 1) * 2.2
    if sev.get("fracture"):
        # A step in one rib with a bright callus.
        fy = top + rng.uniform(0.2, 0.55) * lung_h
        fx = cx + rng.choice([-1, 1]) * rng.uniform(0.12, 0.28) * w
        gap = soft_inside(np.abs(xx - fx) - 0.012 * w, 1.0) * soft_inside(np.abs(yy - fy) - 0.05 * h, 1.0)
        ribs = ribs * (1 - gap * sev["fracture"])
        img += 0.3 * sev["fracture"] * np.exp(-(((xx - fx - 0.02 * w) ** 2 + (yy - fy) ** 2) / (2 * (0.015 * w) ** 2)))
    img += 0.07 * ribs * lungs
    # Heart: its width relative to the thorax (0.4 w) is the cardiothoracic ratio.
    ctr = 0.45 + 0.18 * sev.get("cardiomegaly", 0.0) - 0.05 * emph + p["ctr_jitter"]
    heart = soft_inside(
        ellipse_distance(xx, yy, cx + 0.04 * w + bend * 0.5, top + 0.62 * lung_h, ctr * (0.4 * w), 0.2 * h), 2.5
    )
    img = np.maximum(img, (0.4 + 0.05 * smooth_noise(rng, h, w, 0.1 * w)) * heart)
    img += 0.3 * soft_inside(f.base_y - yy - 0.01 * h * (1 - emph), 3.0) * body  # abdomen below the diaphragm
    return img, lungs


def _findings(
    rng: np.random.Generator, f: _Frame, img: np.ndarray, lungs: np.ndarray, sev: dict[str, float], p: dict[str, Any]
) -> np.ndarray:
    """Effusion, pneumonia, nodules, atelectasis and a blob for each finding without its own picture."""
    h, w, xx, yy, cx, top, lung_h = f.h, f.w, f.xx, f.yy, f.cx, f.top, f.lung_h
    if sev.get("pleural_effusion"):
        # Fluid fills the lung base with a meniscus rising towards the lateral wall.
        level = f.base_y - 0.16 * h * sev["pleural_effusion"]
        lateral = np.abs(xx - cx) / (0.4 * w)
        fluid = soft_inside(level - 0.06 * h * lateral**2 - yy, 2.0) * lungs
        img = img * (1 - fluid) + 0.42 * fluid
    if sev.get("pneumonia"):
        zone = np.exp(
            -(
                ((xx - cx - p["pneumonia_side"] * 0.2 * w) ** 2) / (2 * (0.1 * w) ** 2)
                + ((yy - top - 0.6 * lung_h) ** 2) / (2 * (0.13 * h) ** 2)
            )
        )
        patches = np.clip(smooth_noise(rng, h, w, 0.05 * w) + 0.6, 0, 2) * zone * lungs
        img += 0.2 * sev["pneumonia"] * patches
    if sev.get("nodule"):
        img += (
            0.3
            * sev["nodule"]
            * np.clip(gaussian_spots(rng, h, w, int(rng.integers(2, 5)), 0.025 * w, mask=lungs > 0.9), 0, 1)
        )
    if sev.get("atelectasis"):
        ay = top + 0.75 * lung_h
        tilt = rng.normal(0, 0.15)
        ax = cx + p["atelectasis_side"] * 0.2 * w
        band = np.exp(-(((yy - ay - tilt * (xx - ax)) / (0.03 * h)) ** 2)) * np.exp(-(((xx - ax) / (0.12 * w)) ** 2))
        img += 0.4 * sev["atelectasis"] * band * lungs
    for index, name in enumerate(p["generic"]):
        if sev.get(name):
            gx = cx + (-0.25 + 0.5 * ((index * 0.618) % 1)) * w
            gy = top + (0.2 + 0.6 * ((index * 0.382) % 1)) * lung_h
            img += 0.25 * sev[name] * np.exp(-(((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * (0.05 * w) ** 2)))
    return img


def _plan_t7(rng, task_id, classes, n_train, n_test, per_patient) -> list[PlannedImage]:
    n = len(classes)
    patients = patient_ids(task_id, n_train + n_test)
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
            images.append(patient_image(patient, j, params, labels=found, source="padchest", size=size))
    return images


T7 = TaskSpec("multilabel", "png", True, _plan_t7, _render_cxr)

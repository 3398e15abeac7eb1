"""Knee radiographs (T8), 16-bit: joint space, osteophytes and sclerosis by Kellgren-Lawrence grade."""

from __future__ import annotations

from typing import Any

import numpy as np

from medprobe.demo.data.drawing import ellipse_distance, grid, smooth_noise, soft_inside
from medprobe.demo.data.tasks import (
    PlannedImage,
    TaskSpec,
    ensure_each_class,
    grade_prior,
    image_sizes,
    neighbour_grade,
    patient_ids,
    patient_image,
    require_grades,
)

_KL_JOINT_SPACE = [1.0, 0.92, 0.75, 0.48, 0.15]  # relative medial joint space width per KL grade
_KL_OSTEOPHYTE = [0.0, 0.35, 0.65, 1.0, 1.35]
_KL_SCLEROSIS = [0.0, 0.0, 0.04, 0.08, 0.14]
_KNEE_SOURCE = {
    "oai": {"gamma": 1.0, "bits": 16, "contrast": 1.0},
    "most": {"gamma": 1.35, "bits": 12, "contrast": 0.85},
}


def _render_knee(rng: np.random.Generator, h: int, w: int, p: dict[str, Any]) -> np.ndarray:
    yy, xx = grid(h, w)
    src = _KNEE_SOURCE[p["source"]]
    severity = p["severity"]  # 0..4, continuous
    cx = w / 2 + p["shift"][0] * w
    jy = h / 2 + p["shift"][1] * h
    half_width = 0.3 * w
    img = 0.06 + 0.18 * soft_inside(np.abs(xx - cx) - 0.42 * w, 4.0)  # soft tissue of the leg
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
    in_bone_width = soft_inside(np.abs(xx - cx) - bone_half_width, 2.0)
    femur = soft_inside(yy - femur_bottom[None, :], 1.5) * in_bone_width
    tibia = soft_inside(tibia_top[None, :] - yy, 1.5) * in_bone_width
    bone = np.maximum(femur, tibia)
    trabecular = 0.03 * smooth_noise(rng, h, w, 0.025 * w)
    # Subchondral sclerosis: a brighter band along the joint surfaces.
    sclerosis = np.interp(severity, range(5), _KL_SCLEROSIS)
    near_joint = np.exp(-np.minimum(np.abs(yy - femur_bottom[None, :]), np.abs(yy - tibia_top[None, :])) / (0.03 * h))
    img = img + bone * (0.42 + trabecular + sclerosis * near_joint)
    fibula = soft_inside(
        ellipse_distance(xx, yy, cx - p["side"] * 0.85 * half_width, jy + 0.2 * h, 0.06 * w, 0.1 * h), 1.5
    )
    img = np.maximum(img, 0.4 * fibula * (1 - tibia) + img * tibia)
    # Osteophytes: bright spurs growing from the four joint margins.
    spur = np.interp(severity, range(5), _KL_OSTEOPHYTE) * p["spur_scale"]
    if spur > 0:
        for sx in (-1, 1):
            for edge_y, direction in ((jy - 0.01 * h, -1), (jy + 0.01 * h, 1)):
                ox = cx + sx * (half_width + 0.012 * w * spur)
                size = 0.02 * w * spur * (1.3 if sx == -p["side"] else 0.8)
                d = np.sqrt(
                    ((xx - ox) / (size + 0.5)) ** 2 + ((yy - edge_y - direction * 0.015 * h) / (1.6 * size + 0.5)) ** 2
                )
                img = np.maximum(img, 0.5 * soft_inside(d - 1.0, 0.2))
    img = np.clip(img * src["contrast"] * p["exposure"], 0, 1) ** (src["gamma"] * p["gamma"])
    return img + rng.normal(0.0, 0.012, size=img.shape).astype(np.float32)


def _plan_t8(rng, task_id, classes, n_train, n_test, per_patient) -> list[PlannedImage]:
    n_grades = len(classes)
    require_grades(task_id, classes)
    prior = grade_prior([0.35, 0.2, 0.22, 0.15, 0.08], n_grades, 0.05)
    patients = patient_ids(task_id, n_train + n_test)
    half = (len(patients) + 1) // 2
    base = np.concatenate(
        [
            ensure_each_class(rng, rng.choice(n_grades, size=m, p=prior), n_grades, 0)
            for m in (half, len(patients) - half)
        ]
    )
    sizes = image_sizes(rng, len(patients) * per_patient, 232, 256, large=True)
    images = []
    for pi, patient in enumerate(patients):
        source = "oai" if rng.random() < 0.6 else "most"
        other = int(np.clip(base[pi] + rng.choice([-1, 0, 0, 1]), 0, n_grades - 1))
        knee_grades = {"right": int(base[pi]), "left": other}
        jsw_scale = float(rng.uniform(0.85, 1.15))
        for j in range(per_patient):
            knee = ("right", "left")[j % 2]
            grade = knee_grades[knee]
            look = neighbour_grade(rng, grade, n_grades)
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
            images.append(
                patient_image(
                    patient, j, params, side=knee, label=classes[grade], source=source, size=sizes[pi * per_patient + j]
                )
            )
    return images


T8 = TaskSpec("multiclass", "png", True, _plan_t8, _render_knee)

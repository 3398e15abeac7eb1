"""The label-efficiency sweep: the headline probe refitted on fractions of its training rows."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from medprobe.contracts import read_json
from medprobe.labels import task_targets
from medprobe.probe.files import Activations, write_probabilities
from medprobe.probe.modes import _check_mode, fit_mode
from medprobe.probe.problem import _check_kind
from medprobe.probe.subsets import _efficiency_strata, image_subsets, nested_subsets
from medprobe.settings import EfficiencySettings, ProbeSettings, TaskSettings

logger = logging.getLogger(__name__)

SAMPLINGS = ("patients", "images")


@dataclass
class _Pool:
    """The rows the headline probe was trained on, from which the subsets are drawn, and the test split."""

    layer: str
    kind: str
    classes: list[str]
    X_train: np.ndarray
    y_train: np.ndarray
    patients: np.ndarray  # per training row; a row without patient_id is its own patient
    strata: np.ndarray  # per training row (:func:`medprobe.probe.subsets._efficiency_strata`)
    X_test: np.ndarray
    ids_test: list[str]

    def present(self, y: np.ndarray) -> set[int]:
        """Classes with a training example in ``y`` (multilabel: findings with a positive)."""
        return set(np.flatnonzero(y.sum(0) > 0) if self.kind == "multilabel" else np.unique(y))


@dataclass
class _Sweep:
    probabilities: np.ndarray  # (fractions, seeds, N test, classes)
    n_train: np.ndarray  # (fractions, seeds)
    missing: dict[str, list[str]]  # "fraction=f,seed=s" -> classes the subset lacks


def efficiency_task(
    activations: str | os.PathLike,
    manifest: str | os.PathLike,
    summary: str | os.PathLike,
    out: str | os.PathLike,
    *,
    task: TaskSettings,
    probe: ProbeSettings,
    efficiency: EfficiencySettings,
    seed: int,
    device: str | torch.device | None = None,
) -> dict:
    """Label-efficiency sweep at the layer (and C) of the probe ``summary`` (probe.json); writes ``out``
    (efficiency.h5).

    The pool is the rows the headline probe was trained on (``probe.fit_rows``). For every subset seed
    (:meth:`medprobe.settings.EfficiencySettings.seed_list`), ``efficiency.sampling == "patients"`` draws
    nested patient subsets (:func:`nested_subsets`, stratified by each patient's majority class);
    ``"images"`` the authors' image-level subsets (:func:`image_subsets`). A probe of ``probe.mode`` is
    refitted on each and predicts the test split; the adam probe keeps ``seed`` (the headline probe's), so
    fraction 1.0 reproduces the headline probe. Classes missing from a subset are logged and recorded in
    the ``missing_classes`` attribute (JSON). Returns a summary of the sweep.
    """
    _check_kind(task.kind)
    _check_mode(probe.mode)
    if efficiency.sampling not in SAMPLINGS:
        raise ValueError(f"efficiency.sampling must be 'patients' or 'images', got {efficiency.sampling!r}")
    seeds = efficiency.seed_list(seed)
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    fractions = [float(f) for f in efficiency.fractions]
    layer, C = _headline(summary, probe.mode)
    pool = _pool(activations, manifest, task, probe, layer)
    sweep = _sweep(pool, probe, efficiency.sampling, fractions, seeds, C=C, seed=seed, device=device)
    write_probabilities(
        out,
        pool.ids_test,
        sweep.probabilities,
        datasets={"n_train": sweep.n_train},
        attrs={
            "fractions": np.asarray(fractions, dtype=np.float64),
            "seeds": np.asarray(seeds, dtype=np.int64),
            "classes": pool.classes,
            "kind": pool.kind,
            "layer": pool.layer,
            "C": C,
            "sampling": efficiency.sampling,
            "missing_classes": json.dumps(sweep.missing),
        },
    )
    return {
        "layer": pool.layer,
        "C": C,
        "fractions": fractions,
        "seeds": seeds,
        "n_train": sweep.n_train.tolist(),
        "sampling": efficiency.sampling,
        "missing_classes": sweep.missing,
    }


def _headline(summary: str | os.PathLike, mode: str) -> tuple[int | str, float]:
    """The headline probe's layer (as probe.json names it) and C (inf for the adam and sgd probes)."""
    probe_info = read_json(summary, "probe summary", keys=("layer", "C"))
    C = math.inf if probe_info["C"] is None else float(probe_info["C"])
    if mode == "regularised" and not math.isfinite(C):
        raise ValueError(
            f"probe file {summary} has no finite C (written by the adam or sgd probe?) but probe.mode is {mode!r}"
        )
    return probe_info["layer"], C


def _pool(
    activations: str | os.PathLike,
    manifest: str | os.PathLike,
    task: TaskSettings,
    probe: ProbeSettings,
    layer: int | str,
) -> _Pool:
    with Activations(activations, manifest) as source:
        layer = source.resolve(layer)
        features = source.read(layer)
    rows = source.manifest
    targets, classes, _ = task_targets(rows, task.as_dict(), os.fspath(manifest))
    masks = source.split_masks(need_val=False)
    fit_rows = masks["train"] | masks["val"] if probe.fit_rows == "train+val" else masks["train"]
    train_rows = np.flatnonzero(fit_rows)
    patients = rows["patient_id"].to_numpy()[train_rows].astype(object)
    no_patient = patients == ""
    patients[no_patient] = ["\x00image:" + i for i in rows["image_id"].to_numpy()[train_rows][no_patient]]
    return _Pool(
        layer=layer,
        kind=task.kind,
        classes=classes,
        X_train=features[train_rows],
        y_train=targets[train_rows],
        patients=patients,
        strata=_efficiency_strata(targets[train_rows], task.kind),
        X_test=features[masks["test"]],
        ids_test=rows["image_id"][masks["test"]].tolist(),
    )


def _subsets(pool: _Pool, sampling: str, fractions: list[float], subset_seed: int) -> list[np.ndarray]:
    if sampling == "patients":
        return nested_subsets(pool.patients, pool.strata, fractions, subset_seed)
    return image_subsets(len(pool.y_train), fractions, subset_seed)


def _sweep(
    pool: _Pool,
    probe: ProbeSettings,
    sampling: str,
    fractions: list[float],
    seeds: list[int],
    *,
    C: float,
    seed: int,
    device: str | torch.device | None,
) -> _Sweep:
    """Every (fraction, seed) subset's probe and its test probabilities; identical subsets are fitted once."""
    shape = (len(fractions), len(seeds))
    sweep = _Sweep(
        np.empty((*shape, len(pool.ids_test), len(pool.classes)), dtype=np.float32), np.zeros(shape, dtype=np.int64), {}
    )
    present_in_train = pool.present(pool.y_train)
    cache: dict[bytes, np.ndarray] = {}
    for s, subset_seed in enumerate(seeds):
        for f, subset in enumerate(_subsets(pool, sampling, fractions, subset_seed)):
            sweep.n_train[f, s] = int(subset.sum())
            y_subset = pool.y_train[subset]
            lost = sorted(present_in_train - pool.present(y_subset))
            if lost:
                names = [pool.classes[k] for k in lost]
                sweep.missing[f"fraction={fractions[f]:g},seed={subset_seed}"] = names
                logger.warning(
                    "efficiency subset fraction=%g seed=%d has no sample of %s", fractions[f], subset_seed, names
                )
            key = np.packbits(subset).tobytes()
            if key not in cache:
                fitted = fit_mode(
                    probe, pool.X_train[subset], y_subset, pool.kind, pool.classes, C=C, seed=seed, device=device
                )
                cache[key] = fitted.predict_proba(pool.X_test).astype(np.float32)
            sweep.probabilities[f, s] = cache[key]
    return sweep

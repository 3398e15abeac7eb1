"""A probe per layer of one model's activations on one task, the headline layer, and the probe's files."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medprobe.io import sha256_file
from medprobe.labels import task_targets
from medprobe.probe.files import Activations, write_json, write_layers, write_predictions
from medprobe.probe.modes import _check_mode, _n_outputs, fit_mode
from medprobe.probe.problem import (
    _PARAM_DTYPE,
    _check_kind,
    _normalise_class_weight,
    _prepare_targets,
    _resolve_dtype,
    _standardise,
    _warn_absent,
)
from medprobe.probe.selection import _check_grid, _proba_log_loss, _select, macro_auc
from medprobe.settings import ProbeSettings, TaskSettings

logger = logging.getLogger(__name__)


@dataclass
class _Plan:
    """What every layer's probe shares: the targets, the rows of each split and the headline layer if fixed."""

    kind: str
    classes: list[str]
    dropped: dict[str, int]
    masks: dict[str, np.ndarray]  # train, val, test, and fit: the rows the test-predicting probe trains on
    y: dict[str, np.ndarray]
    ids_test: list[str]
    fixed_layer: str | None
    need_val: bool


@dataclass
class _LayerResult:
    """One layer's probe: what chose it on validation and the probe that predicts the test split."""

    C: float
    val_score: float
    val_log_loss: float
    table: list[tuple[float, float]]
    final: Any


@dataclass
class _Layers:
    """Every layer's test probabilities ``(L, N, C)`` and its entry in probe.json's ``layers``."""

    names: list[str]
    probabilities: np.ndarray
    entries: list[dict]
    absent: list[str]  # classes without a training example (the same on every layer)


@dataclass
class _Choice:
    layer: str
    index: int
    validation_layer: str | None
    note: str | None


def probe_task(
    activations: str | os.PathLike,
    manifest: str | os.PathLike,
    *,
    predictions: str | os.PathLike,
    layers: str | os.PathLike,
    summary: str | os.PathLike,
    task: TaskSettings,
    probe: ProbeSettings,
    layer: int | str,
    seed: int,
    protocol: str | None,
    device: str | torch.device | None = None,
) -> dict:
    """Probe every layer of an activations file; write ``layers``, ``predictions`` and the ``summary``
    (probe.json) to the given paths (contract: docs/architecture.md, "Probes"). Returns the summary.

    ``probe.mode == "regularised"``: per layer (read one at a time) C is selected on the val split by a probe
    fitted on train; that probe predicts the test split, or with ``probe.refit`` a probe refitted at that C on
    train + val. ``"adam"`` / ``"sgd"`` (the authors' probes, :mod:`medprobe.probe.paper`): each layer's probe
    is trained on every non-test row (train + val); with ``layer="validation"`` a second probe per layer, on
    train alone, scores the val split to choose the layer. The headline layer is the best validation macro
    AUC (ties go to the shallower layer) when ``layer == "validation"``, otherwise the fixed layer (``i`` or
    ``hidden.i``, ``image_embeds``, ``authors:k``; :func:`medprobe.layers.resolve_layer`). ``task.classes``
    may be ``"all"`` (multilabel), and ``task.min_test_positives`` keeps findings with more test positives
    (:func:`medprobe.labels.task_targets`).
    """
    _check_settings(task, probe)
    with Activations(activations, manifest) as source:
        plan = _plan(source, task, probe, layer)
        fitted = _probe_layers(source, plan, probe, seed=seed, device=device)
        num_hidden_states = source.num_hidden_states
    choice = _choose_layer(plan, fitted, activations)
    val_scores = np.array([np.nan if r["val_score"] is None else r["val_score"] for r in fitted.entries])
    Cs = np.array([np.inf if r["C"] is None else r["C"] for r in fitted.entries], dtype=np.float64)
    write_layers(
        layers,
        plan.ids_test,
        fitted.probabilities,
        val_scores=val_scores,
        Cs=Cs,
        layer_names=fitted.names,
        classes=plan.classes,
        kind=plan.kind,
        num_hidden_states=num_hidden_states,
    )
    write_predictions(
        predictions,
        plan.ids_test,
        fitted.probabilities[choice.index],
        classes=plan.classes,
        layer=choice.layer,
        kind=plan.kind,
        C=float(Cs[choice.index]),
    )
    result = _summary(
        plan,
        fitted,
        choice,
        task=task,
        probe=probe,
        layer=layer,
        seed=seed,
        protocol=protocol,
        activations=activations,
        manifest=manifest,
    )
    write_json(summary, result)
    return result


def _check_settings(task: TaskSettings, probe: ProbeSettings) -> None:
    """Fail before any file is opened."""
    _check_kind(task.kind)
    _check_mode(probe.mode)
    _check_grid(probe.C_grid)
    _resolve_dtype(probe.dtype)


def _plan(source: Activations, task: TaskSettings, probe: ProbeSettings, layer: int | str) -> _Plan:
    fixed_layer = None if layer == "validation" else source.resolve(layer)
    targets, classes, dropped = task_targets(source.manifest, task.as_dict(), os.fspath(source.manifest_csv))
    if dropped:
        logger.info(
            "%d finding(s) with at most %d positive test images left out: %s",
            len(dropped),
            task.min_test_positives,
            dropped,
        )
    masks = source.split_masks()
    masks["fit"] = masks["train"] | masks["val"] if probe.fit_rows == "train+val" else masks["train"]
    return _Plan(
        kind=task.kind,
        classes=classes,
        dropped=dropped,
        masks=masks,
        y={split: targets[mask] for split, mask in masks.items()},
        ids_test=source.manifest["image_id"][masks["test"]].tolist(),
        fixed_layer=fixed_layer,
        need_val=probe.mode == "regularised" or fixed_layer is None,
    )


def _probe_layers(
    source: Activations, plan: _Plan, probe: ProbeSettings, *, seed: int, device: str | torch.device | None
) -> _Layers:
    target_device = torch.device(device) if device is not None else torch.device("cpu")
    names = source.layer_names
    probabilities = np.empty((len(names), len(plan.ids_test), len(plan.classes)), dtype=np.float32)
    entries: list[dict] = []
    for index, name in enumerate(names):
        features = source.read(name)
        X = {split: features[mask] for split, mask in plan.masks.items()}
        del features
        result = _probe_layer(X, plan, probe, seed=seed, device=target_device, warn_absent=index == 0)
        probabilities[index] = result.final.predict_proba(X["test"])
        entries.append(_layer_entry(name, result))
        logger.info("layer %s: C=%g val macro AUC=%.4f", name, result.C, result.val_score)
    absent = [plan.classes[k] for k in result.final.absent_classes]
    return _Layers(names, probabilities, entries, absent)


def _probe_layer(
    X: dict[str, np.ndarray],
    plan: _Plan,
    probe: ProbeSettings,
    *,
    seed: int,
    device: torch.device,
    warn_absent: bool,
) -> _LayerResult:
    """Fit one layer: ``X`` holds the ``train``, ``val``, ``test`` and ``fit`` rows of its features."""
    if probe.mode == "regularised":
        return _regularised_layer(X, plan, probe, device=device, warn_absent=warn_absent)
    options = dict(seed=seed, n_classes=_n_outputs(plan.kind, plan.classes), class_names=plan.classes, device=device)
    val_score = val_loss = math.nan
    if plan.need_val:
        trial = fit_mode(probe, X["train"], plan.y["train"], plan.kind, **options)
        val_probabilities = trial.predict_proba(X["val"])
        val_score = macro_auc(plan.y["val"], val_probabilities, plan.kind)
        val_loss = _proba_log_loss(plan.y["val"], val_probabilities, plan.kind)
    final = fit_mode(probe, X["fit"], plan.y["fit"], plan.kind, **options)
    return _LayerResult(math.inf, val_score, val_loss, [], final)


def _regularised_layer(
    X: dict[str, np.ndarray], plan: _Plan, probe: ProbeSettings, *, device: torch.device, warn_absent: bool
) -> _LayerResult:
    """C chosen on val by probes fitted on train; with ``refit`` the test probe is refitted on the fit rows."""
    n_classes = _n_outputs(plan.kind, plan.classes)
    class_weight = _normalise_class_weight(probe.class_weight)
    Z, mean, std = _standardise(X["train"][None], _resolve_dtype(probe.dtype), device)
    targets = _prepare_targets(
        plan.y["train"], Z.shape[1], plan.kind, n_classes, class_weight, None, _PARAM_DTYPE, device
    )
    selection = _select(
        Z,
        mean,
        std,
        targets,
        X["val"],
        plan.y["val"],
        probe.C_grid,
        refine=probe.refine,
        refine_points=5,
        max_iter=probe.max_iter,
        tol=probe.tol,
        class_weight=class_weight,
    )
    del Z
    if warn_absent:
        _warn_absent(targets, plan.classes)
    final = selection.probe
    if probe.refit:
        final = fit_mode(
            probe,
            X["fit"],
            plan.y["fit"],
            plan.kind,
            C=selection.C,
            n_classes=n_classes,
            class_names=plan.classes,
            device=device,
        )
    return _LayerResult(selection.C, selection.val_auc, selection.val_log_loss, selection.table, final)


def _json_number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _layer_entry(name: str, result: _LayerResult) -> dict:
    return {
        "name": name,
        "C": _json_number(result.C),
        "val_score": _json_number(result.val_score),
        "val_log_loss": _json_number(result.val_log_loss),
        "n_iter": int(result.final.n_iter),
        "converged": bool(result.final.converged),
        "C_tried": [[c, _json_number(v)] for c, v in result.table],
    }


def _choose_layer(plan: _Plan, fitted: _Layers, source: Any) -> _Choice:
    validation_layer, note = _validation_layer(fitted.entries, fitted.names, source)
    selected = plan.fixed_layer if plan.fixed_layer is not None else validation_layer
    return _Choice(selected, fitted.names.index(selected), validation_layer, note)


def _validation_layer(per_layer: list[dict], layer_names: list[str], source: Any) -> tuple[str | None, str | None]:
    """The best validation macro AUC (ties -> the shallower layer); by log-loss when no AUC is defined."""
    val_scores = np.array([np.nan if r["val_score"] is None else r["val_score"] for r in per_layer])
    if np.isfinite(val_scores).any():
        return layer_names[int(np.argmax(np.where(np.isfinite(val_scores), val_scores, -np.inf)))], None
    losses = np.array([np.inf if r["val_log_loss"] is None else r["val_log_loss"] for r in per_layer])
    if not np.isfinite(losses).any():
        return None, None  # nothing was scored on validation (fixed layer, adam/sgd)
    note = (
        "validation macro AUC undefined on every layer (a class lacks val positives or negatives); "
        "selected by validation log-loss"
    )
    logger.warning("%s: %s", source, note)
    return layer_names[int(np.argmin(losses))], note


def _summary(
    plan: _Plan,
    fitted: _Layers,
    choice: _Choice,
    *,
    task: TaskSettings,
    probe: ProbeSettings,
    layer: int | str,
    seed: int,
    protocol: str | None,
    activations: str | os.PathLike,
    manifest: str | os.PathLike,
) -> dict:
    """probe.json: the headline layer and how it was chosen, every layer's entry, and the settings."""
    result = {
        "layer": choice.layer,
        "selection": "fixed" if plan.fixed_layer is not None else "validation",
        "requested_layer": layer if isinstance(layer, str) else int(layer),
        "validation_layer": choice.validation_layer,
        "C": fitted.entries[choice.index]["C"],
        "val_score": fitted.entries[choice.index]["val_score"],
        "val_metric": "macro_auc",
        "protocol": protocol,
        "kind": plan.kind,
        "classes": plan.classes,
        "dropped_classes": plan.dropped,
        "layers": fitted.entries,
        "n_train": int(plan.masks["fit"].sum()),
        "n_val": int(plan.masks["val"].sum()),
        "n_test": int(plan.masks["test"].sum()),
        "fit_rows": probe.fit_rows,
        "absent_train_classes": fitted.absent,
        "activations": os.fspath(activations),
        "manifest": os.fspath(manifest),
        "manifest_sha256": sha256_file(manifest),
        "settings": _settings_record(task, probe, seed),
    }
    if choice.note:
        result["note"] = choice.note
    return result


def _settings_record(task: TaskSettings, probe: ProbeSettings, seed: int) -> dict:
    settings = {
        "mode": probe.mode,
        "seed": int(seed),
        "dtype": str(_resolve_dtype(probe.dtype)).replace("torch.", ""),
        "min_test_positives": int(task.min_test_positives),
    }
    if probe.mode == "regularised":
        settings.update(
            {
                "C_grid": [float(c) for c in _check_grid(probe.C_grid)],
                "refine": bool(probe.refine),
                "refit": bool(probe.refit),
                "max_iter": int(probe.max_iter),
                "tol": float(probe.tol),
                "class_weight": probe.class_weight or "none",
            }
        )
    else:
        settings[probe.mode] = dataclasses.asdict(probe.adam if probe.mode == "adam" else probe.sgd)
    return settings

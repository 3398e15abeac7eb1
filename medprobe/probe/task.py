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

from medprobe.labels import task_targets
from medprobe.probe.files import Activations, write_json, write_probabilities
from medprobe.probe.modes import _check_mode, _regularised_options, fit_mode
from medprobe.probe.problem import FitOptions, _check_kind, _prepare, _resolve_dtype, _warn_absent
from medprobe.probe.selection import _check_grid, _proba_log_loss, _search_C, macro_auc
from medprobe.settings import ProbeSettings, TaskSettings

logger = logging.getLogger(__name__)


@dataclass
class _Plan:
    """What every layer's probe shares: the targets, the rows of each split, the headline layer if fixed, and
    the facts of the activations file that the outputs record."""

    kind: str
    classes: list[str]
    dropped: dict[str, int]
    masks: dict[str, np.ndarray]  # train, val, test, and fit: the rows the test-predicting probe trains on
    fit_rows: str  # what the fit rows are: "train" or "train+val"
    y: dict[str, np.ndarray]
    ids_test: list[str]
    fixed_layer: str | None
    need_val: bool
    num_hidden_states: Any
    inputs: dict[str, str]  # activations, manifest and the manifest's sha256, as probe.json records them


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

    def values(self, key: str, missing: float) -> np.ndarray:
        """Every layer's entry ``key`` as float64, ``missing`` where the entry has none (JSON null)."""
        return np.array([missing if entry[key] is None else entry[key] for entry in self.entries], dtype=np.float64)


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
    fitted on train, which predicts the test split (with ``probe.refit``: a probe refitted at that C on train
    + val). ``"adam"`` / ``"sgd"`` (:mod:`medprobe.probe.paper`): each layer's probe is trained on train + val;
    with ``layer="validation"`` a second one, on train, scores the val split. The headline layer is the best
    validation macro AUC (ties: the shallower layer) when ``layer == "validation"``, else the fixed layer
    (:func:`medprobe.layers.resolve_layer`). Targets: :func:`medprobe.labels.task_targets`.
    """
    _check_settings(task, probe)
    with Activations(activations, manifest) as source:
        plan = _plan(source, task, probe, layer)
        fitted = _probe_layers(source, plan, probe, seed=seed, device=device)
    choice = _choose_layer(plan, fitted, activations)
    _write_probabilities(plan, fitted, choice, layers=layers, predictions=predictions)
    result = _summary(
        plan, fitted, choice, requested=layer, protocol=protocol, settings=_settings_record(task, probe, seed)
    )
    write_json(summary, result)
    return result


def _write_probabilities(
    plan: _Plan, fitted: _Layers, choice: _Choice, *, layers: str | os.PathLike, predictions: str | os.PathLike
) -> None:
    """``layers.h5`` (every layer's test probabilities, validation score and C) and ``predictions.h5`` (the
    headline layer's)."""
    Cs = fitted.values("C", np.inf)
    attrs: dict[str, Any] = {"layer_names": fitted.names, "classes": plan.classes, "kind": plan.kind}
    if plan.num_hidden_states is not None:
        attrs["num_hidden_states"] = int(plan.num_hidden_states)
    datasets = {"val_score": fitted.values("val_score", np.nan), "C": Cs}
    write_probabilities(layers, plan.ids_test, fitted.probabilities, datasets=datasets, attrs=attrs)
    attrs = {"classes": plan.classes, "layer": choice.layer, "kind": plan.kind, "C": float(Cs[choice.index])}
    write_probabilities(predictions, plan.ids_test, fitted.probabilities[choice.index], attrs=attrs)


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
        fit_rows=probe.fit_rows,
        y={split: targets[mask] for split, mask in masks.items()},
        ids_test=source.manifest["image_id"][masks["test"]].tolist(),
        fixed_layer=fixed_layer,
        need_val=probe.mode == "regularised" or fixed_layer is None,
        num_hidden_states=source.num_hidden_states,
        inputs={
            "activations": os.fspath(source.path),
            "manifest": os.fspath(source.manifest_csv),
            "manifest_sha256": source.manifest_sha256,
        },
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
    val_score = val_loss = math.nan
    if plan.need_val:
        trial = fit_mode(probe, X["train"], plan.y["train"], plan.kind, plan.classes, seed=seed, device=device)
        val_probabilities = trial.predict_proba(X["val"])
        val_score = macro_auc(plan.y["val"], val_probabilities, plan.kind)
        val_loss = _proba_log_loss(plan.y["val"], val_probabilities, plan.kind)
    final = fit_mode(probe, X["fit"], plan.y["fit"], plan.kind, plan.classes, seed=seed, device=device)
    return _LayerResult(math.inf, val_score, val_loss, [], final)


def _regularised_layer(
    X: dict[str, np.ndarray], plan: _Plan, probe: ProbeSettings, *, device: torch.device, warn_absent: bool
) -> _LayerResult:
    """C chosen on val by probes fitted on train; with ``refit`` the test probe is refitted on the fit rows."""
    options = FitOptions(**_regularised_options(probe, plan.kind, plan.classes, device))
    problem = _prepare(X["train"][None], plan.y["train"], plan.kind, options)
    selection = _search_C(problem, X["val"], plan.y["val"], probe.C_grid, refine=probe.refine, options=options)
    del problem
    if warn_absent:
        _warn_absent(plan.kind, selection.probe.absent_classes, plan.classes)
    final = selection.probe
    if probe.refit:
        final = fit_mode(probe, X["fit"], plan.y["fit"], plan.kind, plan.classes, C=selection.C, device=device)
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
    validation_layer, note = _validation_layer(fitted, source)
    selected = plan.fixed_layer if plan.fixed_layer is not None else validation_layer
    return _Choice(selected, fitted.names.index(selected), validation_layer, note)


def _validation_layer(fitted: _Layers, source: Any) -> tuple[str | None, str | None]:
    """The best validation macro AUC (ties -> the shallower layer); by log-loss when no AUC is defined."""
    layer_names = fitted.names
    val_scores = fitted.values("val_score", np.nan)
    if np.isfinite(val_scores).any():
        return layer_names[int(np.argmax(np.where(np.isfinite(val_scores), val_scores, -np.inf)))], None
    losses = fitted.values("val_log_loss", np.inf)
    if not np.isfinite(losses).any():
        return None, None  # nothing was scored on validation (fixed layer, adam/sgd)
    note = (
        "validation macro AUC undefined on every layer (a class lacks val positives or negatives); "
        "selected by validation log-loss"
    )
    logger.warning("%s: %s", source, note)
    return layer_names[int(np.argmin(losses))], note


def _summary(
    plan: _Plan, fitted: _Layers, choice: _Choice, *, requested: int | str, protocol: str | None, settings: dict
) -> dict:
    """probe.json: the headline layer and how it was chosen, every layer's entry, and the settings."""
    result = {
        "layer": choice.layer,
        "selection": "fixed" if plan.fixed_layer is not None else "validation",
        "requested_layer": requested if isinstance(requested, str) else int(requested),
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
        "fit_rows": plan.fit_rows,
        "absent_train_classes": fitted.absent,
        **plan.inputs,
        "settings": settings,
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

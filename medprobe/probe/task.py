"""A probe per layer of one model's activations on one task, the headline layer, and the probe's files."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medprobe.labels import task_targets
from medprobe.probe.files import Activations, write_json, write_probabilities
from medprobe.probe.modes import _check_mode, _regularised_options, fit_mode
from medprobe.probe.problem import FitOptions, _check_kind, _prepare, _resolve_dtype, _warn_absent
from medprobe.probe.selection import _check_grid, _proba_log_loss, _search_C_layers, macro_auc
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
    layer_batch: int | str = 1,
) -> dict:
    """Probe every layer of an activations file; write ``layers``, ``predictions`` and the ``summary``
    (probe.json) to the given paths (contract: docs/architecture.md, "Probes"). Returns the summary.

    ``probe.mode == "regularised"``: per layer (read one at a time) C is selected on the val split by a probe
    fitted on train, which predicts the test split (with ``probe.refit``: a probe refitted at that C on train
    + val). ``"adam"`` / ``"sgd"`` (:mod:`medprobe.probe.paper`): each layer's probe is trained on train + val;
    with ``layer="validation"`` a second one, on train, scores the val split. The headline layer is the best
    validation macro AUC (ties: the shallower layer) when ``layer == "validation"``, else the fixed layer
    (:func:`medprobe.layers.resolve_layer`). Targets: :func:`medprobe.labels.task_targets`.

    ``device`` is where the probes are fitted (None: the CPU). ``layer_batch`` layers (``"auto"``: see
    :func:`layer_batch_size`) have their C searches fitted together in one lockstep solve; each layer's result
    does not depend on it. The next layers are read from the HDF5 while the current ones are fitted.
    """
    _check_settings(task, probe)
    with Activations(activations, manifest) as source:
        plan = _plan(source, task, probe, layer)
        target = torch.device(device) if device is not None else torch.device("cpu")
        batch = layer_batch_size(layer_batch, source, plan, probe, target)
        logger.info("%s: fitting %d layer(s) on %s, %d per solve", activations, len(source.layer_names), target, batch)
        fitted = _probe_layers(source, plan, probe, seed=seed, device=target, layer_batch=batch)
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


def layer_batch_size(
    layer_batch: int | str, source: Activations, plan: _Plan, probe: ProbeSettings, device: torch.device
) -> int:
    """How many layers are fitted together: ``layer_batch`` itself, or for ``"auto"`` 1 on the CPU (batching
    layers gains nothing there and multiplies the memory) and on a CUDA device as many layers as half of its
    free memory holds, each layer counted as its standardised training features plus its validation and test
    rows. Only the regularised probe's C search batches layers."""
    if layer_batch != "auto":
        if isinstance(layer_batch, bool) or not isinstance(layer_batch, int) or layer_batch < 1:
            raise ValueError(f"probe.layer_batch must be a positive integer or 'auto', got {layer_batch!r}")
        return layer_batch
    if device.type != "cuda" or probe.mode != "regularised":
        return 1
    n_rows = int(plan.masks["train"].sum() + plan.masks["val"].sum() + plan.masks["test"].sum())
    width = int(source.handle["activations"].shape[2])
    bytes_per_layer = n_rows * width * torch.tensor([], dtype=_resolve_dtype(probe.dtype)).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    batch = max(1, min(len(source.layer_names), int(0.5 * free // max(bytes_per_layer, 1))))
    logger.info("probe.layer_batch auto: %d layer(s) per solve (%.1f GB free on %s)", batch, free / 1e9, device)
    return batch


def _layer_groups(widths: list[int], size: int) -> list[list[int]]:
    """Consecutive layer indices in groups of at most ``size``, a group never mixing feature widths (the
    projected ``image_embeds`` is narrower than the hidden states)."""
    groups: list[list[int]] = []
    for index, width in enumerate(widths):
        if groups and len(groups[-1]) < size and widths[groups[-1][0]] == width:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def _read_group(source: Activations, plan: _Plan, names: list[str], group: list[int]) -> list[dict[str, np.ndarray]]:
    """The split rows (``plan.masks``) of each layer of ``group``."""
    rows = []
    for index in group:
        features = source.read(names[index])
        rows.append({split: features[mask] for split, mask in plan.masks.items()})
    return rows


def _prefetched_groups(source: Activations, plan: _Plan, names: list[str], groups: list[list[int]]):
    """Yield ``(group, its layers' rows)``; the next group is read in a background thread meanwhile (h5py
    reads while torch, which releases the GIL, fits)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medprobe-read") as pool:
        pending = pool.submit(_read_group, source, plan, names, groups[0]) if groups else None
        for position, group in enumerate(groups):
            rows = pending.result()
            pending = (
                pool.submit(_read_group, source, plan, names, groups[position + 1])
                if position + 1 < len(groups)
                else None
            )
            yield group, rows


def _probe_layers(
    source: Activations,
    plan: _Plan,
    probe: ProbeSettings,
    *,
    seed: int,
    device: torch.device,
    layer_batch: int = 1,
) -> _Layers:
    names = source.layer_names
    probabilities = np.empty((len(names), len(plan.ids_test), len(plan.classes)), dtype=np.float32)
    entries: list[dict] = []
    absent: tuple[int, ...] = ()
    for group, rows in _prefetched_groups(
        source, plan, names, _layer_groups([source.width(name) for name in names], layer_batch)
    ):
        first = group[0] == 0
        if probe.mode == "regularised":
            results = _regularised_layers(rows, plan, probe, device=device, warn_absent=first)
        else:
            results = [_paper_layer(X, plan, probe, seed=seed, device=device) for X in rows]
        for index, X, result in zip(group, rows, results):
            probabilities[index] = result.final.predict_proba(X["test"])
            entries.append(_layer_entry(names[index], result))
            absent = result.final.absent_classes
            logger.info("layer %s: C=%g val macro AUC=%.4f", names[index], result.C, result.val_score)
    return _Layers(names, probabilities, entries, [plan.classes[k] for k in absent])


def _paper_layer(
    X: dict[str, np.ndarray], plan: _Plan, probe: ProbeSettings, *, seed: int, device: torch.device
) -> _LayerResult:
    """One layer's adam or sgd probe (``X``: the layer's ``train``, ``val``, ``test`` and ``fit`` rows); with a
    layer chosen on validation, a second probe fitted on train scores the val split."""
    val_score = val_loss = math.nan
    if plan.need_val:
        trial = fit_mode(probe, X["train"], plan.y["train"], plan.kind, plan.classes, seed=seed, device=device)
        val_probabilities = trial.predict_proba(X["val"])
        val_score = macro_auc(plan.y["val"], val_probabilities, plan.kind)
        val_loss = _proba_log_loss(plan.y["val"], val_probabilities, plan.kind)
    final = fit_mode(probe, X["fit"], plan.y["fit"], plan.kind, plan.classes, seed=seed, device=device)
    return _LayerResult(math.inf, val_score, val_loss, [], final)


def _regularised_layers(
    rows: list[dict[str, np.ndarray]], plan: _Plan, probe: ProbeSettings, *, device: torch.device, warn_absent: bool
) -> list[_LayerResult]:
    """Layers fitted together: each layer's C chosen on val by probes fitted on train (one lockstep search over
    all of them, :func:`medprobe.probe.selection._search_C_layers`); with ``refit`` each test probe is
    refitted on the fit rows at its layer's C."""
    options = FitOptions(**_regularised_options(probe, plan.kind, plan.classes, device))
    train = rows[0]["train"][None] if len(rows) == 1 else np.stack([X["train"] for X in rows])
    problem = _prepare(train, plan.y["train"], plan.kind, options)
    del train
    selections = _search_C_layers(
        problem, [X["val"] for X in rows], plan.y["val"], probe.C_grid, refine=probe.refine, options=options
    )
    del problem
    if warn_absent:
        _warn_absent(plan.kind, selections[0].probe.absent_classes, plan.classes)
    results = []
    for X, selection in zip(rows, selections):
        final = selection.probe
        if probe.refit:
            final = fit_mode(probe, X["fit"], plan.y["fit"], plan.kind, plan.classes, C=selection.C, device=device)
        results.append(_LayerResult(selection.C, selection.val_auc, selection.val_log_loss, selection.table, final))
    return results


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

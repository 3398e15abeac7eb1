"""Tests for medprobe.labels and medprobe.probe, checked against scikit-learn and direct computations."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from medprobe.labels import encode_targets, load_manifest
from medprobe.probe import (
    efficiency_task,
    fit,
    fit_adam,
    fit_layers,
    fit_sgd,
    image_subsets,
    log_loss,
    macro_auc,
    nested_subsets,
    probe_task,
    select_C,
)
from medprobe.probe.lbfgs import _drive, _LayerFeatures, _LayerObjective, _lbfgs, _line_search
from medprobe.probe.problem import _initial_parameters, _prepare_targets
from medprobe.settings import AdamSettings, EfficiencySettings, ProbeSettings, SGDSettings, TaskSettings


@pytest.fixture(autouse=True)
def _one_thread():
    # The test machine is shared; one thread keeps these small problems fast and polite.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_data(kind: str, n: int, d: int, n_out: int, seed: int, noise: float = 1.0):
    """Separable-but-noisy synthetic data with non-zero feature means and unequal scales."""
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.3, 4.0, size=d)
    offsets = rng.normal(scale=5.0, size=d)
    latent = rng.normal(size=(n, d))
    W = rng.normal(size=(d, n_out)) * 1.5
    scores = latent @ W + noise * rng.logistic(size=(n, n_out))
    X = latent * scales + offsets
    if kind == "multiclass":
        y = scores.argmax(1)
    elif kind == "binary":
        y = (scores[:, 0] > 0).astype(np.int64)
    else:
        y = (scores > 0.5).astype(np.uint8)
    return X, y


def sklearn_reference(X_train, y_train, kind, C, **kwargs):
    """scikit-learn models on train-standardised features (multilabel: one per finding)."""
    scaler = StandardScaler().fit(X_train)
    Z = scaler.transform(X_train)
    if kind == "multilabel":
        models = [
            LogisticRegression(C=C, tol=1e-8, max_iter=5000, **kwargs).fit(Z, y_train[:, k])
            for k in range(y_train.shape[1])
        ]
    else:
        models = [LogisticRegression(C=C, tol=1e-8, max_iter=5000, **kwargs).fit(Z, y_train)]
    return scaler, models


def sklearn_proba(scaler, models, X, kind):
    Z = scaler.transform(X)
    if kind == "multilabel":
        return np.column_stack([m.predict_proba(Z)[:, 1] for m in models])
    return models[0].predict_proba(Z)


def sklearn_metrics(y, proba, kind):
    """(macro AUC, log-loss) computed with sklearn.metrics directly."""
    if kind == "binary":
        return roc_auc_score(y, proba[:, 1]), sk_log_loss(y, proba, labels=[0, 1])
    if kind == "multiclass":
        return roc_auc_score(y, proba, multi_class="ovr", average="macro"), sk_log_loss(
            y, proba, labels=np.arange(proba.shape[1])
        )
    aucs = [roc_auc_score(y[:, k], proba[:, k]) for k in range(y.shape[1])]
    losses = [sk_log_loss(y[:, k], proba[:, k], labels=[0, 1]) for k in range(y.shape[1])]
    return float(np.mean(aucs)), float(np.mean(losses))


# --------------------------------------------------------------------------------------------------
# Agreement with scikit-learn
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,n_out", [("binary", 1), ("multiclass", 4), ("multilabel", 3)])
def test_fit_matches_sklearn(kind, n_out):
    X, y = make_data(kind, 500, 12, n_out, seed=1)
    X_train, y_train, X_test, y_test = X[:300], y[:300], X[300:], y[300:]
    C = 0.3
    probe = fit(X_train, y_train, kind, C, max_iter=1000, tol=1e-8, n_classes=n_out if kind == "multiclass" else None)
    scaler, models = sklearn_reference(X_train, y_train, kind, C)
    assert probe.converged

    coef_ref = np.vstack([m.coef_ for m in models])
    intercept_ref = np.concatenate([m.intercept_ for m in models])
    assert probe.coef.shape == coef_ref.shape
    np.testing.assert_allclose(probe.coef, coef_ref, atol=2e-5)
    np.testing.assert_allclose(probe.intercept, intercept_ref, atol=2e-5)

    ours = probe.predict_proba(X_test)
    ref = sklearn_proba(scaler, models, X_test, kind)
    assert ours.shape == ((len(X_test), 2) if kind == "binary" else ref.shape)
    auc_ours, loss_ours = sklearn_metrics(y_test, ours, kind)
    auc_ref, loss_ref = sklearn_metrics(y_test, ref, kind)
    assert abs(auc_ours - auc_ref) < 0.002
    assert abs(loss_ours - loss_ref) < 1e-3
    # Our own metric helpers agree with sklearn.metrics.
    assert macro_auc(y_test, ours, kind) == pytest.approx(auc_ours, abs=1e-12)
    assert log_loss(probe, X_test, y_test) == pytest.approx(loss_ours, abs=1e-9)


def test_class_and_sample_weights_match_sklearn():
    X, y = make_data("multiclass", 300, 8, 3, seed=2)
    # Imbalance so that 'balanced' matters.
    keep = (y != 2) | (np.arange(len(y)) % 4 == 0)
    X, y = X[keep], y[keep]
    weights = np.random.default_rng(3).uniform(0.2, 2.0, size=len(y))
    probe = fit(X, y, "multiclass", 0.5, max_iter=1000, tol=1e-8, class_weight="balanced", sample_weight=weights)
    Z = StandardScaler().fit_transform(X)
    ref = LogisticRegression(C=0.5, tol=1e-8, max_iter=5000, class_weight="balanced").fit(Z, y, sample_weight=weights)
    np.testing.assert_allclose(probe.coef, ref.coef_, atol=2e-5)
    np.testing.assert_allclose(probe.intercept, ref.intercept_, atol=2e-5)


def test_float32_close_to_float64():
    X, y = make_data("multiclass", 300, 10, 3, seed=4)
    exact = fit(X, y, "multiclass", 0.2, tol=1e-8, max_iter=1000)
    single = fit(X.astype(np.float32), y, "multiclass", 0.2, dtype="float32")
    np.testing.assert_allclose(single.predict_proba(X), exact.predict_proba(X), atol=1e-3)


@pytest.mark.parametrize("kind,n_out", [("binary", 1), ("multiclass", 4), ("multilabel", 3)])
def test_workflow_default_precision_matches_sklearn(kind, n_out):
    """The workflow's default probe.dtype (float32 features, float64 parameters and loss) keeps the
    agreement with scikit-learn: test macro AUC within 0.002 and log-loss within 1e-3."""
    from pathlib import Path

    import yaml

    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    dtype = schema["properties"]["probe"]["properties"]["dtype"]["default"]
    assert dtype == "float32"
    X, y = make_data(kind, 800, 40, n_out, seed=7)
    X = X + 0.5 * X[:, :1]  # correlated, offset features: float32 rounding of the standardised copy matters
    X_train, y_train, X_test, y_test = X[:500], y[:500], X[500:], y[500:]
    probe = fit(
        X_train.astype(np.float32), y_train, kind, 0.5, dtype=dtype, n_classes=n_out if kind == "multiclass" else None
    )
    assert probe.converged
    scaler, models = sklearn_reference(X_train, y_train, kind, 0.5)
    auc_ours, loss_ours = sklearn_metrics(y_test, probe.predict_proba(X_test.astype(np.float32)), kind)
    auc_ref, loss_ref = sklearn_metrics(y_test, sklearn_proba(scaler, models, X_test, kind), kind)
    assert abs(auc_ours - auc_ref) < 0.002
    assert abs(loss_ours - loss_ref) < 1e-3


def test_standardisation_uses_train_statistics_only():
    X, y = make_data("binary", 200, 6, 1, seed=5)
    X[:, 2] = 7.25  # constant column: std must become 1, not 0
    X_train, y_train = X[:120], y[:120]
    X_test = X[120:] * 3.0 + 100.0  # wildly different test distribution must not leak in
    probe = fit(X_train, y_train, "binary", 1.0)
    np.testing.assert_allclose(probe.mean, X_train.mean(0), rtol=1e-12, atol=1e-12)
    expected_std = X_train.std(0)
    expected_std[2] = 1.0
    np.testing.assert_allclose(probe.std, expected_std, rtol=1e-12)
    # predict_proba = sigmoid(((x - train mean) / train std) . coef + intercept), computed directly.
    logits = ((X_test - X_train.mean(0)) / expected_std) @ probe.coef[0] + probe.intercept[0]
    p = 1.0 / (1.0 + np.exp(-logits))
    np.testing.assert_allclose(probe.predict_proba(X_test), np.column_stack([1 - p, p]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("as_tensor,dtype", [(False, "float64"), (True, "float64"), (True, "float32")])
def test_fit_leaves_its_input_unchanged(as_tensor, dtype):
    X, y = make_data("multiclass", 300, 5, 3, seed=2)
    X = torch.from_numpy(X).to(getattr(torch, dtype)) if as_tensor else X
    before = X.clone() if as_tensor else X.copy()
    fit(X, y, "multiclass", 0.5, dtype=dtype)
    assert (X == before).all()


def test_fit_layers_equals_per_layer_fits():
    rng = np.random.default_rng(6)
    X, y = make_data("multiclass", 250, 9, 3, seed=6)
    layers = np.stack([X, X[:, ::-1] * 2.0 + 1.0, rng.normal(size=X.shape)])
    Cs = [0.05, 1.0, 0.3]
    batched = fit_layers(layers, y, "multiclass", Cs, max_iter=2000, tol=1e-9)
    assert len(batched) == 3
    for layer, C, probe in zip(layers, Cs, batched):
        single = fit(layer, y, "multiclass", C, max_iter=2000, tol=1e-9)
        assert probe.C == C
        np.testing.assert_allclose(probe.coef, single.coef, atol=1e-6)
        np.testing.assert_allclose(probe.intercept, single.intercept, atol=1e-6)
    # Torch input (the CUDA path takes the same route) gives the same models.
    from_tensor = fit_layers(torch.from_numpy(layers), torch.from_numpy(y), "multiclass", Cs, max_iter=2000, tol=1e-9)
    np.testing.assert_allclose(from_tensor[1].coef, batched[1].coef, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_products_equal_plain_matrix_products(dtype, threads):
    # 1037 rows: the row blocks leave a remainder that takes the plain path.
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    Z = torch.randn(1037, 33, generator=generator, dtype=torch.float64)
    M = torch.randn(4, 33, generator=generator, dtype=torch.float64)
    R = torch.randn(4, 1037, generator=generator, dtype=torch.float64)
    features = _LayerFeatures(Z.to(dtype))
    assert features.blocks.shape[0] == 2 * threads and features.rest.shape[0] > 0
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(features.logits(M), M @ Z.T, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(features.gradient(R), R @ Z, atol=tolerance, rtol=tolerance)
    assert features.logits(M).dtype == torch.float64


def _direct_objective(kind, logits, targets_np, weights, inv_C, W):
    """The scaled objective written with torch.nn.functional, for autograd."""
    if kind == "multiclass":
        data = (
            F.cross_entropy(logits.T, torch.as_tensor(targets_np), reduction="none") * weights
        ).sum() / weights.sum()
        return data + 0.5 * inv_C / weights.sum() * W.square().sum()
    values = torch.as_tensor(targets_np, dtype=torch.float64).T
    data = (F.binary_cross_entropy_with_logits(logits, values, reduction="none") * weights).sum(1) / weights.sum()
    return data.sum() + 0.5 * inv_C / weights.sum() * W.square().sum()


@pytest.mark.parametrize("kind,n_out", [("binary", 1), ("multiclass", 4), ("multilabel", 3)])
def test_line_search_value_slope_and_curvature_match_autograd(kind, n_out):
    X, y = make_data(kind, 200, 6, n_out, seed=11)
    targets = _prepare_targets(
        y, 200, kind, n_out if kind != "binary" else None, None, None, torch.float64, torch.device("cpu")
    )
    K = targets.n_outputs
    Z = torch.as_tensor((X - X.mean(0)) / X.std(0))
    objective = _LayerObjective(targets, torch.tensor(1 / 0.7, dtype=torch.float64))
    generator = torch.Generator().manual_seed(1)
    W, DW = (
        torch.randn(K, 6, generator=generator, dtype=torch.float64),
        torch.randn(K, 6, generator=generator, dtype=torch.float64),
    )
    b, Db = (
        torch.randn(K, generator=generator, dtype=torch.float64),
        torch.randn(K, generator=generator, dtype=torch.float64),
    )
    logits, direction_logits = W @ Z.T + b[:, None], DW @ Z.T + Db[:, None]
    weights = torch.ones(200, dtype=torch.float64)
    labels = y if kind != "binary" else y[:, None]

    def phi(step):
        return _direct_objective(
            kind, (W + step * DW) @ Z.T + (b + step * Db)[:, None], labels, weights, 1 / 0.7, W + step * DW
        )

    step = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    value = phi(step)
    (slope,) = torch.autograd.grad(value, step, create_graph=True)
    (curvature,) = torch.autograd.grad(slope, step)
    data, residual, probabilities = objective.data(logits + 0.3 * direction_logits)
    ours_value = data + objective.penalty(W + 0.3 * DW)
    ours_slope = (residual * direction_logits).sum() + (objective.reg * ((W + 0.3 * DW) * DW).sum(1)).sum()
    ours_curvature = objective.curvature(probabilities, direction_logits) + (objective.reg * DW.square().sum(1)).sum()
    assert float(ours_value) == pytest.approx(float(value.detach()), rel=1e-12)
    assert float(ours_slope) == pytest.approx(float(slope.detach()), rel=1e-10)
    assert float(ours_curvature) == pytest.approx(float(curvature), rel=1e-10)

    # Whatever the first trial step, the accepted one meets the strong Wolfe conditions (checked directly).
    with torch.no_grad():
        start_value = float(phi(torch.tensor(0.0, dtype=torch.float64)))
    step0 = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    (start_slope,) = torch.autograd.grad(phi(step0), step0)
    if start_slope > 0:  # make it a descent direction
        DW, Db, direction_logits, start_slope = -DW, -Db, -direction_logits, -start_slope
    for first in (1e-6, 1.0, 1e3):
        found = _line_search(
            objective,
            logits,
            direction_logits,
            W,
            DW,
            torch.tensor(start_value, dtype=torch.float64),
            float(start_slope),
            first,
        )
        assert found is not None
        accepted = torch.tensor(found[0], dtype=torch.float64, requires_grad=True)
        accepted_value = phi(accepted)
        (accepted_slope,) = torch.autograd.grad(accepted_value, accepted)
        assert float(accepted_value.detach()) <= start_value + 1e-4 * found[0] * float(start_slope)
        assert abs(float(accepted_slope)) <= 0.9 * abs(float(start_slope))
        assert float(found[1]) == pytest.approx(float(accepted_value.detach()), rel=1e-12)


@pytest.mark.parametrize("kind,n_out", [("multiclass", 4), ("multilabel", 3)])
def test_c_values_solved_together_equal_separate_fits_and_share_passes(kind, n_out, monkeypatch):
    X, y = make_data(kind, 400, 10, n_out, seed=9)
    Cs = [0.01, 0.3, 10.0]
    targets = _prepare_targets(y, 400, kind, n_out, None, None, torch.float64, torch.device("cpu"))
    Z = torch.as_tensor((X - X.mean(0)) / X.std(0))
    W0, b0 = (v[0] for v in _initial_parameters(targets, 1, 10, torch.float64, torch.device("cpu")))

    def solver(C):
        return _lbfgs(_LayerObjective(targets, torch.tensor(1 / C, dtype=torch.float64)), W0, b0, 2000, 1e-9)

    calls = []
    original = _LayerFeatures.logits
    monkeypatch.setattr(_LayerFeatures, "logits", lambda self, M: calls.append(M.shape[0]) or original(self, M))
    alone = [_drive([_LayerFeatures(Z)], [(0, solver(C))])[0] for C in Cs]
    calls_alone = len(calls)
    calls.clear()
    together = _drive([_LayerFeatures(Z)], [(0, solver(C)) for C in Cs])
    for single, joint in zip(alone, together):
        assert joint.n_iter == single.n_iter and joint.budget_spent == single.budget_spent
        torch.testing.assert_close(joint.W, single.W, atol=1e-9, rtol=0)
        torch.testing.assert_close(joint.b, single.b, atol=1e-9, rtol=0)
    # One stacked product per round: as many rounds as the longest solve needs, not the sum of all.
    assert len(calls) == max(s.n_iter for s in alone) + 2 < calls_alone
    assert calls[0] == len(Cs) * targets.n_outputs and calls[-1] == targets.n_outputs
    # And the public C search (grid fitted together) agrees with scikit-learn at the C it picks.
    C, _ = select_C(
        X[:300], y[:300], X[300:], y[300:], kind, Cs, refine=False, tol=1e-9, max_iter=2000, n_classes=n_out
    )
    probe = fit(X[:300], y[:300], kind, C, tol=1e-9, max_iter=2000, n_classes=n_out)
    scaler, models = sklearn_reference(X[:300], y[:300], kind, C)
    np.testing.assert_allclose(probe.predict_proba(X[300:]), sklearn_proba(scaler, models, X[300:], kind), atol=1e-5)


def test_fit_layers_counts_iterations_per_layer():
    X, y = make_data("multiclass", 250, 9, 3, seed=6)
    layers = np.stack([X, X * 3.0])
    probes = fit_layers(layers, y, "multiclass", [0.01, 10.0], max_iter=2000, tol=1e-9)
    singles = [fit(layer, y, "multiclass", C, max_iter=2000, tol=1e-9) for layer, C in zip(layers, (0.01, 10.0))]
    assert [p.n_iter for p in probes] == [s.n_iter for s in singles]
    assert probes[0].n_iter < probes[1].n_iter  # strong regularisation converges sooner
    assert all(p.converged for p in probes)
    # A budget that runs out is reported for that layer only.
    short = fit_layers(layers, y, "multiclass", [0.01, 10.0], max_iter=probes[0].n_iter, tol=1e-9)
    assert short[0].converged and not short[1].converged


def test_multilabel_batched_equals_independent_binary_fits():
    X, y = make_data("multilabel", 300, 7, 3, seed=7)
    joint = fit(X, y, "multilabel", 0.4, tol=1e-9, max_iter=2000)
    for k in range(3):
        alone = fit(X, y[:, k].astype(np.int64), "binary", 0.4, tol=1e-9, max_iter=2000)
        np.testing.assert_allclose(joint.coef[k], alone.coef[0], atol=1e-6)
        np.testing.assert_allclose(joint.predict_proba(X)[:, k], alone.predict_proba(X)[:, 1], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# C selection
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,n_out", [("multiclass", 4), ("multilabel", 3)])
def test_select_C_picks_grid_minimum_of_validation_log_loss(kind, n_out):
    X, y = make_data(kind, 260, 30, n_out, seed=8, noise=2.5)
    X_train, y_train, X_val, y_val = X[:110], y[:110], X[110:], y[110:]
    grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    # Direct loop: cold-started fits, log-loss from sklearn.metrics.
    losses = []
    for C in grid:
        proba = fit(X_train, y_train, kind, C, tol=1e-8, max_iter=2000).predict_proba(X_val)
        losses.append(sklearn_metrics(y_val, proba, kind)[1])
    expected = grid[int(np.argmin(losses))]
    assert expected not in (grid[0], grid[-1]), "fixture should have an interior optimum"

    C, auc = select_C(X_train, y_train, X_val, y_val, kind, grid, refine=False, tol=1e-8, max_iter=2000)
    assert C == expected
    best_proba = fit(X_train, y_train, kind, C, tol=1e-8, max_iter=2000).predict_proba(X_val)
    assert auc == pytest.approx(sklearn_metrics(y_val, best_proba, kind)[0], abs=1e-6)

    refined, _ = select_C(X_train, y_train, X_val, y_val, kind, grid, refine=True, tol=1e-8, max_iter=2000)
    position = grid.index(expected)
    assert grid[position - 1] < refined < grid[position + 1]
    refined_proba = fit(X_train, y_train, kind, refined, tol=1e-8, max_iter=2000).predict_proba(X_val)
    assert sklearn_metrics(y_val, refined_proba, kind)[1] <= min(losses) + 1e-9


def test_select_C_rejects_bad_grid():
    X, y = make_data("binary", 40, 3, 1, seed=9)
    with pytest.raises(ValueError, match="C grid"):
        select_C(X, y, X, y, "binary", [0.1, -1.0])


# --------------------------------------------------------------------------------------------------
# Classes without training examples
# --------------------------------------------------------------------------------------------------


def test_absent_multiclass_class_is_handled(caplog):
    X, y = make_data("multiclass", 200, 5, 3, seed=10)
    with caplog.at_level(logging.WARNING, logger="medprobe.probe"):
        probe = fit(X, y, "multiclass", 1.0, n_classes=4, class_names=["a", "b", "c", "ghost"])
    assert "ghost" in caplog.text
    assert probe.absent_classes == (3,)
    proba = probe.predict_proba(X)
    assert proba.shape == (200, 4) and np.all(np.isfinite(proba))
    assert proba[:, 3].max() < 1e-4
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-12)


def test_multilabel_finding_without_positives_uses_intercept(caplog):
    X, y = make_data("multilabel", 200, 5, 3, seed=11)
    y[:, 1] = 0
    with caplog.at_level(logging.WARNING, logger="medprobe.probe"):
        probe = fit(X, y, "multilabel", 1.0, class_names=["x", "never_seen", "z"])
    assert "never_seen" in caplog.text
    proba = probe.predict_proba(X)
    assert np.all(np.isfinite(proba)) and proba[:, 1].max() < 1e-3
    # The regulariser keeps the finding's weights near zero: the probability is the intercept's.
    assert np.abs(probe.coef[1]).max() < 1e-3


# --------------------------------------------------------------------------------------------------
# Labels and manifests
# --------------------------------------------------------------------------------------------------


def test_encode_targets_values_and_errors():
    frame = pd.DataFrame({"image_id": ["a", "b", "c"], "label": ["1", "0", "1"], "labels": ["x|z", "", "y"]})
    np.testing.assert_array_equal(encode_targets(frame, "binary", ["0", "1"]), [1, 0, 1])
    assert encode_targets(frame, "multiclass", ["1", "0"]).dtype == np.int64
    multi = encode_targets(frame, "multilabel", ["x", "y", "z"])
    assert multi.dtype == np.uint8
    np.testing.assert_array_equal(multi, [[1, 0, 1], [0, 0, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match=r"'1'.*image_id 'a'.*\['0', '2'\]"):
        encode_targets(frame, "multiclass", ["0", "2"])
    with pytest.raises(ValueError, match=r"'y'.*\['x', 'z'\]"):
        encode_targets(frame, "multilabel", ["x", "z"])
    with pytest.raises(ValueError, match="unknown task kind 'ordinal'"):
        encode_targets(frame, "ordinal", ["0", "1"])


def test_load_manifest_keeps_strings_and_checks(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("image_id,path,split,patient_id,label,source\n001,a.png,train,p1,NA,s\n002,b.png,test,,0,s\n")
    manifest = load_manifest(good)
    assert manifest["image_id"].tolist() == ["001", "002"]
    assert manifest["label"].tolist() == ["NA", "0"] and manifest["patient_id"].tolist() == ["p1", ""]
    duplicate = tmp_path / "dup.csv"
    duplicate.write_text("image_id,path,split,patient_id,label,source\nx,a,train,p,0,s\nx,b,test,q,1,s\n")
    with pytest.raises(ValueError, match=r"dup\.csv.*duplicate image_id.*'x'"):
        load_manifest(duplicate)
    missing = tmp_path / "missing.csv"
    missing.write_text("image_id,path,split,patient_id,source\nx,a,train,p,s\n")
    with pytest.raises(ValueError, match=r"missing\.csv.*'label'"):
        load_manifest(missing)


# --------------------------------------------------------------------------------------------------
# Nested subsets
# --------------------------------------------------------------------------------------------------


def test_nested_subsets_properties():
    rng = np.random.default_rng(12)
    n_patients = 400
    images = rng.integers(1, 4, size=n_patients)
    patient_ids = np.repeat([f"p{i:03d}" for i in range(n_patients)], images)
    patient_class = rng.choice(4, size=n_patients, p=[0.6, 0.25, 0.13, 0.02])
    strata = np.repeat(patient_class, images)
    fractions = [0.5, 0.05, 0.25, 1.0, 0.1]
    masks = nested_subsets(patient_ids, strata, fractions, seed=3)
    assert len(masks) == len(fractions)
    by_size = sorted(zip(fractions, masks), key=lambda item: item[0])
    for (_, smaller), (_, larger) in zip(by_size, by_size[1:]):
        assert not np.any(smaller & ~larger), "smaller fraction must be a subset of the larger one"
    for fraction, mask in zip(fractions, masks):
        chosen = set(patient_ids[mask])
        # Whole patients: every image of a chosen patient is in, every other image is out.
        assert set(patient_ids[~mask]).isdisjoint(chosen)
        assert abs(len(chosen) / n_patients - fraction) <= 1.0 / n_patients
        assert set(strata[mask]) == set(strata), f"fraction {fraction} lost a stratum"
    # Stratified: class shares among chosen patients follow the full set.
    half = masks[0]
    chosen_classes = np.array([patient_class[int(p[1:])] for p in sorted(set(patient_ids[half]))])
    np.testing.assert_allclose(
        np.bincount(chosen_classes, minlength=4) / len(chosen_classes),
        np.bincount(patient_class) / n_patients,
        atol=0.01,
    )
    # Deterministic per seed, different across seeds.
    again = nested_subsets(patient_ids, strata, fractions, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(masks, again))
    other = nested_subsets(patient_ids, strata, fractions, seed=4)
    assert not np.array_equal(masks[0], other[0])
    assert masks[3].all()


def test_nested_subsets_keeps_one_patient_per_stratum_and_rejects_bad_fractions():
    patient_ids = [f"p{i}" for i in range(20)]
    strata = ["common"] * 19 + ["rare"]
    (tiny,) = nested_subsets(patient_ids, strata, [0.05], seed=0)
    assert tiny.sum() == 2 and tiny[19]
    with pytest.raises(ValueError, match="fractions"):
        nested_subsets(patient_ids, strata, [0.0, 0.5], seed=0)


# --------------------------------------------------------------------------------------------------
# probe_task / efficiency_task on hand-written files
# --------------------------------------------------------------------------------------------------


FINDINGS = ["effusion", "nodule", "fracture"]


def write_task(tmp_path, *, with_embeddings=False, informative_layer=1, n_layers=3, multilabel=False):
    """A tiny manifest + activations HDF5 written per docs/architecture.md (binary, or multilabel with
    FINDINGS where 'fracture' never occurs)."""
    rng = np.random.default_rng(13)
    n_patients, per_patient, D = 60, 2, 6
    patients = np.repeat([f"pat{i:02d}" for i in range(n_patients)], per_patient)
    split_of_patient = np.array(["train"] * 34 + ["val"] * 13 + ["test"] * 13)
    split = np.repeat(split_of_patient, per_patient)
    y = rng.integers(0, 2, size=len(patients))
    ids = [f"img{i:03d}" for i in range(len(patients))]
    if multilabel:
        nodule = rng.integers(0, 2, size=len(patients))
        labels = ["|".join(f for f, on in zip(FINDINGS, (a, c, 0)) if on) for a, c in zip(y, nodule)]
    manifest = pd.DataFrame(
        {
            "image_id": ids,
            "path": [f"images/{i}.png" for i in ids],
            "split": split,
            "patient_id": patients,
            "label": "" if multilabel else np.array(["benign", "malignant"])[y],
            "labels": labels if multilabel else "",
            "source": "demo",
            "group": "",
        }
    )
    manifest_path = tmp_path / "task.csv"
    manifest.to_csv(manifest_path, index=False)
    activations = rng.normal(size=(len(ids), n_layers, D)).astype(np.float16)
    activations[:, informative_layer, 0] += (2.0 * y - 1.0) * 1.5  # the only layer with signal
    h5_path = tmp_path / "acts.h5"
    with h5py.File(h5_path, "w") as f:
        f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("activations", data=activations, chunks=(len(ids), 1, D))
        if with_embeddings:
            f.create_dataset("embeddings", data=rng.normal(size=(len(ids), 4)).astype(np.float16))
        f.attrs["layer_names"] = [f"hidden.{i}" for i in range(n_layers)]
        f.attrs["model"] = "tiny"
        f.attrs["pooling"] = "last"
        f.attrs["dtype"] = "float16"
        f.attrs["manifest_sha256"] = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    return h5_path, manifest_path, manifest


# The settings of these tests, written out in full: settings objects have no defaults.
PROBE = ProbeSettings(
    mode="regularised",
    C_grid=(0.01, 0.1, 1.0),
    refine=True,
    refit=False,
    max_iter=200,
    tol=1e-6,
    class_weight="none",
    dtype="float64",
    adam=AdamSettings(epochs=80, lr=1e-4, batch_size=512, standardise=False),
    sgd=SGDSettings(alpha=0.001, max_iter=10000, class_weight="balanced", random_state=1),
)
BINARY = TaskSettings(
    name="tiny",
    discipline="test",
    dataset="demo",
    kind="binary",
    metric="auc",
    prompt="",
    classes=("benign", "malignant"),
    graded=False,
    min_test_positives=0,
)
MULTILABEL = dataclasses.replace(BINARY, kind="multilabel", classes=tuple(FINDINGS))


def run_probe(
    h5_path, manifest_path, out, *, task=BINARY, probe=PROBE, layer="validation", seed=0, protocol=None, **options
):
    """probe_task writing its three files into ``out`` under the rule's names (``options``: device, layer_batch)."""
    return probe_task(
        h5_path,
        manifest_path,
        predictions=out / "predictions.h5",
        layers=out / "layers.h5",
        summary=out / "probe.json",
        task=task,
        probe=probe,
        layer=layer,
        seed=seed,
        protocol=protocol,
        **options,
    )


def run_efficiency(
    h5_path, manifest_path, summary, out, *, fractions, seeds, sampling="patients", task=BINARY, probe=PROBE, seed=0
):
    efficiency = EfficiencySettings(fractions=tuple(fractions), seeds=seeds, sampling=sampling)
    return efficiency_task(
        h5_path, manifest_path, summary, out, task=task, probe=probe, efficiency=efficiency, seed=seed
    )


def test_probe_task_writes_contract_files_and_selects_informative_layer(tmp_path):
    h5_path, manifest_path, manifest = write_task(tmp_path, with_embeddings=True)
    out = tmp_path / "probes"
    result = run_probe(h5_path, manifest_path, out)
    test_ids = manifest["image_id"][manifest["split"] == "test"].tolist()
    names = ["hidden.0", "hidden.1", "hidden.2", "image_embeds"]

    assert result["layer"] == "hidden.1" and result["selection"] == "validation"
    assert json.loads((out / "probe.json").read_text()) == result
    assert [entry["name"] for entry in result["layers"]] == names

    with h5py.File(out / "layers.h5") as f:
        assert [s.decode() for s in f["ids"][:]] == test_ids
        assert f["probabilities"].shape == (4, len(test_ids), 2) and f["probabilities"].dtype == np.float32
        assert list(f.attrs["layer_names"]) == names
        assert list(f.attrs["classes"]) == ["benign", "malignant"] and f.attrs["kind"] == "binary"
        val_score, Cs, layer_proba = f["val_score"][:], f["C"][:], f["probabilities"][:]
    assert int(np.argmax(val_score)) == 1 and val_score[1] > 0.8
    np.testing.assert_allclose(val_score, [entry["val_score"] for entry in result["layers"]])
    np.testing.assert_allclose(layer_proba.sum(2), 1.0, atol=1e-6)

    with h5py.File(out / "predictions.h5") as f:
        assert [s.decode() for s in f["ids"][:]] == test_ids
        assert f.attrs["layer"] == "hidden.1" and f.attrs["kind"] == "binary"
        assert f.attrs["C"] == pytest.approx(Cs[1])
        np.testing.assert_array_equal(f["probabilities"][:], layer_proba[1])

    # The selected layer's test predictions equal a direct refit on train at the chosen C.
    with h5py.File(h5_path) as f:
        features = f["activations"][:, 1, :].astype(np.float64)
    y = (manifest["label"] == "malignant").to_numpy().astype(np.int64)
    train, test = (manifest["split"] == "train").to_numpy(), (manifest["split"] == "test").to_numpy()
    direct = fit(features[train], y[train], "binary", result["C"]).predict_proba(features[test])
    np.testing.assert_allclose(layer_proba[1], direct, atol=1e-4)

    # Fixed layers: int means hidden.i, strings are names, unknown names are listed.
    fixed = run_probe(h5_path, manifest_path, tmp_path / "fixed", layer=2)
    assert fixed["layer"] == "hidden.2" and fixed["selection"] == "fixed"
    with pytest.raises(ValueError, match=r"hidden\.9.*image_embeds"):
        run_probe(h5_path, manifest_path, tmp_path / "bad", layer="hidden.9")


def test_probe_task_rejects_mismatched_ids_and_hash(tmp_path):
    h5_path, manifest_path, manifest = write_task(tmp_path)
    with h5py.File(h5_path, "a") as f:
        f.attrs["manifest_sha256"] = "0" * 64
    with pytest.raises(ValueError, match=r"acts\.h5.*task\.csv"):
        run_probe(h5_path, manifest_path, tmp_path / "out")

    h5_path, manifest_path, manifest = write_task(tmp_path)
    reordered = manifest.iloc[::-1]
    reordered.to_csv(manifest_path, index=False)
    with h5py.File(h5_path, "a") as f:  # hash matches, order does not
        f.attrs["manifest_sha256"] = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=r"acts\.h5: ids do not match manifest .*task\.csv"):
        run_probe(h5_path, manifest_path, tmp_path / "out")
    assert not (tmp_path / "out" / "probe.json").exists()


def test_efficiency_task(tmp_path):
    h5_path, manifest_path, manifest = write_task(tmp_path)
    out = tmp_path / "probes"
    run_probe(h5_path, manifest_path, out)
    summary = run_efficiency(
        h5_path, manifest_path, out / "probe.json", out / "efficiency.h5", fractions=[0.25, 0.5, 1.0], seeds=2
    )
    n_test = int((manifest["split"] == "test").sum())
    n_train = int((manifest["split"] == "train").sum())
    with h5py.File(out / "efficiency.h5") as f:
        proba = f["probabilities"][:]
        counts = f["n_train"][:]
        assert proba.shape == (3, 2, n_test, 2) and proba.dtype == np.float32
        np.testing.assert_allclose(f.attrs["fractions"], [0.25, 0.5, 1.0])
        np.testing.assert_array_equal(f.attrs["seeds"], [0, 1])
        assert list(f.attrs["classes"]) == ["benign", "malignant"]
    # Whole patients (2 images each), growing with the fraction, everything at 1.0.
    assert np.all(counts % 2 == 0) and np.all(np.diff(counts, axis=0) > 0) and np.all(counts[2] == n_train)
    np.testing.assert_array_equal(counts[0], [2 * int(0.25 * 34 + 0.5)] * 2)  # 8.5 patients rounds half up
    with h5py.File(out / "predictions.h5") as f:
        np.testing.assert_allclose(proba[2, 0], f["probabilities"][:], atol=1e-4)
    assert summary["layer"] == "hidden.1"
    # Deterministic given the seeds.
    run_efficiency(
        h5_path, manifest_path, out / "probe.json", tmp_path / "again.h5", fractions=[0.25, 0.5, 1.0], seeds=2
    )
    with h5py.File(tmp_path / "again.h5") as f:
        np.testing.assert_array_equal(f["probabilities"][:], proba)


def test_probe_and_efficiency_multilabel_with_unseen_finding(tmp_path, caplog):
    h5_path, manifest_path, manifest = write_task(tmp_path, multilabel=True, informative_layer=2)
    out = tmp_path / "probes"
    probe = dataclasses.replace(PROBE, class_weight="balanced", refine=False)
    with caplog.at_level(logging.WARNING, logger="medprobe.probe"):
        result = run_probe(h5_path, manifest_path, out, task=MULTILABEL, probe=probe)
    assert "fracture" in caplog.text and result["absent_train_classes"] == ["fracture"]
    # The layer carrying the 'effusion' signal wins on validation macro AUC over the findings with both labels.
    assert result["layer"] == "hidden.2"
    n_test = int((manifest["split"] == "test").sum())
    with h5py.File(out / "predictions.h5") as f:
        proba = f["probabilities"][:]
    assert proba.shape == (n_test, 3) and proba[:, 2].max() < 1e-2
    run_efficiency(
        h5_path,
        manifest_path,
        out / "probe.json",
        out / "efficiency.h5",
        fractions=[0.1, 1.0],
        seeds=(7,),
        task=MULTILABEL,
        probe=probe,
    )
    with h5py.File(out / "efficiency.h5") as f:
        assert f["probabilities"].shape == (2, 1, n_test, 3)
        np.testing.assert_array_equal(f.attrs["seeds"], [7])
        np.testing.assert_allclose(f["probabilities"][1, 0], proba, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# The authors' probes (probe.mode adam and sgd) and the protocol options around them
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,n_out", [("binary", 2), ("multiclass", 3), ("multilabel", 3)])
def test_fit_adam_is_the_authors_loop(kind, n_out):
    """fit_adam against a direct torch loop: nn.Linear, cross-entropy (multilabel: sigmoid + BCELoss), Adam,
    shuffled mini-batches, no standardisation, the same seed."""
    X, y = make_data(kind, 300, 5, n_out if kind != "binary" else 1, seed=33)
    epochs, lr, batch_size, seed = 4, 1e-2, 64, 7

    torch.manual_seed(seed)
    linear = torch.nn.Linear(5, n_out)
    optimiser = torch.optim.Adam(linear.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    features = torch.tensor(X, dtype=torch.float32)
    targets = torch.tensor(y, dtype=torch.float32 if kind == "multilabel" else torch.int64)
    for _ in range(epochs):
        for rows in torch.randperm(300, generator=order).split(batch_size):
            logits = linear(features[rows])
            loss = (
                torch.nn.BCELoss()(torch.sigmoid(logits), targets[rows])
                if kind == "multilabel"
                else torch.nn.CrossEntropyLoss()(logits, targets[rows])
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        logits = linear(features)
        expected = torch.sigmoid(logits) if kind == "multilabel" else torch.softmax(logits, dim=1)

    torch.manual_seed(12345)
    before = torch.rand(1)
    probe = fit_adam(
        X,
        y,
        kind,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        n_classes=n_out if kind == "multiclass" else None,
    )
    np.testing.assert_allclose(probe.predict_proba(X), expected.numpy(), atol=1e-5)
    assert probe.coef.shape == (n_out, 5) and probe.C == float("inf") and probe.n_iter == epochs * 5
    torch.manual_seed(12345)
    assert torch.rand(1) == before  # the global generator is left alone
    with pytest.raises(ValueError, match="epochs >= 1"):
        fit_adam(X, y, kind, epochs=0)


def test_fit_adam_standardise_option_and_seeds():
    X, y = make_data("binary", 200, 3, 1, seed=32)
    first = fit_adam(X, y, "binary", epochs=3, batch_size=16, seed=1)
    np.testing.assert_array_equal(first.coef, fit_adam(X, y, "binary", epochs=3, batch_size=16, seed=1).coef)
    assert not np.allclose(first.coef, fit_adam(X, y, "binary", epochs=3, batch_size=16, seed=2).coef)
    scaled = fit_adam(X, y, "binary", epochs=3, batch_size=16, seed=1, standardise=True)
    np.testing.assert_allclose(scaled.mean, X.mean(0)) and np.testing.assert_allclose(scaled.std, X.std(0))
    assert np.all(first.mean == 0) and np.all(first.std == 1)


@pytest.mark.parametrize("kind,n_out", [("binary", 1), ("multiclass", 3)])
def test_fit_sgd_is_the_authors_clip_baseline(kind, n_out):
    from sklearn.linear_model import SGDClassifier

    X, y = make_data(kind, 300, 4, n_out, seed=34)
    probe = fit_sgd(X, y, kind, n_classes=None if kind == "binary" else n_out)
    reference = SGDClassifier(
        loss="log_loss", penalty="l2", alpha=0.001, max_iter=10000, class_weight="balanced", random_state=1
    ).fit(X, y)
    np.testing.assert_allclose(probe.predict_proba(X), reference.predict_proba(X), atol=1e-12)


def test_fit_sgd_multilabel_finding_without_positives():
    X, y = make_data("multilabel", 200, 4, 3, seed=35)
    y[:, 2] = 0
    probe = fit_sgd(X, y, "multilabel")
    proba = probe.predict_proba(X)
    assert proba.shape == (200, 3) and np.all(proba[:, 2] == 0.0) and probe.absent_classes == (2,)


def _split_rows(manifest):
    return {split: (manifest["split"] == split).to_numpy() for split in ("train", "val", "test")}


def test_probe_task_adam_trains_on_every_non_test_row(tmp_path):
    h5_path, manifest_path, manifest = write_task(tmp_path)
    adam = {"epochs": 20, "lr": 0.01, "batch_size": 32}
    probe = dataclasses.replace(PROBE, mode="adam", adam=AdamSettings(**adam, standardise=False))
    result = run_probe(h5_path, manifest_path, tmp_path / "out", probe=probe, seed=3, layer=1, protocol="paper")
    assert result["settings"]["mode"] == "adam" and result["settings"]["adam"]["epochs"] == 20
    assert result["C"] is None and result["protocol"] == "paper" and result["fit_rows"] == "train+val"
    assert result["validation_layer"] is None and result["layer"] == "hidden.1"
    rows = _split_rows(manifest)
    assert result["n_train"] == int((rows["train"] | rows["val"]).sum())
    with h5py.File(h5_path) as f:
        features = f["activations"][:, 1, :].astype(np.float64)
    y = (manifest["label"] == "malignant").to_numpy().astype(np.int64)
    fit_rows = rows["train"] | rows["val"]
    direct = fit_adam(features[fit_rows], y[fit_rows], "binary", seed=3, **adam).predict_proba(features[rows["test"]])
    with h5py.File(tmp_path / "out" / "predictions.h5") as f:
        np.testing.assert_allclose(f["probabilities"][:], direct, atol=1e-5)
        assert f.attrs["C"] == np.inf
    run_efficiency(
        h5_path,
        manifest_path,
        tmp_path / "out" / "probe.json",
        tmp_path / "eff.h5",
        fractions=[0.5, 1.0],
        seeds=(1,),
        probe=probe,
        seed=3,
        sampling="images",
    )
    with h5py.File(tmp_path / "eff.h5") as f:
        np.testing.assert_allclose(f["probabilities"][1, 0], direct, atol=1e-5)  # fraction 1.0 = the headline
        assert list(f["n_train"][:, 0]) == [int(0.5 * fit_rows.sum()), int(fit_rows.sum())]
    with pytest.raises(ValueError, match="no finite C"):
        run_efficiency(
            h5_path, manifest_path, tmp_path / "out" / "probe.json", tmp_path / "x.h5", fractions=[1.0], seeds=1
        )
    with pytest.raises(ValueError, match="probe.mode"):
        run_probe(h5_path, manifest_path, tmp_path / "bad", probe=PROBE.for_mode("paper"))


def test_probe_task_adam_with_validation_layer_scores_train_only_probes(tmp_path):
    h5_path, manifest_path, manifest = write_task(tmp_path)
    adam = {"epochs": 30, "lr": 0.05, "batch_size": 32}
    probe = dataclasses.replace(PROBE, mode="adam", adam=AdamSettings(**adam, standardise=False))
    result = run_probe(h5_path, manifest_path, tmp_path / "out", probe=probe)
    assert result["layer"] == result["validation_layer"] == "hidden.1" and result["selection"] == "validation"
    rows = _split_rows(manifest)
    with h5py.File(h5_path) as f:
        features = f["activations"][:, 1, :].astype(np.float64)
    y = (manifest["label"] == "malignant").to_numpy().astype(np.int64)
    trial = fit_adam(features[rows["train"]], y[rows["train"]], "binary", **adam)
    expected = roc_auc_score(y[rows["val"]], trial.predict_proba(features[rows["val"]])[:, 1])
    assert result["layers"][1]["val_score"] == pytest.approx(expected, abs=1e-6)


def test_probe_task_sgd_on_the_embeddings(tmp_path):
    h5_path, manifest_path, manifest = write_task(tmp_path, with_embeddings=True)
    result = run_probe(h5_path, manifest_path, tmp_path / "out", probe=PROBE.for_mode("sgd"), layer="image_embeds")
    assert result["layer"] == "image_embeds" and result["settings"]["sgd"]["class_weight"] == "balanced"
    rows = _split_rows(manifest)
    fit_rows = rows["train"] | rows["val"]
    with h5py.File(h5_path) as f:
        embeddings = f["embeddings"][:].astype(np.float64)
    y = (manifest["label"] == "malignant").to_numpy().astype(np.int64)
    from sklearn.linear_model import SGDClassifier

    reference = SGDClassifier(
        loss="log_loss", penalty="l2", alpha=0.001, max_iter=10000, class_weight="balanced", random_state=1
    ).fit(embeddings[fit_rows], y[fit_rows])
    with h5py.File(tmp_path / "out" / "predictions.h5") as f:
        np.testing.assert_allclose(f["probabilities"][:], reference.predict_proba(embeddings[rows["test"]]), atol=1e-6)


def test_probe_task_refit_uses_train_and_val_at_the_chosen_C(tmp_path):
    h5_path, manifest_path, manifest = write_task(tmp_path)
    plain = run_probe(h5_path, manifest_path, tmp_path / "plain")
    result = run_probe(h5_path, manifest_path, tmp_path / "refit", probe=dataclasses.replace(PROBE, refit=True))
    assert result["C"] == plain["C"] and result["layer"] == plain["layer"] and result["fit_rows"] == "train+val"
    rows = _split_rows(manifest)
    fit_rows = rows["train"] | rows["val"]
    with h5py.File(h5_path) as f:
        features = f["activations"][:, 1, :].astype(np.float64)
    y = (manifest["label"] == "malignant").to_numpy().astype(np.int64)
    direct = fit(features[fit_rows], y[fit_rows], "binary", result["C"]).predict_proba(features[rows["test"]])
    with h5py.File(tmp_path / "refit" / "predictions.h5") as f:
        np.testing.assert_allclose(f["probabilities"][:], direct, atol=1e-4)


def test_image_subsets_are_the_authors_numpy_draws():
    masks = image_subsets(50, [0.1, 0.5, 1.0], seed=1)
    for fraction, mask in zip([0.1, 0.5, 1.0], masks):
        np.random.seed(1)
        expected = np.random.choice(50, int(fraction * 50), replace=False)
        assert set(np.flatnonzero(mask)) == set(expected.tolist())
    with pytest.raises(ValueError, match="0 images"):
        image_subsets(5, [0.1], seed=1)
    counted, listed = (EfficiencySettings(fractions=(1.0,), seeds=seeds, sampling="images") for seeds in (3, (1,)))
    assert counted.seed_list(10) == [10, 11, 12] and listed.seed_list(10) == [1]


def test_probe_task_layer_in_the_authors_numbering(tmp_path):
    h5_path, manifest_path, manifest = write_task(tmp_path, n_layers=13, informative_layer=3)
    with h5py.File(h5_path, "a") as f:
        f.attrs["num_hidden_states"] = 13
    # 12 layer files x.0 ... x.11 sort as x.0, x.1, x.10, x.11, x.2, ...: index 4 is x.2 = hidden_states[3].
    result = run_probe(h5_path, manifest_path, tmp_path / "out", layer="authors:4")
    assert result["layer"] == "hidden.3" and result["requested_layer"] == "authors:4"


def test_multilabel_all_findings_and_the_strict_min_test_positives_rule(tmp_path):
    h5_path, manifest_path, manifest = write_task(tmp_path, multilabel=True, informative_layer=2)
    test = (manifest["split"] == "test").to_numpy()
    counts = {f: int(manifest["labels"][test].str.split("|").apply(lambda v, f=f: f in v).sum()) for f in FINDINGS}
    threshold = counts["nodule"]  # nodule has exactly `threshold` test positives: left out by the strict rule
    probe = dataclasses.replace(PROBE, class_weight="balanced", C_grid=(0.1,), refine=False)
    everything_task = dataclasses.replace(MULTILABEL, classes="all")
    result = run_probe(
        h5_path,
        manifest_path,
        tmp_path / "out",
        probe=probe,
        task=dataclasses.replace(everything_task, min_test_positives=threshold),
    )
    kept = [f for f in ("effusion", "nodule") if counts[f] > threshold]
    assert result["classes"] == kept and result["dropped_classes"]["nodule"] == threshold
    with h5py.File(tmp_path / "out" / "predictions.h5") as f:
        assert list(f.attrs["classes"]) == kept and f["probabilities"].shape[1] == len(kept)
    everything = run_probe(h5_path, manifest_path, tmp_path / "all", task=everything_task, probe=probe)
    train_counts = manifest["labels"][manifest["split"] == "train"].str.split("|").explode().value_counts()
    assert everything["classes"] == [f for f in train_counts.index if f]  # 'fracture' never occurs


def test_non_finite_activations_stop_the_probe_naming_the_images(tmp_path):
    h5_path, manifest_path, manifest = write_task(tmp_path)
    with h5py.File(h5_path, "r+") as f:
        data = f["activations"][:]
        data[7, 2, 3] = np.nan
        data[11, 2, 0] = np.inf
        f["activations"][:] = data
    with pytest.raises(ValueError, match=r"hidden\.2.*img007.*img011|img007.*img011.*hidden\.2"):
        run_probe(h5_path, manifest_path, tmp_path / "probes")
    assert not (tmp_path / "probes" / "predictions.h5").exists()


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("refit", [False, True])
def test_layers_fitted_together_get_the_result_each_gets_alone(tmp_path, multilabel, refit):
    """probe.layer_batch (the GPU path: several layers' C searches in one lockstep solve, the next layers read
    while these are fitted), run here on the CPU, gives every layer the C, scores and test probabilities that
    layer-by-layer fitting gives; groups never mix the hidden states with the narrower image_embeds."""
    h5_path, manifest_path, _ = write_task(tmp_path, with_embeddings=True, n_layers=5, multilabel=multilabel)
    task = MULTILABEL if multilabel else BINARY
    probe = dataclasses.replace(PROBE, refit=refit)
    alone = run_probe(h5_path, manifest_path, tmp_path / "alone", task=task, probe=probe, layer_batch=1)
    together = run_probe(h5_path, manifest_path, tmp_path / "together", task=task, probe=probe, layer_batch=3)
    assert together["layer"] == alone["layer"]
    for one, other in zip(alone["layers"], together["layers"], strict=True):
        assert one["name"] == other["name"] and one["C"] == other["C"] and one["n_iter"] == other["n_iter"]
        assert [c for c, _ in one["C_tried"]] == [c for c, _ in other["C_tried"]]
        np.testing.assert_allclose([v for _, v in one["C_tried"]], [v for _, v in other["C_tried"]], rtol=1e-12)
        assert one["val_score"] == pytest.approx(other["val_score"], rel=1e-12)
    with h5py.File(tmp_path / "alone" / "layers.h5") as a, h5py.File(tmp_path / "together" / "layers.h5") as b:
        np.testing.assert_allclose(a["probabilities"][:], b["probabilities"][:], rtol=0, atol=1e-6)


def test_layer_batch_groups_and_sizes():
    from medprobe.probe.task import _layer_groups, layer_batch_size

    assert _layer_groups([6, 6, 6, 6, 6, 4], 2) == [[0, 1], [2, 3], [4], [5]]
    assert _layer_groups([6, 6, 4], 1) == [[0], [1], [2]]
    # auto is one layer at a time on the CPU; an integer is taken as it is; anything else is refused.
    assert layer_batch_size("auto", None, None, PROBE, torch.device("cpu")) == 1
    assert layer_batch_size(7, None, None, PROBE, torch.device("cpu")) == 7
    for bad in (0, -1, "all", 2.5, True):
        with pytest.raises(ValueError, match="probe.layer_batch must be a positive integer or 'auto'"):
            layer_batch_size(bad, None, None, PROBE, torch.device("cpu"))

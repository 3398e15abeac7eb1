"""The authors' two probes, reproduced exactly (``probe.mode: adam`` and ``sgd``).

* :func:`fit_adam` - their IDEFICS probe (``eval_torch_ex.py``, ``eval_torch_padchest.py``): ``nn.Linear(d, K)``,
  cross-entropy over K logits (a binary task has two, as in their code; multilabel: sigmoid + ``BCELoss``),
  Adam, a fixed number of epochs of shuffled mini-batches, no weight decay, no feature standardisation.
  Their code sets no seed; here ``seed`` seeds the layer's initialisation (``torch.manual_seed``) and the
  shuffling (a ``torch.Generator``), so that reruns are identical::

      torch.manual_seed(seed); linear = nn.Linear(d, K); optimiser = Adam(linear.parameters(), lr)
      order = torch.Generator().manual_seed(seed)
      for epoch in range(epochs):
          for rows in torch.randperm(n, generator=order).split(batch_size):
              loss = cross_entropy(linear(X[rows]), y[rows]); zero_grad; backward; step

* :func:`fit_sgd` - their CLIP baseline (``clip_ex.py``): scikit-learn's ``SGDClassifier(loss="log_loss",
  penalty="l2", alpha=0.001, max_iter=10000, class_weight="balanced", random_state=1)`` on the raw features.
  A multilabel task gets one such classifier per finding.

Both return objects with ``predict_proba`` in the layout of :class:`medprobe.probe.LogisticProbe`
(binary ``(n, 2)``, multiclass ``(n, C)``, multilabel ``(n, F)``) and record ``C = inf`` (no C search).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medprobe.probe.problem import _check_kind
from medprobe.probe.solver import LinearModel

logger = logging.getLogger(__name__)


def _n_outputs(kind: str, y: np.ndarray, n_classes: int | None) -> int:
    if kind == "binary":
        return 2
    if kind == "multilabel":
        return int(y.shape[1])
    return int(n_classes) if n_classes is not None else int(y.max()) + 1


def _absent(kind: str, y: np.ndarray, n_out: int) -> tuple[int, ...]:
    """Classes without a training example (multilabel: findings without positives or without negatives)."""
    if kind == "multilabel":
        positives = y.sum(0)
        return tuple(int(k) for k in np.flatnonzero((positives == 0) | (positives == y.shape[0])))
    return tuple(int(k) for k in sorted(set(range(n_out)) - set(np.unique(y).tolist())))


def _warn_absent(absent: Sequence[int], class_names: Sequence[str] | None, kind: str) -> None:
    if absent:
        names = [class_names[k] if class_names is not None else str(k) for k in absent]
        what = "positive or negative training example" if kind == "multilabel" else "training example"
        logger.warning("class(es) %s have no %s", ", ".join(names), what)


@dataclass
class LinearProbe(LinearModel):
    """A probe trained by :func:`fit_adam`; ``mean`` and ``std`` are 0 and 1 unless it standardised."""

    C: float = math.inf
    n_iter: int = 0
    converged: bool = True
    absent_classes: tuple[int, ...] = field(default=())

    def predict_proba(self, X: Any) -> np.ndarray:
        """Binary ``[1 - p, p]`` from the softmax of the two logits, multiclass softmax, multilabel sigmoid."""
        logits = self.decision_function(X)
        proba = torch.sigmoid(logits) if self.kind == "multilabel" else torch.softmax(logits, dim=1)
        return proba.cpu().numpy()


def fit_adam(
    X: Any,
    y: Any,
    kind: str,
    *,
    epochs: int = 80,
    lr: float = 1e-4,
    batch_size: int = 512,
    standardise: bool = False,
    seed: int = 0,
    n_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    device: str | torch.device | None = None,
) -> LinearProbe:
    """The authors' Adam probe (module docstring) on ``X`` ``(n, d)``; float32 as ``nn.Linear``'s default.

    ``y``: binary/multiclass class indices ``(n,)``, multilabel 0/1 ``(n, F)``. ``standardise`` first scales
    the features with the training mean and population SD (an option; the authors did not).
    """
    _check_kind(kind)
    if epochs < 1 or not lr > 0 or batch_size < 1:
        raise ValueError(f"probe.adam needs epochs >= 1, lr > 0, batch_size >= 1; got {epochs}, {lr}, {batch_size}")
    if device is None:
        device = X.device if isinstance(X, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    features = torch.as_tensor(X, device=device).to(torch.float32)
    y_np = y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    n, d = features.shape
    if n == 0:
        raise ValueError("the Adam probe got no training rows")
    features, mean_np, std_np = _scaled(features, standardise)
    n_out = _n_outputs(kind, y_np, n_classes)
    absent = _absent(kind, y_np, n_out)
    _warn_absent(absent, class_names, kind)
    targets = torch.as_tensor(y_np, device=device)
    targets = targets.to(torch.float32) if kind == "multilabel" else targets.to(torch.int64)
    linear = _train_adam(features, targets, kind, n_out, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    return LinearProbe(
        mean=mean_np,
        std=std_np,
        coef=linear.weight.detach().double().cpu().numpy().copy(),
        intercept=linear.bias.detach().double().cpu().numpy().copy(),
        kind=kind,
        n_iter=int(epochs) * math.ceil(n / batch_size),
        absent_classes=absent,
    )


def _scaled(features: torch.Tensor, standardise: bool) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The features the probe trains on, with the mean and SD it applies (0 and 1 when not standardised)."""
    d = features.shape[1]
    if not standardise:
        return features, np.zeros(d), np.ones(d)
    mean = features.double().mean(0)
    std = features.double().std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    features = ((features.double() - mean) / std).to(torch.float32)
    return features, mean.cpu().numpy(), std.cpu().numpy()


def _train_adam(
    features: torch.Tensor,
    targets: torch.Tensor,
    kind: str,
    n_out: int,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> torch.nn.Linear:
    """The authors' loop: ``nn.Linear``, Adam, ``epochs`` passes of shuffled mini-batches, seeded by ``seed``."""
    device, (n, d) = features.device, features.shape
    with torch.random.fork_rng(devices=[]):  # the caller's global generator is left as it was
        torch.manual_seed(int(seed))
        linear = torch.nn.Linear(d, n_out)
    linear = linear.to(device)
    optimiser = torch.optim.Adam(linear.parameters(), lr=lr)
    order = torch.Generator(device="cpu").manual_seed(int(seed))
    for _ in range(int(epochs)):
        for rows in torch.randperm(n, generator=order).split(int(batch_size)):
            rows = rows.to(device)
            logits = linear(features[rows])
            if kind == "multilabel":
                loss = F.binary_cross_entropy(torch.sigmoid(logits), targets[rows])
            else:
                loss = F.cross_entropy(logits, targets[rows])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    return linear


@dataclass
class SGDProbe:
    """Scikit-learn SGD classifiers (one per finding for multilabel) fitted by :func:`fit_sgd`.

    ``constant`` holds, per output, the probability of an output whose training labels had one value only
    (scikit-learn cannot fit such a classifier; the authors' code would have stopped).
    """

    models: list[Any]
    constant: list[float | None]
    kind: str
    n_outputs: int
    C: float = math.inf
    n_iter: int = 0
    converged: bool = True
    absent_classes: tuple[int, ...] = field(default=())

    def predict_proba(self, X: Any) -> np.ndarray:
        features = np.asarray(X.cpu().numpy() if isinstance(X, torch.Tensor) else X, dtype=np.float64)
        if self.kind == "multilabel":
            columns = [
                np.full(len(features), value) if model is None else model.predict_proba(features)[:, 1]
                for model, value in zip(self.models, self.constant)
            ]
            return np.stack(columns, axis=1)
        (model,), (value,) = self.models, self.constant
        proba = np.zeros((len(features), self.n_outputs))
        if model is None:
            proba[:, int(value)] = 1.0
        else:
            proba[:, model.classes_.astype(int)] = model.predict_proba(features)
        return proba


def fit_sgd(
    X: Any,
    y: Any,
    kind: str,
    *,
    alpha: float = 0.001,
    max_iter: int = 10000,
    class_weight: str | None = "balanced",
    random_state: int = 1,
    n_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> SGDProbe:
    """The authors' CLIP baseline: ``SGDClassifier(loss="log_loss", penalty="l2", ...)`` on raw ``X``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import SGDClassifier

    _check_kind(kind)
    features = np.asarray(X.cpu().numpy() if isinstance(X, torch.Tensor) else X, dtype=np.float64)
    y_np = np.asarray(y.cpu().numpy() if isinstance(y, torch.Tensor) else y)
    n_out = _n_outputs(kind, y_np, n_classes)
    absent = _absent(kind, y_np, n_out)
    _warn_absent(absent, class_names, kind)
    weight = None if class_weight in (None, "none") else class_weight
    columns = [y_np[:, k] for k in range(n_out)] if kind == "multilabel" else [y_np]
    models, constant, iterations, converged = [], [], 0, True
    for column in columns:
        values = np.unique(column)
        if values.size < 2:
            models.append(None)
            constant.append(float(values[0]) if values.size else 0.0)
            continue
        model = SGDClassifier(
            loss="log_loss",
            penalty="l2",
            alpha=alpha,
            max_iter=max_iter,
            class_weight=weight,
            random_state=random_state,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(features, column)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            converged = False
            logger.warning("SGDClassifier did not converge in max_iter=%d epochs", max_iter)
        models.append(model)
        constant.append(None)
        iterations = max(iterations, int(model.n_iter_))
    return SGDProbe(
        models=models,
        constant=constant,
        kind=kind,
        n_outputs=n_out,
        n_iter=iterations,
        converged=converged,
        absent_classes=absent,
    )

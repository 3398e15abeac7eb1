"""Argument checks shared by the statistics modules."""

from __future__ import annotations

import numpy as np


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def _check_ci(ci: float) -> None:
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie strictly between 0 and 1; got {ci!r}")


def _indicator(values: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != shape:
        raise ValueError(f"{name} must have shape {shape}; got {values.shape}")
    if not np.isin(values, (0, 1)).all():
        raise ValueError(f"{name} must be a 0/1 indicator matrix; found values {np.unique(values)[:5]}")
    return values.astype(np.int64)


def _indicator_and_scores(targets: np.ndarray, other: np.ndarray, other_name: str) -> tuple[np.ndarray, np.ndarray]:
    other = np.asarray(other)
    if other.ndim != 2:
        raise ValueError(f"{other_name} must be a 2-D (n, C) array; got shape {other.shape}")
    targets = _indicator(targets, other.shape, "targets")
    if other.dtype.kind == "f" and not np.isfinite(other).all():
        raise ValueError(f"{other_name} contain NaN or infinite values")
    return targets, other

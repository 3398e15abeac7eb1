"""Training subsets for the label-efficiency sweep: nested patient subsets, or the authors' image draws."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def nested_subsets(
    patient_ids: Sequence[str] | np.ndarray,
    strata: Sequence[Any] | np.ndarray,
    fractions: Sequence[float],
    seed: int,
) -> list[np.ndarray]:
    """Nested, patient-grouped, stratified training subsets.

    ``patient_ids`` and ``strata`` are per sample; a patient's stratum is its most frequent value
    (ties -> the smallest). Returns one boolean sample mask per fraction (in the given order) that
    keeps ``round(f * n_patients)`` whole patients, at least one patient per stratum (so tiny fractions
    may exceed ``f``). A larger fraction's subset always contains a smaller one's: patients are put in
    one random order (interleaved across strata so that every prefix is stratified) and each fraction
    takes a prefix. Deterministic given ``seed``.
    """
    patient_ids = np.asarray(patient_ids).astype(str)
    strata = np.asarray(strata)
    if patient_ids.ndim != 1 or strata.shape != patient_ids.shape:
        raise ValueError(
            f"patient_ids and strata must be 1-d of equal length, got {patient_ids.shape} and {strata.shape}"
        )
    fractions_arr = np.asarray(list(fractions), dtype=np.float64)
    if fractions_arr.ndim != 1 or fractions_arr.size == 0 or np.any(~(fractions_arr > 0)) or np.any(fractions_arr > 1):
        raise ValueError(f"fractions must be in (0, 1], got {list(fractions)!r}")
    if patient_ids.size == 0:
        return [np.zeros(0, dtype=bool) for _ in fractions_arr]

    patients, patient_of_sample = np.unique(patient_ids, return_inverse=True)
    _, stratum_of_sample = np.unique(strata.astype(str), return_inverse=True)
    counts = np.zeros((patients.size, stratum_of_sample.max() + 1), dtype=np.int64)
    np.add.at(counts, (patient_of_sample, stratum_of_sample), 1)
    patient_stratum = counts.argmax(axis=1)  # first maximum: ties -> smallest stratum

    rng = np.random.default_rng(seed)
    # Systematic stratified ordering: the r-th of n_s shuffled patients of a stratum gets the key
    # (r + u) / n_s, so sorting by key interleaves strata in proportion at every prefix length.
    key = np.empty(patients.size)
    leads_stratum = np.zeros(patients.size, dtype=bool)
    present_strata = np.unique(patient_stratum)
    for stratum in present_strata:
        members = rng.permutation(np.flatnonzero(patient_stratum == stratum))
        key[members] = (np.arange(members.size) + rng.random(members.size)) / members.size
        leads_stratum[members[0]] = True
    # One patient of every stratum first, so even the smallest subset represents every stratum.
    order = np.lexsort((key, ~leads_stratum))

    masks = []
    for fraction in fractions_arr:
        n_keep = patients.size if fraction >= 1 else int(np.floor(fraction * patients.size + 0.5))
        n_keep = min(patients.size, max(n_keep, present_strata.size, 1))
        keep_patient = np.zeros(patients.size, dtype=bool)
        keep_patient[order[:n_keep]] = True
        masks.append(keep_patient[patient_of_sample])
    return masks


def _efficiency_strata(targets: np.ndarray, kind: str) -> np.ndarray:
    """Per-sample stratum: the class index; for multilabel the rarest finding present (-1 = none),
    so that patients carrying rare findings are spread over the subsets."""
    if kind != "multilabel":
        return targets
    prevalence = targets.sum(0).astype(np.float64)
    rarity = np.where(targets > 0, prevalence[None, :], np.inf)
    return np.where(targets.any(1), rarity.argmin(1), -1)


def image_subsets(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """The authors' subsets: ``np.random.seed(seed); np.random.choice(n, int(f * n), replace=False)`` per
    fraction, as boolean masks over the ``n`` training images (image-level, not nested, no stratification)."""
    masks = []
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"fractions must be in (0, 1], got {fraction!r}")
        if int(fraction * n) == 0:
            raise ValueError(
                f"efficiency fraction {fraction:g} of {n} training images is int({fraction:g} * {n}) = 0 "
                "images; raise the smallest of efficiency.fractions"
            )
        chosen = np.random.RandomState(seed).choice(n, int(fraction * n), replace=False)
        mask = np.zeros(n, dtype=bool)
        mask[chosen] = True
        masks.append(mask)
    return masks

"""One frozen settings object per config section, built from the validated config.

The JSON schema (``workflow/schemas/config.schema.yaml``) is the only place a default is written: these
classes have none, and :func:`build` fails on a key the section lacks, so they can only be built from a
config the schema has validated and filled (``medprobe.config.validate``). Rules pass config sections as
params; a script turns each into its settings object with ``XSettings.from_dict(section)`` and hands it
to the package.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

S = TypeVar("S")


def build(cls: type[S], section: Mapping[str, Any], where: str) -> S:
    """``cls`` from the config mapping ``section`` (named ``where`` in errors): nested settings are built
    recursively, lists become tuples; keys the class does not name are ignored (other stages read them)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if field.name not in section:
            if field.default is not dataclasses.MISSING:
                continue
            raise KeyError(
                f"{where}.{field.name} is missing: build settings from a validated config "
                "(medprobe.config.validate fills every default)"
            )
        value = section[field.name]
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            value = build(kind, value, f"{where}.{field.name}")
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        elif isinstance(value, dict):
            value = tuple(value.items())
        values[field.name] = value
    return cls(**values)


class _FromDict:
    SECTION = ""

    @classmethod
    def from_dict(cls: type[S], section: Mapping[str, Any]) -> S:
        return build(cls, section, cls.SECTION)


@dataclasses.dataclass(frozen=True)
class AdamSettings(_FromDict):
    """The authors' Adam probe (``probe.adam``)."""

    SECTION = "probe.adam"
    epochs: int
    lr: float
    batch_size: int
    standardise: bool


@dataclasses.dataclass(frozen=True)
class SGDSettings(_FromDict):
    """The authors' SGD baseline (``probe.sgd``)."""

    SECTION = "probe.sgd"
    alpha: float
    max_iter: int
    class_weight: str
    random_state: int


@dataclasses.dataclass(frozen=True)
class ProbeSettings(_FromDict):
    """``probe``: which probe, and each probe's settings."""

    SECTION = "probe"
    mode: str
    C_grid: tuple[float, ...]
    refine: bool
    refit: bool
    max_iter: int
    tol: float
    class_weight: str
    dtype: str
    adam: AdamSettings
    sgd: SGDSettings

    @property
    def fit_rows(self) -> str:
        """The rows the test-predicting probe is trained on: ``train`` or ``train+val``."""
        return "train+val" if self.mode != "regularised" or self.refit else "train"

    def for_mode(self, mode: str | None) -> ProbeSettings:
        """The same settings with a model's own ``probe_mode`` (None keeps ``probe.mode``)."""
        return self if mode is None else dataclasses.replace(self, mode=mode)


@dataclasses.dataclass(frozen=True)
class EvaluationSettings(_FromDict):
    SECTION = "evaluation"
    bootstrap: int
    ci: float
    auc_thresholds: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class EfficiencySettings(_FromDict):
    SECTION = "efficiency"
    fractions: tuple[float, ...]
    seeds: int | tuple[int, ...]
    sampling: str
    summary_tasks: tuple[tuple[str, str], ...] = ()

    def seed_list(self, seed: int) -> list[int]:
        """A count n means ``seed, ..., seed + n - 1``; a list is taken as it is."""
        if isinstance(self.seeds, int):
            return [seed + offset for offset in range(self.seeds)]
        return list(self.seeds)


@dataclasses.dataclass(frozen=True)
class SplitSettings(_FromDict):
    SECTION = "split"
    val_fraction: float
    test_fraction: float


@dataclasses.dataclass(frozen=True)
class ExtractionSettings(_FromDict):
    SECTION = "extraction"
    batch_size: int
    num_workers: int
    dtype: str
    prefetch_factor: int
    shards: int
    compression: str
    compression_level: int
    prompt_format: str
    # The layer selection of models without their own ``layers`` (all, every:<k> or indices).
    layers: str | tuple[int, ...] = "all"


@dataclasses.dataclass(frozen=True)
class FiguresSettings(_FromDict):
    SECTION = "figures"
    figure5_task: str
    figureS6_task: str
    figureS5_order: str
    figureS5_metric: str


@dataclasses.dataclass(frozen=True)
class NejmSettings(_FromDict):
    SECTION = "nejm"
    cases_dir: str
    models: tuple[str, ...]
    template: str
    shots: int
    shot_ids: tuple[str, ...]
    max_images: tuple[tuple[str, int], ...]
    top_k_samples: int
    temperature: float
    top_k: int
    strata: int
    max_new_tokens: int
    batch_size: int
    fuzzy_cutoff: float
    likelihood_score: str


@dataclasses.dataclass(frozen=True)
class TaskSettings(_FromDict):
    """One ``tasks.<T>`` entry, or the part of it a rule's params hold (medprobe.rule_params): the fields a
    stage does not depend on are left out of its params and take the defaults below, which mean "not given"."""

    SECTION = "tasks.<task>"
    kind: str
    classes: str | tuple[str, ...]
    min_test_positives: int = 0
    name: str = ""
    discipline: str = ""
    dataset: str = ""
    metric: str = ""
    prompt: str = ""
    graded: bool = False
    test_fraction: float | None = None
    label_rule: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The mapping form (``classes`` a list) for code that reads a task config."""
        values = dataclasses.asdict(self)
        if isinstance(self.classes, tuple):
            values["classes"] = list(self.classes)
        return values

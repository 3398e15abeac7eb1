"""Every figure the workflow draws, in one registry: the rules read which figures a config gets and which
tables each reads, the figure script which builder to call, the report each figure's caption.

Adding a figure: write its builder (``tables, tasks, models, options -> Figure``) in a module of this
package and register a :class:`FigureSpec` for it below; the ``figure`` rule, its script and the report
caption follow from the spec.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

from medprobe.figures.common import Models, Tasks
from medprobe.figures.efficiency import figure6
from medprobe.figures.findings import figure5
from medprobe.figures.groups import figureS6
from medprobe.figures.layers import figureS5
from medprobe.figures.nejm import figure1d
from medprobe.figures.performance import figure3, figure4
from medprobe.registry import Registry
from medprobe.settings import FiguresSettings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Draws a figure from the result tables it reads (by name), the config's tasks and models, and ``figures``.
Builder = Callable[[Mapping[str, pd.DataFrame], Tasks, Models, FiguresSettings], "Figure"]


@dataclasses.dataclass(frozen=True)
class FigureSpec:
    """One figure: its builder, the result tables it reads, the tasks it draws and its report caption.

    ``tasks`` lists the tasks whose rows it draws (None: every configured task; empty: none, as Figure 1d,
    which draws the NEJM table); ``task_option`` instead names the :class:`FiguresSettings` field that
    says which one task it draws. ``caption`` is one sentence, shown under the figure in the report.
    """

    name: str
    build: Builder
    tables: tuple[str, ...]
    caption: str
    tasks: tuple[str, ...] | None = None
    task_option: str | None = None

    def drawn_tasks(self, configured: Iterable[str], options: FiguresSettings) -> list[str]:
        """The tasks of ``configured`` it draws, in their order."""
        wanted = (getattr(options, self.task_option),) if self.task_option else self.tasks
        return [task for task in configured if wanted is None or task in wanted]

    def is_planned(self, configured: Iterable[str], options: FiguresSettings, written: Collection[str]) -> bool:
        """Whether the workflow draws it: every table it reads is ``written`` and, if it draws tasks, at least
        one of them is ``configured`` (a paper figure of tasks a config leaves out is simply not drawn)."""
        if not set(self.tables) <= set(written):
            return False
        return self.tasks == () or bool(self.drawn_tasks(configured, options))


FIGURES: Registry[FigureSpec] = Registry("figure")

# The paper's order: the report and the default target list the figures so.
for _spec in (
    FigureSpec(
        name="figure1d",
        build=figure1d,
        tables=("nejm",),
        tasks=(),
        caption="NEJM Image Challenge accuracy per difficulty stratum (the share of human readers who answered right, "
        "in five equal intervals) of each model's greedy answer, its top-k sampled answers and its highest-likelihood "
        "choice, against the readers' own accuracy (black) and chance (dashed), with bootstrap-SD error bars over cases.",
    ),
    FigureSpec(
        name="figure3",
        build=figure3,
        tables=("metrics",),
        tasks=("T1", "T2", "T3", "T4"),
        caption="Pathology and dermatology probes at the headline layer: (a) T1 colorectal tissue per-class F1, "
        "(b) T2 pan-cancer malignancy macro F1 (the mean of both classes' F1, as the paper), (c) T3 skin lesions "
        "per-class AUC and (d) T4 melanoma AUC, with bootstrap-SD error bars.",
    ),
    FigureSpec(
        name="figure4",
        build=figure4,
        tables=("metrics",),
        tasks=("T5", "T6", "T8"),
        caption="Ophthalmology and knee radiograph probes at the headline layer: (a) T5 diabetic retinopathy "
        "per-grade AUC, (b) T6 glaucoma AUC and (c) T8 knee osteoarthritis per-KL-grade AUC, with bootstrap-SD "
        "error bars.",
    ),
    FigureSpec(
        name="figure5",
        build=figure5,
        tables=("metrics",),
        task_option="figure5_task",
        caption="Chest radiograph findings (``figures.figure5_task``, T7): AUC per finding with more positive test "
        "images than the task's ``min_test_positives``, most frequent first, the first half in the left panel and "
        "the rest in the right, with bootstrap-SD error bars.",
    ),
    FigureSpec(
        name="figure6",
        build=figure6,
        tables=("efficiency",),
        caption="Label efficiency: the headline metric against the fraction of training labels used (nested, "
        "patient-grouped subsets), mean over seeds with a band of seed and bootstrap SD combined, one panel per "
        "discipline.",
    ),
    FigureSpec(
        name="figureS5",
        build=figureS5,
        tables=("layers", "metrics"),
        caption="Macro metric (``figures.figureS5_metric``) of a probe on each layer, one panel per discipline "
        "(colour = task, line style = model, band = bootstrap SD), with the headline layer of each model and task "
        "as a black dashed line, on a layer axis of true depth or the authors' text-sorted file order "
        "(``figures.figureS5_order``), in which the paper's layer 32 of the 80B model is hidden.39.",
    ),
    FigureSpec(
        name="figureS6",
        build=figureS6,
        tables=("groups",),
        task_option="figureS6_task",
        caption="Malignancy detection per organ type (``figures.figureS6_task``, T2): (a) macro F1, the mean of both "
        "classes, and (b) F1 of the positive class (malignant), with bootstrap-SD error bars.",
    ),
):
    FIGURES.register(_spec.name, _spec)


def planned(config: Mapping[str, Any], tables: Collection[str]) -> list[str]:
    """The figures drawn for a validated ``config`` when the workflow writes the result ``tables`` (by name),
    in registry order."""
    options = FiguresSettings.from_dict(config["figures"])
    return [name for name in FIGURES if FIGURES[name].is_planned(config["tasks"], options, tables)]


def figure_tasks(name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``tasks`` entries of a validated ``config`` that figure ``name`` draws, in config order."""
    options = FiguresSettings.from_dict(config["figures"])
    return {task: config["tasks"][task] for task in FIGURES[name].drawn_tasks(config["tasks"], options)}

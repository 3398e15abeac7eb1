"""The paper's figures (1d, 3, 4, 5, 6, S5, S6 of Han et al., 2023), drawn from the result tables alone.

:data:`FIGURES` (``registry.py``) names every figure with its builder, tables, tasks and caption;
:func:`draw` is what the workflow calls, :func:`render` returns the figure for inspection; the builders
themselves (``figure1d`` ... ``figureS6``) are importable here too. Each figure module also exposes the
data behind its plot (:func:`bar_table`, :func:`layer_curves`, ...) so that tests
and notebooks can check what is drawn.

Missing data is tolerated: a task or model absent from a table is skipped (logged), and only a figure
with nothing at all to draw raises :class:`ValueError`, naming the figure and the tasks it looked for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import pandas as pd

from medprobe.figures.common import (
    METRIC_LABELS,
    PNG_DPI,
    UNIT_YLIM,
    Models,
    Tasks,
    configured_classes,
    headline_metric,
    save,
)
from medprobe.figures.efficiency import efficiency_curves, figure6
from medprobe.figures.findings import figure5, figure5_findings, min_test_positives, support_filter
from medprobe.figures.groups import figureS6, figureS6_panels
from medprobe.figures.layers import LAYER_ORDERS, figureS5, headline_layers, layer_curves, layer_index, order_layers
from medprobe.figures.nejm import figure1d
from medprobe.figures.performance import bar_table, class_order, figure3, figure4
from medprobe.figures.registry import FIGURES, FigureSpec, figure_tasks, planned
from medprobe.figures.tables import MACRO, load_table, read_tables
from medprobe.settings import FiguresSettings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "FIGURES",
    "LAYER_ORDERS",
    "MACRO",
    "METRIC_LABELS",
    "PNG_DPI",
    "UNIT_YLIM",
    "FigureSpec",
    "bar_table",
    "class_order",
    "configured_classes",
    "draw",
    "efficiency_curves",
    "figure1d",
    "figure3",
    "figure4",
    "figure5",
    "figure5_findings",
    "figure6",
    "figureS5",
    "figureS6",
    "figureS6_panels",
    "figure_tasks",
    "headline_layers",
    "headline_metric",
    "layer_curves",
    "layer_index",
    "load_table",
    "min_test_positives",
    "order_layers",
    "planned",
    "read_tables",
    "render",
    "save",
    "support_filter",
]


def render(
    name: str, tables: Mapping[str, pd.DataFrame], tasks: Tasks, models: Models, options: FiguresSettings
) -> Figure:
    """Figure ``name`` drawn from ``tables`` (result tables by name), the config's ``tasks`` and ``models``
    sections and its ``figures`` settings."""
    spec = FIGURES.get(name)
    missing = [table for table in spec.tables if table not in tables]
    if missing:
        raise ValueError(
            f"{name} needs the table(s) {', '.join(map(repr, missing))}; given: {', '.join(tables) or 'none'}"
        )
    return spec.build(tables, tasks, models, options)


def draw(
    name: str,
    tables: Mapping[str, str | os.PathLike],
    out_pdf: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    tasks: Tasks,
    models: Models,
    options: FiguresSettings,
) -> None:
    """Draw figure ``name`` from the result tables at ``tables`` (paths by name) into ``out_pdf`` and
    ``out_png``; see :func:`render`."""
    save(render(name, read_tables(tables), tasks, models, options), out_pdf, out_png)

"""Tests for medprobe.figures: the registry, files written, plotted data equal to the tables, filters and ordering."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import jinja2
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from PIL import Image

from medprobe import figures
from medprobe.settings import FiguresSettings

PDF_MAGIC = b"%PDF-"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TASKS = {
    "T1": {
        "name": "Colorectal tissue",
        "discipline": "pathology",
        "kind": "multiclass",
        "metric": "f1",
        "classes": ["ADI", "LYM", "TUM"],
    },
    "T2": {
        "name": "Pan-cancer malignancy",
        "discipline": "pathology",
        "kind": "binary",
        "metric": "f1",
        "classes": ["benign", "malignant"],
    },
    "T3": {
        "name": "Skin lesions",
        "discipline": "dermatology",
        "kind": "multiclass",
        "metric": "auc",
        "classes": ["MEL", "NV", "BCC"],
    },
    "T4": {
        "name": "Melanoma",
        "discipline": "dermatology",
        "kind": "binary",
        "metric": "auc",
        "classes": ["benign", "malignant"],
    },
    "T5": {
        "name": "Diabetic retinopathy",
        "discipline": "ophthalmology",
        "kind": "multiclass",
        "metric": "auc",
        "classes": ["0", "1", "2"],
        "graded": True,
    },
    "T6": {
        "name": "Glaucoma",
        "discipline": "ophthalmology",
        "kind": "binary",
        "metric": "auc",
        "classes": ["no_glaucoma", "glaucoma"],
    },
    "T7": {
        "name": "Chest radiograph findings",
        "discipline": "radiology",
        "kind": "multilabel",
        "metric": "auc",
        "classes": ["cardiomegaly", "effusion", "nodule", "fracture", "scoliosis"],
        "min_test_positives": 9,
    },
    "T8": {
        "name": "Knee osteoarthritis",
        "discipline": "radiology",
        "kind": "multiclass",
        "metric": "auc",
        "classes": ["0", "1", "2"],
        "graded": True,
    },
}
# "absent" is configured but has no rows anywhere: figures must skip it silently.
MODELS = {
    "big": {"label": "Big VLM"},
    "small": {"label": "Small VLM"},
    "absent": {"label": "Never run"},
}
RUN_MODELS = ["big", "small"]
# Test positives per T7 finding; with min_test_positives=9 (strictly more kept), "fracture" and "scoliosis" must
# be dropped.
T7_SUPPORT = {"cardiomegaly": 40, "effusion": 25, "nodule": 12, "fracture": 9, "scoliosis": 3}
# The schema's defaults for the config's `figures` section.
OPTIONS = FiguresSettings(figure5_task="T7", figureS6_task="T2", figureS5_order="depth", figureS5_metric="auc")
REPORT_CAPTION = Path(__file__).resolve().parent.parent / "workflow" / "report" / "figure.rst"


def _row(task, model, cls, metric, value, sd, layer="hidden.4", fraction=1.0, seed=float("nan")):
    return {
        "task": task,
        "model": model,
        "layer": layer,
        "fraction": fraction,
        "seed": seed,
        "class": cls,
        "metric": metric,
        "value": value,
        "sd": sd,
        "ci_low": value - 2 * sd,
        "ci_high": value + 2 * sd,
        "n_train": 100,
        "n_test": 50,
    }


@pytest.fixture(scope="module")
def metrics() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for task, conf in TASKS.items():
        for model in RUN_MODELS:
            for cls in conf["classes"] + ["macro"]:
                for metric in ("auc", "f1"):
                    rows.append(_row(task, model, cls, metric, rng.uniform(0.5, 0.95), rng.uniform(0.01, 0.05)))
                positives = T7_SUPPORT.get(cls, 20) if task == "T7" else 20
                if cls != "macro":
                    support = _row(task, model, cls, "support", positives, 0.0)
                    support.update(sd=float("nan"), ci_low=float("nan"), ci_high=float("nan"))
                    rows.append(support)
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def layers() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    # "big" has 13 hidden layers, "small" 5 plus CLIP's projected embeddings.
    names = {"big": [f"hidden.{i}" for i in range(13)], "small": [f"hidden.{i}" for i in range(5)] + ["image_embeds"]}
    for task in TASKS:
        for model in RUN_MODELS:
            for layer in names[model]:
                for metric in ("auc", "f1"):  # every task has both, as in layers.csv
                    rows.append(_row(task, model, "macro", metric, rng.uniform(0.5, 0.9), 0.02, layer=layer))
    table = pd.DataFrame(rows)
    return table.sample(frac=1.0, random_state=3).reset_index(drop=True)  # file order must not matter


@pytest.fixture(scope="module")
def efficiency() -> pd.DataFrame:
    rng = np.random.default_rng(2)
    rows = []
    for task, conf in TASKS.items():
        for model in RUN_MODELS:
            for fraction in (0.1, 0.25, 1.0):
                for seed in range(3):
                    value = 0.5 + 0.4 * fraction + rng.normal(0, 0.03)
                    rows.append(
                        _row(
                            task,
                            model,
                            "macro",
                            conf["metric"],
                            value,
                            rng.uniform(0.01, 0.04),
                            fraction=fraction,
                            seed=seed,
                        )
                    )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def groups() -> pd.DataFrame:
    rng = np.random.default_rng(4)
    rows = []
    for group in ("Breast", "Colon", "Kidney"):
        for model in RUN_MODELS:
            # macro f1 = mean of both classes' F1 (the paper's); macro f1_positive = the positive class's F1.
            for cls, metric in (("benign", "f1"), ("malignant", "f1"), ("macro", "f1"), ("macro", "f1_positive")):
                row = _row("T2", model, cls, metric, rng.uniform(0.5, 0.95), rng.uniform(0.01, 0.05))
                row["group"] = group
                rows.append(row)
    return pd.DataFrame(rows)


NEJM_STRATA = ["0-20%", "20-40%", "40-60%", "60-80%", "80-100%"]


@pytest.fixture(scope="module")
def nejm() -> pd.DataFrame:
    """A nejm.csv: per model and answer mode the accuracy per difficulty stratum and overall, the readers, chance."""
    rng = np.random.default_rng(5)
    rows = []
    for model in RUN_MODELS:
        for mode in ("greedy", "top3", "likelihood"):
            for low, stratum in enumerate(NEJM_STRATA + ["all"]):
                rows.append(
                    {
                        "model": model,
                        "mode": mode,
                        "stratum": stratum,
                        "stratum_low": low / 5,
                        "stratum_high": (low + 1) / 5,
                        "accuracy": rng.uniform(0.2, 0.9),
                        "sd": rng.uniform(0.01, 0.05),
                        "n_cases": 10 + low,
                    }
                )
    for low, stratum in enumerate(NEJM_STRATA):
        rows.append(
            {
                "model": "readers",
                "mode": "readers",
                "stratum": stratum,
                "stratum_low": low / 5,
                "stratum_high": (low + 1) / 5,
                "accuracy": 0.1 + 0.2 * low,
                "sd": 0.01,
                "n_cases": 10 + low,
            }
        )
    rows.append(
        {
            "model": "chance",
            "mode": "chance",
            "stratum": "all",
            "stratum_low": 0.0,
            "stratum_high": 1.0,
            "accuracy": 0.2,
            "sd": 0.0,
            "n_cases": 50,
        }
    )
    return pd.DataFrame(rows)


def _write(folder, name, table) -> Path:
    """``table`` as ``folder/<name>.csv``, the way the workflow hands tables to draw()."""
    path = folder / f"{name}.csv"
    table.to_csv(path, index=False)
    return path


def _render(name, tables, tasks=TASKS, options=OPTIONS):
    return figures.render(name, tables, tasks, MODELS, options)


def _draw(name, tables, stem, tasks=TASKS, options=OPTIONS) -> None:
    figures.draw(
        name, tables, stem.with_suffix(".pdf"), stem.with_suffix(".png"), tasks=tasks, models=MODELS, options=options
    )


def _check_outputs(stem) -> None:
    pdf = stem.with_suffix(".pdf").read_bytes()
    png = stem.with_suffix(".png").read_bytes()
    assert pdf.startswith(PDF_MAGIC) and b"%%EOF" in pdf[-64:]
    assert png.startswith(PNG_MAGIC)
    with Image.open(stem.with_suffix(".png")) as image:
        image.verify()
    with Image.open(stem.with_suffix(".png")) as image:
        width, height = image.size
        assert image.format == "PNG"
    # 200 dpi: every figure is at least 5 x 3 inches.
    assert width >= 1000 and height >= 600


# ---------------------------------------------------------------------------------------------
# The registry: which figures a config gets, what each reads, its caption
# ---------------------------------------------------------------------------------------------

PROBE_TABLES = ["metrics", "layers", "efficiency", "groups"]


def test_planned_figures_follow_the_written_tables_and_the_configured_tasks():
    config = {"tasks": TASKS, "figures": dataclasses.asdict(OPTIONS)}
    paper = ["figure3", "figure4", "figure5", "figure6", "figureS5", "figureS6"]
    assert figures.planned(config, PROBE_TABLES) == paper
    assert figures.planned(config, PROBE_TABLES + ["nejm"]) == ["figure1d"] + paper  # when the NEJM branch runs
    assert figures.planned(config, ["metrics"]) == ["figure3", "figure4", "figure5"]
    only_t5 = {**config, "tasks": {"T5": TASKS["T5"]}}
    assert figures.planned(only_t5, PROBE_TABLES) == ["figure4", "figure6", "figureS5"]
    # Figures 5 and S6 draw the task their option names.
    other = {**config, "tasks": {"T3": TASKS["T3"]}, "figures": {**config["figures"], "figure5_task": "T3"}}
    assert figures.planned(other, PROBE_TABLES) == ["figure3", "figure5", "figure6", "figureS5"]


def test_figure_tasks_are_the_config_entries_a_figure_draws():
    config = {"tasks": TASKS, "figures": {**dataclasses.asdict(OPTIONS), "figureS6_task": "T4"}}
    assert list(figures.figure_tasks("figure3", config)) == ["T1", "T2", "T3", "T4"]
    assert list(figures.figure_tasks("figure4", config)) == ["T5", "T6", "T8"]
    assert figures.figure_tasks("figure5", config) == {"T7": TASKS["T7"]}
    assert list(figures.figure_tasks("figureS6", config)) == ["T4"]
    assert (
        list(figures.figure_tasks("figure6", config)) == list(TASKS) == list(figures.figure_tasks("figureS5", config))
    )
    assert figures.figure_tasks("figure1d", config) == {}


def test_every_figure_has_a_one_sentence_caption_in_the_report():
    template = jinja2.Template(REPORT_CAPTION.read_text())
    for name in figures.FIGURES:
        caption = figures.FIGURES[name].caption
        assert caption.endswith(".") and ". " not in caption, name
        job = SimpleNamespace(wildcards=SimpleNamespace(figure=name), params=SimpleNamespace(caption=caption))
        assert template.render(snakemake=job).strip() == f"{name}: {caption}"


# ---------------------------------------------------------------------------------------------
# load_table
# ---------------------------------------------------------------------------------------------


def test_load_table_round_trip_keeps_class_names_as_text(tmp_path, metrics):
    path = tmp_path / "metrics.csv"
    metrics.to_csv(path, index=False)
    table = figures.load_table(path)
    assert list(table.columns) == list(metrics.columns)
    t5_classes = set(table.loc[table["task"] == "T5", "class"])
    assert t5_classes == {"0", "1", "2", "macro"}  # grades stay strings, not ints
    np.testing.assert_allclose(table["value"].to_numpy(), metrics["value"].to_numpy())
    support = table[table["metric"] == "support"]
    assert support["ci_low"].isna().all() and table["seed"].isna().all()


@pytest.mark.parametrize("column", ["sd", "class", "n_test"])
def test_load_table_missing_column_names_column_and_file(tmp_path, metrics, column):
    path = tmp_path / "broken_metrics.csv"
    metrics.drop(columns=[column]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=rf"'{column}'") as error:
        figures.load_table(path)
    assert "broken_metrics.csv" in str(error.value)


def test_load_table_rejects_text_in_numeric_column(tmp_path, metrics):
    table = metrics.astype({"value": object})
    table.loc[3, "value"] = "high"
    path = tmp_path / "metrics.csv"
    table.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"'value'.*'high'"):
        figures.load_table(path)


def test_groups_table_requires_group_column(tmp_path, groups):
    path = tmp_path / "groups.csv"
    groups.drop(columns=["group"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"'group'"):
        figures.load_table(path)
    with pytest.raises(ValueError, match=r"figureS6.*'group'"):
        figures.render("figureS6", {"groups": groups.drop(columns=["group"])}, TASKS, MODELS, OPTIONS)


def test_figure_rejects_table_without_required_column(metrics):
    with pytest.raises(ValueError, match=r"figure3.*'metric'"):
        figures.render("figure3", {"metrics": metrics.drop(columns=["metric"])}, TASKS, MODELS, OPTIONS)


# ---------------------------------------------------------------------------------------------
# Every figure, through draw()
# ---------------------------------------------------------------------------------------------


def test_every_figure_is_written_as_pdf_and_png(tmp_path, metrics, layers, efficiency, groups, nejm):
    tables = {"metrics": metrics, "layers": layers, "efficiency": efficiency, "groups": groups, "nejm": nejm}
    paths = {name: _write(tmp_path, name, table) for name, table in tables.items()}
    for name in figures.FIGURES:
        spec = figures.FIGURES[name]
        stem = tmp_path / "figs" / name
        _draw(name, {table: paths[table] for table in spec.tables}, stem)
        _check_outputs(stem)
    assert sorted(path.name for path in (tmp_path / "figs").iterdir()) == sorted(
        f"{name}.{extension}" for name in figures.FIGURES for extension in ("pdf", "png")
    )  # written atomically: no temporary file is left behind


def test_png_has_figure_size_at_200_dpi(tmp_path, metrics):
    expected = figures.render("figure4", {"metrics": metrics}, TASKS, MODELS, OPTIONS).get_size_inches() * 200
    figures.save(
        figures.render("figure4", {"metrics": metrics}, TASKS, MODELS, OPTIONS),
        tmp_path / "f4.pdf",
        tmp_path / "f4.png",
    )
    with Image.open(tmp_path / "f4.png") as image:
        assert image.size == (round(expected[0]), round(expected[1]))


def test_draw_rejects_unknown_figure_and_missing_table(tmp_path, metrics):
    with pytest.raises(KeyError, match=r"figure7.*figure3"):
        figures.render("figure7", {"metrics": metrics}, TASKS, MODELS, OPTIONS)
    with pytest.raises(ValueError, match=r"figure6.*'efficiency'"):
        _draw("figure6", {"metrics": _write(tmp_path, "metrics", metrics)}, tmp_path / "x")
    with pytest.raises(ValueError, match=r"figureS5.*'metrics'"):
        figures.render("figureS5", {"layers": metrics}, TASKS, MODELS, OPTIONS)


def test_reruns_write_identical_pdf(tmp_path, metrics):
    path = _write(tmp_path, "metrics", metrics)
    _draw("figure3", {"metrics": path}, tmp_path / "one")
    _draw("figure3", {"metrics": path}, tmp_path / "two")
    assert (tmp_path / "one.pdf").read_bytes() == (tmp_path / "two.pdf").read_bytes()
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()


# ---------------------------------------------------------------------------------------------
# Plotted data equal the table
# ---------------------------------------------------------------------------------------------


def _bars_by_model_and_tick(ax) -> dict[tuple[str, str], tuple[float, float]]:
    """(model label, tick label) -> (bar height, bar centre) read back from the Axes."""
    ticks = {round(t, 6): label.get_text() for t, label in zip(ax.get_xticks(), ax.get_xticklabels())}
    bars = {}
    for container in ax.containers:
        if not isinstance(container, BarContainer):
            continue
        for patch in container.patches:
            centre = patch.get_x() + patch.get_width() / 2
            tick = ticks[round(float(np.round(centre)), 6)]
            bars[(container.get_label(), tick)] = (patch.get_height(), centre)
    return bars


def _error_bar_extents(ax) -> dict[float, tuple[float, float]]:
    """bar centre -> (low, high) of the drawn SD error bars."""
    extents = {}
    for container in ax.containers:
        if isinstance(container, ErrorbarContainer):
            _, _, (vertical,) = container.lines
            for segment in vertical.get_segments():
                extents[round(float(segment[0, 0]), 6)] = (float(segment[0, 1]), float(segment[1, 1]))
    return extents


def _lookup(table, task, model, cls, metric):
    # Independent of figures.bar_table: a plain loop over the rows.
    matches = [
        (row.value, row.sd)
        for row in table.itertuples()
        if row.task == task and row.model == model and row._6 == cls and row.metric == metric
    ]
    assert len(matches) == 1
    return matches[0]


def test_figure3_bar_heights_and_error_bars_equal_table(metrics):
    assert list(metrics.columns).index("class") == 5  # itertuples renames the keyword column to _6
    figure = _render("figure3", {"metrics": metrics})
    axes = figure.get_axes()
    titles = [ax.get_title() for ax in axes]
    assert [t.split(":")[0] for t in titles] == ["(a) T1", "(b) T2", "(c) T3", "(d) T4"]
    labels = {conf["label"]: model for model, conf in MODELS.items()}

    per_class = _bars_by_model_and_tick(axes[0])
    assert len(per_class) == len(TASKS["T1"]["classes"]) * len(RUN_MODELS)  # "absent" draws nothing
    errors = _error_bar_extents(axes[0])
    for (label, cls), (height, centre) in per_class.items():
        value, sd = _lookup(metrics, "T1", labels[label], cls, "f1")  # T1's headline metric is F1
        assert height == pytest.approx(value, abs=1e-12)
        low, high = errors[round(centre, 6)]
        assert (low, high) == pytest.approx((value - sd, value + sd), abs=1e-12)
    # Bars within a class are ordered as the models dict: big left of small.
    for cls in TASKS["T1"]["classes"]:
        assert per_class[("Big VLM", cls)][1] < per_class[("Small VLM", cls)][1]

    macro = _bars_by_model_and_tick(axes[3])
    assert {tick for _, tick in macro} == {"malignant vs benign"}
    for (label, _), (height, _) in macro.items():
        assert height == pytest.approx(_lookup(metrics, "T4", labels[label], "macro", "auc")[0], abs=1e-12)
    assert axes[3].get_ylim() == figures.UNIT_YLIM


def test_bar_table_matches_direct_pivot(metrics):
    values, sds = figures.bar_table(metrics, "T3", "auc", MODELS, ["MEL", "NV", "BCC"])
    assert list(values.columns) == RUN_MODELS and list(values.index) == ["MEL", "NV", "BCC"]
    for cls in values.index:
        for model in values.columns:
            value, sd = _lookup(metrics, "T3", model, cls, "auc")
            assert values.loc[cls, model] == value and sds.loc[cls, model] == sd


def test_duplicate_rows_are_an_error(metrics):
    doubled = pd.concat([metrics, metrics[metrics["task"] == "T1"]])
    with pytest.raises(ValueError, match=r"task T1, model big.*2 rows"):
        _render("figure3", {"metrics": doubled})


def test_missing_tasks_are_skipped_and_empty_figure_raises(metrics, tmp_path):
    without_t2 = metrics[metrics["task"] != "T2"]
    titles = [ax.get_title() for ax in _render("figure3", {"metrics": without_t2}).get_axes()]
    assert [t.split(":")[0] for t in titles] == ["(a) T1", "(c) T3", "(d) T4"]
    only_radiology = metrics[metrics["task"].isin(["T7", "T8"])]
    with pytest.raises(ValueError, match=r"figure3: nothing to draw.*T1, T2, T3, T4"):
        _draw("figure3", {"metrics": _write(tmp_path, "metrics", only_radiology)}, tmp_path / "f3")
    assert not (tmp_path / "f3.pdf").exists()


# ---------------------------------------------------------------------------------------------
# Figure 5: support rule, order, two side-by-side panels
# ---------------------------------------------------------------------------------------------


def _hbars_by_model_and_tick(ax) -> dict[tuple[str, str], tuple[float, float]]:
    """(model label, tick label) -> (bar length, bar centre) of horizontal bars read back from the Axes."""
    ticks = {round(t, 6): label.get_text() for t, label in zip(ax.get_yticks(), ax.get_yticklabels())}
    bars = {}
    for container in ax.containers:
        if not isinstance(container, BarContainer):
            continue
        for patch in container.patches:
            centre = patch.get_y() + patch.get_height() / 2
            bars[(container.get_label(), ticks[round(float(np.round(centre)), 6)])] = (patch.get_width(), centre)
    return bars


def _findings(ax) -> list[str]:
    """Findings of a Figure 5 panel from top to bottom (tick labels without the support count)."""
    ticks = sorted(zip(ax.get_yticks(), ax.get_yticklabels()), key=lambda tick: tick[0])
    if not ax.yaxis_inverted():
        ticks.reverse()
    return [label.get_text().split(" (n=")[0] for _, label in ticks if label.get_text()]


def test_support_filter_keeps_findings_with_strictly_more_positives(metrics):
    kept = figures.support_filter(metrics, "T7", MODELS, min_positives=9)
    expected = sorted((f for f, n in T7_SUPPORT.items() if n > 9), key=lambda f: -T7_SUPPORT[f])
    assert list(kept.index) == expected == ["cardiomegaly", "effusion", "nodule"]
    assert kept.tolist() == [40, 25, 12]
    # Boundary: a finding with exactly the threshold's number of positives is left out (the authors' > 50).
    assert "nodule" not in figures.support_filter(metrics, "T7", MODELS, min_positives=12).index
    assert "nodule" in figures.support_filter(metrics, "T7", MODELS, min_positives=11).index


def test_figure5_reads_min_test_positives_from_task_and_applies_it_strictly(metrics):
    tasks = {**TASKS, "T7": {**TASKS["T7"], "min_test_positives": 12}}
    figure = _render("figure5", {"metrics": metrics}, tasks)
    shown = [finding for ax in figure.get_axes() for finding in _findings(ax)]
    assert shown == ["cardiomegaly", "effusion"]  # nodule has exactly 12 test positives
    # Without the key every finding with a positive is drawn.
    tasks["T7"] = {k: v for k, v in TASKS["T7"].items() if k != "min_test_positives"}
    shown = [finding for ax in _render("figure5", {"metrics": metrics}, tasks).get_axes() for finding in _findings(ax)]
    assert shown == ["cardiomegaly", "effusion", "nodule", "fracture", "scoliosis"]


def test_figure5_first_half_left_rest_right(metrics):
    figure = _render("figure5", {"metrics": metrics})
    left, right = figure.get_axes()
    assert left.get_position().x1 < right.get_position().x0  # side by side, not stacked
    assert left.get_position().y0 == pytest.approx(right.get_position().y0)
    assert [_findings(left), _findings(right)] == [["cardiomegaly", "effusion"], ["nodule"]]
    bars = _hbars_by_model_and_tick(left)
    length, _ = bars[("Small VLM", "effusion (n=25)")]
    assert length == _lookup(metrics, "T7", "small", "effusion", "auc")[0]


def test_figure5_without_support_rows_draws_every_finding_in_table_order(metrics):
    # The probe stage already keeps only findings with enough positives; support rows are only a guard.
    table = metrics[(metrics["metric"] != "support") & ~((metrics["task"] == "T7") & (metrics["class"] == "nodule"))]
    order = ["scoliosis", "cardiomegaly", "fracture", "effusion"]
    rows = [table[(table["task"] == "T7") & (table["class"] == finding)] for finding in order]
    table = pd.concat([table[(table["task"] != "T7") | (table["class"] == "macro")], *rows])
    tasks = {**TASKS, "T7": {**TASKS["T7"], "classes": "all"}}
    figure = _render("figure5", {"metrics": table}, tasks)
    assert [finding for ax in figure.get_axes() for finding in _findings(ax)] == order


def test_figure5_threshold_above_every_finding_raises(metrics, tmp_path):
    tasks = {**TASKS, "T7": {**TASKS["T7"], "min_test_positives": 40}}  # the most frequent finding has 40
    with pytest.raises(ValueError, match=r"figure5.*T7.*more than 40.*tasks\.T7\.min_test_positives"):
        _draw("figure5", {"metrics": _write(tmp_path, "metrics", metrics)}, tmp_path / "f5", tasks)
    assert not (tmp_path / "f5.pdf").exists()


def test_classes_all_takes_classes_in_table_order(metrics, tmp_path):
    tasks = {name: {**conf, "classes": "all"} if name == "T7" else conf for name, conf in TASKS.items()}
    # Table order, not the characters of "all".
    assert figures.class_order(metrics, "T7", tasks["T7"]) == TASKS["T7"]["classes"]
    assert figures.class_order(metrics, "T3", tasks["T3"]) == TASKS["T3"]["classes"]
    tables = {"metrics": _write(tmp_path, "metrics", metrics)}
    for name in ("figure3", "figure4", "figure5"):
        _draw(name, tables, tmp_path / name, tasks)
        _check_outputs(tmp_path / name)
    with pytest.raises(ValueError, match=r"tasks\.T7\.classes is 'every'"):
        figures.class_order(metrics, "T7", {**TASKS["T7"], "classes": "every"})


def test_figure3_binary_f1_bar_says_it_is_the_mean_of_both_classes(metrics):
    axes = _render("figure3", {"metrics": metrics}).get_axes()
    assert {tick for _, tick in _bars_by_model_and_tick(axes[1])} == {"macro F1\n(benign, malignant)"}


# ---------------------------------------------------------------------------------------------
# Figure S5: per-layer curves
# ---------------------------------------------------------------------------------------------


def test_layers_are_ordered_numerically_with_embeddings_last():
    names = ["hidden.10", "image_embeds", "hidden.9", "hidden.0", "hidden.2", "hidden.12", "hidden.1"]
    assert figures.order_layers(names) == [
        "hidden.0",
        "hidden.1",
        "hidden.2",
        "hidden.9",
        "hidden.10",
        "hidden.12",
        "image_embeds",
    ]
    with pytest.raises(ValueError, match=r"'pooler'"):
        figures.order_layers(["hidden.1", "pooler"])


def test_layer_curves_follow_depth_order(layers):
    curves = figures.layer_curves(layers, TASKS, MODELS, metric="auc")
    big = curves[(curves["task"] == "T3") & (curves["model"] == "big")]
    assert big["layer"].tolist() == [f"hidden.{i}" for i in range(13)]
    np.testing.assert_allclose(big["x"], np.arange(13))
    small = curves[(curves["task"] == "T3") & (curves["model"] == "small")]
    assert small["layer"].tolist()[-2:] == ["hidden.4", "image_embeds"]
    assert small["x"].tolist()[-2:] == [4, 5]  # the projection one step past the last hidden layer
    for row in small.itertuples():
        source = layers[
            (layers["task"] == "T3")
            & (layers["model"] == "small")
            & (layers["layer"] == row.layer)
            & (layers["metric"] == "auc")
        ]
        assert row.value == source["value"].item() and row.sd == source["sd"].item()


def test_figureS5_lines_run_left_to_right(layers, metrics):
    figure = _render("figureS5", {"layers": layers, "metrics": metrics})
    axes = figure.get_axes()
    assert [ax.get_title() for ax in axes] == ["(a) pathology", "(b) dermatology", "(c) ophthalmology", "(d) radiology"]
    (line,) = [line for line in axes[0].get_lines() if line.get_label().startswith("T1 · Big")]
    x = np.asarray(line.get_xdata(), dtype=float)
    assert np.all(np.diff(x) > 0) and x[0] == 0.0 and x[-1] == 12.0


def _layer_tables(n_hidden_states: int, headline: str, task: str = "T3"):
    """layers.csv rows of one model for every hidden.i, and the metrics.csv rows naming its headline layer."""
    rng = np.random.default_rng(7)
    rows = []
    for i in range(n_hidden_states):
        for metric in ("auc", "f1"):
            rows.append(
                _row(task, "big", "macro", metric, rng.uniform(0.5, 0.9), rng.uniform(0.01, 0.03), layer=f"hidden.{i}")
            )
    metrics = pd.DataFrame([_row(task, "big", "macro", metric, 0.8, 0.02, layer=headline) for metric in ("auc", "f1")])
    return pd.DataFrame(rows), metrics


AUTHORS_ORDER = dataclasses.replace(OPTIONS, figureS5_order="authors")


def _headline_lines(ax) -> list[float]:
    return sorted(
        float(line.get_xdata()[0])
        for line in ax.get_lines()
        if line.get_gid() == "headline" and line.get_linestyle() == "--" and line.get_color() == "black"
    )


def test_figureS5_authors_order_puts_hidden39_at_32_and_marks_the_fixed_layer():
    layers, metrics = _layer_tables(81, headline="hidden.39")  # the 80-layer model: 81 hidden states
    curves = figures.layer_curves(layers, TASKS, MODELS, metric="auc", order="authors")
    assert curves.set_index("layer").loc["hidden.39", "x"] == 32
    assert "hidden.0" not in set(curves["layer"])  # never saved by the authors: no index
    assert sorted(curves["x"]) == list(range(80))
    figure = _render("figureS5", {"layers": layers, "metrics": metrics}, options=AUTHORS_ORDER)
    (ax,) = figure.get_axes()
    assert _headline_lines(ax) == [32.0]
    assert "authors" in ax.get_xlabel()
    (line,) = [line for line in ax.get_lines() if line.get_label() == "T3 · Big VLM"]
    auc = layers[layers["metric"] == "auc"].set_index("layer")["value"]
    text_sorted = [int(name[2:-3]) for name in sorted(f"x.{k}.pt" for k in range(80))]  # x.0, x.1, x.10, ...
    expected = [auc[f"hidden.{lix + 1}"] for lix in text_sorted]
    np.testing.assert_allclose(line.get_ydata(), expected)
    # Depth order: the same layer at its hidden_states index.
    figure = _render("figureS5", {"layers": layers, "metrics": metrics})
    assert _headline_lines(figure.get_axes()[0]) == [39.0]


def test_figureS5_uses_the_authors_layer_column_when_present():
    layers, metrics = _layer_tables(81, headline="hidden.39")
    stored = layers[layers["layer"].isin(["hidden.1", "hidden.11", "hidden.39"])].copy()
    # Only three layers stored: the deepest stored name alone cannot tell the model has 80 layer files.
    stored["authors_layer"] = stored["layer"].map({"hidden.1": "0", "hidden.11": "2", "hidden.39": "32"})
    curves = figures.layer_curves(stored, TASKS, MODELS, metric="auc", order="authors")
    assert dict(zip(curves["layer"], curves["x"])) == {"hidden.1": 0, "hidden.11": 2, "hidden.39": 32}


def test_figureS5_draws_the_chosen_metric_with_sd_band():
    layers, metrics = _layer_tables(9, headline="hidden.4", task="T1")  # T1's headline metric is F1
    for metric in ("auc", "f1"):
        figure = _render(
            "figureS5",
            {"layers": layers, "metrics": metrics},
            options=dataclasses.replace(OPTIONS, figureS5_metric=metric),
        )
        (ax,) = figure.get_axes()
        (line,) = [line for line in ax.get_lines() if line.get_label() == "T1 · Big VLM"]
        rows = layers[layers["metric"] == metric].set_index("layer").loc[[f"hidden.{i}" for i in range(9)]]
        np.testing.assert_allclose(line.get_ydata(), rows["value"])
        assert ax.get_ylabel().startswith(figures.METRIC_LABELS[metric])
        (band,) = ax.collections
        vertices = band.get_paths()[0].vertices
        for x, row in enumerate(rows.itertuples()):
            at_x = vertices[np.isclose(vertices[:, 0], x), 1]
            assert at_x.min() == pytest.approx(row.value - row.sd) and at_x.max() == pytest.approx(row.value + row.sd)
        assert _headline_lines(ax) == [4.0]


def test_figureS5_rejects_unknown_order_and_headline_layer_conflicts():
    layers, metrics = _layer_tables(9, headline="hidden.4")
    with pytest.raises(ValueError, match=r"figures\.figureS5_order.*'text'.*depth, authors"):
        _render(
            "figureS5",
            {"layers": layers, "metrics": metrics},
            options=dataclasses.replace(OPTIONS, figureS5_order="text"),
        )
    conflicting = pd.concat([metrics, metrics.assign(layer="hidden.5")])
    with pytest.raises(ValueError, match=r"task T3, model big.*hidden\.4.*hidden\.5"):
        _render("figureS5", {"layers": layers, "metrics": conflicting})


def test_figure5_and_figureS6_draw_the_tasks_their_options_name(metrics, groups):
    t3 = metrics[metrics["task"] == "T3"].assign(task="T9")
    tasks = {**TASKS, "T9": {**TASKS["T3"], "name": "Skin lesions again", "min_test_positives": 0}}
    options = dataclasses.replace(OPTIONS, figure5_task="T9", figureS6_task="T9")
    titles = [ax.get_title() for ax in _render("figure5", {"metrics": t3}, tasks, options).get_axes()]
    assert titles == ["(a) T9: Skin lesions again", "(b) T9: Skin lesions again"]
    with pytest.raises(ValueError, match=r"figureS6: nothing to draw.*T9"):
        _render("figureS6", {"groups": groups}, tasks, options)


def test_draw_passes_metrics_to_figureS5_for_the_headline_layer(tmp_path, monkeypatch):
    layers, metrics = _layer_tables(81, headline="hidden.39")
    paths = {"layers": _write(tmp_path, "layers", layers), "metrics": _write(tmp_path, "metrics", metrics)}
    drawn = {}
    monkeypatch.setattr(figures, "save", lambda figure, pdf, png: drawn.update(figure=figure, files=(pdf, png)))
    options = FiguresSettings.from_dict({**dataclasses.asdict(OPTIONS), "figureS5_order": "authors"})
    figures.draw(
        "figureS5", paths, tmp_path / "s5.pdf", tmp_path / "s5.png", tasks=TASKS, models=MODELS, options=options
    )
    assert drawn["files"] == (tmp_path / "s5.pdf", tmp_path / "s5.png")
    assert _headline_lines(drawn["figure"].get_axes()[0]) == [32.0]


# ---------------------------------------------------------------------------------------------
# Figure 6: seed mean and band
# ---------------------------------------------------------------------------------------------


def test_efficiency_curves_mean_and_band(efficiency):
    curves = figures.efficiency_curves(efficiency, TASKS, MODELS)
    assert len(curves) == len(TASKS) * len(RUN_MODELS) * 3
    for row in curves.itertuples():
        seeds = efficiency[
            (efficiency["task"] == row.task)
            & (efficiency["model"] == row.model)
            & np.isclose(efficiency["fraction"], row.fraction)
        ]
        values, boot_sd = seeds["value"].to_numpy(), seeds["sd"].to_numpy()
        assert row.n_seeds == 3
        assert row.mean == pytest.approx(values.mean())
        expected_band = math.sqrt(np.var(values, ddof=1) + np.mean(boot_sd**2))
        assert row.band_sd == pytest.approx(expected_band)
    first = curves[(curves["task"] == "T1")]
    assert first["model"].tolist()[:3] == ["big"] * 3 and first["fraction"].tolist()[:3] == [0.1, 0.25, 1.0]


def test_figure6_plots_seed_means_on_log_axis(efficiency):
    figure = _render("figure6", {"efficiency": efficiency})
    ax = figure.get_axes()[2]  # ophthalmology
    assert ax.get_xscale() == "log"
    (line,) = [line for line in ax.get_lines() if line.get_label() == "T6 · Small VLM"]
    rows = efficiency[(efficiency["task"] == "T6") & (efficiency["model"] == "small")]
    expected = rows.groupby("fraction")["value"].mean()
    np.testing.assert_allclose(line.get_xdata(), expected.index)
    np.testing.assert_allclose(line.get_ydata(), expected.to_numpy())


def test_figure6_with_one_discipline(efficiency, tmp_path):
    _draw(
        "figure6",
        {"efficiency": _write(tmp_path, "efficiency", efficiency[efficiency["task"] == "T4"])},
        tmp_path / "f6",
    )
    _check_outputs(tmp_path / "f6")
    with pytest.raises(ValueError, match=r"figure6: nothing to draw"):
        _render("figure6", {"efficiency": efficiency[efficiency["model"] == "nobody"]})


def test_figureS6_shows_macro_and_positive_class_f1_per_organ(groups):
    figure = _render("figureS6", {"groups": groups})
    macro_ax, positive_ax = figure.get_axes()
    assert "macro F1" in macro_ax.get_ylabel() and "malignant" in positive_ax.get_ylabel()
    labels = {conf["label"]: model for model, conf in MODELS.items()}
    for ax, metric in ((macro_ax, "f1"), (positive_ax, "f1_positive")):
        bars = _bars_by_model_and_tick(ax)
        assert {tick for _, tick in bars} == {"Breast", "Colon", "Kidney"}
        errors = _error_bar_extents(ax)
        for (label, group), (height, centre) in bars.items():
            row = groups[
                (groups["group"] == group)
                & (groups["model"] == labels[label])
                & (groups["class"] == "macro")
                & (groups["metric"] == metric)
            ]
            assert height == row["value"].item()
            assert errors[round(centre, 6)] == pytest.approx(
                (row["value"].item() - row["sd"].item(), row["value"].item() + row["sd"].item())
            )


def test_figureS6_positive_f1_falls_back_to_the_positive_class_row(groups):
    older = groups[groups["metric"] != "f1_positive"]
    _, positive_ax = _render("figureS6", {"groups": older}).get_axes()
    bars = _bars_by_model_and_tick(positive_ax)
    for (label, group), (height, _) in bars.items():
        row = older[
            (older["group"] == group)
            & (older["model"] == ("big" if label == "Big VLM" else "small"))
            & (older["class"] == "malignant")
        ]
        assert height == row["value"].item()


# ---------------------------------------------------------------------------------------------
# Figure 1d: NEJM accuracy by difficulty
# ---------------------------------------------------------------------------------------------


def test_figure1d_bars_readers_and_chance_equal_the_nejm_table(nejm):
    (ax,) = _render("figure1d", {"nejm": nejm}, tasks={}).get_axes()
    ticks = [label.get_text().split("\n")[0] for label in ax.get_xticklabels()]
    assert ticks == NEJM_STRATA  # easiest last: strata by the readers' share, not by name
    bars = {}
    for container in ax.containers:
        if isinstance(container, BarContainer):
            for patch in container.patches:
                stratum = ticks[int(np.round(patch.get_x() + patch.get_width() / 2))]
                bars[(patch.get_gid(), stratum)] = patch.get_height()
    expected = {
        (f"{row.model}:{row.mode}", row.stratum): row.accuracy
        for row in nejm.itertuples()
        if row.model in RUN_MODELS and row.stratum != "all"
    }
    assert bars == pytest.approx(expected, abs=1e-12)
    (readers,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.get_label() == "human readers"]
    np.testing.assert_allclose(np.asarray(readers.lines[0].get_ydata(), float), [0.1, 0.3, 0.5, 0.7, 0.9])
    (chance,) = [line for line in ax.get_lines() if line.get_gid() == "chance"]
    assert list(chance.get_ydata()) == [0.2, 0.2]
    labels = [container.get_label() for container in ax.containers if isinstance(container, BarContainer)]
    assert labels[:3] == ["Big VLM, greedy", "Big VLM, top-3 sampled", "Big VLM, likelihood"]


def test_figure1d_without_model_rows_raises(nejm):
    with pytest.raises(ValueError, match="figure1d: nothing to draw"):
        _render("figure1d", {"nejm": nejm[nejm["model"].isin(["readers", "chance"])]}, tasks={})

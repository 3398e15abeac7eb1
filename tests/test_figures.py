"""Tests for medprobe.figures: files written, plotted data equal to the tables, filters and ordering."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from PIL import Image

from medprobe import figures

PDF_MAGIC = b"%PDF-"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TASKS = {
    "T1": {"name": "Colorectal tissue", "discipline": "pathology", "kind": "multiclass", "metric": "f1",
           "classes": ["ADI", "LYM", "TUM"]},
    "T2": {"name": "Pan-cancer malignancy", "discipline": "pathology", "kind": "binary", "metric": "f1",
           "classes": ["benign", "malignant"]},
    "T3": {"name": "Skin lesions", "discipline": "dermatology", "kind": "multiclass", "metric": "auc",
           "classes": ["MEL", "NV", "BCC"]},
    "T4": {"name": "Melanoma", "discipline": "dermatology", "kind": "binary", "metric": "auc",
           "classes": ["benign", "malignant"]},
    "T5": {"name": "Diabetic retinopathy", "discipline": "ophthalmology", "kind": "multiclass", "metric": "auc",
           "classes": ["0", "1", "2"], "graded": True},
    "T6": {"name": "Glaucoma", "discipline": "ophthalmology", "kind": "binary", "metric": "auc",
           "classes": ["no_glaucoma", "glaucoma"]},
    "T7": {"name": "Chest radiograph findings", "discipline": "radiology", "kind": "multilabel", "metric": "auc",
           "classes": ["cardiomegaly", "effusion", "nodule", "fracture", "scoliosis"]},
    "T8": {"name": "Knee osteoarthritis", "discipline": "radiology", "kind": "multiclass", "metric": "auc",
           "classes": ["0", "1", "2"], "graded": True},
}
# "absent" is configured but has no rows anywhere: figures must skip it silently.
MODELS = {
    "big": {"label": "Big VLM"},
    "small": {"label": "Small VLM"},
    "absent": {"label": "Never run"},
}
RUN_MODELS = ["big", "small"]
# Test positives per T7 finding; with min_positives=10, "fracture" and "scoliosis" must be dropped.
T7_SUPPORT = {"cardiomegaly": 40, "effusion": 25, "nodule": 12, "fracture": 9, "scoliosis": 3}


def _row(task, model, cls, metric, value, sd, layer="hidden.4", fraction=1.0, seed=float("nan")):
    return {
        "task": task, "model": model, "layer": layer, "fraction": fraction, "seed": seed, "class": cls,
        "metric": metric, "value": value, "sd": sd, "ci_low": value - 2 * sd, "ci_high": value + 2 * sd,
        "n_train": 100, "n_test": 50,
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
    for task, conf in TASKS.items():
        for model in RUN_MODELS:
            for layer in names[model]:
                rows.append(_row(task, model, "macro", conf["metric"], rng.uniform(0.5, 0.9), 0.02, layer=layer))
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
                    rows.append(_row(task, model, "macro", conf["metric"], value, rng.uniform(0.01, 0.04),
                                     fraction=fraction, seed=seed))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def groups() -> pd.DataFrame:
    rng = np.random.default_rng(4)
    rows = []
    for group in ("Breast", "Colon", "Kidney"):
        for model in RUN_MODELS:
            for cls in ("malignant", "macro"):
                row = _row("T2", model, cls, "f1", rng.uniform(0.5, 0.95), rng.uniform(0.01, 0.05))
                row["group"] = group
                rows.append(row)
    return pd.DataFrame(rows)


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
        figures.figureS6(groups.drop(columns=["group"]), TASKS, MODELS, tmp_path / "s6")


def test_figure_rejects_table_without_required_column(tmp_path, metrics):
    with pytest.raises(ValueError, match=r"figure3.*'metric'"):
        figures.figure3(metrics.drop(columns=["metric"]), TASKS, MODELS, tmp_path / "f3")


# ---------------------------------------------------------------------------------------------
# Every figure, through draw()
# ---------------------------------------------------------------------------------------------


def test_every_figure_is_written_as_pdf_and_png(tmp_path, metrics, layers, efficiency, groups):
    tables = {"metrics": metrics, "layers": layers, "efficiency": efficiency, "groups": groups}
    options = {"figure5": {"min_positives": 10}}
    for name in ("figure3", "figure4", "figure5", "figure6", "figureS5", "figureS6"):
        stem = tmp_path / "figs" / name
        figures.draw(name, tables, TASKS, MODELS, stem, **options.get(name, {}))
        _check_outputs(stem)


def test_png_has_figure_size_at_200_dpi(tmp_path, metrics):
    expected = figures.build_figure4(metrics, TASKS, MODELS).get_size_inches() * 200
    figures.figure4(metrics, TASKS, MODELS, tmp_path / "f4")
    with Image.open(tmp_path / "f4.png") as image:
        assert image.size == (round(expected[0]), round(expected[1]))


def test_draw_rejects_unknown_figure_and_missing_table(tmp_path, metrics):
    with pytest.raises(ValueError, match=r"figure7.*figure3"):
        figures.draw("figure7", {"metrics": metrics}, TASKS, MODELS, tmp_path / "x")
    with pytest.raises(ValueError, match=r"figure6.*'efficiency'"):
        figures.draw("figure6", {"metrics": metrics}, TASKS, MODELS, tmp_path / "x")


def test_reruns_write_identical_pdf(tmp_path, metrics):
    figures.figure3(metrics, TASKS, MODELS, tmp_path / "one")
    figures.figure3(metrics, TASKS, MODELS, tmp_path / "two")
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
        if row.task == task and row.model == model and getattr(row, "_6") == cls and row.metric == metric
    ]
    assert len(matches) == 1
    return matches[0]


def test_figure3_bar_heights_and_error_bars_equal_table(metrics):
    assert list(metrics.columns).index("class") == 5  # itertuples renames the keyword column to _6
    figure = figures.build_figure3(metrics, TASKS, MODELS)
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
        figures.build_figure3(doubled, TASKS, MODELS)


def test_missing_tasks_are_skipped_and_empty_figure_raises(metrics, tmp_path):
    without_t2 = metrics[metrics["task"] != "T2"]
    titles = [ax.get_title() for ax in figures.build_figure3(without_t2, TASKS, MODELS).get_axes()]
    assert [t.split(":")[0] for t in titles] == ["(a) T1", "(c) T3", "(d) T4"]
    only_radiology = metrics[metrics["task"].isin(["T7", "T8"])]
    with pytest.raises(ValueError, match=r"figure3: nothing to draw.*T1, T2, T3, T4"):
        figures.figure3(only_radiology, TASKS, MODELS, tmp_path / "f3")
    assert not (tmp_path / "f3.pdf").exists()


# ---------------------------------------------------------------------------------------------
# Figure 5: support filter
# ---------------------------------------------------------------------------------------------


def test_support_filter_drops_rare_findings(metrics):
    kept = figures.support_filter(metrics, "T7", MODELS, min_positives=10)
    expected = sorted((f for f, n in T7_SUPPORT.items() if n >= 10), key=lambda f: -T7_SUPPORT[f])
    assert list(kept.index) == expected == ["cardiomegaly", "effusion", "nodule"]
    assert kept.tolist() == [40, 25, 12]
    # Boundary: support equal to the threshold is kept.
    assert "nodule" in figures.support_filter(metrics, "T7", MODELS, min_positives=12).index


def test_figure5_plots_only_kept_findings_in_two_halves(metrics):
    figure = figures.build_figure5(metrics, TASKS, MODELS, min_positives=10)
    top, bottom = figure.get_axes()
    shown = [{tick.split("\n")[0] for _, tick in _bars_by_model_and_tick(ax)} for ax in (top, bottom)]
    assert shown == [{"cardiomegaly", "effusion"}, {"nodule"}]
    heights = _bars_by_model_and_tick(top)
    assert heights[("Small VLM", "effusion\n(n=25)")][0] == _lookup(metrics, "T7", "small", "effusion", "auc")[0]


def test_figure5_threshold_above_every_finding_raises(metrics, tmp_path):
    with pytest.raises(ValueError, match=r"figure5.*T7.*at least 41"):
        figures.figure5(metrics, TASKS, MODELS, tmp_path / "f5", min_positives=41)
    with pytest.raises(ValueError, match=r"figure5.*'support' rows"):
        figures.figure5(metrics[metrics["metric"] != "support"], TASKS, MODELS, tmp_path / "f5")


# ---------------------------------------------------------------------------------------------
# Figure S5: layer order and depth
# ---------------------------------------------------------------------------------------------


def test_layers_are_ordered_numerically_with_embeddings_last():
    names = ["hidden.10", "image_embeds", "hidden.9", "hidden.0", "hidden.2", "hidden.12", "hidden.1"]
    assert figures.order_layers(names) == [
        "hidden.0", "hidden.1", "hidden.2", "hidden.9", "hidden.10", "hidden.12", "image_embeds",
    ]
    depths = figures.relative_depths(names)
    assert depths["hidden.9"] == pytest.approx(9 / 12) and depths["hidden.12"] == 1.0
    assert depths["image_embeds"] == pytest.approx(13 / 12)
    with pytest.raises(ValueError, match=r"'pooler'"):
        figures.order_layers(["hidden.1", "pooler"])


def test_layer_curves_follow_depth_order(layers):
    curves = figures.layer_curves(layers, TASKS, MODELS)
    big = curves[(curves["task"] == "T3") & (curves["model"] == "big")]
    assert big["layer"].tolist() == [f"hidden.{i}" for i in range(13)]
    np.testing.assert_allclose(big["depth"], np.arange(13) / 12)
    small = curves[(curves["task"] == "T3") & (curves["model"] == "small")]
    assert small["layer"].tolist()[-2:] == ["hidden.4", "image_embeds"]
    for row in small.itertuples():
        source = layers[(layers["task"] == "T3") & (layers["model"] == "small") & (layers["layer"] == row.layer)]
        assert row.value == source["value"].item() and row.ci_high == source["ci_high"].item()


def test_figureS5_lines_run_left_to_right(layers):
    figure = figures.build_figureS5(layers, TASKS, MODELS)
    axes = figure.get_axes()
    assert [ax.get_title() for ax in axes] == ["(a) pathology", "(b) dermatology", "(c) ophthalmology", "(d) radiology"]
    lines = [line for line in axes[0].get_lines() if line.get_label().startswith("T1 · Big")]
    (line,) = lines
    x = np.asarray(line.get_xdata(), dtype=float)
    assert np.all(np.diff(x) > 0) and x[0] == 0.0 and x[-1] == 1.0


# ---------------------------------------------------------------------------------------------
# Figure 6: seed mean and band
# ---------------------------------------------------------------------------------------------


def test_efficiency_curves_mean_and_band(efficiency):
    curves = figures.efficiency_curves(efficiency, TASKS, MODELS)
    assert len(curves) == len(TASKS) * len(RUN_MODELS) * 3
    for row in curves.itertuples():
        seeds = efficiency[
            (efficiency["task"] == row.task) & (efficiency["model"] == row.model)
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
    figure = figures.build_figure6(efficiency, TASKS, MODELS)
    ax = figure.get_axes()[2]  # ophthalmology
    assert ax.get_xscale() == "log"
    (line,) = [line for line in ax.get_lines() if line.get_label() == "T6 · Small VLM"]
    rows = efficiency[(efficiency["task"] == "T6") & (efficiency["model"] == "small")]
    expected = rows.groupby("fraction")["value"].mean()
    np.testing.assert_allclose(line.get_xdata(), expected.index)
    np.testing.assert_allclose(line.get_ydata(), expected.to_numpy())


def test_figure6_with_one_discipline(efficiency, tmp_path):
    figures.figure6(efficiency[efficiency["task"] == "T4"], TASKS, MODELS, tmp_path / "f6")
    _check_outputs(tmp_path / "f6")
    with pytest.raises(ValueError, match=r"figure6: nothing to draw"):
        figures.figure6(efficiency[efficiency["model"] == "nobody"], TASKS, MODELS, tmp_path / "none")


def test_figureS6_bars_equal_group_values(groups):
    figure = figures.build_figureS6(groups, TASKS, MODELS)
    (ax,) = figure.get_axes()
    bars = _bars_by_model_and_tick(ax)
    assert {tick for _, tick in bars} == {"Breast", "Colon", "Kidney"}
    for (label, group), (height, _) in bars.items():
        model = "big" if label == "Big VLM" else "small"
        expected = groups[(groups["group"] == group) & (groups["model"] == model) & (groups["class"] == "macro")]
        assert height == expected["value"].item()

"""The cost model (medprobe.cost): its arithmetic against hand computations, the generator on both study
configs, and docs/cost.md kept equal to what the generator writes for config/paper.yaml."""

import ast
import json
import math
import re

import pytest

from medprobe import cost
from medprobe.cost import (
    Architecture,
    Decoder,
    Hardware,
    Images,
    Layout,
    Resampler,
    Stack,
    Vision,
)


def mm(m, k, n):
    """FLOPs of an (m, k) x (k, n) matrix product."""
    return 2 * m * k * n


# A made-up model: a 2-layer ViT (width 8, MLP 16) on 32 px images in 8 px patches (16 patches + a class token),
# a projection to 4; a resampler of 4 latents (inner width 6, MLP 32); a 3-layer gated decoder (width 16, MLP
# 24) with a cross-attention block before every 2nd layer, reading the 4 latents.
VISION = Vision(Stack(layers=2, width=8, ffn=16), image_size=32, patch_size=8, extra_tokens=1, projection=4)
RESAMPLER = Resampler(latents=4, depth=1, inner=6, width=8, ffn=32)
DECODER = Decoder(
    Stack(layers=3, width=16, ffn=24, gated=True), vocab=50, cross_interval=2, image_width=8, image_tokens=4
)
TINY = Architecture("tiny", "made up", VISION, RESAMPLER, DECODER)
TINY_VISION = Architecture("tiny vision", "made up", VISION)
HARDWARE = Hardware("test GPU", 100.0, 10.0, 5.0, 2.0, 0.5, "test", 1e-3, "test")


def vision_flops_by_hand():
    tokens = 17
    layer = (
        4 * mm(tokens, 8, 8)  # q, k, v, o
        + mm(tokens, 8, tokens)  # Q K^T
        + mm(tokens, tokens, 8)  # scores x V
        + mm(tokens, 8, 16)  # MLP up
        + mm(tokens, 16, 8)  # MLP down
    )
    patch_embedding = mm(16, 3 * 8 * 8, 8)
    projection = mm(1, 8, 4)
    return patch_embedding + 2 * layer + projection


def resampler_flops_by_hand():
    context = 17 + 4
    return (
        mm(4, 8, 6)  # q from the latents
        + 2 * mm(context, 8, 6)  # k, v from [vision tokens, latents]
        + mm(4, 6, context)  # Q K^T
        + mm(4, context, 6)  # scores x V
        + mm(4, 6, 8)  # o
        + mm(4, 8, 32)
        + mm(4, 32, 8)  # MLP
    )


def decoder_flops_by_hand(text, layers_run):
    layer = (
        4 * mm(text, 16, 16)
        + mm(text, 16, text)
        + mm(text, text, 16)
        + 2 * mm(text, 16, 24)  # gate and up
        + mm(text, 24, 16)  # down
    )
    block = (
        mm(text, 16, 16)  # q
        + 2 * mm(4, 8, 16)  # k, v from the 4 latents of width 8
        + mm(text, 16, 4)
        + mm(text, 4, 16)  # scores
        + mm(text, 16, 16)  # o
        + 2 * mm(text, 16, 24)
        + mm(text, 24, 16)  # gated MLP
    )
    blocks = math.ceil(layers_run / 2)  # before layers 0, 2, ...
    return layers_run * layer, blocks * block


def test_flops_per_image_by_hand():
    assert VISION.tokens == 17
    parts = TINY.flops(text_tokens=5)
    assert parts["vision tower"] == vision_flops_by_hand()
    assert parts["resampler"] == resampler_flops_by_hand()
    assert (parts["decoder"], parts["cross-attention"]) == decoder_flops_by_hand(5, 3)
    # the forward stops after the deepest stored hidden state: hidden.1 = the output of decoder layer 0
    shallow = TINY.flops(text_tokens=5, deepest=1)
    assert (shallow["decoder"], shallow["cross-attention"]) == decoder_flops_by_hand(5, 1)
    assert TINY_VISION.flops(0) == {"vision tower": vision_flops_by_hand()}


def test_parameters_by_hand():
    vision = 3 * 8 * 8 * 8 + 2 * (4 * 8 * 8 + 2 * 8 * 16) + 8 * 4
    resampler = (4 * 8 * 6 + 2 * 8 * 32) + 4 * 8
    decoder = 3 * (4 * 16 * 16 + 3 * 16 * 24) + 2 * (2 * 16 * 16 + 2 * 8 * 16 + 3 * 16 * 24) + 2 * 50 * 16
    assert TINY.params() == vision + resampler + decoder
    assert TINY.hidden_states == 4 and TINY.width == 16 and TINY.embedding is None
    assert TINY_VISION.hidden_states == 3 and TINY_VISION.width == 8 and TINY_VISION.embedding == 4


def test_disk_bytes_by_hand():
    every = Layout(hidden=(0, 1, 2, 3), embeddings=False, dtype="float16")
    assert cost.disk_bytes(10, every, TINY) == 10 * 4 * 16 * 2
    assert cost.disk_bytes(10, Layout((0, 1, 2, 3), False, "float32"), TINY) == 10 * 4 * 16 * 4
    # int8: one byte per value and one float32 scale per layer and channel
    assert cost.disk_bytes(10, Layout((0, 1, 2, 3), False, "int8"), TINY) == 10 * 64 + 64 * 4
    with_embeddings = Layout(hidden=(0, 1, 2), embeddings=True, dtype="float32")
    assert cost.disk_bytes(10, with_embeddings, TINY_VISION) == 10 * (3 * 8 + 4) * 4


def probe_config(**probe):
    return {
        "probe": {"C_grid": [0.1, 1.0, 10.0, 1.0], "refine": True, "refit": True, "max_iter": 7, **probe},
        "efficiency": {"fractions": [0.5, 1.0], "seeds": 2},
        "models": {"m": {"layer": "validation"}},
    }


def test_regularised_probe_flops_and_bytes_by_hand():
    config = probe_config(mode="regularised", dtype="float32", adam={"batch_size": 32})
    images = Images(train=100, val=20, test=30, classes=3, source="made up")
    plan = cost.probe_plan(config, "m", "multiclass", images)
    layers, efficiency = cost.probe_work(plan, [16, 16], 16, HARDWARE)
    # per layer, 7 iterations of two passes (X W, then G^T X: 2 x 2 N D K) for the 3 grid values (train rows),
    # the 5 refined values (train rows) and the refit (train + val rows)
    per_fit_train, per_fit_all = 7 * 4 * 100 * 16 * 3, 7 * 4 * 120 * 16 * 3
    assert layers.flops == 2 * (3 * per_fit_train + 5 * per_fit_train + per_fit_all)
    # lockstep fits share each pass: 2 reads of the float32 features per iteration and phase
    assert layers.bytes_read == 2 * (2 * 7 * 2 * 100 * 16 * 4 + 7 * 2 * 120 * 16 * 4)
    # efficiency: fraction 0.5 (60 rows) for both seeds, the whole training set once
    assert efficiency.flops == 2 * 7 * 4 * 60 * 16 * 3 + 7 * 4 * 120 * 16 * 3
    grid_flops, grid_bytes = 3 * per_fit_train, 7 * 2 * 100 * 16 * 4
    grid_seconds = max(grid_flops / 10e12, grid_bytes / 2e12) / 0.5
    single = cost.probe_work(plan, [16], 16, HARDWARE)[0]
    assert single.seconds == pytest.approx(
        grid_seconds
        + max(5 * per_fit_train / 10e12, grid_bytes / 2e12) / 0.5
        + max(per_fit_all / 10e12, 7 * 2 * 120 * 16 * 4 / 2e12) / 0.5
    )


def test_adam_probe_counts_epochs_and_steps():
    config = probe_config(mode="adam", adam={"epochs": 3, "batch_size": 32})
    images = Images(train=100, val=20, test=30, classes=2, source="made up")
    plan = cost.probe_plan(config, "m", "binary", images)
    assert plan.outputs == 2  # the authors' nn.Linear(d, 2)
    layers, _ = cost.probe_work(plan, [16], 16, HARDWARE)
    # train + val, and (layer chosen on validation) train alone; 3 epochs each
    assert layers.flops == 3 * 4 * 120 * 16 * 2 + 3 * 4 * 100 * 16 * 2
    roofline = max(3 * 4 * 120 * 16 * 2 / 10e12, 3 * 2 * 120 * 16 * 4 / 2e12) / 0.5
    roofline += max(3 * 4 * 100 * 16 * 2 / 10e12, 3 * 2 * 100 * 16 * 4 / 2e12) / 0.5
    steps = 3 * math.ceil(120 / 32) + 3 * math.ceil(100 / 32)
    assert layers.seconds == pytest.approx(roofline + steps * 1e-3)
    regularised = cost.probe_plan(probe_config(mode="regularised", adam={"batch_size": 32}), "m", "binary", images)
    assert regularised.outputs == 1


def test_extraction_time_is_a_roofline():
    layout = Layout(hidden=(0, 1, 2, 3), embeddings=False, dtype="float16")
    work = cost.extraction_work(TINY, images=10, text=5, layout=layout, batch_size=4, weight_bytes=2, hardware=HARDWARE)
    per_image = sum(TINY.flops(5).values())
    weights = (
        VISION.params() + RESAMPLER.params() + 3 * (4 * 256 + 3 * 16 * 24) + 2 * (2 * 256 + 2 * 8 * 16 + 3 * 16 * 24)
    )
    assert work.flops == 10 * per_image
    assert work.bytes_read == 3 * weights * 2  # 3 batches, each reading the weights once
    assert work.seconds == pytest.approx(max(10 * per_image / 100e12, 6 * weights / 2e12) / 0.5)


def test_layer_selections():
    assert cost.stored_layers("all", 5) == [0, 1, 2, 3, 4]
    assert cost.stored_layers(None, 5) == [0, 1, 2, 3, 4]
    assert cost.stored_layers([0, -1, 4], 5) == [0, 4]
    assert cost.stored_layers("every:2", 6) == [0, 2, 4, 5]  # and the last hidden state
    assert cost.stored_layers("every:4", 9) == [0, 4, 8]
    for bad in ([7], "every:0", "some"):
        with pytest.raises(ValueError):
            cost.stored_layers(bad, 5)
    idefics_80b = cost.ARCHITECTURES["HuggingFaceM4/idefics-80b-instruct"]
    assert cost.headline_layer({"layer": "authors:32"}, idefics_80b) == ([39], False)
    assert cost.headline_layer({"layer": "validation"}, idefics_80b) == ([80], False)
    clip = cost.ARCHITECTURES["openai/clip-vit-base-patch32"]
    assert cost.headline_layer({"layer": "image_embeds"}, clip) == ([], True)


def test_prompt_tokens_by_word_rule():
    # <s> + 3 image tokens + Question : What can you see ? Answer :
    assert cost.text_tokens("What can you see?", "question_answer") == (4 + 9, "words")
    # <s> User : <image x3> What can you see ? <end_of_utterance> \nAssistant :
    assert cost.text_tokens("What can you see?", "chat") == (5 + 2 + 5 + 2, "words")


def test_paper_architectures_agree_with_the_gpu_benchmark_and_transformers():
    """The 9B numbers equal benchmarks/extract.py's idefics-9b-instruct config; CLIP's are transformers' defaults,
    which openai/clip-vit-base-patch32's config.json relies on."""
    from transformers import CLIPConfig

    from medprobe.probe.selection import REFINE_POINTS

    tree = ast.parse((cost.ROOT / "benchmarks" / "extract.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "IDEFICS_9B")
    nine = eval(compile(ast.Expression(node.value), "extract.py", "eval"), {"dict": dict})  # dict(...) literals only
    arch = cost.ARCHITECTURES["HuggingFaceM4/idefics-9b-instruct"]
    stack, vision, resampler = arch.decoder.stack, arch.vision, arch.resampler
    assert (stack.width, stack.ffn, stack.layers) == (nine["hidden_size"], nine["intermediate_size"], 32)
    assert arch.decoder.cross_interval == nine["cross_layer_interval"]
    assert arch.decoder.vocab == nine["vocab_size"] + nine["additional_vocab_size"]
    seen = nine["vision_config"]
    assert (vision.stack.width, vision.stack.ffn, vision.stack.layers) == (
        seen["embed_dim"],
        seen["intermediate_size"],
        seen["num_hidden_layers"],
    )
    assert (vision.image_size, vision.patch_size) == (seen["image_size"], seen["patch_size"])
    perceiver = nine["perceiver_config"]
    assert (resampler.latents, resampler.depth, resampler.inner) == (
        perceiver["resampler_n_latents"],
        perceiver["resampler_depth"],
        perceiver["resampler_n_heads"] * perceiver["resampler_head_dim"],
    )
    clip = CLIPConfig()
    for name in ("openai/clip-vit-base-patch32", "vinid/plip"):
        tower = cost.ARCHITECTURES[name].vision
        assert (tower.stack.width, tower.stack.ffn, tower.stack.layers, tower.patch_size, tower.projection) == (
            clip.vision_config.hidden_size,
            clip.vision_config.intermediate_size,
            clip.vision_config.num_hidden_layers,
            clip.vision_config.patch_size,
            clip.projection_dim,
        )
    assert cost.REFINE_POINTS == REFINE_POINTS
    # the published sizes: 80B and 9B (8.9B), the ViT-H/14 tower 632M
    assert cost.ARCHITECTURES["HuggingFaceM4/idefics-80b-instruct"].params() == pytest.approx(80e9, rel=0.01)
    assert arch.params() == pytest.approx(8.93e9, rel=0.01)
    assert arch.vision.params() == pytest.approx(632e6, rel=0.01)


def test_table1_agrees_with_the_dataset_recipes():
    from medprobe import datasets

    for name, (train, test) in cost.PAPER_TABLE1.items():
        expected = datasets.get(name).expected
        total = (
            expected["total"]["images"] if "total" in expected else sum(part["images"] for part in expected.values())
        )
        assert train + test == total, name


@pytest.fixture(scope="module")
def paper_text(repo, tmp_path_factory):
    empty = tmp_path_factory.mktemp("no-results")
    return cost.generate([repo / "config" / "paper.yaml"], results=empty, out="docs/cost.md")


def test_committed_cost_doc_is_what_the_generator_writes(repo, paper_text):
    committed = (repo / "docs" / "cost.md").read_text()
    assert committed == paper_text, (
        "docs/cost.md is stale: python -m medprobe.cost --configfile config/paper.yaml --out docs/cost.md"
    )


def test_readme_states_the_paper_totals(repo, paper_text):
    summary = re.search(
        r"\*\*Whole study: about ([\d.,]+) GPU-hours .*?, and ([\d.,]+ [kMGT]?B) of activations", paper_text
    )
    readme = repo.joinpath("README.md").read_text()
    assert f"{summary.group(1)} GPU-hours" in readme and summary.group(2) in readme and "docs/cost.md" in readme


def test_paper_study(repo, tmp_path):
    config = cost.load_config([repo / "config" / "paper.yaml"])
    study = cost.study_cost(config, results=tmp_path)
    assert not study.missing and len(study.rows) == 26  # 3 models x 8 tasks + PLIP on T1, T2
    rows = {(row.model, row.task): row for row in study.rows}
    t1 = rows[("idefics_80b", "T1")]
    assert t1.images.total == 107_180 and t1.images.source.startswith("paper Table 1")
    assert t1.disk == 107_180 * 81 * 8192 * 2  # every hidden state of the 80-layer decoder in float16
    assert t1.held_hours == pytest.approx(4 * t1.extraction.seconds / 3600)  # gpus: 4
    assert rows[("clip", "T7")].images.classes == 54  # the paper's findings before the manifest exists
    assert rows[("clip", "T1")].plan.dtype == "cpu"  # scikit-learn SGD
    # rigorous.yaml extends paper.yaml: L-BFGS over the C grid
    rigorous = cost.study_cost(cost.load_config([repo / "config" / "rigorous.yaml"]), results=tmp_path)
    assert {row.plan.mode for row in rigorous.rows} == {"regularised"}


def test_what_if_rows_come_from_the_cost_model(repo, tmp_path):
    config = cost.load_config([repo / "config" / "paper.yaml"])
    base = cost.study_cost(config, results=tmp_path)
    int8 = cost.study_cost(config, results=tmp_path, dtype="int8")
    assert int8.total("disk") == pytest.approx(base.total("disk") / 2, rel=1e-3)
    one = cost.study_cost(config, results=tmp_path, layers="one")
    rows = {(row.model, row.task): row for row in one.rows}
    assert rows[("idefics_80b", "T1")].layout.hidden == (39,)  # authors:32
    assert rows[("clip", "T1")].layout == Layout((), True, "float16")  # image_embeds only
    assert rows[("idefics_80b", "T1")].extraction.flops < base.rows[0].extraction.flops  # stops at layer 39
    every = cost.study_cost(config, results=tmp_path, layers="every:4")
    assert {len(row.layout.hidden) for row in every.rows if row.model == "idefics_80b"} == {21}  # 0, 4, ..., 80
    assert {row.layout.hidden for row in every.rows if row.model == "clip"} == {(0, 4, 8, 12)}
    # extraction.layers and a model's own layers, as the workflow reads them
    config["extraction"]["layers"] = "every:2"
    config["models"]["clip"]["layers"] = [-1]
    chosen = {(row.model, row.task): row.layout.hidden for row in cost.study_cost(config, results=tmp_path).rows}
    assert chosen[("idefics_9b", "T1")] == tuple(range(0, 33, 2)) and chosen[("clip", "T1")] == (12,)


def test_manifest_counts_replace_table1_for_the_same_dataset(repo, tmp_path):
    config = cost.load_config([repo / "config" / "paper.yaml"])
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    rows = [("a", "train", "ADI"), ("b", "train", "TUM"), ("c", "val", "ADI"), ("d", "test", "TUM")]
    lines = ["image_id,path,split,patient_id,label,labels,source,group"]
    lines += [f"{i},{i}.png,{split},p{i},{label},,nct," for i, split, label in rows]
    (manifests / "T1.csv").write_text("\n".join(lines) + "\n")
    (manifests / "T1.json").write_text(json.dumps({"dataset": "nct_crc_he"}))
    images = cost.task_images(config, "T1", tmp_path)
    assert (images.train, images.val, images.test, images.classes) == (2, 1, 1, 9)
    assert images.source == "manifest T1.csv"
    # a manifest of another dataset (a demo run in the same folder) is not this task's
    (manifests / "T1.json").write_text(json.dumps({"dataset": "demo"}))
    assert cost.task_images(config, "T1", tmp_path).source.startswith("paper Table 1")


def test_demo_config_is_costed_from_its_built_models(repo, tmp_path):
    text = cost.generate([repo / "config" / "config.yaml"], results=tmp_path)
    assert "## Not counted" in text and "not modelled" not in text
    for model in ("IDEFICS-80B (tiny demo stand-in)", "DINOv2 (tiny demo stand-in)"):
        assert f"| {model} | T1 |" in text
    assert "config.json of the demo build tiny-clip" in text
    # counted with the tiny tokenizer, not the word rule
    assert not re.search(r"\| \d+ \(words\) \|", text)
    assert "| T1 | demo | 96 | 24 | 48 | 168 | 9 |" in text  # (40 + 16) patients x 3 images

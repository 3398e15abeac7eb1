"""NEJM multiple-choice evaluation: prompt, answer extraction, top-k, strata, resumable answers, likelihoods."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medprobe import nejm
from medprobe.demo.nejm import generate_cases
from medprobe.figures import draw, figure1d

CHOICES = ["Psoriasis", "Melanoma", "Amelanotic melanoma", "Tinea corporis", "Lichen planus"]


def write_case(root: Path, case_id: str, date: str, answer: str, *, shares=None, explanation="", colour=(200, 0, 0)):
    folder = root / case_id
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32), colour).save(folder / "image.png")
    data = {
        "id": case_id,
        "date": date,
        "question": "What is the diagnosis?",
        "context": f"A patient ({case_id}) presented with a rash.",
        "choices": CHOICES,
        "answer": answer,
        "reader_shares": shares or [0.2] * 5,
    }
    if explanation:
        data["explanation"] = explanation
    (folder / "case.json").write_text(json.dumps(data))
    return folder


@pytest.fixture
def cases_dir(tmp_path):
    root = tmp_path / "cases"
    write_case(root, "q1", "2006-01-05", "Melanoma", shares=[0.1, 0.35, 0.25, 0.2, 0.1], colour=(0, 0, 200))
    write_case(root, "s2", "2005-10-20", "Lichen planus", explanation="Violaceous flat papules.", colour=(0, 200, 0))
    write_case(root, "s1", "2005-10-13", "Psoriasis", explanation="Silvery scales on the elbows.")
    write_case(root, "q2", "2006-02-01", "Tinea corporis", shares=[0.05, 0.05, 0.05, 0.8, 0.05], colour=(9, 9, 9))
    return root


# ---------------------------------------------------------------------------------------------- prompt


def test_shots_are_the_first_by_date_and_leave_the_test_set(cases_dir):
    shots, test = nejm.split_shots(nejm.load_cases(cases_dir), shots=2)
    assert [c.id for c in shots] == ["s1", "s2"]
    assert [c.id for c in test] == ["q1", "q2"]
    shots, test = nejm.split_shots(nejm.load_cases(cases_dir), shot_ids=["q2"])
    assert [c.id for c in shots] == ["q2"] and [c.id for c in test] == ["s1", "s2", "q1"]
    with pytest.raises(ValueError, match="unknown case id"):
        nejm.split_shots(nejm.load_cases(cases_dir), shot_ids=["nope"])


def test_exact_two_shot_prompt(cases_dir):
    shots, test = nejm.split_shots(nejm.load_cases(cases_dir), shots=2)
    items = nejm.build_prompt(shots, test[0])
    choices = "Choices:\n1. Psoriasis\n2. Melanoma\n3. Amelanotic melanoma\n4. Tinea corporis\n5. Lichen planus"
    assert items == [
        "User:",
        cases_dir / "s1" / "image.png",
        f"A patient (s1) presented with a rash. What is the diagnosis?\n{choices}<end_of_utterance>",
        "\nAssistant: Answer: 1. Psoriasis. Reason: Silvery scales on the elbows.<end_of_utterance>",
        "\nUser:",
        cases_dir / "s2" / "image.png",
        f"A patient (s2) presented with a rash. What is the diagnosis?\n{choices}<end_of_utterance>",
        "\nAssistant: Answer: 5. Lichen planus. Reason: Violaceous flat papules.<end_of_utterance>",
        "\nUser:",
        cases_dir / "q1" / "image.png",
        f"A patient (q1) presented with a rash. What is the diagnosis?\n{choices}<end_of_utterance>",
        "\nAssistant:",
    ]
    assert nejm.prompt_text(items).count("<image>") == 3
    # The hash follows the text and the image bytes.
    before = nejm.prompt_hash(items)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(cases_dir / "s2" / "image.png")
    assert nejm.prompt_hash(items) != before


def test_bad_case_files_are_named(tmp_path):
    folder = write_case(tmp_path, "c1", "2005-10-13", "Melanoma")
    data = json.loads((folder / "case.json").read_text())
    data["answer"] = "Gout"
    (folder / "case.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"case\.json.*'answer' 'Gout' is not one of the choices"):
        nejm.load_case(folder)


# ---------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "raw, expected, rule",
    [
        ("I think this ring-shaped rash is tinea corporis, given the scale.", 3, "exact_text"),
        ("Answer: 2. Melanoma. Reason: unlike psoriasis, it is pigmented.", 1, "exact_text_first"),
        ("Psoriasis or melanoma", 0, "exact_text_first"),
        ("amelanotic melanoma", 2, "exact_text"),  # "melanoma" inside the longer choice does not count
        ("4", 3, "choice_number"),
        ("Answer: 5.<end_of_utterance>\nUser: 1. Psoriasis", 4, "choice_number"),
        ("(B)", 1, "choice_number"),
        ("the answer is 3", 2, "choice_number"),
        ("Psoriassis", 0, "fuzzy"),
        ("", None, "unparseable"),
        ("ithT UsT UsT", None, "unparseable"),
        ("A 45 year old with a rash", None, "unparseable"),  # the article "A" is not choice A
    ],
)
def test_layered_extraction(raw, expected, rule):
    assert nejm.extract_choice(raw, CHOICES) == (expected, rule)


def test_top_k_rule():
    records = [
        {"case_id": "a", "mode": "sample", "correct": False},
        {"case_id": "a", "mode": "sample", "correct": True},
        {"case_id": "a", "mode": "sample", "correct": False},
        {"case_id": "b", "mode": "sample", "correct": False},
        {"case_id": "b", "mode": "greedy", "correct": True},  # greedy does not count for top-k
        {"case_id": "b", "mode": "sample", "correct": False},
    ]
    assert nejm.top_k_correct(records) == {"a": True, "b": False}


# ---------------------------------------------------------------------------------------------- strata


def test_stratum_binning():
    assert nejm.stratum_edges(5).tolist() == [0, 20, 40, 60, 80, 100]
    percent = [0, 19.99, 20, 39.9, 40, 59.5, 60, 79, 80, 99.9, 100, np.nan]
    assert nejm.assign_strata(percent, 5).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, -1]
    assert nejm.assign_strata([50], 1).tolist() == [0]
    with pytest.raises(ValueError, match="percent correct"):
        nejm.assign_strata([101], 5)


# ---------------------------------------------------------------------------------------------- answering


class FakeAdapter:
    """Answers by a lookup on the query case's context; counts calls."""

    def __init__(self, answers):
        self.answers, self.calls = answers, {"generate": 0, "likelihood": 0}

    def _case(self, conversation):
        text = [item for item in conversation if isinstance(item, str)][-2]
        return text.split("(")[1].split(")")[0]

    def generate(self, conversations, *, max_new_tokens, do_sample=False, num_return_sequences=1, seed=None, **kw):
        self.calls["generate"] += len(conversations)
        out = []
        for conversation in conversations:
            case = self._case(conversation)
            if do_sample:
                out.append([f"{case} sample {seed % 7} {i}" for i in range(num_return_sequences - 1)] + [self.answers[case]])
            else:
                out.append([self.answers[case]])
        return out

    def choice_loglikelihoods(self, conversation, continuations):
        self.calls["likelihood"] += 1
        # choice 4 has the best sum, choice 2 the best mean per token
        return [-9.0, -2.5, -9.0, -2.0, -9.0], [3, 5, 3, 1, 3]


def test_answers_are_resumable_and_redone_when_the_prompt_changes(cases_dir, tmp_path):
    out = tmp_path / "nejm" / "m" / "answers.jsonl"
    fake = FakeAdapter({"q1": "Melanoma", "q2": "no idea"})
    kwargs = dict(model_name="m", model_cfg={"checkpoint": "x"}, max_new_tokens=5, adapter=fake, top_k_samples=3)
    nejm.answer_cases(cases_dir, out, **kwargs)
    records = nejm.load_answers(out)
    assert len(records) == 2 * (1 + 3 + 1)
    greedy = {r["case_id"]: r for r in records if r["mode"] == "greedy"}
    assert greedy["q1"]["parsed_choice"] == 2 and greedy["q1"]["correct"] and greedy["q1"]["rule"] == "exact_text"
    assert greedy["q2"]["parsed_choice"] is None and greedy["q2"]["rule"] == "unparseable" and not greedy["q2"]["correct"]
    likelihood = {r["case_id"]: r for r in records if r["mode"] == "likelihood"}
    assert likelihood["q2"]["parsed_choice"] == 4 and likelihood["q2"]["correct"]
    assert set(records[0]) >= {"case_id", "prompt_hash", "raw_output", "parsed_choice", "rule", "correct", "mode"}
    calls = dict(fake.calls)
    assert calls == {"generate": 2 + 2, "likelihood": 2}

    # Snakemake removes the output before a rerun: the cache makes the rerun skip finished cases.
    out.unlink()
    nejm.answer_cases(cases_dir, out, **kwargs)
    assert fake.calls == calls
    assert nejm.load_answers(out) == records

    # A torn last line (killed run) is skipped; a changed case text changes its prompt hash and redoes it.
    cache = out.with_name("answers.cache.jsonl")
    with open(cache, "a") as handle:
        handle.write('{"case_id": "q1", "mo')
    data = json.loads((cases_dir / "q2" / "case.json").read_text())
    data["context"] = "A patient (q2) presented with a rash again."
    (cases_dir / "q2" / "case.json").write_text(json.dumps(data))
    nejm.answer_cases(cases_dir, out, **kwargs)
    assert fake.calls == {"generate": calls["generate"] + 2, "likelihood": calls["likelihood"] + 1}
    new = {(r["case_id"], r["mode"], r["sample"]): r["prompt_hash"] for r in nejm.load_answers(out)}
    old = {(r["case_id"], r["mode"], r["sample"]): r["prompt_hash"] for r in records}
    assert all(new[k] == old[k] for k in new if k[0] == "q1") and all(new[k] != old[k] for k in new if k[0] == "q2")

    # Mean-per-token likelihood picks choice 2 from the stored scores, without the model.
    nejm.answer_cases(cases_dir, out, **{**kwargs, "likelihood_score": "mean"})
    assert fake.calls["likelihood"] == calls["likelihood"] + 1
    assert {r["parsed_choice"] for r in nejm.load_answers(out) if r["mode"] == "likelihood"} == {2}


def test_accuracy_table_and_figure(cases_dir, tmp_path):
    out = tmp_path / "answers.jsonl"
    nejm.answer_cases(
        cases_dir, out, model_name="m", model_cfg={"checkpoint": "x"}, adapter=FakeAdapter({"q1": "Melanoma", "q2": "?"})
    )
    table, unparseable = nejm.accuracy_table({"m": out}, cases_dir, n_boot=200, seed=1)
    assert list(table.columns) == list(nejm.TABLE_COLUMNS)
    row = table.set_index(["model", "mode", "stratum"])
    # q1: readers 35% (stratum 20-40%), greedy right; q2: readers 80% (80-100%), unparseable, top-3 wrong
    assert row.loc[("m", "greedy", "all"), "accuracy"] == 0.5
    assert row.loc[("m", "greedy", "20-40%"), "accuracy"] == 1.0
    assert row.loc[("m", "greedy", "80-100%"), "accuracy"] == 0.0
    assert row.loc[("m", "greedy", "80-100%"), "n_unparseable"] == 1
    assert row.loc[("m", "top3", "all"), "accuracy"] == 0.5
    assert row.loc[("m", "likelihood", "all"), "accuracy"] == 0.5  # choice 4 is right for q2 only
    assert row.loc[("readers", "readers", "all"), "accuracy"] == pytest.approx((0.35 + 0.8) / 2)
    assert row.loc[("chance", "chance", "all"), "accuracy"] == 0.2
    # bootstrap SD of the overall greedy accuracy, against a direct computation on the same resamples
    from medprobe.stats import bootstrap_indices

    values = np.array([1.0, 0.0])
    assert row.loc[("m", "greedy", "all"), "sd"] == pytest.approx(values[bootstrap_indices(2, 200, 1)].mean(1).std(ddof=1))
    # the fake's first two samples are gibberish; q2's greedy and last sample ("?") too
    assert sorted(unparseable.groupby(["case_id", "mode"]).size().items()) == [
        (("q1", "sample"), 2), (("q2", "greedy"), 1), (("q2", "sample"), 3)
    ]

    path = tmp_path / "nejm.csv"
    table.to_csv(path, index=False)
    models = {"m": {"label": "Model M"}}
    figure1d(pd.read_csv(path), None, models, tmp_path / "figs" / "figure1d")
    draw("figure1d", {"nejm": pd.read_csv(path)}, {}, models, tmp_path / "figs" / "again")
    for stem in ("figure1d", "again"):
        assert (tmp_path / "figs" / f"{stem}.pdf").stat().st_size > 1000
        assert (tmp_path / "figs" / f"{stem}.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="nothing to draw"):
        figure1d(table[table["model"].isin(["readers", "chance"])], None, models, tmp_path / "x")


# ---------------------------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def idefics(tmp_path_factory):
    from medprobe.demo.models import build
    from medprobe.models import load_adapter

    root = tmp_path_factory.mktemp("nejm_models")
    build("tiny-idefics-small", root / "m", seed=0)
    return load_adapter({"adapter": "idefics", "checkpoint": str(root / "m")}, device="cpu")


@pytest.fixture(scope="module")
def demo_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("nejm_cases")
    generate_cases(root, n_cases=5, seed=0)
    return nejm.load_cases(root)


def test_likelihood_equals_a_direct_computation_with_the_logits(idefics, demo_cases):
    shots, test = nejm.split_shots(demo_cases, shots=2)
    conversation = nejm.load_images(nejm.build_prompt(shots, test[0]))
    continuations = nejm.likelihood_continuations(test[0])
    sums, n_tokens = idefics.choice_loglikelihoods(conversation, continuations)
    processor = idefics.processor
    for index in (0, 3):
        prompt_ids = processor(text=[conversation], return_tensors="pt")["input_ids"][0]
        full = processor(text=[conversation[:-1] + [conversation[-1] + continuations[index]]], return_tensors="pt")
        ids = full["input_ids"][0]
        assert torch.equal(ids[: len(prompt_ids)], prompt_ids)  # the prompt is a prefix here
        with torch.no_grad():
            logits = idefics.model(**full).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        direct = sum(float(logprobs[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids)))
        assert n_tokens[index] == len(ids) - len(prompt_ids) > 1
        assert sums[index] == pytest.approx(direct, abs=2e-3)  # batched with padding vs alone


def test_generate_greedy_is_batch_invariant_and_sampling_is_seeded(idefics, demo_cases):
    shots, test = nejm.split_shots(demo_cases, shots=2)
    conversations = [nejm.load_images(nejm.build_prompt(shots, case)) for case in test]
    batched = idefics.generate(conversations, max_new_tokens=4)
    alone = [idefics.generate([c], max_new_tokens=4)[0] for c in conversations]
    assert batched == alone and all(len(texts) == 1 for texts in batched)
    state = torch.random.get_rng_state()
    first = idefics.generate(conversations[:1], max_new_tokens=4, do_sample=True, num_return_sequences=3, seed=7)
    again = idefics.generate(conversations[:1], max_new_tokens=4, do_sample=True, num_return_sequences=3, seed=7)
    assert first == again and len(first[0]) == 3
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched

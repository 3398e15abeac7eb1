"""NEJM multiple-choice evaluation: prompt, answer extraction, top-k, strata, resumable answers, likelihoods."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from medprobe import nejm
from medprobe.config import SCHEMA_PATH
from medprobe.demo.nejm import generate_cases
from medprobe.figures import draw, figure1d, save
from medprobe.settings import FiguresSettings, NejmSettings

CHOICES = ["Psoriasis", "Melanoma", "Amelanotic melanoma", "Tinea corporis", "Lichen planus"]


def schema_defaults(section: str) -> dict:
    """The defaults the schema writes for the keys of config section ``section``."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    return {key: spec["default"] for key, spec in schema["properties"][section]["properties"].items()}


def nejm_settings(**changes) -> NejmSettings:
    """The schema's ``nejm`` defaults with ``changes``."""
    return NejmSettings.from_dict({**schema_defaults("nejm"), **changes})


def answer_cases(cases_dir, out, *, adapter, **changes):
    """``nejm.answer_cases`` by ``adapter`` as model ``m``, the cache next to ``out``, with ``changes`` to the
    default settings."""
    return nejm.answer_cases(
        cases_dir,
        out,
        out.with_name("answers.cache.jsonl"),
        model_name="m",
        model_cfg={"checkpoint": "x"},
        settings=nejm_settings(**changes),
        seed=0,
        adapter=adapter,
    )


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


# The paper's Figure S2, copied verbatim from its text (han2023.txt, Online Supplement): the two shots
# (13 and 20 October 2005) and the query. The lines holding one space are where the figure's layout
# put the three images (the query's beside its choices).
FIGURE_S2 = """ 
Question: What is the diagnosis?

Choices:

1. Rocky mountain spotted fever
2. Hand foot and mouth disease
3. Infective endocarditis
4. Psoriasis
5. Secondary syphilis

Answer: Secondary syphilis

Reason: This symmetric, dusky red, and polymorphic papulosquamous rash is consistent with secondary syphilis.



 
Question: What process is illustrated in the radiograph?

Choices:

1. Paget's disease
2. Osteopetrosis
3. Hyperparathyroidism
4. Bone marrow hyperplasia
5. Acromegaly

Answer: Bone marrow hyperplasia

Reason: The "hair-on-end" appearance of the skull in the radiograph is consistent with massive bone marrow hyperplasia.



Question: This rash appeared following treatment for leukemia. What is the diagnosis?

Choices:

 
1. Cryoglobulinemia
2. Leukemia cutis
3. Herpes zoster
4. Graft-versus-host disease
5. Urticaria pigmentosa

Answer:"""


def paper_case(root: Path, case_id: str, date: str, question: str, choices, answer: str, explanation: str = ""):
    folder = root / case_id
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 0, 0)).save(folder / "image.png")
    data = {"id": case_id, "date": date, "question": question, "choices": choices, "answer": answer}
    if explanation:
        data["explanation"] = explanation
    (folder / "case.json").write_text(json.dumps(data))
    return nejm.load_case(folder)


def test_figure_s2_prompt_is_the_papers_figure_text(tmp_path):
    syphilis = paper_case(
        tmp_path,
        "shot1",
        "2005-10-13",
        "What is the diagnosis?",
        [
            "Rocky mountain spotted fever",
            "Hand foot and mouth disease",
            "Infective endocarditis",
            "Psoriasis",
            "Secondary syphilis",
        ],
        "Secondary syphilis",
        "This symmetric, dusky red, and polymorphic papulosquamous rash is consistent with secondary syphilis.",
    )
    marrow = paper_case(
        tmp_path,
        "shot2",
        "2005-10-20",
        "What process is illustrated in the radiograph?",
        ["Paget's disease", "Osteopetrosis", "Hyperparathyroidism", "Bone marrow hyperplasia", "Acromegaly"],
        "Bone marrow hyperplasia",
        'The "hair-on-end" appearance of the skull in the radiograph is consistent with massive bone marrow hyperplasia.',
    )
    rash = paper_case(
        tmp_path,
        "query",
        "2005-10-27",
        "This rash appeared following treatment for leukemia. What is the diagnosis?",
        ["Cryoglobulinemia", "Leukemia cutis", "Herpes zoster", "Graft-versus-host disease", "Urticaria pigmentosa"],
        "Graft-versus-host disease",
    )
    items = nejm.build_prompt([syphilis, marrow], rash, "figure_s2")
    # Images and texts alternate, each case's image first, the query's text last.
    assert items[0::2] == [syphilis.image, marrow.image, rash.image]
    assert all(isinstance(item, str) for item in items[1::2]) and items[-1].endswith("\nAnswer:")
    # The figure's cases, parted by its runs of blank lines, with the image lines taken out (an editor
    # must not have stripped them from the literal).
    assert FIGURE_S2.split("\n").count(" ") == 3
    blocks = ["\n".join(line for line in block.split("\n") if line != " ") for block in FIGURE_S2.split("\n\n\n\n")]
    assert len(blocks) == 3
    assert nejm.prompt_text(items) == "\n\n".join(f"<image>{block}" for block in blocks)


def test_figure_s2_leaves_out_the_context_and_a_missing_reason(cases_dir):
    shots, test = nejm.split_shots(nejm.load_cases(cases_dir), shots=2)
    plain = nejm.Case(**{**shots[1].__dict__, "explanation": ""})
    text = nejm.prompt_text(nejm.build_prompt([shots[0], plain], test[0], "figure_s2"))
    assert "presented with a rash" not in text
    assert "presented with a rash" in nejm.prompt_text(nejm.build_prompt(shots, test[0], "chat"))
    assert "Answer: Psoriasis\n\nReason: Silvery scales on the elbows.\n\n<image>Question:" in text
    assert "Answer: Lichen planus\n\n<image>Question:" in text  # no Reason line
    assert text.count("Reason:") == 1
    with pytest.raises(ValueError, match=r"nejm\.template .*'figure'"):
        nejm.build_prompt(shots, test[0], "figure")


def test_chat_template_text_is_pinned(cases_dir):
    shots, test = nejm.split_shots(nejm.load_cases(cases_dir), shots=2)
    items = nejm.build_prompt(shots, test[0], "chat")
    assert items == nejm.build_prompt(shots, test[0])  # chat is the default
    choices = "Choices:\n1. Psoriasis\n2. Melanoma\n3. Amelanotic melanoma\n4. Tinea corporis\n5. Lichen planus"
    assert nejm.prompt_text(items) == (
        f"User:<image>A patient (s1) presented with a rash. What is the diagnosis?\n{choices}<end_of_utterance>"
        "\nAssistant: Answer: 1. Psoriasis. Reason: Silvery scales on the elbows.<end_of_utterance>"
        f"\nUser:<image>A patient (s2) presented with a rash. What is the diagnosis?\n{choices}<end_of_utterance>"
        "\nAssistant: Answer: 5. Lichen planus. Reason: Violaceous flat papules.<end_of_utterance>"
        f"\nUser:<image>A patient (q1) presented with a rash. What is the diagnosis?\n{choices}<end_of_utterance>"
        "\nAssistant:"
    )
    assert nejm.stop_strings("chat") == ()


@pytest.mark.parametrize(
    "template, expected",
    [
        (
            "chat",
            [
                " Answer: 1. Psoriasis",
                " Answer: 2. Melanoma",
                " Answer: 3. Amelanotic melanoma",
                " Answer: 4. Tinea corporis",
                " Answer: 5. Lichen planus",
            ],
        ),
        (
            "figure_s2",
            [" Psoriasis\n", " Melanoma\n", " Amelanotic melanoma\n", " Tinea corporis\n", " Lichen planus\n"],
        ),
    ],
)
def test_likelihood_continuations_follow_the_template(cases_dir, template, expected):
    shots, test = nejm.split_shots(nejm.load_cases(cases_dir), shots=2)
    assert nejm.likelihood_continuations(test[0], template) == expected
    # The query's prompt ends where a shot's answer starts, and the right continuation is the text a
    # solved shot shows there: scoring and the shots agree.
    query_end = nejm.build_prompt(shots, test[0], template)[-1]
    as_shot = nejm.prompt_text(nejm.build_prompt([], shots[0], template)[:-1] + [query_end])
    solved = nejm.prompt_text(nejm.build_prompt([shots[0]], test[0], template))
    answer = nejm.likelihood_continuations(shots[0], template)[shots[0].answer_index]
    assert solved.startswith(as_shot + answer)


@pytest.mark.parametrize(
    "raw, expected, rule",
    [
        (" Melanoma\n\nReason: unlike psoriasis, it is pigmented.\n\nQuestion:", 1, "exact_text"),
        ("\n\nLichen planus\n\nReason: not tinea corporis", 4, "exact_text"),
        (" 4. Tinea corporis\nQuestion: What is", 3, "exact_text"),
        (" Tinea corporis. Reason: ring-shaped, unlike psoriasis", 3, "exact_text"),
        (" 2\n\nReason: because of 5. Lichen planus", 1, "choice_number"),
        (" Not sure.\n\nReason: maybe melanoma", None, "unparseable"),  # the reason never decides
        (" Psoriassis<end_of_utterance>Melanoma", 0, "fuzzy"),
    ],
)
def test_figure_s2_extraction_reads_the_answer_line(raw, expected, rule):
    assert nejm.extract_choice(raw, CHOICES, template="figure_s2") == (expected, rule)


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
                out.append(
                    [f"{case} sample {seed % 7} {i}" for i in range(num_return_sequences - 1)] + [self.answers[case]]
                )
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
    kwargs = dict(max_new_tokens=5, adapter=fake, top_k_samples=3)
    answer_cases(cases_dir, out, **kwargs)
    records = nejm.load_answers(out)
    assert len(records) == 2 * (1 + 3 + 1)
    greedy = {r["case_id"]: r for r in records if r["mode"] == "greedy"}
    assert greedy["q1"]["parsed_choice"] == 2 and greedy["q1"]["correct"] and greedy["q1"]["rule"] == "exact_text"
    assert (
        greedy["q2"]["parsed_choice"] is None and greedy["q2"]["rule"] == "unparseable" and not greedy["q2"]["correct"]
    )
    likelihood = {r["case_id"]: r for r in records if r["mode"] == "likelihood"}
    assert likelihood["q2"]["parsed_choice"] == 4 and likelihood["q2"]["correct"]
    assert set(records[0]) >= {"case_id", "prompt_hash", "raw_output", "parsed_choice", "rule", "correct", "mode"}
    calls = dict(fake.calls)
    assert calls == {"generate": 2 + 2, "likelihood": 2}

    # Snakemake removes the output before a rerun: the cache makes the rerun skip finished cases.
    out.unlink()
    answer_cases(cases_dir, out, **kwargs)
    assert fake.calls == calls
    assert nejm.load_answers(out) == records

    # A torn last line (killed run) is skipped; a changed case text changes its prompt hash and redoes it.
    cache = out.with_name("answers.cache.jsonl")
    with open(cache, "a") as handle:
        handle.write('{"case_id": "q1", "mo')
    data = json.loads((cases_dir / "q2" / "case.json").read_text())
    data["context"] = "A patient (q2) presented with a rash again."
    (cases_dir / "q2" / "case.json").write_text(json.dumps(data))
    answer_cases(cases_dir, out, **kwargs)
    assert fake.calls == {"generate": calls["generate"] + 2, "likelihood": calls["likelihood"] + 1}
    new = {(r["case_id"], r["mode"], r["sample"]): r["prompt_hash"] for r in nejm.load_answers(out)}
    old = {(r["case_id"], r["mode"], r["sample"]): r["prompt_hash"] for r in records}
    assert all(new[k] == old[k] for k in new if k[0] == "q1") and all(new[k] != old[k] for k in new if k[0] == "q2")

    # Mean-per-token likelihood picks choice 2 from the stored scores, without the model.
    answer_cases(cases_dir, out, **{**kwargs, "likelihood_score": "mean"})
    assert fake.calls["likelihood"] == calls["likelihood"] + 1
    assert {r["parsed_choice"] for r in nejm.load_answers(out) if r["mode"] == "likelihood"} == {2}


class ImageKeyedAdapter:
    """Answers by the query image's colour (figure_s2 prompts show no case history); records its calls."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def generate(self, conversations, *, max_new_tokens, do_sample=False, num_return_sequences=1, seed=None, **kw):
        out = []
        for conversation in conversations:
            self.calls.append(("generate", conversation[-1], kw))
            query_image = [item for item in conversation if not isinstance(item, str)][-1]
            out.append([self.answers[query_image.getpixel((0, 0))]] * num_return_sequences)
        return out

    def choice_loglikelihoods(self, conversation, continuations):
        self.calls.append(("likelihood", conversation[-1], list(continuations)))
        return [-9.0, -2.5, -9.0, -2.0, -9.0], [3, 5, 3, 1, 3]


def test_answer_cases_use_the_template_throughout(cases_dir, tmp_path, caplog):
    data = json.loads((cases_dir / "s2" / "case.json").read_text())
    del data["explanation"]
    (cases_dir / "s2" / "case.json").write_text(json.dumps(data))
    out = tmp_path / "answers.jsonl"
    fake = ImageKeyedAdapter(
        {
            (0, 0, 200): " Melanoma\n\nReason: pigmented, unlike psoriasis.\n\nQuestion:",
            (9, 9, 9): " Hard to say.\n\nReason: tinea corporis is likely.",
        }
    )
    kwargs = dict(adapter=fake, top_k_samples=2)
    with caplog.at_level("WARNING", logger="medprobe.nejm"):
        answer_cases(cases_dir, out, template="figure_s2", **kwargs)
    assert "shot s2" in caplog.text and "no 'explanation'" in caplog.text and "shot s1" not in caplog.text
    generated = [call for call in fake.calls if call[0] == "generate"]
    assert len(generated) == 2 + 2 and all(call[1].endswith("\nAnswer:") for call in generated)
    assert all(call[2]["stop_strings"] == ["Question:"] for call in generated)
    scored = [call for call in fake.calls if call[0] == "likelihood"]
    assert [call[2] for call in scored] == [[f" {c}\n" for c in CHOICES]] * 2
    records = nejm.load_answers(out)
    greedy = {r["case_id"]: r for r in records if r["mode"] == "greedy"}
    assert (greedy["q1"]["parsed_choice"], greedy["q1"]["rule"]) == (2, "exact_text")
    assert (greedy["q2"]["parsed_choice"], greedy["q2"]["rule"]) == (None, "unparseable")
    assert {r["raw_output"] for r in records if r["mode"] == "likelihood"} == {"Tinea corporis"}

    # The template writes the prompt, so another template re-answers every case; the first template's
    # answers stay in the cache and are reused when it comes back.
    calls = len(fake.calls)
    answer_cases(cases_dir, out, template="chat", **kwargs)
    assert len(fake.calls) == calls + 2 * 3
    assert all("stop_strings" not in call[2] for call in fake.calls[calls:] if call[0] == "generate")
    hashes = {r["prompt_hash"] for r in nejm.load_answers(out)}
    assert not hashes & {r["prompt_hash"] for r in records}
    calls = len(fake.calls)
    answer_cases(cases_dir, out, template="figure_s2", **kwargs)
    assert len(fake.calls) == calls and nejm.load_answers(out) == records
    with pytest.raises(ValueError, match=r"nejm\.template must be one of \['chat', 'figure_s2'\], got 'Figure'"):
        answer_cases(cases_dir, out, template="Figure", **kwargs)


def test_demo_explanations_change_nothing_else(tmp_path):
    plain = generate_cases(tmp_path / "plain", n_cases=4, seed=3)
    explained = generate_cases(tmp_path / "explained", n_cases=4, seed=3, explanations=True)
    for a, b in zip(plain, explained):
        case_a, case_b = (json.loads((folder / "case.json").read_text()) for folder in (a, b))
        assert "explanation" not in case_a
        assert case_b.pop("explanation").endswith(f"sign of {case_b['answer']}.")
        assert case_a == case_b
        assert (a / "image.png").read_bytes() == (b / "image.png").read_bytes()
        assert nejm.load_case(b).explanation


def test_accuracy_table_and_figure(cases_dir, tmp_path):
    out = tmp_path / "answers.jsonl"
    answer_cases(cases_dir, out, adapter=FakeAdapter({"q1": "Melanoma", "q2": "?"}))
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
    assert row.loc[("m", "greedy", "all"), "sd"] == pytest.approx(
        values[bootstrap_indices(2, 200, 1)].mean(1).std(ddof=1)
    )
    # the fake's first two samples are gibberish; q2's greedy and last sample ("?") too
    assert sorted(unparseable.groupby(["case_id", "mode"]).size().items()) == [
        (("q1", "sample"), 2),
        (("q2", "greedy"), 1),
        (("q2", "sample"), 3),
    ]

    path = tmp_path / "nejm.csv"
    table.to_csv(path, index=False)
    models = {"m": {"label": "Model M"}}
    options = FiguresSettings.from_dict(schema_defaults("figures"))
    figs = tmp_path / "figs"
    save(figure1d({"nejm": pd.read_csv(path)}, {}, models, options), figs / "figure1d.pdf", figs / "figure1d.png")
    draw("figure1d", {"nejm": path}, figs / "again.pdf", figs / "again.png", tasks={}, models=models, options=options)
    for stem in ("figure1d", "again"):
        assert (figs / f"{stem}.pdf").stat().st_size > 1000
        assert (figs / f"{stem}.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="nothing to draw"):
        figure1d({"nejm": table[table["model"].isin(["readers", "chance"])]}, {}, models, options)


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
    generate_cases(root, n_cases=5, seed=0, explanations=True)
    return nejm.load_cases(root)


@pytest.mark.parametrize("template", nejm.TEMPLATES)
def test_likelihood_equals_a_direct_computation_with_the_logits(idefics, demo_cases, template):
    shots, test = nejm.split_shots(demo_cases, shots=2)
    conversation = nejm.load_images(nejm.build_prompt(shots, test[0], template))
    continuations = nejm.likelihood_continuations(test[0], template)
    sums, n_tokens = idefics.choice_loglikelihoods(conversation, continuations)
    processor = idefics.processor
    for index in (0, 3):
        prompt_ids = processor(text=[conversation], return_tensors="pt")["input_ids"][0]
        full = processor(text=[conversation[:-1] + [conversation[-1] + continuations[index]]], return_tensors="pt")
        ids = full["input_ids"][0]
        # The continuation is what follows the longest common prefix: under chat the whole prompt; the
        # tiny tokenizer re-splits figure_s2's last word ("Answer:" -> "w", "er:_"), and those tokens
        # are scored with the continuation.
        common = next((t for t, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), len(prompt_ids))
        assert common == len(prompt_ids) if template == "chat" else len(prompt_ids) - 3 <= common
        with torch.no_grad():
            logits = idefics.model(**full).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        direct = sum(float(logprobs[t - 1, ids[t]]) for t in range(common, len(ids)))
        assert n_tokens[index] == len(ids) - common > 1
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


def test_figure_s2_prompt_reaches_the_model_as_written(idefics, demo_cases):
    shots, test = nejm.split_shots(demo_cases, shots=2)
    items = nejm.build_prompt(shots, test[0], "figure_s2")
    encoded = idefics.processor(text=[nejm.load_images(items)], return_tensors="pt")
    tokenizer = idefics.processor.tokenizer
    image = "<fake_token_around_image><image><fake_token_around_image>"
    # The processor adds the BOS and wraps the images, nothing else (no <end_of_utterance>, no turns).
    expected = tokenizer.bos_token + nejm.prompt_text(items).replace("<image>", image)
    assert encoded["input_ids"].shape[0] == 1
    assert tokenizer.decode(encoded["input_ids"][0]).replace(f"{image} ", image) == expected
    assert tokenizer.convert_tokens_to_ids("<end_of_utterance>") not in encoded["input_ids"][0].tolist()


def test_generate_stops_at_the_stop_strings(idefics, demo_cases):
    shots, test = nejm.split_shots(demo_cases, shots=2)
    conversations = [nejm.load_images(nejm.build_prompt(shots, case, "figure_s2")) for case in test[:2]]
    free = idefics.generate(conversations, max_new_tokens=8)
    # A stop string the random model does write: its first answer's first six characters.
    stop = free[0][0][:6]
    assert len(stop) == 6 and len(free[0][0]) > 6
    stopped = idefics.generate(conversations, max_new_tokens=8, stop_strings=[stop])
    assert stop in stopped[0][0] and free[0][0].startswith(stopped[0][0]) and len(stopped[0][0]) < len(free[0][0])
    for text, full in zip(stopped, free):
        assert full[0].startswith(text[0])

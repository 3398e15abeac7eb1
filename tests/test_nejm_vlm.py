"""NEJM answering with the generic ``hf_vlm`` adapter (medprobe.models.vlm_answering) on tiny random builds of
every family (medprobe.demo.vlm_models): the prompt each processor gets, greedy and sampled answers, choice
likelihoods, and one-image models answering zero-shot."""

import copy

import pandas as pd
import pytest
import torch
import yaml

from medprobe import config as medprobe_config
from medprobe import nejm
from medprobe.config import SCHEMA_PATH, ConfigError
from medprobe.demo.nejm import generate_cases
from medprobe.demo.vlm_models import VLM_NAMES, build_vlm
from medprobe.gpu_job import GpuJob
from medprobe.models import load_adapter
from medprobe.models.vlm_answering import conversation_turns
from medprobe.settings import NejmSettings

ONE_IMAGE = ("tiny-llava", "tiny-paligemma")
# (model, NEJM template): every family under the chat template; figure_s2 through a chat template and PaliGemma's.
ANSWERED = [(name, "chat") for name in VLM_NAMES] + [("tiny-idefics3", "figure_s2"), ("tiny-paligemma", "figure_s2")]


def nejm_settings(**changes) -> NejmSettings:
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    defaults = {key: spec["default"] for key, spec in schema["properties"]["nejm"]["properties"].items()}
    return NejmSettings.from_dict({**defaults, **changes})


class TinyVlms(dict):
    """Adapters of the tiny builds by name, each built and loaded when first asked for."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, name):
        path = build_vlm(name, self.root / name, seed=0)
        self[name] = load_adapter({"adapter": "hf_vlm", "checkpoint": str(path)}, "cpu")
        return self[name]


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    return TinyVlms(tmp_path_factory.mktemp("nejm_vlms"))


def model_cfg(vlms, name, **changes):
    return {"adapter": "hf_vlm", "checkpoint": vlms[name].checkpoint, **changes}


@pytest.fixture(scope="module")
def cases_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("nejm_vlm_cases")
    generate_cases(root, n_cases=4, seed=0, explanations=True)
    return root


@pytest.fixture(scope="module")
def cases(cases_dir):
    return nejm.split_shots(nejm.load_cases(cases_dir), shots=2)


def conversation(shots, case, template):
    return nejm.load_images(nejm.build_prompt(shots, case, template))


def shown_shots(adapter, shots):
    """The shots a prompt of ``adapter`` shows: one (two images: several) or none for a one-image model;
    one shot keeps the tests fast, test_chat_template_gets_the_nejm_turns lays out two."""
    return list(shots[:1]) if adapter.max_images is None else []


def chat_messages(shots, query, with_images=True):
    """The NEJM chat template as chat messages, written here from the cases (not parsed from the prompt)."""
    messages = []
    for case in [*shots, query]:
        image = {"type": "image", "image": nejm.load_images([case.image])[0]} if with_images else {"type": "image"}
        messages.append({"role": "user", "content": [image, {"type": "text", "text": nejm.prompt.case_text(case)}]})
        if case is not query:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": nejm.prompt.answer_text(case)}]})
    return messages


def direct_messages(shots, query, template, with_images=True):
    """The chat messages of one NEJM prompt: its turns, or the figure_s2 text as one user message."""
    if template == "chat":
        return chat_messages(shots, query, with_images)
    items = conversation(shots, query, template)
    image = (lambda item: {"type": "image", "image": item}) if with_images else (lambda item: {"type": "image"})
    return [
        {"role": "user", "content": [{"type": "text", "text": i} if isinstance(i, str) else image(i) for i in items]}
    ]


def direct_inputs(adapter, shots, query, template):
    """The model's inputs for one NEJM prompt, made with transformers' own routes, not the adapter's."""
    processor = adapter.processor
    if adapter.answer_layout == "chat_template":
        return processor.apply_chat_template(
            direct_messages(shots, query, template),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
    # PaliGemma: the processor itself puts the image first (text without an image token), the IDEFICS end of
    # turn is no token of its tokenizer.
    assert not shots
    return processor(text=[raw_text(query, template)], images=nejm.load_images([query.image]), return_tensors="pt")


def raw_text(query, template):
    items = nejm.build_prompt([], query, template)
    return "".join(item for item in items if isinstance(item, str)).replace("<end_of_utterance>", "")


# ---------------------------------------------------------------------------------------------- the prompt


def test_conversation_turns_follow_the_idefics_markup(cases):
    shots, test = cases
    turns = conversation_turns(nejm.build_prompt(shots, test[0], "chat"))
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert turns[0].parts == [shots[0].image, nejm.prompt.case_text(shots[0])]
    assert turns[1].parts == [nejm.prompt.answer_text(shots[0])]  # the space after "Assistant:" is not the answer's
    assert turns[-1].parts == [] and not turns[-1].closed
    plain = nejm.build_prompt(shots, test[0], "figure_s2")
    assert [(t.role, t.parts) for t in conversation_turns(plain)] == [("user", plain), ("assistant", [])]
    with pytest.raises(ValueError, match="open, empty assistant turn"):
        conversation_turns(["User:", "a question<end_of_utterance>"])
    with pytest.raises(ValueError, match="outside"):
        conversation_turns(["User:", "a<end_of_utterance>", "stray text", "\nAssistant:"])
    with pytest.raises(ValueError, match="an image outside"):
        conversation_turns(["User:", "a<end_of_utterance>", shots[0].image, "\nAssistant:"])


def test_chat_template_gets_the_nejm_turns(vlms, cases):
    shots, test = cases
    adapter = vlms["tiny-idefics3"]
    processor = adapter.processor
    text, images = adapter.render_conversation(conversation(shots, test[0], "chat"))
    expected = processor.apply_chat_template(
        chat_messages(shots, test[0], with_images=False), add_generation_prompt=True, tokenize=False
    )
    assert text == expected and len(images) == 3
    # figure_s2: the figure's text verbatim in one user turn (the tiny template writes <image> as prompt_text does)
    items = nejm.build_prompt(shots, test[0], "figure_s2")
    text, _ = adapter.render_conversation(nejm.load_images(items))
    assert text == f"<|im_start|>User:{nejm.prompt_text(items)}<end_of_utterance>\nAssistant:"
    # PaliGemma (no template): the image first, the text verbatim, <end_of_utterance> dropped (not a token)
    paligemma = vlms["tiny-paligemma"]
    text, _ = paligemma.render_conversation(conversation([], test[0], "chat"))
    assert paligemma.answer_layout == "images_first"
    assert text == "<image>User:" + nejm.prompt.case_text(test[0]) + "\nAssistant:"
    with pytest.raises(ValueError, match="one image"):
        paligemma.render_conversation(conversation(shots, test[0], "chat"))


def test_max_images_config_names_known_models(repo):
    config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    model = next(iter(config["models"]))
    config["nejm"]["max_images"] = {model: 1}
    validated = medprobe_config.validate(copy.deepcopy(config))
    assert NejmSettings.from_dict(validated["nejm"]).max_images == ((model, 1),)
    assert medprobe_config.validate({**config, "nejm": {}})["nejm"]["max_images"] == {}
    config["nejm"]["max_images"] = {"gpt4": 1}
    with pytest.raises(ConfigError, match="nejm.max_images: unknown model 'gpt4'"):
        medprobe_config.validate(copy.deepcopy(config))
    config["nejm"]["max_images"] = {model: 0}
    with pytest.raises(ConfigError, match="max_images"):
        medprobe_config.validate(copy.deepcopy(config))


def test_image_limits_by_family(vlms):
    assert {name: vlms[name].max_images for name in VLM_NAMES} == {
        name: 1 if name in ONE_IMAGE else None for name in VLM_NAMES
    }
    cfg = model_cfg(vlms, "tiny-llava")
    assert nejm.answering.prompt_image_limit(cfg) == 1  # read from the config alone, before loading
    assert nejm.answering.prompt_image_limit(cfg, configured=3) == 3
    assert nejm.answering.prompt_image_limit({"adapter": "idefics", "checkpoint": "x"}) is None
    with pytest.raises(ValueError, match=r"nejm\.max_images values must be integers >= 1"):
        nejm.answering.prompt_image_limit(cfg, configured=0)


# ---------------------------------------------------------------------------------------------- answering


@pytest.mark.parametrize("name, template", ANSWERED)
def test_greedy_equals_a_direct_generate(vlms, cases, name, template):
    adapter = vlms[name]
    shots, test = cases
    shots = shown_shots(adapter, shots)
    ours = adapter.encode_conversations([conversation(shots, test[0], template)])
    direct = direct_inputs(adapter, shots, test[0], template)
    assert set(ours) == set(direct) - {"labels"}
    for key, value in ours.items():
        assert torch.equal(value, direct[key].to(value.dtype)), key
    stop, banned = adapter.stop_and_banned_ids()
    assert adapter.processor.tokenizer.eos_token_id in stop
    assert all([i] in banned for i in adapter.image_token_ids)
    answer = adapter.generate([conversation(shots, test[0], template)], max_new_tokens=6)
    inputs = {k: v for k, v in direct.items() if k != "labels"}
    with torch.no_grad():
        output = adapter.model.generate(
            **inputs, max_new_tokens=6, do_sample=False, eos_token_id=stop, bad_words_ids=banned, pad_token_id=0
        )
    tokens = output[0, direct["input_ids"].shape[1] :]
    assert answer == [[adapter.processor.tokenizer.decode(tokens, skip_special_tokens=True)]]
    assert len(tokens) > 1


@pytest.mark.parametrize("name", ["tiny-idefics3", "tiny-paligemma"])
def test_batched_greedy_equals_one_at_a_time_and_sampling_is_seeded(vlms, cases, name):
    adapter = vlms[name]
    shots, test = cases
    shots = shown_shots(adapter, shots)
    conversations = [conversation(shots, case, "figure_s2") for case in test]
    lengths = {adapter.encode_conversations([c])["input_ids"].shape[1] for c in conversations}
    assert len(lengths) > 1  # the batch is padded
    batched = adapter.generate(conversations, max_new_tokens=5)
    assert batched == [adapter.generate([c], max_new_tokens=5)[0] for c in conversations]
    state = torch.random.get_rng_state()
    first = adapter.generate(conversations[:1], max_new_tokens=5, do_sample=True, num_return_sequences=3, seed=7)
    again = adapter.generate(conversations[:1], max_new_tokens=5, do_sample=True, num_return_sequences=3, seed=7)
    assert first == again and len(first[0]) == 3
    assert torch.equal(torch.random.get_rng_state(), state)


def test_generation_stops_at_the_stop_strings(vlms, cases):
    adapter = vlms["tiny-llava"]
    _, test = cases
    conversations = [conversation([], case, "figure_s2") for case in test[:2]]
    free = adapter.generate(conversations, max_new_tokens=8)
    stop = free[0][0][:4]
    assert len(free[0][0]) > 4
    stopped = adapter.generate(conversations, max_new_tokens=8, stop_strings=[stop])
    # The stop string stays in the answer; the token that completes it may run past it.
    assert stop in stopped[0][0] and free[0][0].startswith(stopped[0][0]) and len(stopped[0][0]) < len(free[0][0])


def test_image_tokens_are_never_generated_and_the_end_of_turn_stops(vlms, cases):
    adapter = vlms["tiny-idefics3"]
    shots, test = cases
    conversations = [conversation(shots, test[0], "chat")]
    tokenizer = adapter.processor.tokenizer
    stop, banned = adapter.stop_and_banned_ids()
    image_markup = [
        tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<fake_token_around_image>", "<global-img>")
    ]
    assert sorted(image_markup) == sorted(i for (i,) in banned)

    def boosted(token_ids):
        def hook(module, args, output):
            output[..., token_ids] += 1e4
            return output

        return adapter.model.get_output_embeddings().register_forward_hook(hook)

    handle = boosted(image_markup)  # the model now prefers image tokens above all
    try:
        batch = adapter.encode_conversations(conversations)
        with torch.no_grad():
            free = adapter.model.generate(**batch, max_new_tokens=3, do_sample=False, eos_token_id=stop)
        new = free[0, batch["input_ids"].shape[1] :].tolist()
        assert len(new) == 3 and set(new) <= set(image_markup)
        assert adapter.generate(conversations, max_new_tokens=3)[0][0] != ""  # other tokens
    finally:
        handle.remove()
    # The first new token is <end_of_utterance>, then a word: the end of turn ends the answer.
    end, word = tokenizer.convert_tokens_to_ids("<end_of_utterance>"), tokenizer.encode("a", add_special_tokens=False)
    steps = []

    def end_then_word(module, args, output):
        output[..., word[0] if steps else end] += 1e4
        steps.append(1)
        return output

    handle = adapter.model.get_output_embeddings().register_forward_hook(end_then_word)
    try:
        assert adapter.generate(conversations, max_new_tokens=3) == [[""]] and len(steps) == 1
    finally:
        handle.remove()
    # Continuations: the leading space stays after "Assistant:", goes after PaliGemma's closing newline.
    assert adapter._continuation("Assistant:", " Answer: 1. X") == " Answer: 1. X"
    assert adapter._continuation("Assistant:\n", " Answer: 1. X") == "Answer: 1. X"
    assert vlms["tiny-paligemma"]._continuation("Answer:", " X\n") == "X\n"


@pytest.mark.parametrize("name, template", ANSWERED)
def test_likelihood_equals_a_direct_computation_with_the_logits(vlms, cases, name, template):
    adapter = vlms[name]
    processor = adapter.processor
    shots, test = cases
    shots, query = shown_shots(adapter, shots), test[0]
    continuations = nejm.likelihood_continuations(query, template)
    sums, n_tokens = adapter.choice_loglikelihoods(conversation(shots, query, template), continuations)
    prompt_ids = direct_inputs(adapter, shots, query, template)["input_ids"][0]
    images = nejm.load_images([c.image for c in [*shots, query]])
    for index, continuation in enumerate(continuations):
        if adapter.answer_layout == "images_first":  # PaliGemma: the choice is the causal suffix, then EOS
            full = processor(
                text=[raw_text(query, template)], images=images, suffix=[continuation.lstrip()], return_tensors="pt"
            )
            full = {k: v[:, :-1] if k != "pixel_values" else v for k, v in full.items() if k != "labels"}
            assert int(full["token_type_ids"][0, len(prompt_ids)]) == 1
        else:
            messages = direct_messages(shots, query, template, with_images=False)
            rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if rendered.endswith("\n"):  # Qwen's and Gemma's generation prompts
                continuation = continuation.lstrip()
            bos = processor.tokenizer.bos_token
            special = {"add_special_tokens": False} if bos and rendered.startswith(bos) else {}
            full = processor(text=[rendered + continuation], images=[images], return_tensors="pt", **special)
        ids = full["input_ids"][0]
        common = next((t for t, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), len(prompt_ids))
        if template == "chat":  # " Answer: ..." after "Assistant:" merges with nothing
            assert common == len(prompt_ids)
        with torch.no_grad():
            logprobs = torch.log_softmax(adapter.model(**full).logits[0].double(), dim=-1)
        direct = sum(float(logprobs[t - 1, ids[t]]) for t in range(common, len(ids)))
        assert n_tokens[index] == len(ids) - common > 1
        assert sums[index] == pytest.approx(direct, abs=1e-4)  # right-padded batch vs alone


# ---------------------------------------------------------------------------------------------- end to end


class Counting:
    """An adapter that counts its model calls and forwards everything else."""

    def __init__(self, adapter):
        self.adapter, self.calls = adapter, 0

    def __getattr__(self, name):
        return getattr(self.adapter, name)

    def generate(self, conversations, **kwargs):
        self.calls += 1
        return self.adapter.generate(conversations, **kwargs)

    def choice_loglikelihoods(self, conversation, continuations):
        self.calls += 1
        return self.adapter.choice_loglikelihoods(conversation, continuations)


def test_answer_cases_end_to_end_one_image_model_zero_shot(vlms, tmp_path, caplog):
    # One shot (two images in a prompt) and two test cases keep it short; the layout of two is tested above.
    cases_dir = tmp_path / "cases"
    generate_cases(cases_dir, n_cases=3, seed=1, explanations=True)
    settings = nejm_settings(max_new_tokens=4, top_k_samples=2, batch_size=2, shots=1)
    shots, test = nejm.split_shots(nejm.load_cases(cases_dir), shots=1)
    answers = {}
    for name in ("tiny-idefics3", "tiny-llava"):
        out = tmp_path / name / "answers.jsonl"
        cfg = model_cfg(vlms, name)
        with caplog.at_level("WARNING", logger="medprobe.nejm"):
            nejm.answer_cases(
                cases_dir, out, out.with_name("answers.cache.jsonl"), model_name=name, model_cfg=cfg,
                settings=settings, seed=0, job=GpuJob.on("cpu"),
            )  # fmt: skip
        answers[name] = out
    assert "model tiny-llava takes at most 1 image(s) per prompt" in caplog.text and "idefics3 takes" not in caplog.text
    records = {name: nejm.load_answers(path) for name, path in answers.items()}
    for name, n_shots in (("tiny-idefics3", 1), ("tiny-llava", 0)):
        assert len(records[name]) == len(test) * (1 + 2 + 1)
        assert {r["shots"] for r in records[name]} == {n_shots}
        assert {r["case_id"] for r in records[name]} == {c.id for c in test}  # the same test cases
        hashes = {c.id: nejm.prompt_hash(nejm.build_prompt(shots[:n_shots], c, "chat")) for c in test}
        assert all(r["prompt_hash"] == hashes[r["case_id"]] for r in records[name])

    table_path, unparseable_path = tmp_path / "nejm.csv", tmp_path / "nejm_unparseable.csv"
    nejm.write_table(answers, cases_dir, table_path, unparseable_path, settings=settings, n_boot=20, seed=0)
    table = pd.read_csv(table_path)
    assert list(table.columns) == list(nejm.TABLE_COLUMNS)
    shots_of = table.drop_duplicates("model").set_index("model")["shots"]
    assert shots_of["tiny-idefics3"] == 1 and shots_of["tiny-llava"] == 0
    assert shots_of[["readers", "chance"]].isna().all()
    assert "different numbers of shots" in caplog.text

    # Another number of shots is another prompt: every answer is redone; back again, the cache answers.
    llava = Counting(vlms["tiny-llava"])
    out = answers["tiny-llava"]
    kwargs = dict(model_name="tiny-llava", model_cfg=model_cfg(vlms, "tiny-llava"), seed=0, adapter=llava)
    two_images = nejm_settings(max_new_tokens=4, top_k_samples=2, batch_size=2, shots=1, max_images={"tiny-llava": 2})
    nejm.answer_cases(cases_dir, out, out.with_name("answers.cache.jsonl"), settings=two_images, **kwargs)
    one_shot = nejm.load_answers(out)
    assert {r["shots"] for r in one_shot} == {1} and {r["shot_ids"][0] for r in one_shot} == {shots[0].id}
    with pytest.raises(ValueError, match="mix prompts with different numbers of shots"):
        nejm.accuracy_table({"m": records["tiny-llava"] + one_shot}, cases_dir, n_boot=2)
    assert llava.calls == -(-len(test) // settings.batch_size) + 2 * len(test)  # greedy batches, samples, likelihood
    llava.calls = 0
    nejm.answer_cases(cases_dir, out, out.with_name("answers.cache.jsonl"), settings=settings, **kwargs)
    assert llava.calls == 0 and nejm.load_answers(out) == records["tiny-llava"]


def test_a_model_that_writes_no_text_cannot_answer(cases_dir, tmp_path):
    out = tmp_path / "answers.jsonl"
    with pytest.raises(ValueError, match="model 'clip' \\(adapter 'clip'\\) cannot answer the NEJM cases"):
        nejm.answer_cases(
            cases_dir, out, tmp_path / "cache.jsonl", model_name="clip", model_cfg={"adapter": "clip"},
            settings=nejm_settings(), seed=0, adapter=object(),
        )  # fmt: skip

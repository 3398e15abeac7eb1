"""Answering the test cases in three modes (:data:`MODES`), resumable: every answer is appended to a cache
as soon as its batch is done, and a rerun answers only what the cache lacks.

:func:`answer_cases` reads as its steps: :func:`plan_answers` (test cases, prompts and the settings each
answer depends on) -> :meth:`AnswerPlan.missing` (what the cache lacks) -> the model on the job's devices (:class:`medprobe.gpu_job.GpuJob`)
-> greedy, sampled and likelihood answers -> :func:`finish_answers` (the current records into the
answers file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medprobe.gpu_job import GpuJob
from medprobe.io import write_text_atomic
from medprobe.nejm import prompt
from medprobe.nejm.cases import Case, load_cases, split_shots
from medprobe.nejm.choices import extract_choice
from medprobe.settings import NejmSettings

logger = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "AnswerJournal",
    "AnswerPlan",
    "answer_cases",
    "finish_answers",
    "fit_shots",
    "load_answers",
    "plan_answers",
    "prompt_image_limit",
]

#: Answer modes: the greedy answer, sampled answers (top-k accuracy) and choice likelihoods.
MODES = ("greedy", "sample", "likelihood")


# --------------------------------------------------------------------------------------------
# The answers file and its cache
# --------------------------------------------------------------------------------------------


def record_key(record: Mapping[str, Any]) -> tuple:
    """What makes an answer reusable: the case, mode and sample, the prompt and the answer settings."""
    return (
        record["case_id"],
        record["mode"],
        int(record.get("sample", 0)),
        record["prompt_hash"],
        json.dumps(record.get("settings", {}), sort_keys=True),
    )


def load_answers(path: str | Path) -> list[dict[str, Any]]:
    """Records of an answers (or cache) JSONL file; a torn last line (a killed run) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("%s: skipping a torn last line (an interrupted run)", path)
                continue
            raise ValueError(f"{path}, line {number}: not valid JSON") from None
        records.append(record)
    return records


class AnswerJournal:
    """Append-only JSONL cache of answers, flushed and synced after every batch, so that a killed run
    loses at most the batch it was in. ``records`` maps :func:`record_key` to the latest record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records = {record_key(r): r for r in load_answers(path)}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # cut a torn last line so that new records start on a line of their own
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as handle:
                    handle.truncate(data.rfind(b"\n") + 1)
        self._handle = open(path, "a", encoding="utf-8")

    def add(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self.records[record_key(record)] = record
            self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerPlan:
    """Every answer one run must hold: the test cases, their prompts and prompt hashes, and the settings
    each mode's answers depend on (a record answered under other settings is not reused)."""

    settings: NejmSettings
    seed: int
    test_cases: tuple[Case, ...]
    prompts: Mapping[str, list[str | Path]]
    hashes: Mapping[str, str]
    mode_settings: Mapping[str, dict[str, Any]]
    #: The shots every prompt shows (fewer than configured where the model takes fewer images).
    shot_ids: tuple[str, ...] = ()

    @property
    def shots(self) -> dict[str, Any]:
        """What every record says of its prompt's shots: their number (0: zero-shot) and ids."""
        return {"shots": len(self.shot_ids), "shot_ids": list(self.shot_ids)}

    def samples(self, mode: str) -> int:
        return self.settings.top_k_samples if mode == "sample" else 1

    def key(self, case: Case, mode: str, sample: int = 0) -> tuple:
        return record_key(
            {
                "case_id": case.id,
                "mode": mode,
                "sample": sample,
                "prompt_hash": self.hashes[case.id],
                "settings": self.mode_settings[mode],
            }
        )

    def missing(self, done: Mapping[tuple, Any]) -> dict[str, list[Case]]:
        """Mode -> the test cases with an answer of that mode not in ``done``."""
        return {
            mode: [
                case
                for case in self.test_cases
                if any(self.key(case, mode, s) not in done for s in range(self.samples(mode)))
            ]
            for mode in MODES
        }

    def current(self, done: Mapping[tuple, dict[str, Any]]) -> list[dict[str, Any]]:
        """The records of this plan, by case, mode and sample (copies).

        A record's prompt hash fixes its shots, so :attr:`shots` also completes records cached before
        records carried them."""
        return [
            {**done[self.key(case, mode, s)], **self.shots}
            for case in self.test_cases
            for mode in MODES
            for s in range(self.samples(mode))
        ]

    def record(self, case: Case, mode: str, sample: int, raw: str, index: int | None, rule: str, **extra) -> dict:
        """One answer: ``index`` is the 0-based choice (None: unparseable), ``rule`` what decided it."""
        return {
            "case_id": case.id,
            "mode": mode,
            "sample": sample,
            "prompt_hash": self.hashes[case.id],
            "raw_output": raw,
            "parsed_choice": None if index is None else index + 1,
            "choice": None if index is None else case.choices[index],
            "rule": rule,
            "correct": index == case.answer_index,
            "answer": case.answer_index + 1,
            "settings": self.mode_settings[mode],
            **self.shots,
            **extra,
        }


def check_settings(settings: NejmSettings) -> None:
    """``ValueError`` naming the config key for settings the answering cannot use."""
    prompt.check_template(settings.template)
    if settings.likelihood_score not in ("sum", "mean"):
        raise ValueError(f"nejm.likelihood_score must be 'sum' or 'mean', got {settings.likelihood_score!r}")
    if settings.batch_size < 1 or settings.top_k_samples < 1 or settings.max_new_tokens < 1:
        raise ValueError(
            f"nejm.batch_size, top_k_samples and max_new_tokens must be >= 1, got "
            f"{settings.batch_size}, {settings.top_k_samples}, {settings.max_new_tokens}"
        )


def _mode_settings(model_name: str, model_cfg: Mapping[str, Any], settings: NejmSettings, seed: int) -> dict:
    """The settings each mode's answers depend on (recorded with every answer)."""
    model = {
        "model": model_name,
        "checkpoint": str(model_cfg.get("checkpoint", "")),
        "revision": str(model_cfg.get("revision") or ""),
    }
    generation = {**model, "max_new_tokens": int(settings.max_new_tokens)}
    sampling = {"temperature": float(settings.temperature), "top_k": int(settings.top_k), "seed": int(seed)}
    return {"greedy": generation, "sample": {**generation, **sampling}, "likelihood": dict(model)}


def _log_shots(shot_cases: Sequence[Case], test_cases: Sequence[Case]) -> None:
    logger.info(
        "%d test cases; shots: %s", len(test_cases), ", ".join(f"{c.id} ({c.date})" for c in shot_cases) or "none"
    )
    for shot in shot_cases:
        if not shot.explanation:
            logger.warning(
                "shot %s (%s) has no 'explanation': its answer is shown without a Reason",
                shot.id,
                shot.image.parent / "case.json",
            )


def prompt_image_limit(model_cfg: Mapping[str, Any], adapter: Any = None, configured: int | None = None) -> int | None:
    """Most images one prompt of the model may hold (``None``: no limit).

    ``configured`` (the model's ``nejm.max_images``) when given; else the family's own (:attr:`max_images`
    of a loaded adapter, ``max_images_of_config`` of its adapter class, which reads only the checkpoint's
    config: 1 for the ``hf_vlm`` families trained with one image, see :mod:`medprobe.models.vlm_answering`);
    else no limit (IDEFICS, adapters that say nothing).
    """
    if configured is not None:
        if isinstance(configured, bool) or not isinstance(configured, int) or configured < 1:
            raise ValueError(f"nejm.max_images values must be integers >= 1, got {configured!r}")
        return configured
    if adapter is not None:
        return getattr(adapter, "max_images", None)
    if not model_cfg.get("adapter"):
        return None
    from medprobe.models import ADAPTERS

    of_config = getattr(ADAPTERS.get(model_cfg["adapter"]), "max_images_of_config", None)
    return None if of_config is None else of_config(model_cfg)


def fit_shots(shot_cases: Sequence[Case], max_images: int | None) -> list[Case]:
    """The first shots that fit in a prompt of at most ``max_images`` images (one is the query's)."""
    return list(shot_cases if max_images is None else shot_cases[: max(max_images - 1, 0)])


def plan_answers(
    cases_dir: str | Path,
    model_name: str,
    model_cfg: Mapping[str, Any],
    settings: NejmSettings,
    seed: int,
    max_images: int | None = None,
) -> AnswerPlan:
    """The shots and test cases of ``cases_dir`` and every test case's prompt in ``settings.template``.

    The prompts show the shots that fit in ``max_images`` images (:func:`fit_shots`; zero-shot for a
    one-image model); the test cases are the same whatever fits, every configured shot left out, so that
    all models answer the same cases.
    """
    shot_cases, test_cases = split_shots(load_cases(cases_dir), settings.shots, settings.shot_ids)
    _log_shots(shot_cases, test_cases)
    shown = fit_shots(shot_cases, max_images)
    if len(shown) < len(shot_cases):
        logger.warning(
            "model %s takes at most %d image(s) per prompt: its prompts show %d of the %d shots (%d-shot); "
            "nejm.max_images.%s overrides this",
            model_name,
            max_images,
            len(shown),
            len(shot_cases),
            len(shown),
            model_name,
        )
    prompts = {case.id: prompt.build_prompt(shown, case, settings.template) for case in test_cases}
    if test_cases:
        logger.info("prompt of %s:\n%s", test_cases[0].id, prompt.prompt_text(prompts[test_cases[0].id]))
    return AnswerPlan(
        settings=settings,
        seed=seed,
        test_cases=tuple(test_cases),
        prompts=prompts,
        hashes={case_id: prompt.prompt_hash(items) for case_id, items in prompts.items()},
        mode_settings=_mode_settings(model_name, model_cfg, settings, seed),
        shot_ids=tuple(case.id for case in shown),
    )


# --------------------------------------------------------------------------------------------
# The model and the three modes
# --------------------------------------------------------------------------------------------


def _sample_seed(seed: int, case_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{case_id}".encode()).digest()[:4], "little")


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _stops(template: str) -> dict[str, Any]:
    # Under chat, generate is called without stop strings (adapters without them keep working).
    return {"stop_strings": list(prompt.stop_strings(template))} if prompt.stop_strings(template) else {}


def _parsed(plan: AnswerPlan, case: Case, mode: str, sample: int, text: str) -> dict:
    settings = plan.settings
    return plan.record(
        case, mode, sample, text, *extract_choice(text, case.choices, settings.fuzzy_cutoff, settings.template)
    )


def answer_greedy(plan: AnswerPlan, adapter: Any, journal: AnswerJournal, cases: Sequence[Case], images: dict) -> None:
    """Greedy answers, ``batch_size`` cases per ``generate`` call."""
    settings = plan.settings
    for batch in _batches(cases, settings.batch_size):
        outputs = adapter.generate(
            [prompt.load_images(plan.prompts[c.id], images) for c in batch],
            max_new_tokens=settings.max_new_tokens,
            do_sample=False,
            **_stops(settings.template),
        )
        journal.add(_parsed(plan, case, "greedy", 0, texts[0]) for case, texts in zip(batch, outputs))
        logger.info("greedy: %d cases answered", len(batch))


def answer_sampled(plan: AnswerPlan, adapter: Any, journal: AnswerJournal, cases: Sequence[Case], images: dict) -> None:
    """``top_k_samples`` sampled answers per case."""
    settings = plan.settings
    for case in cases:
        # One call per case with its own seed: the samples do not depend on batching or resuming.
        (texts,) = adapter.generate(
            [prompt.load_images(plan.prompts[case.id], images)],
            max_new_tokens=settings.max_new_tokens,
            do_sample=True,
            temperature=settings.temperature,
            top_k=settings.top_k,
            num_return_sequences=settings.top_k_samples,
            seed=_sample_seed(plan.seed, case.id),
            **_stops(settings.template),
        )
        journal.add(_parsed(plan, case, "sample", s, text) for s, text in enumerate(texts))


def _best_choice(scores_sum: Sequence[float], scores_mean: Sequence[float], score: str) -> int:
    return int(np.argmax(scores_sum if score == "sum" else scores_mean))


def answer_likelihood(
    plan: AnswerPlan, adapter: Any, journal: AnswerJournal, cases: Sequence[Case], images: dict
) -> None:
    """The choice the model finds likeliest after the prompt, by the summed or mean log-likelihood."""
    score = plan.settings.likelihood_score
    for case in cases:
        continuations = prompt.likelihood_continuations(case, plan.settings.template)
        sums, n_tokens = adapter.choice_loglikelihoods(prompt.load_images(plan.prompts[case.id], images), continuations)
        means = [s / n for s, n in zip(sums, n_tokens)]
        best = _best_choice(sums, means, score)
        scores = {"scores_sum": sums, "scores_mean": means, "n_tokens": n_tokens, "score": score}
        journal.add([plan.record(case, "likelihood", 0, continuations[best].strip(), best, "likelihood", **scores)])


# --------------------------------------------------------------------------------------------
# Finish
# --------------------------------------------------------------------------------------------


def _rescore_likelihood(plan: AnswerPlan, records: Iterable[dict[str, Any]]) -> None:
    """Likelihood records keep both scores; the configured one decides, without asking the model again."""
    score = plan.settings.likelihood_score
    cases = {case.id: case for case in plan.test_cases}
    for rec in records:
        if rec["mode"] == "likelihood" and rec.get("score") != score:
            case = cases[rec["case_id"]]
            best = _best_choice(rec["scores_sum"], rec["scores_mean"], score)
            rec.update(
                score=score,
                parsed_choice=best + 1,
                choice=case.choices[best],
                correct=best == case.answer_index,
                raw_output=prompt.likelihood_continuations(case, plan.settings.template)[best].strip(),
            )


def finish_answers(plan: AnswerPlan, done: Mapping[tuple, dict[str, Any]], out_path: Path) -> Path:
    """Write the plan's records (from ``done``) to ``out_path``, atomically, and log the unparseable."""
    current = plan.current(done)
    _rescore_likelihood(plan, current)
    write_text_atomic(out_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in current))
    unparseable = [r for r in current if r["rule"] == "unparseable"]
    logger.info(
        "wrote %s: %d records; %d unparseable answers (counted wrong): %s",
        out_path,
        len(current),
        len(unparseable),
        ", ".join(f"{r['case_id']}/{r['mode']}{r['sample']}" for r in unparseable[:20])
        + (f", ... ({len(unparseable) - 20} more)" if len(unparseable) > 20 else "")
        or "none",
    )
    return out_path


def answer_cases(
    cases_dir: str | Path,
    out_path: str | Path,
    cache_path: str | Path,
    *,
    model_name: str,
    model_cfg: Mapping[str, Any],
    settings: NejmSettings,
    seed: int,
    job: GpuJob | None = None,
    adapter: Any = None,
) -> Path:
    """Answer every test case of ``cases_dir`` in the three modes; write ``out_path`` (JSONL, one record
    per answer).

    Records (keys): ``case_id``, ``mode`` (``greedy`` | ``sample`` | ``likelihood``), ``sample`` (0 ...
    ``top_k_samples`` - 1 for sampled answers, else 0), ``prompt_hash``, ``raw_output``, ``parsed_choice``
    (1-5 or null), ``choice`` (its text), ``rule`` (see :data:`medprobe.nejm.choices.RULES`),
    ``correct``, ``answer`` (1-5), ``settings``, ``shots`` (how many solved cases the prompt shows; 0:
    zero-shot) and ``shot_ids``, and for likelihood mode ``scores_sum``, ``scores_mean`` and ``n_tokens``
    per choice.

    The prompts show ``settings.shots`` (or ``shot_ids``) solved cases, fewer where the model takes fewer
    images in one prompt (:func:`prompt_image_limit`: the model's ``nejm.max_images`` or its family's;
    a one-image model answers zero-shot). The test cases do not depend on it.

    ``settings.template`` writes the prompts, the likelihood continuations, the stop strings and the
    answer parsing alike.

    Every answer is appended to ``cache_path`` as soon as its batch is done. A rerun, also after
    Snakemake has removed ``out_path``, answers only what the cache lacks: a case whose prompt hash (its
    text, shots or images; another template gives other hashes) or answer settings changed is answered
    again (so is every case when the shots shown change). ``out_path`` is written last, atomically, with the
    current records.

    The model is loaded onto ``job``'s devices (:class:`medprobe.gpu_job.GpuJob`; the default is the first
    CUDA device if any, else the CPU) only when something is left to answer. ``adapter`` (tests) replaces
    it; it needs ``generate`` and ``choice_loglikelihoods`` (:class:`medprobe.models.idefics.IdeficsAdapter`,
    and the ``hf_vlm`` adapter through :class:`medprobe.models.vlm_answering.VlmAnswering`).
    """
    check_settings(settings)
    max_images = prompt_image_limit(model_cfg, adapter, dict(settings.max_images).get(model_name))
    plan = plan_answers(cases_dir, model_name, model_cfg, settings, seed, max_images)
    journal = AnswerJournal(Path(cache_path))
    todo = plan.missing(journal.records)
    n = len(plan.test_cases)
    logger.info("cache %s: %s", cache_path, ", ".join(f"{mode} {n - len(todo[mode])}/{n} done" for mode in MODES))
    started = time.perf_counter()
    try:
        if any(todo.values()):
            adapter = (job or GpuJob.on(None)).load_adapter(model_cfg) if adapter is None else adapter
            if not all(callable(getattr(adapter, name, None)) for name in ("generate", "choice_loglikelihoods")):
                raise ValueError(
                    f"model {model_name!r} (adapter {model_cfg.get('adapter')!r}) cannot answer the NEJM cases: "
                    "it does not generate text (nejm.models takes idefics and hf_vlm models)"
                )
            images: dict[Path, Any] = {}
            answer_greedy(plan, adapter, journal, todo["greedy"], images)
            answer_sampled(plan, adapter, journal, todo["sample"], images)
            answer_likelihood(plan, adapter, journal, todo["likelihood"], images)
            logger.info("answered in %.1f s", time.perf_counter() - started)
    finally:
        journal.close()
    return finish_answers(plan, journal.records, Path(out_path))

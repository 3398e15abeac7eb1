"""NEJM Image Challenge: few-shot multiple-choice answers, answer extraction, accuracy by difficulty.

The paper's first result: IDEFICS-80B, shown two solved cases in its prompt, picks the right diagnosis
of 40.4% of 929 NEJM Image Challenge cases (54.3% with three sampled answers), plotted per difficulty
stratum against the human readers (Figure 1d). The cases are copyrighted: users bring them as case
folders (``<cases_dir>/<id>/{image.*, case.json}``; docs/nejm.md); the demo generates synthetic ones.

The steps, one module each:

* :mod:`~medprobe.nejm.cases`: :func:`load_cases` reads and checks the case folders; :func:`split_shots`
  takes the in-context shots (the first ``shots`` cases by date, or named ones) out of the test set.
* :mod:`~medprobe.nejm.prompt`: :func:`build_prompt` writes the interleaved image-and-text prompt in one
  of :data:`TEMPLATES`, the paper's Figure S2 text (``figure_s2``) or the IDEFICS instruct chat turns
  (``chat``); :func:`prompt_hash` fingerprints it (text and image bytes). The template also decides
  what likelihood mode scores (:func:`likelihood_continuations`) and where generation stops
  (:func:`stop_strings`).
* :mod:`~medprobe.nejm.choices`: :func:`extract_choice` maps a generated answer to one of the five
  choices by layered rules and says which rule decided.
* :mod:`~medprobe.nejm.answering`: :func:`answer_cases` runs the three modes (greedy, sampled top-k,
  likelihood) and appends one JSON record per answer to a cache that makes reruns skip finished work.
  The models are IDEFICS (``idefics``) and any image-text-to-text model (``hf_vlm``, which gets the prompt
  through its chat template: :mod:`medprobe.models.vlm_answering`); a model trained with one image per
  prompt is shown no shots (zero-shot, recorded as ``shots``).
* :mod:`~medprobe.nejm.table`: :func:`accuracy_table` turns the answers into ``results/tables/nejm.csv``
  (accuracy per difficulty stratum with bootstrap SD and each model's number of shots, the readers' own
  accuracy and chance).
"""

from medprobe.nejm.answering import MODES, answer_cases, load_answers
from medprobe.nejm.cases import N_CHOICES, Case, load_case, load_cases, split_shots
from medprobe.nejm.choices import RULES, extract_choice
from medprobe.nejm.prompt import (
    END_OF_UTTERANCE,
    TEMPLATES,
    build_prompt,
    check_template,
    likelihood_continuations,
    load_images,
    prompt_hash,
    prompt_text,
    stop_strings,
)
from medprobe.nejm.table import (
    TABLE_COLUMNS,
    accuracy_table,
    assign_strata,
    stratum_edges,
    top_k_correct,
    write_table,
)

__all__ = [
    "Case",
    "END_OF_UTTERANCE",
    "MODES",
    "N_CHOICES",
    "RULES",
    "TABLE_COLUMNS",
    "TEMPLATES",
    "accuracy_table",
    "answer_cases",
    "assign_strata",
    "build_prompt",
    "check_template",
    "extract_choice",
    "likelihood_continuations",
    "load_answers",
    "load_case",
    "load_cases",
    "load_images",
    "prompt_hash",
    "prompt_text",
    "split_shots",
    "stop_strings",
    "stratum_edges",
    "top_k_correct",
    "write_table",
]

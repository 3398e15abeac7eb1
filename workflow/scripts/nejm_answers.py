"""NEJM cases through one model: greedy, sampled and likelihood answers into a resumable JSONL."""
from medprobe.nejm import answer_cases
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    nejm = snakemake.params.nejm
    answer_cases(
        snakemake.input.cases,
        snakemake.output[0],
        model_name=snakemake.wildcards.model,
        model_cfg=snakemake.params.model,
        shots=nejm["shots"],
        shot_ids=nejm["shot_ids"],
        template=nejm["template"],
        top_k_samples=nejm["top_k_samples"],
        temperature=nejm["temperature"],
        top_k=nejm["top_k"],
        max_new_tokens=nejm["max_new_tokens"],
        batch_size=nejm["batch_size"],
        fuzzy_cutoff=nejm["fuzzy_cutoff"],
        likelihood_score=nejm["likelihood_score"],
        seed=snakemake.params.seed,
    )

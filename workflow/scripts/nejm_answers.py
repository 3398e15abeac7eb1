"""NEJM cases through one model: greedy, sampled and likelihood answers into a resumable JSONL."""

from medprobe.gpu_job import GpuJob
from medprobe.logs import rule_logging
from medprobe.nejm import answer_cases
from medprobe.rule_params import load_entry
from medprobe.settings import NejmSettings

with rule_logging(snakemake), GpuJob.claim_devices(snakemake.resources.gpu) as job:
    answer_cases(
        snakemake.input.cases,
        snakemake.output[0],
        snakemake.params.cache,
        model_name=snakemake.wildcards.model,
        model_cfg=load_entry(snakemake.params.model, snakemake.config, snakemake.wildcards.model),
        settings=NejmSettings.from_dict(snakemake.params.nejm),
        seed=snakemake.params.seed,
        job=job,
    )

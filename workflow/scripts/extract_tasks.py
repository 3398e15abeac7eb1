"""One model over all its tasks (group_tasks): loaded once, each task's activations HDF5 written in turn."""

from medprobe.gpu_job import GpuJob
from medprobe.logs import rule_logging
from medprobe.rule_params import extraction_run, load_entry
from medprobe.settings import ExtractionSettings

model = snakemake.params.model_name
with rule_logging(snakemake), GpuJob.claim_devices(snakemake.resources.gpu) as job:
    from medprobe.extract import extract_tasks

    extract_tasks(
        dict(zip(snakemake.params.tasks, snakemake.input.manifests, strict=True)),
        dict(zip(snakemake.params.tasks, snakemake.output.activations, strict=True)),
        settings=ExtractionSettings.from_dict(
            {**snakemake.params.extraction, **extraction_run(snakemake.config, model)}
        ),
        model_name=model,
        model=load_entry(snakemake.params.model, snakemake.config, model),
        prompts=snakemake.params.by_task["prompt"],
        job=job,
        progress="log",
    )

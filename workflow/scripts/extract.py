"""Images + prompt through the model; pooled per-layer states into the activations HDF5 or one shard of it."""

from medprobe.gpu_job import GpuJob
from medprobe.logs import rule_logging
from medprobe.rule_params import extraction_run, load_entry
from medprobe.settings import ExtractionSettings

model = snakemake.wildcards.model
# The devices are claimed before anything initialises CUDA: this job's own GPU(s), or the scheduler's.
with rule_logging(snakemake), GpuJob.claim_devices(snakemake.resources.gpu) as job:
    from medprobe.extract import extract_activations

    extract_activations(
        snakemake.input.manifest,
        snakemake.output[0],
        # The params hold what the stored values depend on; how rows are fed and split comes from the config.
        settings=ExtractionSettings.from_dict(
            {**snakemake.params.extraction, **extraction_run(snakemake.config, model)}
        ),
        model_name=model,
        model=load_entry(snakemake.params.model, snakemake.config, model),
        prompt=snakemake.params.prompt,
        shard=int(snakemake.wildcards.get("shard", 0)),  # extract_whole: the whole manifest
        job=job,
        progress="log",
    )

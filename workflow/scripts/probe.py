"""Fit a probe per layer, select the headline layer, save test predictions."""

from medprobe.gpu_job import GpuJob
from medprobe.logs import rule_logging
from medprobe.probe import probe_task
from medprobe.settings import ProbeSettings, TaskSettings

with rule_logging(snakemake), GpuJob.claim_devices(snakemake.resources.gpu) as job:
    probe_task(
        snakemake.input.activations,
        snakemake.input.manifest,
        predictions=snakemake.output.predictions,
        layers=snakemake.output.layers,
        summary=snakemake.output.summary,
        task=TaskSettings.from_dict(snakemake.params.task),
        probe=ProbeSettings.from_dict(snakemake.params.probe).for_mode(snakemake.params.mode),
        layer=snakemake.params.layer,
        seed=snakemake.params.seed,
        protocol=snakemake.params.protocol,
        device=job.device,
        # Not a param: the batching changes how the layers are fitted, not their results (common.smk).
        layer_batch=snakemake.config["probe"]["layer_batch"],
    )

"""Label-efficiency sweep: refit the headline probe on fractions of the training data."""

from medprobe.gpu_job import GpuJob
from medprobe.logs import rule_logging
from medprobe.probe import efficiency_task
from medprobe.settings import EfficiencySettings, ProbeSettings, TaskSettings

with rule_logging(snakemake), GpuJob.claim_devices(snakemake.resources.gpu) as job:
    efficiency_task(
        snakemake.input.activations,
        snakemake.input.manifest,
        snakemake.input.summary,
        snakemake.output[0],
        task=TaskSettings.from_dict(snakemake.params.task),
        probe=ProbeSettings.from_dict(snakemake.params.probe).for_mode(snakemake.params.mode),
        efficiency=EfficiencySettings.from_dict(snakemake.params.efficiency),
        seed=snakemake.params.seed,
        device=job.device,
    )

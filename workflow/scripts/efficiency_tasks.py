"""group_tasks: the label-efficiency sweeps of one model on each of its tasks in turn, as rule efficiency
runs them one task a job."""

import logging

from medprobe.gpu_job import GpuJob
from medprobe.logs import rule_logging
from medprobe.probe import efficiency_task
from medprobe.settings import EfficiencySettings, ProbeSettings, TaskSettings

with rule_logging(snakemake), GpuJob.claim_devices(snakemake.resources.gpu) as job:
    probe = ProbeSettings.from_dict(snakemake.params.probe).for_mode(snakemake.params.mode)
    efficiency = EfficiencySettings.from_dict(snakemake.params.efficiency)
    for index, task in enumerate(snakemake.params.tasks):
        logging.getLogger("medprobe.probe.efficiency").info("%s: %s", task, snakemake.input.activations[index])
        efficiency_task(
            snakemake.input.activations[index],
            snakemake.input.manifests[index],
            snakemake.input.summaries[index],
            snakemake.output[index],
            task=TaskSettings.from_dict(snakemake.params.by_task["task"][task]),
            probe=probe,
            efficiency=efficiency,
            seed=snakemake.params.seed,
            device=job.device,
        )

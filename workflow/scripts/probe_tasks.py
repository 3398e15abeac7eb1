"""group_tasks: the probes of one model on each of its tasks in turn, as rule probe fits them one task a job."""

import logging

from medprobe.gpu_job import GpuJob
from medprobe.logs import rule_logging
from medprobe.probe import probe_task
from medprobe.settings import ProbeSettings, TaskSettings

with rule_logging(snakemake), GpuJob.claim_devices(snakemake.resources.gpu) as job:
    probe = ProbeSettings.from_dict(snakemake.params.probe).for_mode(snakemake.params.mode)
    for index, task in enumerate(snakemake.params.tasks):
        logging.getLogger("medprobe.probe.task").info("%s: %s", task, snakemake.input.activations[index])
        probe_task(
            snakemake.input.activations[index],
            snakemake.input.manifests[index],
            predictions=snakemake.output.predictions[index],
            layers=snakemake.output.layers[index],
            summary=snakemake.output.summaries[index],
            task=TaskSettings.from_dict(snakemake.params.by_task["task"][task]),
            probe=probe,
            layer=snakemake.params.layer,
            seed=snakemake.params.seed,
            protocol=snakemake.params.protocol,
            device=job.device,
            # Not a param: the batching changes how the layers are fitted, not their results (common.smk).
            layer_batch=snakemake.config["probe"]["layer_batch"],
        )

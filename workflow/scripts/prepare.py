"""Raw metadata -> manifest, preprocessed images and sidecar for one task."""

from medprobe.logs import rule_logging
from medprobe.prepare import prepare_task
from medprobe.settings import SplitSettings, TaskSettings

with rule_logging(snakemake):
    prepare_task(
        snakemake.wildcards.task,
        TaskSettings.from_dict(snakemake.params.task),
        SplitSettings.from_dict(snakemake.params.split),
        snakemake.params.seed,
        metadata=snakemake.input.metadata,
        recipe_counts=snakemake.input.get("counts"),
        manifest=snakemake.output.manifest,
        sidecar=snakemake.output.sidecar,
        images=snakemake.output.images,
        on_bad_image=snakemake.params.on_bad_image,
        threads=snakemake.threads,
    )

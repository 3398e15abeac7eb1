"""Raw metadata -> manifest, preprocessed images and sidecar for one task."""
from medprobe.prepare import prepare_task
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    prepare_task(
        snakemake.wildcards.task,
        snakemake.params.task,  # its own test_fraction, where set, replaces split.test_fraction
        raw_dir=snakemake.input[0].rsplit("/", 1)[0],
        manifest_path=snakemake.output.manifest,
        sidecar_path=snakemake.output.sidecar,
        images_dir=snakemake.output.images,
        val_fraction=snakemake.params.split["val_fraction"],
        test_fraction=snakemake.params.split["test_fraction"],
        seed=snakemake.params.seed,
        on_bad_image=snakemake.params.on_bad_image,
        threads=snakemake.threads,
    )

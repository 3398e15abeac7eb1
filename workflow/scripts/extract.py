"""Images + prompt through the model; pooled per-layer states into the activations HDF5 (or one shard of it)."""

from medprobe.devices import claim_devices, placement
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    # Before anything touches CUDA: this job's own GPU(s), or the scheduler's assignment as it is.
    claim = claim_devices(int(snakemake.resources.gpu))
    from medprobe.extract import extract_activations

    model = placement(snakemake.params.model, claim)
    extraction = snakemake.params.extraction
    extract_activations(
        snakemake.input.manifest,
        snakemake.output[0],
        model_name=snakemake.wildcards.model,
        model_cfg=model,
        prompt=snakemake.params.prompt,
        prompt_format=extraction["prompt_format"],
        batch_size=model.get("batch_size", extraction["batch_size"]),
        num_workers=extraction["num_workers"],
        prefetch_factor=extraction["prefetch_factor"],
        dtype=extraction["dtype"],
        layers=model.get("layers"),
        compression=extraction["compression"],
        compression_level=extraction["compression_level"],
        shard=(int(snakemake.wildcards.get("shard", 0)), snakemake.params.shards),
        progress="log",
    )

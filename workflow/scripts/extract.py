"""Images + prompt through the model; pooled per-layer states into the activations HDF5."""
from medprobe.extract import extract_activations
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    model = snakemake.params.model
    extraction = snakemake.params.extraction
    extract_activations(
        snakemake.input.manifest,
        snakemake.output[0],
        model_name=snakemake.wildcards.model,
        model_cfg=model,
        prompt=snakemake.params.prompt,
        batch_size=model.get("batch_size", extraction["batch_size"]),
        num_workers=extraction["num_workers"],
        dtype=extraction["dtype"],
        progress=False,
    )

"""Label-efficiency sweep: refit the headline probe on nested fractions of the training patients."""
from medprobe.probe import efficiency_task
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    task, probe, efficiency = snakemake.params.task, snakemake.params.probe, snakemake.params.efficiency
    efficiency_task(
        snakemake.input.activations,
        snakemake.input.manifest,
        snakemake.input.summary,
        snakemake.output[0],
        kind=task["kind"],
        classes=task["classes"],
        fractions=efficiency["fractions"],
        seeds=[snakemake.params.seed + offset for offset in range(efficiency["seeds"])],
        max_iter=probe["max_iter"],
        tol=probe["tol"],
        class_weight=None if probe["class_weight"] == "none" else probe["class_weight"],
        dtype=probe["dtype"],
        mode=probe["mode"],
        paper=probe["paper"],
    )

"""Label-efficiency sweep: refit the headline probe on fractions of the training data."""
from medprobe.probe import efficiency_seeds, efficiency_task
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
        min_test_positives=task["min_test_positives"],
        fractions=efficiency["fractions"],
        seeds=efficiency_seeds(efficiency["seeds"], snakemake.params.seed),
        sampling=efficiency["sampling"],
        max_iter=probe["max_iter"],
        tol=probe["tol"],
        class_weight=probe["class_weight"],
        dtype=probe["dtype"],
        mode=snakemake.params.mode,
        refit=probe["refit"],
        adam=probe["adam"],
        sgd=probe["sgd"],
        seed=snakemake.params.seed,
    )

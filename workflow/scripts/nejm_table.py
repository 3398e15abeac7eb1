"""NEJM answers of every model -> accuracy per difficulty stratum (nejm.csv) and the unparseable answers."""
from medprobe.nejm import write_table
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    nejm = snakemake.params.nejm
    write_table(
        dict(zip(snakemake.params.models, snakemake.input.answers)),
        snakemake.input.cases,
        snakemake.output.table,
        snakemake.output.unparseable,
        top_k_samples=nejm["top_k_samples"],
        n_strata=nejm["strata"],
        n_boot=snakemake.params.bootstrap,
        seed=snakemake.params.seed,
    )

"""NEJM answers of every model -> accuracy per difficulty stratum (nejm.csv) and the unparseable answers."""

from medprobe.logs import rule_logging
from medprobe.nejm import write_table
from medprobe.settings import NejmSettings

with rule_logging(snakemake):
    settings = NejmSettings.from_dict(snakemake.params.nejm)
    write_table(
        dict(zip(settings.models, snakemake.input.answers)),
        snakemake.input.cases,
        snakemake.output.table,
        snakemake.output.unparseable,
        settings=settings,
        n_boot=snakemake.params.bootstrap,
        seed=snakemake.params.seed,
    )

"""Draw one figure from the result tables."""
from pathlib import Path

from medprobe.figures import draw, figure_options, load_table
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    tables = {name: load_table(snakemake.input[name]) for name in ("metrics", "layers", "efficiency", "groups")}
    name = snakemake.wildcards.figure
    draw(
        name,
        tables,
        snakemake.params.tasks,
        snakemake.params.models,
        str(Path(snakemake.output.pdf).with_suffix("")),
        **figure_options(name, snakemake.params.options),
    )

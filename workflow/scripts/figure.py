"""Draw one figure from the result tables."""
from pathlib import Path

from medprobe.figures import draw, load_table
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    tables = {name: load_table(snakemake.input[name]) for name in ("metrics", "layers", "efficiency", "groups")}
    name = snakemake.wildcards.figure
    options = snakemake.params.options
    extra = {}
    if name == "figure5":
        extra = {"task": options["figure5_task"], "min_positives": options["figure5_min_positives"]}
    elif name == "figureS6":
        extra = {"task": options["figureS6_task"]}
    draw(name, tables, snakemake.params.tasks, snakemake.params.models, str(Path(snakemake.output.pdf).with_suffix("")), **extra)

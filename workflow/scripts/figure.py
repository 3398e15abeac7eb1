"""Draw one figure of medprobe.figures.FIGURES from the result tables the rule declares."""

from medprobe.figures import draw
from medprobe.logs import rule_logging
from medprobe.settings import FiguresSettings

with rule_logging(snakemake):
    draw(
        snakemake.wildcards.figure,
        tables=dict(snakemake.input.items()),
        out_pdf=snakemake.output.pdf,
        out_png=snakemake.output.png,
        tasks=snakemake.params.tasks,
        models=snakemake.params.models,
        options=FiguresSettings.from_dict(snakemake.params.options),
    )

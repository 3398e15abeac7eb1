# Figures drawn from the result tables alone: one rule for every figure of medprobe.figures.FIGURES.


rule figure:
    input:
        unpack(figure_tables),
    output:
        pdf="results/figures/{figure}.pdf",
        png=report(
            "results/figures/{figure}.png",
            caption="../report/figure.rst",
            category="Figures",
        ),
    log:
        "logs/figures/{figure}.log",
    conda:
        ENV
    params:
        tasks=figure_tasks,
        models=model_labels(),
        options=config["figures"],
        caption=figure_caption,
    script:
        "../scripts/figure.py"

# Figures drawn from the result tables alone.


rule figure:
    input:
        metrics="results/tables/metrics.csv",
        layers="results/tables/layers.csv",
        efficiency="results/tables/efficiency.csv",
        groups="results/tables/groups.csv",
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
        tasks=config["tasks"],
        models=model_labels(),
        options=config["figures"],
    script:
        "../scripts/figure.py"

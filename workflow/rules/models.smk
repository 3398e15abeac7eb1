# Model checkpoints for offline compute nodes: `fetch: true` downloads the pinned revision on the
# submit host (a local rule, it needs the internet); extraction jobs then load the local copy.


localrules:
    fetch_model,


rule fetch_model:
    output:
        directory("resources/checkpoints/{model}"),
    log:
        "logs/fetch_model/{model}.log",
    conda:
        ENV_FETCH
    params:
        repo_id=lambda wildcards: config["models"][wildcards.model]["checkpoint"],
        revision=lambda wildcards: config["models"][wildcards.model]["revision"],
        source=workflow.basedir,
    script:
        "../scripts/fetch_model.py"

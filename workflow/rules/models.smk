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
        repo_id=lookup(dpath="models/{model}/checkpoint", within=config),
        revision=lookup(dpath="models/{model}/revision", within=config),
        source=workflow.basedir,
    script:
        "../scripts/fetch_model.py"

# Predictions -> metrics with bootstrap CIs, paired comparisons, and the collected result tables.


rule evaluate:
    input:
        manifest="results/manifests/{task}.csv",
        predictions="results/probes/{model}/{task}/predictions.h5",
        layers="results/probes/{model}/{task}/layers.h5",
        summary="results/probes/{model}/{task}/probe.json",
        efficiency="results/probes/{model}/{task}/efficiency.h5",
    output:
        expand("results/evaluation/{{model}}/{{task}}/{table}.csv", table=TABLES),
    log:
        "logs/evaluate/{model}/{task}.log",
    conda:
        ENV
    params:
        task=task_config,
        evaluation=evaluation_settings,
        seed=config["seed"],
        out_dir=subpath(output[0], parent=True),
    script:
        "../scripts/evaluate.py"


rule compare:
    input:
        unpack(
            lambda wildcards: {
                "manifest": f"results/manifests/{wildcards.task}.csv",
                **task_predictions(wildcards),
            }
        ),
    output:
        "results/evaluation/comparisons/{task}.csv",
    log:
        "logs/compare/{task}.log",
    conda:
        ENV
    params:
        task=task_config,
        models=lambda wildcards: list(task_predictions(wildcards)),
        pairs=comparison_pairs,
        evaluation=evaluation_settings,
        seed=config["seed"],
    script:
        "../scripts/compare.py"


rule collect_table:
    input:
        table_inputs,
    output:
        "results/tables/{table}.csv",
    log:
        "logs/collect/{table}.log",
    conda:
        ENV
    script:
        "../scripts/collect.py"


rule task_table:
    input:
        lambda wildcards: [
            f"results/evaluation/{model}/{wildcards.task}/metrics.csv"
            for model in medprobe_config.task_models(config, wildcards.task)
        ],
    output:
        "results/tables/by_task/{task}.csv",
    log:
        "logs/collect/by_task/{task}.log",
    conda:
        ENV
    script:
        "../scripts/collect.py"


rule model_table:
    input:
        lambda wildcards: [
            f"results/evaluation/{wildcards.model}/{task}/metrics.csv"
            for task in medprobe_config.model_tasks(config, wildcards.model)
        ],
    output:
        "results/tables/by_model/{model}.csv",
    log:
        "logs/collect/by_model/{model}.log",
    conda:
        ENV
    script:
        "../scripts/collect.py"


rule efficiency_summary:
    input:
        "results/tables/efficiency.csv",
    output:
        "results/tables/efficiency_summary.csv",
    log:
        "logs/collect/efficiency_summary.log",
    conda:
        ENV
    params:
        tasks=config["tasks"],
    script:
        "../scripts/efficiency_summary.py"


rule efficiency_retained:
    input:
        "results/tables/efficiency.csv",
    output:
        "results/tables/efficiency_retained.csv",
    log:
        "logs/collect/efficiency_retained.log",
    conda:
        ENV
    params:
        tasks=config["tasks"],
        summary_tasks=config["efficiency"]["summary_tasks"],
    script:
        "../scripts/efficiency_retained.py"


rule findings_table:
    input:
        "results/tables/metrics.csv",
    output:
        "results/tables/findings.csv",
    log:
        "logs/collect/findings.log",
    conda:
        ENV
    params:
        tasks=config["tasks"],
        thresholds=config["evaluation"]["auc_thresholds"],
    script:
        "../scripts/findings_table.py"

# Predictions -> metrics with bootstrap CIs, paired comparisons, and the collected result tables.


# The tables of one model x task in two jobs, by the probe output they score: the probe's predictions and
# layers (metrics, groups, layers) and the label-efficiency sweep (efficiency), so that changing the
# label-efficiency settings rescores efficiency.csv alone. With group_tasks, the same two jobs per model over
# all its tasks (evaluate_tasks_<model>, evaluate_efficiency_tasks_<model>).
rule evaluate:
    input:
        manifest="results/manifests/{task}.csv",
        summary="results/probes/{model}/{task}/probe.json",
        predictions="results/probes/{model}/{task}/predictions.h5",
        layers="results/probes/{model}/{task}/layers.h5",
    output:
        metrics="results/evaluation/{model}/{task}/metrics.csv",
        groups="results/evaluation/{model}/{task}/groups.csv",
        layers="results/evaluation/{model}/{task}/layers.csv",
    log:
        "logs/evaluate/{model}/{task}/probe_tables.log",
    wildcard_constraints:
        model=models_matching(sorted(set(MODELS) - set(GROUPED_MODELS))),
    conda:
        ENV
    params:
        **rule_params("evaluate"),
    script:
        "../scripts/evaluate.py"


use rule evaluate as evaluate_efficiency with:
    input:
        manifest="results/manifests/{task}.csv",
        summary="results/probes/{model}/{task}/probe.json",
        efficiency="results/probes/{model}/{task}/efficiency.h5",
    output:
        efficiency="results/evaluation/{model}/{task}/efficiency.csv",
    log:
        "logs/evaluate/{model}/{task}/efficiency.log",


for grouped_model in GROUPED_MODELS:

    rule:
        name:
            f"evaluate_tasks_{grouped_model}"
        input:
            manifest=model_files("results/manifests/{task}.csv", grouped_model),
            summary=model_files(
                "results/probes/{model}/{task}/probe.json", grouped_model
            ),
            predictions=model_files(
                "results/probes/{model}/{task}/predictions.h5", grouped_model
            ),
            layers=model_files("results/probes/{model}/{task}/layers.h5", grouped_model),
        output:
            metrics=model_files(
                "results/evaluation/{model}/{task}/metrics.csv", grouped_model
            ),
            groups=model_files(
                "results/evaluation/{model}/{task}/groups.csv", grouped_model
            ),
            layers=model_files(
                "results/evaluation/{model}/{task}/layers.csv", grouped_model
            ),
        log:
            f"logs/evaluate/{grouped_model}/probe_tables.log",
        conda:
            ENV
        params:
            **medprobe_rule_params.grouped_params(
                "evaluate",
                config,
                grouped_model,
                medprobe_config.model_tasks(config, grouped_model),
            ),
            model_name=grouped_model,
            tasks=medprobe_config.model_tasks(config, grouped_model),
        script:
            "../scripts/evaluate_tasks.py"

    rule:
        name:
            f"evaluate_efficiency_tasks_{grouped_model}"
        input:
            manifest=model_files("results/manifests/{task}.csv", grouped_model),
            summary=model_files(
                "results/probes/{model}/{task}/probe.json", grouped_model
            ),
            efficiency=model_files(
                "results/probes/{model}/{task}/efficiency.h5", grouped_model
            ),
        output:
            efficiency=model_files(
                "results/evaluation/{model}/{task}/efficiency.csv", grouped_model
            ),
        log:
            f"logs/evaluate/{grouped_model}/efficiency.log",
        conda:
            ENV
        params:
            **medprobe_rule_params.grouped_params(
                "evaluate",
                config,
                grouped_model,
                medprobe_config.model_tasks(config, grouped_model),
            ),
            model_name=grouped_model,
            tasks=medprobe_config.model_tasks(config, grouped_model),
        script:
            "../scripts/evaluate_tasks.py"


rule compare:
    input:
        unpack(compare_inputs),
    output:
        "results/evaluation/comparisons/{task}.csv",
    log:
        "logs/compare/{task}.log",
    conda:
        ENV
    params:
        **rule_params("compare"),
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
        task_metrics,
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
        model_metrics,
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

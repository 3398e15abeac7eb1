# Linear probes on the activations: every layer, the headline layer, and the label-efficiency sweep.
# One job per model and task, or with group_tasks one job per model over all its tasks (probe_tasks_<model>,
# efficiency_tasks_<model>): torch loads once.


rule probe:
    input:
        activations="results/activations/{model}/{task}.h5",
        manifest="results/manifests/{task}.csv",
    output:
        predictions="results/probes/{model}/{task}/predictions.h5",
        layers="results/probes/{model}/{task}/layers.h5",
        summary="results/probes/{model}/{task}/probe.json",
    log:
        "logs/probe/{model}/{task}.log",
    wildcard_constraints:
        model=models_matching(sorted(set(MODELS) - set(GROUPED_MODELS))),
    conda:
        ENV
    threads: config["threads"]["probe"]
    resources:
        gpu=lookup(dpath="probe/gpus", within=config),
        mem_mb=lookup(dpath="probe/resources/mem_mb", within=config),
        runtime=lookup(dpath="probe/resources/runtime", within=config),
        cpus_per_gpu=lookup(dpath="probe/resources/cpus_per_gpu", within=config),
        gpu_model=lookup(dpath="probe/resources/gpu_model", within=config),
    params:
        **rule_params("probe"),
    script:
        "../scripts/probe.py"


rule efficiency:
    input:
        activations="results/activations/{model}/{task}.h5",
        manifest="results/manifests/{task}.csv",
        summary="results/probes/{model}/{task}/probe.json",
    output:
        "results/probes/{model}/{task}/efficiency.h5",
    log:
        "logs/efficiency/{model}/{task}.log",
    wildcard_constraints:
        model=models_matching(sorted(set(MODELS) - set(GROUPED_MODELS))),
    conda:
        ENV
    threads: config["threads"]["probe"]
    resources:
        gpu=lookup(dpath="efficiency/gpus", within=config),
        mem_mb=lookup(dpath="probe/resources/mem_mb", within=config),
        runtime=lookup(dpath="probe/resources/runtime", within=config),
        cpus_per_gpu=lookup(dpath="probe/resources/cpus_per_gpu", within=config),
        gpu_model=lookup(dpath="probe/resources/gpu_model", within=config),
    params:
        **rule_params("efficiency"),
    script:
        "../scripts/efficiency.py"


for grouped_model in GROUPED_MODELS:

    rule:
        name:
            f"probe_tasks_{grouped_model}"
        input:
            activations=model_files(
                "results/activations/{model}/{task}.h5", grouped_model
            ),
            manifests=model_files("results/manifests/{task}.csv", grouped_model),
        output:
            predictions=model_files(
                "results/probes/{model}/{task}/predictions.h5", grouped_model
            ),
            layers=model_files("results/probes/{model}/{task}/layers.h5", grouped_model),
            summaries=model_files(
                "results/probes/{model}/{task}/probe.json", grouped_model
            ),
        log:
            f"logs/probe/{grouped_model}/tasks.log",
        conda:
            ENV
        threads: config["threads"]["probe"]
        resources:
            gpu=config["probe"]["gpus"],
            mem_mb=lookup(dpath="probe/resources/mem_mb", within=config),
            runtime=lookup(dpath="probe/resources/runtime", within=config),
            cpus_per_gpu=lookup(dpath="probe/resources/cpus_per_gpu", within=config),
            gpu_model=lookup(dpath="probe/resources/gpu_model", within=config),
        params:
            **medprobe_rule_params.grouped_params(
                "probe",
                config,
                grouped_model,
                medprobe_config.model_tasks(config, grouped_model),
            ),
            tasks=medprobe_config.model_tasks(config, grouped_model),
        script:
            "../scripts/probe_tasks.py"

    rule:
        name:
            f"efficiency_tasks_{grouped_model}"
        input:
            activations=model_files(
                "results/activations/{model}/{task}.h5", grouped_model
            ),
            manifests=model_files("results/manifests/{task}.csv", grouped_model),
            summaries=model_files(
                "results/probes/{model}/{task}/probe.json", grouped_model
            ),
        output:
            model_files("results/probes/{model}/{task}/efficiency.h5", grouped_model),
        log:
            f"logs/efficiency/{grouped_model}/tasks.log",
        conda:
            ENV
        threads: config["threads"]["probe"]
        resources:
            gpu=config["efficiency"]["gpus"],
            mem_mb=lookup(dpath="probe/resources/mem_mb", within=config),
            runtime=lookup(dpath="probe/resources/runtime", within=config),
            cpus_per_gpu=lookup(dpath="probe/resources/cpus_per_gpu", within=config),
            gpu_model=lookup(dpath="probe/resources/gpu_model", within=config),
        params:
            **medprobe_rule_params.grouped_params(
                "efficiency",
                config,
                grouped_model,
                medprobe_config.model_tasks(config, grouped_model),
            ),
            tasks=medprobe_config.model_tasks(config, grouped_model),
        script:
            "../scripts/efficiency_tasks.py"

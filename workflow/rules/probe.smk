# Linear probes on the activations: every layer, the headline layer, and the label-efficiency sweep.


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

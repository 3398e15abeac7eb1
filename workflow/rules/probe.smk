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
    params:
        task=task_config,
        probe=config["probe"],
        layer=lookup(dpath="models/{model}/layer", within=config),
        mode=model_probe_mode,
        protocol=config["protocol"],
        seed=config["seed"],
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
    params:
        task=task_config,
        probe=config["probe"],
        efficiency={
            key: config["efficiency"][key]
            for key in ("fractions", "seeds", "sampling")
        },
        mode=model_probe_mode,
        seed=config["seed"],
    script:
        "../scripts/efficiency.py"

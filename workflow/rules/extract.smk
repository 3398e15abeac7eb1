# Images + prompt through a model; the pooled state of every layer into the activations HDF5.


rule demo_model:
    output:
        directory("resources/models/{build}"),
    log:
        "logs/demo_model/{build}.log",
    wildcard_constraints:
        build="tiny-idefics-large|tiny-idefics-small|tiny-clip",
    conda:
        ENV
    params:
        seed=config["seed"],
    script:
        "../scripts/demo_model.py"


rule extract:
    input:
        manifest="results/manifests/{task}.csv",
        checkpoint=model_checkpoint,
    output:
        "results/activations/{model}/{task}.h5",
    log:
        "logs/extract/{model}/{task}.log",
    conda:
        ENV
    threads: config["threads"]["extract"]
    resources:
        gpu=model_gpus,
    params:
        model=model_config,
        prompt=lambda wildcards: config["tasks"][wildcards.task]["prompt"],
        extraction=config["extraction"],
    script:
        "../scripts/extract.py"

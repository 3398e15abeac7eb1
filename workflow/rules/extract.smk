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
    wildcard_constraints:
        model=models_matching(sharded=False),
    conda:
        ENV
    threads: config["threads"]["extract"]
    resources:
        gpu=model_gpus,
        mem_mb=model_resource("mem_mb"),
        runtime=model_resource("runtime"),
        cpus_per_gpu=model_resource("cpus_per_gpu"),
        gpu_model=model_resource("gpu_model"),
    params:
        model=model_config,
        prompt=lambda wildcards: config["tasks"][wildcards.task]["prompt"],
        extraction=config["extraction"],
        shards=1,
    script:
        "../scripts/extract.py"


# Models with shards > 1: one job per consecutive slice of the manifest, merged into the same file.
rule extract_shard:
    input:
        manifest="results/manifests/{task}.csv",
        checkpoint=model_checkpoint,
    output:
        temp("results/activations/{model}/{task}.shards/{shard}.h5"),
    log:
        "logs/extract/{model}/{task}.shards/{shard}.log",
    wildcard_constraints:
        model=models_matching(sharded=True),
        shard=r"\d+",
    conda:
        ENV
    threads: config["threads"]["extract"]
    resources:
        gpu=model_gpus,
        mem_mb=model_resource("mem_mb"),
        runtime=model_resource("runtime"),
        cpus_per_gpu=model_resource("cpus_per_gpu"),
        gpu_model=model_resource("gpu_model"),
    params:
        model=model_config,
        prompt=lambda wildcards: config["tasks"][wildcards.task]["prompt"],
        extraction=config["extraction"],
        shards=lambda wildcards: model_shards(wildcards.model),
    script:
        "../scripts/extract.py"


rule merge_shards:
    input:
        manifest="results/manifests/{task}.csv",
        shards=shard_files,
    output:
        "results/activations/{model}/{task}.h5",
    log:
        "logs/extract/{model}/{task}.merge.log",
    wildcard_constraints:
        model=models_matching(sharded=True),
    conda:
        ENV
    script:
        "../scripts/merge_shards.py"

# Images + prompt through a model; the pooled state of every layer into the activations HDF5.
# A model with `shards: n` (or extraction.shards) runs n jobs per task, each over consecutive whole batches of
# the manifest, and merge_shards joins them; so it does for int8 storage (extraction.dtype), whose scales need
# every row. A model with `group_tasks` runs one job over all its tasks (extract_tasks_<model>), which loads
# the model once. Any other model runs one job per task that writes the activations file itself
# (extract_whole).


rule demo_model:
    output:
        directory("resources/models/{build}"),
    log:
        "logs/demo_model/{build}.log",
    wildcard_constraints:
        build="tiny-idefics-large|tiny-idefics-small|tiny-clip|tiny-dinov2",
    conda:
        ENV
    params:
        seed=lookup(dpath="seed", within=config),
    script:
        "../scripts/demo_model.py"


rule extract:
    input:
        manifest="results/manifests/{task}.csv",
        checkpoint=model_checkpoint,
    output:
        temp("results/activations/{model}/{task}.shards/{shard}.h5"),
    log:
        "logs/extract/{model}/{task}.shards/{shard}.log",
    wildcard_constraints:
        shard=r"\d+",
        model=models_matching(MERGED_MODELS),
    conda:
        ENV
    threads: config["threads"]["extract"]
    resources:
        gpu=lookup(dpath="models/{model}/gpus", within=config),
        mem_mb=lookup(dpath="models/{model}/resources/mem_mb", within=config),
        runtime=lookup(dpath="models/{model}/resources/runtime", within=config),
        cpus_per_gpu=lookup(
            dpath="models/{model}/resources/cpus_per_gpu", within=config
        ),
        gpu_model=lookup(dpath="models/{model}/resources/gpu_model", within=config),
    params:
        **rule_params("extract"),
    script:
        "../scripts/extract.py"


use rule extract as extract_whole with:
    output:
        "results/activations/{model}/{task}.h5",
    log:
        "logs/extract/{model}/{task}.log",
    wildcard_constraints:
        model=models_matching(
            sorted(set(MODELS) - set(MERGED_MODELS) - set(GROUPED_MODELS))
        ),


# One rule per grouped model (group_tasks): its outputs are the files of exactly the tasks it joins.
for grouped_model in GROUPED_MODELS:

    rule:
        name:
            f"extract_tasks_{grouped_model}"
        input:
            manifests=model_files("results/manifests/{task}.csv", grouped_model),
            checkpoint=checkpoint_inputs(grouped_model),
        output:
            activations=model_files(
                "results/activations/{model}/{task}.h5", grouped_model
            ),
        log:
            f"logs/extract/{grouped_model}/tasks.log",
        conda:
            ENV
        threads: config["threads"]["extract"]
        resources:
            gpu=config["models"][grouped_model]["gpus"],
            mem_mb=lookup(
                dpath=f"models/{grouped_model}/resources/mem_mb", within=config
            ),
            runtime=lookup(
                dpath=f"models/{grouped_model}/resources/runtime", within=config
            ),
            cpus_per_gpu=lookup(
                dpath=f"models/{grouped_model}/resources/cpus_per_gpu", within=config
            ),
            gpu_model=lookup(
                dpath=f"models/{grouped_model}/resources/gpu_model", within=config
            ),
        params:
            **medprobe_rule_params.grouped_params(
                "extract",
                config,
                grouped_model,
                medprobe_config.model_tasks(config, grouped_model),
            ),
            model_name=grouped_model,
            tasks=medprobe_config.model_tasks(config, grouped_model),
        script:
            "../scripts/extract_tasks.py"


rule merge_shards:
    input:
        manifest="results/manifests/{task}.csv",
        shards=shard_files,
    output:
        "results/activations/{model}/{task}.h5",
    log:
        "logs/merge_shards/{model}/{task}.log",
    wildcard_constraints:
        model=models_matching(MERGED_MODELS),
    conda:
        ENV
    script:
        "../scripts/merge_shards.py"

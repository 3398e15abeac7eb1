# Raw data -> manifest + preprocessed images. The demo generates its raw data; real recipes (issue 3)
# produce the same raw table from the publishers' archives.


rule demo_data:
    output:
        "resources/demo/raw/{task}/metadata.csv",
    log:
        "logs/demo_data/{task}.log",
    conda:
        ENV
    params:
        task=task_config,
        seed=config["seed"],
        images_per_patient=config["demo"]["images_per_patient"],
    script:
        "../scripts/demo_data.py"


rule demo_nejm:
    output:
        directory("resources/demo/nejm"),
    log:
        "logs/demo_nejm.log",
    conda:
        ENV
    params:
        n_cases=config["demo"]["nejm_cases"],
        seed=config["seed"],
    script:
        "../scripts/demo_nejm.py"


rule prepare:
    input:
        raw_metadata,
    output:
        manifest="results/manifests/{task}.csv",
        sidecar="results/manifests/{task}.json",
        images=directory("results/images/{task}"),
    log:
        "logs/prepare/{task}.log",
    conda:
        ENV
    threads: config["threads"]["prepare"]
    params:
        task=task_config,
        split=config["split"],
        seed=config["seed"],
        on_bad_image=config["on_bad_image"],
    script:
        "../scripts/prepare.py"


# Public files are downloaded (resumable, retried, checksum-verified) and extracted safely; files under a
# data-use agreement are checked for and, when missing, the job stops saying where to get them and where
# they go. Kaggle credentials: KAGGLE_USERNAME / KAGGLE_KEY from the environment only.
rule download_dataset:
    output:
        "resources/datasets/{dataset}/download.json",
    log:
        "logs/download_dataset/{dataset}.log",
    wildcard_constraints:
        dataset="[a-z0-9_]+",
    conda:
        "../../envs/datasets.yaml"
    params:
        checksums=dataset_checksums,
    script:
        "../scripts/download_dataset.py"


rule raw_dataset:
    input:
        dataset_receipt,
    output:
        "resources/raw/{task}/metadata.csv",
    log:
        "logs/raw_dataset/{task}.log",
    conda:
        "../../envs/datasets.yaml"
    params:
        task=task_config,
    script:
        "../scripts/raw_dataset.py"

# Raw data -> manifest + preprocessed images. The demo generates its raw data; the dataset recipes make the
# same raw table from the publishers' files (T8's own rules: t8.smk).


rule demo_data:
    output:
        "resources/demo/raw/{task}/metadata.csv",
    log:
        "logs/demo_data/{task}.log",
    conda:
        ENV
    params:
        **rule_params("demo_data"),
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
        unpack(raw_metadata),
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
        **rule_params("prepare"),
        raw_files=raw_files,
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
        # every dataset but oai_most, whose files rule oai_most_files checks (t8.smk)
        dataset="(?!oai_most/)[a-z0-9_]+",
    conda:
        "../../envs/datasets.yaml"
    params:
        data_dir=subpath(output[0], parent=True),
        checksums=dataset_checksums,
    script:
        "../scripts/download_dataset.py"


rule raw_dataset:
    input:
        unpack(dataset_receipt),
    output:
        metadata="resources/raw/{task}/metadata.csv",
        counts="resources/raw/{task}/counts.json",
    log:
        "logs/raw_dataset/{task}.log",
    conda:
        "../../envs/datasets.yaml"
    params:
        **rule_params("raw_dataset"),
        data_dir=dataset_folder,
    script:
        "../scripts/raw_dataset.py"

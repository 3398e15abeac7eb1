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


# T8 (oai_most) instead of download_dataset: the OAI release as downloaded (oai/), your own knees.csv (MOST, or
# everything), or both. Checks which is there (else stops naming both options and where each file goes), lists
# every knee in knees_all.csv (what KNEEL runs on) and writes the receipt.
rule oai_most_files:
    output:
        receipt="resources/datasets/oai_most/download.json",
        knees="resources/datasets/oai_most/knees_all.csv",
    log:
        "logs/oai_most_files.log",
    conda:
        "../../envs/datasets.yaml"
    params:
        data_dir=lambda wildcards, output: os.path.dirname(output.receipt),
        checksums=oai_most_checksums,
    shell:
        "python -m medprobe.datasets.oai_most --data-dir {params.data_dir:q} --knees-out {output.knees:q}"
        " --receipt {output.receipt:q} --checksums {params.checksums:q} > {log:q} 2>&1"


ruleorder: oai_most_files > download_dataset


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


# T8: knee joint landmarks for the 140 mm crops, put into the raw folder before raw_dataset runs.
# `landmarks: kneel` runs the upstream KNEEL models (their own Python 3.7 env, so a plain script run by
# shell, not `script:`); `landmarks: <path>` checks the user's file and copies it.
localrules:
    kneel_snapshots,


rule kneel_snapshots:
    output:
        directory("resources/kneel/snapshots_release"),
    log:
        "logs/kneel_snapshots.log",
    conda:
        "../../envs/datasets.yaml"
    script:
        "../scripts/kneel_snapshots.py"


rule kneel_landmarks:
    input:
        receipt=dataset_download,
        knees=dataset_knees,
        snapshots="resources/kneel/snapshots_release",
    output:
        landmarks="resources/raw/{task}/landmarks.csv",
        undetected="resources/raw/{task}/landmarks_undetected.csv",
    log:
        "logs/kneel_landmarks/{task}.log",
    wildcard_constraints:
        task=landmark_tasks("kneel"),
    conda:
        "../../envs/kneel.yaml"
    resources:
        gpu=1,
        mem_mb=kneel_resource("mem_mb"),
        runtime=kneel_resource("runtime"),
        cpus_per_gpu=kneel_resource("cpus_per_gpu"),
        gpu_model=kneel_resource("gpu_model"),
    params:
        script=f"{workflow.basedir}/workflow/scripts/kneel_landmarks.py",
        data_dir=dataset_folder,
        refine="" if config["kneel"]["refine"] else "--no-refine",
    shell:
        "python {params.script:q} --knees {input.knees:q} --data-dir {params.data_dir:q}"
        " --snapshots {input.snapshots:q} --landmarks {output.landmarks:q}"
        " --undetected {output.undetected:q} {params.refine} > {log:q} 2>&1"


rule kneel_given_landmarks:
    input:
        given_landmarks,
    output:
        landmarks="resources/raw/{task}/landmarks.csv",
        undetected="resources/raw/{task}/landmarks_undetected.csv",
    log:
        "logs/kneel_given_landmarks/{task}.log",
    wildcard_constraints:
        task=landmark_tasks("given"),
    conda:
        "../../envs/datasets.yaml"
    script:
        "../scripts/kneel_given_landmarks.py"

# T8 (oai_most): the knees come from the OAI release and/or the user's knees.csv (rule oai_most_files takes
# download_dataset's place), and each is cropped around landmarks that rule raw_dataset reads from the task's
# `landmarks`: `kneel` runs the upstream KNEEL models (rule kneel_landmarks), a path is the user's own file.


# The OAI release as downloaded (oai/), your own knees.csv (MOST, or everything), or both. Checks which is
# there (else stops naming both options and where each file goes), lists every knee in knees_all.csv (what
# KNEEL runs on) and writes the receipt.
rule oai_most_files:
    output:
        receipt="resources/datasets/oai_most/download.json",
        knees="resources/datasets/oai_most/knees_all.csv",
    log:
        "logs/oai_most_files.log",
    conda:
        "../../envs/datasets.yaml"
    params:
        data_dir=subpath(output.receipt, parent=True),
        checksums=oai_most_checksums,
    shell:
        "python -m medprobe.datasets.oai_most --data-dir {params.data_dir:q} --knees-out {output.knees:q}"
        " --receipt {output.receipt:q} --checksums {params.checksums:q} > {log:q} 2>&1"


# The released KNEEL models; a local rule: it needs the internet. Without it, unpack the archive into the
# output folder by hand and the rule is skipped.
localrules:
    kneel_snapshots,


rule kneel_snapshots:
    output:
        directory("resources/kneel/snapshots_release"),
    log:
        "logs/kneel_snapshots.log",
    conda:
        "../../envs/datasets.yaml"
    params:
        url=lookup(dpath="kneel/snapshots_url", within=config),
        sha256=lookup(dpath="kneel/snapshots_sha256", within=config, default=None),
    script:
        "../scripts/kneel_snapshots.py"


# KNEEL runs in its own Python 3.7 environment, without Snakemake, so its script is run by shell with
# arguments instead of by `script:`.
rule kneel_landmarks:
    input:
        receipt=dataset_download,
        knees=dataset_knees,
        # Fetching the snapshots again (a pinned checksum, a mirror) must not rerun this GPU job.
        snapshots=ancient("resources/kneel/snapshots_release"),
    output:
        landmarks="resources/raw/{task}/landmarks.csv",
        undetected="resources/raw/{task}/landmarks_undetected.csv",
    log:
        "logs/kneel_landmarks/{task}.log",
    conda:
        "../../envs/kneel.yaml"
    resources:
        gpu=1,
        mem_mb=lookup(dpath="kneel/resources/mem_mb", within=config),
        runtime=lookup(dpath="kneel/resources/runtime", within=config),
        cpus_per_gpu=lookup(dpath="kneel/resources/cpus_per_gpu", within=config),
        gpu_model=lookup(dpath="kneel/resources/gpu_model", within=config),
    params:
        script=f"{workflow.basedir}/workflow/scripts/kneel_landmarks.py",
        data_dir=dataset_folder,
        refine="" if config["kneel"]["refine"] else "--no-refine",
    shell:
        "python {params.script:q} --knees {input.knees:q} --data-dir {params.data_dir:q}"
        " --snapshots {input.snapshots:q} --landmarks {output.landmarks:q}"
        " --undetected {output.undetected:q} {params.refine} > {log:q} 2>&1"

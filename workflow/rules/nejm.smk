# NEJM Image Challenge: few-shot multiple-choice answers per model, accuracy by difficulty (drawn as
# Figure 1d by rule figure).


rule nejm_answers:
    input:
        cases=config["nejm"]["cases_dir"],
        checkpoint=model_checkpoint,
    output:
        "results/nejm/{model}/answers.jsonl",
    log:
        "logs/nejm/{model}.log",
    conda:
        ENV
    threads: config["threads"]["extract"]
    resources:
        gpu=model_gpus,
    params:
        **rule_params("nejm_answers"),
        # Outlives the output (Snakemake removes that before a rerun), so that a rerun resumes.
        cache="results/nejm/{model}/answers.cache.jsonl",
    script:
        "../scripts/nejm_answers.py"


rule nejm_table:
    input:
        cases=config["nejm"]["cases_dir"],
        answers=nejm_answer_files(),
    output:
        table="results/tables/nejm.csv",
        unparseable="results/tables/nejm_unparseable.csv",
    log:
        "logs/nejm/table.log",
    conda:
        ENV
    params:
        nejm=config["nejm"],
        bootstrap=config["evaluation"]["bootstrap"],
        seed=config["seed"],
    script:
        "../scripts/nejm_table.py"

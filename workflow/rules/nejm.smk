# NEJM Image Challenge: few-shot multiple-choice answers per model, accuracy by difficulty, Figure 1d.


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
        model=model_config,
        nejm=config["nejm"],
        seed=config["seed"],
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
        models=config["nejm"]["models"],
        nejm=config["nejm"],
        bootstrap=config["evaluation"]["bootstrap"],
        seed=config["seed"],
    script:
        "../scripts/nejm_table.py"


rule figure1d:
    input:
        "results/tables/nejm.csv",
    output:
        pdf="results/figures/figure1d.pdf",
        png=report(
            "results/figures/figure1d.png",
            caption="../report/figure1d.rst",
            category="Figures",
        ),
    log:
        "logs/figures/figure1d.log",
    conda:
        ENV
    params:
        models=model_labels(),
    script:
        "../scripts/nejm_figure.py"

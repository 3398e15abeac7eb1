# medprobe: linear probes on vision-language model activations for medical images.
# The default config is the embedded offline demo; `--configfile config/paper.yaml` is the paper's study.
from snakemake.utils import min_version

min_version("9.0")

# The default config (the demo) comes from profiles/default/config.yaml, so that
# `--configfile config/paper.yaml` replaces it instead of being merged into it.


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/t8.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/nejm.smk"
include: "workflow/rules/verify.smk"


report: "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        all_tables(),
        all_figures(),
        all_nejm(),

"""Generate the synthetic NEJM-style multiple-choice cases."""

from medprobe.demo.nejm import generate_cases
from medprobe.logs import rule_logging

with rule_logging(snakemake):
    generate_cases(snakemake.output[0], n_cases=snakemake.params.n_cases, seed=snakemake.params.seed)

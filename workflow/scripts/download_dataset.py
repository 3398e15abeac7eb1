"""Download / verify / extract one dataset's source files (or stop naming the files the user must bring)."""

from medprobe.datasets import fetch
from medprobe.logs import rule_logging

with rule_logging(snakemake):
    fetch(snakemake.wildcards.dataset, snakemake.params.data_dir, snakemake.output[0], snakemake.params.checksums)

"""Download / verify / extract one dataset's source files (or stop naming the files the user must bring)."""
from pathlib import Path

from medprobe.datasets import fetch
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    receipt = Path(snakemake.output[0])
    fetch(snakemake.wildcards.dataset, receipt.parent, receipt, snakemake.params.checksums)

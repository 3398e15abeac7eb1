"""Build a tiny random demo model offline (stands in for IDEFICS-80B/9B, CLIP or DINOv2)."""

from medprobe.demo.models import build
from medprobe.logs import rule_logging

with rule_logging(snakemake):
    build(snakemake.wildcards.build, snakemake.output[0], seed=snakemake.params.seed)

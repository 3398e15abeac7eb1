"""The shard files of one extraction, joined into the activations HDF5 in manifest order."""

from medprobe.extract import merge_shards
from medprobe.logs import rule_logging

with rule_logging(snakemake):
    merge_shards(snakemake.input.manifest, snakemake.input.shards, snakemake.output[0])

"""Download and unpack the released KNEEL model snapshots (rule kneel_snapshots)."""

from medprobe.kneel import fetch_snapshots
from medprobe.logs import rule_logging

with rule_logging(snakemake):
    fetch_snapshots(snakemake.output[0], snakemake.params.url, snakemake.params.sha256)

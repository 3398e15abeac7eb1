"""Download and unpack the released KNEEL model snapshots (rule kneel_snapshots, a local rule: it needs the
internet). Without internet, unpack the archive by hand into the rule's output folder (docs/datasets.md, T8).
URL and pinned checksum are read from the config here, not passed as params, so that changing them reruns
nothing."""
from medprobe.kneel import fetch_snapshots, snapshots_source
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    url, sha256 = snapshots_source(snakemake.config)
    fetch_snapshots(snakemake.output[0], url, sha256)

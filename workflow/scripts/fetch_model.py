"""Download a model checkpoint at its pinned revision on the submit host (rule fetch_model)."""

import sys

try:
    import medprobe  # noqa: F401
except ImportError:  # the small `fetch` conda env has no medprobe install: use the source tree
    sys.path.insert(0, snakemake.params.source)

from medprobe.checkpoints import fetch_checkpoint
from medprobe.logs import rule_logging

with rule_logging(snakemake):
    fetch_checkpoint(snakemake.params.repo_id, snakemake.params.revision, snakemake.output[0])

"""Logging for the scripts in workflow/scripts: a rule's script logs into the rule's log file."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def rule_logging(snakemake: Any) -> Iterator[logging.Logger]:
    """Send the ``medprobe`` loggers (and warnings) to the rule's log file; log a failure before re-raising.

    Snakemake shows the exception itself; the log keeps the context that led to it.
    """
    log_files = list(getattr(snakemake, "log", []))
    handler: logging.Handler = (
        logging.FileHandler(log_files[0], mode="w") if log_files else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger("medprobe")
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addHandler(handler)
    threads = int(getattr(snakemake, "threads", 1) or 1)
    if "torch" in sys.modules:  # only rules that use torch pay for importing it
        sys.modules["torch"].set_num_threads(threads)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        yield root
    except Exception:
        root.exception("rule %s failed", getattr(snakemake, "rule", "?"))
        raise
    finally:
        root.removeHandler(handler)
        logging.getLogger("py.warnings").removeHandler(handler)
        handler.close()

"""Figure 1d: NEJM accuracy per difficulty stratum, from results/tables/nejm.csv."""
from pathlib import Path

import pandas as pd

from medprobe.figures import figure1d
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    table = pd.read_csv(snakemake.input[0], keep_default_na=True)
    figure1d(table, None, snakemake.params.models, str(Path(snakemake.output.pdf).with_suffix("")))

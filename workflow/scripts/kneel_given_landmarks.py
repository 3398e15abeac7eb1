"""The user's own knee landmarks (tasks.<task>.landmarks: <path>), checked and put into the raw folder."""
from medprobe.kneel import install_landmarks
from medprobe.workflow import rule_logging

with rule_logging(snakemake):
    install_landmarks(snakemake.input[0], snakemake.output.landmarks, snakemake.output.undetected)

# `snakemake verify`: python -m medprobe.verify as a job. It checks every result file against its contract and
# the checksums recorded about it, without recomputing anything, and prints the command that rebuilds each
# damaged one (docs/reliability.md). It is no part of `all` and has no output, so it runs whenever asked for;
# the run's working directory and config files go into the printed commands.
import shlex

import medprobe.verify as medprobe_verify


rule verify:
    log:
        "logs/verify.log",
    conda:
        ENV
    params:
        options=shlex.join(
            medprobe_verify.snakemake_options(
                os.getcwd(), workflow.basedir, workflow.overwrite_configfiles
            )
        ),
    shell:
        "python -m medprobe.verify {params.options} 2>&1 | tee {log}"

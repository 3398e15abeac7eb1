"""The demo's wall time from an empty working directory, against a named baseline revision.

Runs ``snakemake --cores all`` of the default demo (config/config.yaml) into a fresh directory for the
working tree and for ``--baseline`` (a git revision, checked out into a temporary clone), alternating
``--repeats`` times so that both see the same machine load, and prints the median wall time of each, their
ratio, and the job-seconds by rule (from Snakemake's ``.snakemake/metadata`` start and end times) of the
last run of each. The machines are noisy: quote medians, and compare only runs made side by side.

    python benchmarks/demo.py --baseline d3c0ce0 --repeats 2
    python benchmarks/demo.py --summarise /tmp/demo    # job-seconds of a finished run's directory

Each run takes minutes (about 3 to 11 on 2 cores, by machine); nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def job_seconds(workdir: Path) -> dict[str, list[float]]:
    """Seconds of every job by rule: one entry per job (its outputs share the job's hash; a directory
    output's end time is a few milliseconds later), from the earliest start to the latest end."""
    jobs: dict[tuple[str, object], tuple[float, float]] = {}
    for path in (workdir / ".snakemake" / "metadata").iterdir():
        record = json.loads(path.read_text())
        if record.get("starttime") and record.get("endtime"):
            key = (record["rule"], record.get("job_hash"))
            start, end = jobs.get(key, (float("inf"), float("-inf")))
            jobs[key] = (min(start, record["starttime"]), max(end, record["endtime"]))
    by_rule: dict[str, list[float]] = defaultdict(list)
    for (rule, _), (start, end) in jobs.items():
        by_rule[rule].append(end - start)
    return dict(by_rule)


def print_job_seconds(by_rule: dict[str, list[float]], title: str) -> None:
    print(f"\n{title}\n| rule | jobs | seconds | per job |\n|---|---|---|---|")
    for rule, seconds in sorted(by_rule.items(), key=lambda item: -sum(item[1])):
        print(f"| {rule} | {len(seconds)} | {sum(seconds):.0f} | {sum(seconds) / len(seconds):.1f} |")
    total = [s for seconds in by_rule.values() for s in seconds]
    print(f"| all | {len(total)} | {sum(total):.0f} | |")


def checkout(revision: str, into: Path) -> Path:
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(into)], check=True)
    subprocess.run(["git", "checkout", "--quiet", revision], cwd=into, check=True)
    return into


def run_demo(tree: Path, workdir: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the run and its jobs) of the demo of ``tree`` into ``workdir``."""
    environment = {**os.environ, "PYTHONPATH": str(tree)}  # the tree's medprobe, not the installed one
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "all", "--directory", str(workdir)],
        cwd=tree, env=environment, capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"the demo of {tree} failed:\n{result.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="git revision to compare with (e.g. the commit before a change)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--summarise", type=Path, help="only print the job-seconds of this finished run")
    args = parser.parse_args()
    if args.summarise:
        print_job_seconds(job_seconds(args.summarise), f"job-seconds by rule of {args.summarise}")
        return
    with tempfile.TemporaryDirectory(prefix="medprobe-demo-bench-") as scratch:
        trees = {"working tree": REPO}
        if args.baseline:
            trees = {f"baseline {args.baseline}": checkout(args.baseline, Path(scratch) / "baseline"), **trees}
        walls: dict[str, list[float]] = defaultdict(list)
        for repeat in range(args.repeats):
            for name, tree in trees.items():
                workdir = Path(scratch) / f"run-{repeat}-{len(walls[name])}-{name.split()[0]}"
                wall, cpu = run_demo(tree, workdir)
                walls[name].append(wall)
                print(f"{name}: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
                if repeat == args.repeats - 1:
                    print_job_seconds(job_seconds(workdir), f"job-seconds by rule, {name}")
                shutil.rmtree(workdir)
        print()
        for name, values in walls.items():
            print(f"{name}: median wall {statistics.median(values):.0f} s over {len(values)} run(s)")
        if args.baseline:
            ratio = statistics.median(walls["working tree"]) / statistics.median(walls[f"baseline {args.baseline}"])
            print(f"working tree / baseline: {ratio:.2f}")


if __name__ == "__main__":
    main()

"""The repository as users meet it: README commands, CI, lint and format, dry-run plans."""

import re
import subprocess
import sys

import pytest

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def run(command, cwd):
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def readme_commands(repo):
    return re.findall(r"```bash\n(.*?)\n```", (repo / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command(repo):
    commands = readme_commands(repo)
    test_command = next(command for command in commands if "pytest" in command)
    assert test_command in (repo / ".ci" / "run").read_text().splitlines()
    assert any(command.endswith("snakemake --cores all") for command in commands)


def test_layout_from_the_design_card(repo):
    for path in [
        "Snakefile",
        "workflow/rules",
        "workflow/scripts",
        "config/config.yaml",
        "config/paper.yaml",
        "envs/medprobe.yaml",
        "tests",
        "LICENSE",
        "workflow/schemas/config.schema.yaml",
        "profiles/default/config.yaml",
        "docs/architecture.md",
    ]:
        assert (repo / path).exists(), path
    assert "MIT License" in (repo / "LICENSE").read_text()


def test_snakemake_lint_is_clean(repo):
    result = run(SNAKEMAKE + ["--lint"], repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "good condition" in result.stdout + result.stderr


RUFF_PATHS = ["medprobe", "workflow/scripts", "tests", "benchmarks"]


def test_ruff_lint_with_the_complexity_gate_and_format_are_clean(repo):
    lint = run([sys.executable, "-m", "ruff", "check", *RUFF_PATHS], repo)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    formatting = run([sys.executable, "-m", "ruff", "format", "--check", *RUFF_PATHS], repo)
    assert formatting.returncode == 0, formatting.stdout + formatting.stderr


def test_snakefmt_is_clean(repo):
    result = run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow"], repo)
    assert result.returncode == 0, result.stdout + result.stderr


def planned_jobs(output):
    table = re.search(r"Job stats:\n.*?\n-+\s+-+\n(.*?)\n\n", output, flags=re.S)
    assert table, output
    return {line.split()[0]: int(line.split()[1]) for line in table.group(1).splitlines()}


def test_demo_dry_run_plans_every_step(repo, tmp_path):
    result = run(SNAKEMAKE + ["-n", "--directory", str(tmp_path)], repo)
    assert result.returncode == 0, result.stderr
    jobs = planned_jobs(result.stdout)
    # group_tasks: one extraction, probe, efficiency and two evaluation jobs per model over its tasks.
    for kind in ("extract", "probe", "efficiency", "evaluate", "evaluate_efficiency"):
        assert [jobs[f"{kind}_tasks_{model}"] for model in ("idefics_80b", "idefics_9b", "clip", "dinov2")] == [1] * 4
    per_task = {"extract", "extract_whole", "merge_shards", "probe", "efficiency", "evaluate", "evaluate_efficiency"}
    assert not per_task & set(jobs)
    assert jobs["prepare"] == jobs["demo_data"] == 8 and jobs["figure"] == 7  # 3, 4, 5, 6, S5, S6 and NEJM 1d


@pytest.mark.parametrize("configfile", ["paper.yaml", "rigorous.yaml"])
def test_paper_dry_run_plans_the_whole_study(repo, tmp_path, configfile):
    result = run(
        SNAKEMAKE + ["-n", "--configfile", str(repo / "config" / configfile), "--directory", str(tmp_path)], repo
    )
    assert result.returncode == 0, result.stderr
    jobs = planned_jobs(result.stdout)
    # 3 models x 8 tasks + PLIP on T1 and T2
    assert jobs["extract_whole"] == jobs["probe"] == jobs["efficiency"] == jobs["evaluate"] == 26
    assert jobs["raw_dataset"] == 8 and "demo_data" not in jobs and jobs["figure"] == 6
    assert jobs["compare"] == 8 and jobs["efficiency_retained"] == jobs["findings_table"] == 1


def test_bad_config_value_stops_before_any_job(repo, tmp_path):
    result = run(SNAKEMAKE + ["-n", "--directory", str(tmp_path), "--config", "on_bad_image=ignore"], repo)
    assert result.returncode != 0
    assert "on_bad_image" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()

"""Offline compute nodes: fetching checkpoints on the submit host (snapshot_download monkeypatched, no network)."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import yaml

from medprobe import checkpoints


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        Path(kwargs["local_dir"], "config.json").write_text("{}")
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_fetch_downloads_the_pinned_revision_with_the_token_from_the_environment(fake_hub, tmp_path, caplog):
    commit = "a" * 40
    with caplog.at_level(logging.INFO, logger="medprobe"):
        out = checkpoints.fetch_checkpoint("vinid/plip", commit, tmp_path / "plip", environ={"HF_TOKEN": "hf_secret"})
    assert fake_hub == [
        {"repo_id": "vinid/plip", "revision": commit, "local_dir": str(tmp_path / "plip"), "token": "hf_secret",
         "allow_patterns": None}
    ]  # fmt: skip
    assert (out / "config.json").exists()
    record = json.loads((out / checkpoints.FETCH_RECORD).read_text())
    assert record == {"repo_id": "vinid/plip", "revision": commit, "allow_patterns": None}
    assert "hf_secret" not in caplog.text and "hf_secret" not in (out / checkpoints.FETCH_RECORD).read_text()
    assert "branch or tag" not in caplog.text


def test_fetch_without_token_uses_none_and_warns_about_branches(fake_hub, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="medprobe"):
        checkpoints.fetch_checkpoint("openai/clip-vit-base-patch32", "main", tmp_path / "clip", environ={})
    assert fake_hub[0]["token"] is False  # not a stored token file either
    assert "branch or tag" in caplog.text


def test_fetch_errors_name_the_checkpoint(monkeypatch, tmp_path):
    def failing(**kwargs):
        raise OSError("401 gated repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(RuntimeError, match=r"HuggingFaceM4/idefics-9b-instruct at revision main.*HF_TOKEN"):
        checkpoints.fetch_checkpoint("HuggingFaceM4/idefics-9b-instruct", "main", tmp_path / "x", environ={})
    with pytest.raises(ValueError, match="revision"):
        checkpoints.fetch_checkpoint("vinid/plip", "", tmp_path / "x", environ={})


@pytest.mark.parametrize("token", [None, "hf_secret"])
def test_a_gated_repo_says_where_to_request_access_and_what_to_set(monkeypatch, tmp_path, token):
    import httpx2
    from huggingface_hub.errors import GatedRepoError

    response = httpx2.Response(403, request=httpx2.Request("GET", "https://huggingface.co/api/models/google/medgemma"))

    def gated(**kwargs):
        raise GatedRepoError("403 Client Error: access to model google/medgemma is restricted", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    environ = {"HF_TOKEN": token} if token else {}
    with pytest.raises(RuntimeError) as error:
        checkpoints.fetch_checkpoint("google/medgemma", "main", tmp_path / "x", environ=environ)
    message = str(error.value)
    assert "google/medgemma is a gated repository" in message and "https://huggingface.co/google/medgemma" in message
    assert ("HF_TOKEN has no access" in message) == bool(token) and ("set HF_TOKEN" in message) == (not token)
    assert "hf_secret" not in message
    assert not (tmp_path / "x" / checkpoints.FETCH_RECORD).exists()  # never marked as fetched


def test_compute_config_loads_the_local_copy_and_drops_scheduling_keys():
    entry = {"adapter": "clip", "checkpoint": "vinid/plip", "revision": "main", "gpus": 1, "fetch": True,
             "resources": {"mem_mb": 1}}  # fmt: skip
    assert checkpoints.compute_model_config("plip", entry) == {
        "adapter": "clip", "checkpoint": "resources/checkpoints/plip", "gpus": 1}  # fmt: skip
    plain = {**entry, "fetch": False}
    assert checkpoints.compute_model_config("plip", plain) == {
        "adapter": "clip", "checkpoint": "vinid/plip", "revision": "main", "gpus": 1}  # fmt: skip
    with pytest.raises(ValueError, match="demo_build"):
        checkpoints.compute_model_config("clip", {**entry, "demo_build": "tiny-clip"})


def test_compute_jobs_go_offline_only_when_no_model_needs_the_hub(tmp_path):
    fetched = {"checkpoint": "vinid/plip", "fetch": True}
    demo = {"checkpoint": str(tmp_path), "demo_build": "tiny-clip"}
    hub = {"checkpoint": "openai/clip-vit-base-patch32"}
    environ = {"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "2"}
    line = checkpoints.prepare_compute_job({"models": {"plip": fetched, "clip": demo}}, environ)
    assert environ["HF_HUB_OFFLINE"] == "1"
    assert "SLURM_JOB_ID=7" in line and "CUDA_VISIBLE_DEVICES=2" in line and "HF_HUB_OFFLINE=1" in line
    environ = {}
    checkpoints.prepare_compute_job({"models": {"plip": fetched, "clip": hub}}, environ)
    assert "HF_HUB_OFFLINE" not in environ


def test_workflow_fetches_on_the_submit_host_and_extracts_from_the_copy(repo, tmp_path):
    config = yaml.safe_load((repo / "config" / "paper.yaml").read_text())
    config["models"]["plip"]["fetch"] = True
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    for task in config["tasks"]:  # raw data present, so the dry run reaches extraction
        (tmp_path / "resources" / "raw" / task).mkdir(parents=True)
        (tmp_path / "resources" / "raw" / task / "metadata.csv").write_text("id\n")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "results/activations/plip/T1.h5", "results/activations/clip/T1.h5",
         "--dry-run", "--directory", str(tmp_path), "--configfile", str(tmp_path / "config.yaml")],
        cwd=repo, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "rule fetch_model:" in out and "resources/checkpoints/plip" in out
    assert "resources/checkpoints/clip" not in out

"""Tests of hf_longattn.run.export_step: what is pushed and loaded is always the current selection's export."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow.parquet as pq
import pytest

from hf_longattn.cli import main
from hf_longattn.run.job import LongAttnPipeline


@pytest.fixture
def own_run(finished_run, tmp_path):
    """A copy of the finished tiny run that a test may change: (config, output folder)."""
    config, _ = finished_run
    out = tmp_path / "out"
    shutil.copytree(config.output_dir, out)
    return config.replace(output_dir=str(out)), out


@pytest.fixture
def fake_hub(monkeypatch):
    """The Hub API boundary, recorded: what each upload would have sent (files and their rows)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.hf_api.RepoUrl(f"https://huggingface.co/datasets/{repo_id}")

    def upload_folder(self, *, folder_path, **kwargs):
        files = {p.relative_to(folder_path).as_posix(): pq.read_metadata(p).num_rows
                 for p in Path(folder_path).rglob("*.parquet")}
        uploads.append({"files": files, **kwargs})

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return uploads


def filtered_rows(upload: dict) -> int:
    return sum(rows for name, rows in upload["files"].items() if name.startswith("data/filtered/"))


def test_push_after_a_reselection_pushes_the_new_selection(own_run, fake_hub, capsys):
    config, out = own_run
    half = config.replace(keep_fraction=0.5, push_to_hub="me/tiny")
    summary = LongAttnPipeline(half, progress=False).select()  # re-selected, not exported
    kept = sum(row["kept"] for row in summary["categories"].values())
    assert kept == sum(math.floor(0.5 * row["scored_ok"]) for row in summary["categories"].values())
    assert LongAttnPipeline(half, progress=False).push() == "https://huggingface.co/datasets/me/tiny"
    assert "[push] to do: export, finish, push\n  export: " in capsys.readouterr().out
    assert filtered_rows(fake_hub[-1]) == kept
    assert fake_hub[-1]["delete_patterns"] == ["data/**", "plots/**"]  # an earlier export's files go
    LongAttnPipeline(half, progress=False).push()  # pushed already: nothing to upload
    assert "[push] everything is current" in capsys.readouterr().out and len(fake_hub) == 1


def test_push_without_network_says_so_in_one_line(own_run, monkeypatch, capsys):
    config, out = own_run
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(self, *args, **kwargs):
        import httpx2  # what huggingface_hub speaks HTTP with

        raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    path = out.parent / "c.yaml"
    path.write_text(config.replace(push_to_hub="me/tiny").to_yaml())
    assert main(["push", "--config", str(path), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "could not push" in error and "ConnectError" in error and "run the push again: it resumes" in error
    assert error.count("\n") == 1 and "Traceback" not in error


def test_load_dataset_with_the_default_cache_sees_a_new_selection(own_run, monkeypatch, tmp_path):
    config, out = own_run
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "default-cache")  # the user's default cache
    first = datasets.load_dataset(str(out / "hub"), "filtered")
    summary = LongAttnPipeline(config.replace(keep_fraction=0.6), progress=False).select()
    LongAttnPipeline(config.replace(keep_fraction=0.6), progress=False).export()
    again = datasets.load_dataset(str(out / "hub"), "filtered")
    assert {name: len(split) for name, split in again.items()} == {c: r["kept"] for c, r in summary["categories"].items()}
    assert sum(len(s) for s in again.values()) > sum(len(s) for s in first.values())
    assert datasets.load_dataset(str(out / "hub"), "filtered", download_mode="force_redownload")["code"].num_rows == \
        summary["categories"]["code"]["kept"]

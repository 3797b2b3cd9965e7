"""Tests of hf_longattn.run.export_step: what is pushed and loaded is always the current selection's export."""

from __future__ import annotations

import json
import math
import shutil

import datasets
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


def filtered_rows(hub, repo_id: str) -> int:
    """Rows of the ``filtered`` config the repo holds now."""
    import io

    files = hub.repo(repo_id).files()
    return sum(pq.read_metadata(io.BytesIO(data)).num_rows for name, data in files.items()
               if name.startswith("data/filtered/"))


def test_push_after_a_reselection_pushes_the_new_selection(own_run, hub_client, capsys):
    config, out = own_run
    half = config.replace(keep_fraction=0.5, push_to_hub="user/tiny")
    summary = LongAttnPipeline(half, progress=False).select()  # re-selected, not exported
    kept = sum(row["kept"] for row in summary["categories"].values())
    assert kept == sum(math.floor(0.5 * row["scored_ok"]) for row in summary["categories"].values())
    assert LongAttnPipeline(half, progress=False).push() == f"{hub_client.url}/datasets/user/tiny"
    assert "[push] to do: export, finish, push\n  export: " in capsys.readouterr().out
    assert filtered_rows(hub_client, "user/tiny") == kept
    tag = json.loads((out / "hub" / "hf_longattn_export.json").read_text())["tag"]
    assert all(name.endswith(f"-{tag}.parquet") for name in hub_client.repo("user/tiny").files() if name.startswith("data/"))
    commits = len(hub_client.repo("user/tiny").history())
    LongAttnPipeline(half, progress=False).push()  # pushed already: nothing to upload
    assert "[push] everything is current" in capsys.readouterr().out and filtered_rows(hub_client, "user/tiny") == kept
    assert len(hub_client.repo("user/tiny").history()) == commits  # nothing changed: no commit


def test_push_without_network_says_so_in_one_line(own_run, hub_client, monkeypatch, capsys):
    import socket

    import huggingface_hub

    config, out = own_run
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
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

"""Tests of hf_longattn.storage and the one error path: full disks, corrupt files, symlinks — one line, nothing partial."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from hf_longattn.cli import main
from hf_longattn.errors import LongAttnError
from hf_longattn import storage
from hf_longattn.storage import atomic_folder, read_json

from .helpers import tiny_config


def test_an_interrupted_folder_swap_leaves_the_old_folder(tmp_path):
    target = tmp_path / "export"
    with atomic_folder(target) as building:
        (building / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_folder(target) as building:
        (building / "a.txt").write_text("new, half written")
        raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_corrupt_json_file_is_named_with_what_to_do(tmp_path):
    path = tmp_path / "fingerprint.json"
    path.write_text("{")
    with pytest.raises(LongAttnError, match=rf"{path} \(the fingerprint\) is not valid JSON \(line 1, column 2.*\): fix it"):
        read_json(path, what="the fingerprint", remedy="fix it")
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(LongAttnError, match="is not UTF-8 text"):
        read_json(path)


def no_space(path_part: str, monkeypatch, error_number: int = errno.ENOSPC) -> None:
    """Make every atomic write whose target path contains ``path_part`` fail as a full disk would."""
    real = storage.atomic_write

    def failing(path, write, **fencing):
        if path_part in str(path):
            def full(temporary):
                Path(temporary).write_bytes(b"partial")
                raise OSError(error_number, os.strerror(error_number), str(temporary))
            return real(path, full, **fencing)
        return real(path, write, **fencing)

    monkeypatch.setattr(storage, "atomic_write", failing)


def test_a_full_disk_in_the_windows_step_stops_clearly_and_the_relaunch_finishes(tiny_model, corpus, tmp_path,
                                                                                  monkeypatch, capsys):
    config = tiny_config(tiny_model, corpus, tmp_path / "out")
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    no_space("/windows/shard-", monkeypatch)
    assert main(["run", "--config", str(path), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "cannot write" in error and "(ENOSPC)" in error and "relaunch" in error and "Traceback" not in error
    assert error.count("\n") == 1
    assert not list((tmp_path / "out" / "windows").glob("*.parquet")) and not list((tmp_path / "out").rglob("*tmp-*"))
    monkeypatch.undo()
    assert main(["run", "--config", str(path), "--no-progress"]) == 0


def test_a_full_disk_in_the_export_keeps_the_previous_export_whole(finished_run, tmp_path, monkeypatch, capsys):
    import shutil

    config, _ = finished_run
    shutil.copytree(config.output_dir, tmp_path / "out")
    config = config.replace(output_dir=str(tmp_path / "out"))
    hub = Path(config.output_dir) / "hub"
    before = sorted(p.relative_to(hub).as_posix() for p in hub.rglob("*"))
    real = storage.os.replace

    def full(source, target):
        if Path(target) == hub and Path(source).name.startswith(".hub.building-"):  # the new export going into place
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real(source, target)

    monkeypatch.setattr(storage.os, "replace", full)
    path = Path(config.output_dir).parent / "export.yaml"
    path.write_text(config.replace(keep_fraction=0.5).to_yaml())
    assert main(["run", "--config", str(path), "--no-progress"]) == 2  # re-selects, then the export fails at the swap
    assert "(ENOSPC)" in capsys.readouterr().err
    assert sorted(p.relative_to(hub).as_posix() for p in hub.rglob("*")) == before  # the old export, whole
    monkeypatch.undo()
    assert main(["export", "--config", str(path), "--no-progress"]) == 0  # space freed: the export completes
    assert not [p for p in hub.parent.iterdir() if p.name.startswith(".hub.")]  # no work folder left behind


@pytest.mark.parametrize("name", ["hub", "scores"])
def test_symlinks_in_the_run_folder_are_refused(finished_run, tmp_path, name, capsys):
    config, _ = finished_run
    out = tmp_path / "copy"
    import shutil

    shutil.copytree(config.output_dir, out)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(out / name)
    (out / name).symlink_to(outside, target_is_directory=True)
    path = tmp_path / "c.yaml"
    path.write_text(config.replace(output_dir=str(out)).to_yaml())
    assert main(["run", "--config", str(path), "--no-progress"]) == 2
    assert f"{out / name} is a symlink to {outside}" in capsys.readouterr().err
    assert list(outside.iterdir()) == []


def test_corrupt_run_files_and_bad_input_name_the_file(finished_run, tmp_path, capsys):
    config, _ = finished_run
    out = Path(config.output_dir)
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    timings = out / "timings.json"
    saved = timings.read_text()
    timings.write_text("{not json")
    try:
        assert main(["select", "--config", str(path), "--no-progress"]) == 2
        assert f"{timings} (step timings) is not valid JSON" in capsys.readouterr().err
    finally:
        timings.write_text(saved)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps({"id": "a", "text": "fine"}).encode() + b"\n" + b'{"id": "b", "text": "\xff"}\n')
    assert main(["windows", "--input", str(bad), "--output-dir", str(tmp_path / "o"), "--model", config.model,
                 "--window-size", "64", "--no-progress"]) == 2
    assert f"{bad}, line 2: not UTF-8" in capsys.readouterr().err

"""Every user mistake on the command line gets one line on stderr, exit status 2, and leaves no file behind.

Run: ``python -m pytest -q tests/test_cli_errors.py`` (CPU, the tiny model, no network; ~10 s).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hf_longattn.cli import main


def refused(capsys, tmp_path: Path, *argv: str) -> str:
    """Run ``hf-longattn *argv`` in ``tmp_path``; assert exit status 2, one line on stderr, nothing written. The line."""
    before = sorted(tmp_path.rglob("*"))
    try:
        status = main(list(argv))
    except SystemExit as exit_:  # argparse's own exit
        status = exit_.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == 2, captured
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert sorted(tmp_path.rglob("*")) == before, "the command left files behind"
    return lines[0]


@pytest.fixture
def run_args(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return ["--model", str(tiny_model), "--window-size", "64", "--output-dir", str(tmp_path / "out"), "--no-progress"]


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path.parent / f"{tmp_path.name}-{name}"  # outside tmp_path: only the command's own files count
    path.write_text(text)
    return str(path)


def test_a_number_for_sources(capsys, tmp_path, run_args):
    line = refused(capsys, tmp_path, "windows", *run_args, "--set", "sources=3")
    assert line.startswith("hf-longattn windows: error: sources must be a list") and "got int 3" in line


def test_a_string_for_sources_is_not_four_sources(capsys, tmp_path, run_args, tiny_model):
    config = write(tmp_path, "string.yaml", f"model: {tiny_model}\nsources: docs\n")
    line = refused(capsys, tmp_path, "windows", "--config", config, "--output-dir", str(tmp_path / "out"))
    assert "got the string 'docs'" in line and "sources: [{path: docs}]" in line and "--input docs" in line


def test_a_mapping_for_sources_is_not_a_source_named_path(capsys, tmp_path, tiny_model):
    config = write(tmp_path, "mapping.yaml", f"model: {tiny_model}\nsources:\n  path: docs.jsonl\n  category: book\n")
    line = refused(capsys, tmp_path, "windows", "--config", config, "--output-dir", str(tmp_path / "out"))
    assert "got one mapping" in line and "list item" in line


def test_an_unreachable_hub_source_offline(capsys, tmp_path, run_args, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    line = refused(capsys, tmp_path, "windows", *run_args, "--set", "sources=[{hub: someone/long-docs}]")
    assert "Hub source 'someone/long-docs'" in line and "HF_HUB_OFFLINE" in line


def test_a_mistyped_flag_gets_the_subcommands_suggestion(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, tmp_path, "windows", "--windw-size", "4096")
    assert line.startswith("hf-longattn windows: error: unrecognized argument")
    assert "did you mean '--window-size'?" in line and "hf-longattn windows --help" in line


def test_a_mistyped_flag_of_the_probe(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, tmp_path, "probe", "--probe-num-windws", "4")
    assert "hf-longattn probe: error" in line and "did you mean '--probe-num-windows'?" in line


def test_an_unknown_config_key_gets_a_suggestion(capsys, tmp_path, run_args):
    line = refused(capsys, tmp_path, "windows", *run_args, "--set", "windw_size=3")
    assert "Unknown config key 'windw_size'" in line and "did you mean 'window_size'?" in line


def test_an_unknown_key_in_a_config_file_gets_a_suggestion(capsys, tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write(tmp_path, "typo.yaml", f"model: {tiny_model}\nsources: [{{path: x}}]\nkeep_fracton: 0.5\n")
    line = refused(capsys, tmp_path, "select", "--config", config)
    assert "'keep_fracton'" in line and "did you mean 'keep_fraction'?" in line


def test_an_unknown_source_key_gets_a_suggestion(capsys, tmp_path, run_args):
    line = refused(capsys, tmp_path, "windows", *run_args, "--set", "sources=[{path: x, categry: book}]")
    assert "categry" in line and "did you mean 'category'?" in line


def test_a_missing_input_leaves_no_output_folder(capsys, tmp_path, run_args):
    for command in ("windows", "score", "run"):
        line = refused(capsys, tmp_path, command, *run_args, "--input", str(tmp_path / "nowhere"))
        assert "nowhere does not exist" in line
    assert not (tmp_path / "out").exists()


def test_a_missing_optional_package_names_its_extra(capsys, tmp_path, run_args, monkeypatch, corpus):
    """The datatrove recipe's --write-selected on a machine without orjson: one line naming the extra."""
    from datatrove.utils import _import_utils

    real = _import_utils._is_distribution_available
    monkeypatch.setattr(_import_utils, "_is_distribution_available", lambda name: name != "orjson" and real(name))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    try:
        import longabc_datatrove
    finally:
        sys.path.pop(0)
    status = longabc_datatrove.main([*run_args, "--input", str(corpus / "code.jsonl"), "--write-selected",
                                     "--tasks", "1", "--workers", "1"])
    captured = capsys.readouterr()
    assert status == 2
    lines = [line for line in captured.err.splitlines() if "error" in line]
    assert len(lines) == 1 and "orjson" in lines[0] and 'pip install "hf-longattn[datatrove]"' in lines[0], captured.err

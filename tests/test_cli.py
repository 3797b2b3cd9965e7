"""Tests of the hf-longattn command (hf_longattn.cli) and recipes/longabc.py: help, config resolution, errors, a tiny run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_longattn.cli import STEP_HELP, build_parser, config_from_args, main
from hf_longattn.config import RunConfig

from .corpus import CATEGORIES, write_corpus
from .helpers import load_export, tiny_model_with_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_setup(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    model = tiny_model_with_tokenizer(tiny_model_dir("llama"), base / "tiny-llama")
    corpus = write_corpus(base / "corpus", docs_per_category=2, chars=600)
    config = base / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model),
        "sources": [{"path": str(corpus / f"{c}.jsonl")} for c in CATEGORIES],
        "window_size": 32,
        "keep_fraction": 0.25,
        "chunk_size": 4,
        "output_dir": str(base / "out"),
    }))
    return base, config


def test_module_help_runs_as_a_program():
    result = subprocess.run([sys.executable, "-m", "hf_longattn.cli", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: hf-longattn" in result.stdout
    for command in STEP_HELP:
        assert command in result.stdout
    recipe = subprocess.run([sys.executable, str(ROOT / "recipes" / "longabc.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert recipe.returncode == 0 and "Run the whole job" in recipe.stdout


@pytest.mark.parametrize("command", list(STEP_HELP))
def test_every_subcommand_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"usage: hf-longattn {command}" in text
    assert " ".join(STEP_HELP[command][1].split())[:60] in text
    assert "--config FILE" in text and "--set KEY=VALUE" in text


def test_no_command_prints_the_overview(capsys):
    assert main([]) == 0
    assert "LongAttn (arXiv 2502.16860)" in capsys.readouterr().out


def test_config_resolution_order(tmp_path, capsys):
    parser = build_parser()
    demo = config_from_args(parser.parse_args(["run"]))
    assert demo == RunConfig.demo()
    mine = config_from_args(parser.parse_args(["run", "--input", "docs/", "--input", "more.jsonl", "--window-size", "4096",
                                               "--min-distance", "1024", "--set", "keep_fraction=0.5"]))
    assert [s.path for s in mine.sources] == ["docs/", "more.jsonl"]
    assert (mine.output_dir, mine.window_size, mine.min_distance, mine.keep_fraction) == ("longattn-output", 4096, 1024, 0.5)
    assert mine.model == "smollm2"
    assert main(["config", "--alpha", "1", "--set", "seed=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert RunConfig.from_dict(printed) == RunConfig.demo(alpha=1.0, seed=7)


def test_errors_exit_2_with_a_clear_message(tmp_path, capsys, monkeypatch):
    assert main(["config", "--set", "windowsize=8"]) == 2
    assert "Unknown config key 'windowsize' in overrides (did you mean 'window_size'?); valid keys: model," in capsys.readouterr().err
    assert main(["config", "--set", "keep_fraction"]) == 2
    assert "--set expects KEY=VALUE" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "never"
    assert main(["run", "--output-dir", str(out), "--push-to-hub", "me/longabc", "--no-progress"]) == 2
    assert "HF_HUB_OFFLINE=1 is set: cannot push to me/longabc" in capsys.readouterr().err
    assert not out.exists()
    assert main(["push", "--output-dir", str(out)]) == 2
    assert "push needs a repo" in capsys.readouterr().err


def test_tiny_run_then_reselect_and_export_through_the_cli(tiny_setup, capsys):
    base, config = tiny_setup
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "LongAttn summary" in printed and "wall time: windows" in printed
    assert "%|" not in captured.err + printed  # --no-progress: no bar of ours, datasets' or huggingface_hub's
    out = base / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["categories"]) == list(CATEGORIES)
    scored = load_export(out / "hub", "scored")
    assert sum(len(split) for split in scored.values()) == sum(s["windows"] for s in summary["categories"].values())

    assert main(["select", "--config", str(config), "--keep-fraction", "0.5", "--no-progress"]) == 0
    reselected = json.loads((out / "summary.json").read_text())["categories"]
    assert all(row["kept"] == math.floor(0.5 * row["scored_ok"]) for row in reselected.values())
    assert main(["export", "--config", str(config), "--keep-fraction", "0.5", "--no-progress"]) == 0
    filtered = load_export(out / "hub", "filtered")
    assert {name: len(split) for name, split in filtered.items()} == {c: r["kept"] for c, r in reselected.items() if r["kept"]}

    # Steps one by one in a new output_dir give the same scores.
    steps_dir = base / "steps"
    for command in ("windows", "score", "select", "export"):
        assert main([command, "--config", str(config), "--output-dir", str(steps_dir), "--no-progress"]) == 0, command
    import pyarrow.parquet as pq

    assert pq.read_table(steps_dir / "selection.parquet").drop_columns(["longattn_lds", "longattn_selected"]).equals(
        pq.read_table(out / "selection.parquet").drop_columns(["longattn_lds", "longattn_selected"]))
    assert main(["score", "--config", str(config), "--window-size", "16", "--no-progress"]) == 2
    assert "different configuration (changed: window_size: 32 → 16" in capsys.readouterr().err

"""The run graph (issue 17): what a command publishes is what a fresh run on the same inputs and settings gives, or a
one-line refusal. The regression cases of the adversarial run on 2ff7e88, driven through the CLI.

Run: ``python -m pytest -q tests/test_run_graph.py`` (CPU, the tiny model; ~1-2 min on 2 cores).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hf_longattn.cli import main

from .corpus import write_corpus
from .helpers import tiny_config


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main([*argv, "--no-progress"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def hub_tables(out: Path) -> dict[str, pa.Table]:
    """Every parquet file of ``hub/`` by its path without the export tag (tags differ with the card settings)."""
    return {p.relative_to(out / "hub").as_posix().rsplit("-", 1)[0]: pq.read_table(p)
            for p in sorted((out / "hub" / "data").rglob("*.parquet"))}


def assert_hub_equals_fresh(config, out: Path, tmp_path: Path, capsys) -> None:
    """``out/hub`` holds exactly the data a fresh run of ``config`` into an empty folder exports."""
    fresh = tmp_path / "fresh"
    shutil.rmtree(fresh, ignore_errors=True)
    path = tmp_path / "fresh.yaml"
    path.write_text(config.replace(output_dir=str(fresh)).to_yaml())
    assert cli(capsys, "run", "--config", str(path))[0] == 0
    ours, theirs = hub_tables(out), hub_tables(fresh)
    assert list(ours) == list(theirs)
    for name in ours:
        assert ours[name].equals(theirs[name]), name
    assert pq.read_table(out / "selection.parquet").equals(pq.read_table(fresh / "selection.parquet"))


@pytest.fixture
def project(tiny_model, tmp_path, capsys):
    """A finished run over a corpus of its own: ``(config, config path, corpus, output folder)``."""
    corpus = write_corpus(tmp_path / "corpus")
    config = tiny_config(tiny_model, corpus, tmp_path / "out")
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert cli(capsys, "run", "--config", str(path))[0] == 0
    return config, path, corpus, tmp_path / "out"


def edit_one_document(corpus: Path) -> None:
    path = corpus / "prose.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    text = rows[0]["text"]
    rows[0]["text"] = text[: len(text) // 2] + text[len(text) // 2:][:40].swapcase() + text[len(text) // 2 + 40:]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_1_an_export_after_a_rescore_publishes_the_new_scores_and_selection(project, tmp_path, capsys):
    config, path, corpus, out = project
    edit_one_document(corpus)
    assert cli(capsys, "score", "--config", str(path))[0] == 0
    status, printed, _ = cli(capsys, "export", "--config", str(path))
    assert status == 0 and "[export] to do: select, export, finish" in printed  # the selection was stale: redone
    assert_hub_equals_fresh(config, out, tmp_path, capsys)


def test_2_export_refuses_windows_that_do_not_match_their_hash(project, capsys):
    config, path, corpus, out = project
    shard = sorted((out / "windows").glob("shard-*.parquet"))[0]
    table = pq.read_table(shard)
    ids = table.column("input_ids").to_pylist()
    ids[1][3] = (ids[1][3] + 1) % 300  # the hash column is left alone
    pq.write_table(table.set_column(table.schema.get_field_index("input_ids"), "input_ids",
                                    pa.array(ids, table.schema.field("input_ids").type)), shard, row_group_size=4)
    before = hub_tables(out)
    assert cli(capsys, "select", "--config", str(path), "--keep-fraction", "0.9")[0] == 0
    status, _, error = cli(capsys, "export", "--config", str(path))
    assert status == 2 and error.count("\n") == 1
    assert f"{shard}, row 1" in error and "do not match their recorded hash" in error
    assert {k: v.num_rows for k, v in hub_tables(out).items()} == {k: v.num_rows for k, v in before.items()}
    assert cli(capsys, "windows", "--config", str(path))[0] == 0  # checks every shard's sha256: rebuilt
    assert cli(capsys, "export", "--config", str(path))[0] == 0


def test_3_export_and_push_publish_the_last_selection_made_never_a_silent_one(project, tmp_path, capsys):
    config, path, corpus, out = project  # the configuration keeps 0.3
    assert cli(capsys, "select", "--config", str(path), "--keep-fraction", "0.5")[0] == 0
    status, printed, _ = cli(capsys, "export", "--config", str(path))
    assert status == 0
    assert "publishing the selection the last `select` made: keep_fraction 0.5 (the configuration says 0.3)" in printed
    assert json.loads((out / "selector.json").read_text())["config"]["keep_fraction"] == 0.5
    assert_hub_equals_fresh(config.replace(keep_fraction=0.5), out, tmp_path, capsys)
    # the other order: the configuration's selection made last (by `run`), then published as it is
    assert cli(capsys, "run", "--config", str(path))[0] == 0
    status, printed, _ = cli(capsys, "export", "--config", str(path), "--keep-fraction", "0.5")
    assert status == 0 and "publishing the selection the last `select` made: keep_fraction 0.3" in printed
    assert_hub_equals_fresh(config, out, tmp_path, capsys)


def test_4_a_category_without_any_window_has_no_split_and_the_export_loads(tiny_model, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "tiny.jsonl").write_text(json.dumps({"id": "t", "text": "too short for a window"}) + "\n")
    config = tiny_config(tiny_model, corpus, tmp_path / "out")
    config = config.replace(sources=[*[s.to_dict() for s in config.sources], {"path": str(corpus / "tiny.jsonl")}])
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert cli(capsys, "run", "--config", str(path))[0] == 0
    hub = tmp_path / "out" / "hub"
    for name in ("scored", "filtered"):
        loaded = datasets.load_dataset(str(hub), name, cache_dir=str(tmp_path / f"cache-{name}"))
        assert "tiny" not in loaded and len(loaded) >= 1
    card = (hub / "README.md").read_text()
    assert "| tiny | — (no window) | 1 | 1 |" in card and "split: tiny" not in card


def test_the_same_command_twice_does_nothing_the_second_time(project, capsys):
    config, path, corpus, out = project
    marks = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix in (".parquet", ".done")}
    status, printed, _ = cli(capsys, "export", "--config", str(path))
    assert status == 0 and "everything is current" in printed
    assert {p: p.stat().st_mtime_ns for p in marks} == marks

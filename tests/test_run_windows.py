"""Tests of hf_longattn.run.windows_step and score reuse: edited, added and renamed sources, corrupt shards, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hf_longattn.errors import LongAttnError
from hf_longattn.run.job import LongAttnPipeline

from .corpus import CATEGORIES, write_corpus
from .helpers import chunk_plan, tiny_config


def run(config):
    return LongAttnPipeline(config, progress=False).run()


def selection(output_dir: Path):
    return pq.read_table(Path(output_dir) / "selection.parquet")


@pytest.fixture
def edited(tiny_model, tmp_path):
    """A finished run over a fresh copy of the corpus: (config, corpus folder, output folder)."""
    corpus = write_corpus(tmp_path / "corpus")
    config = tiny_config(tiny_model, corpus, tmp_path / "out")
    run(config)
    return config, corpus, tmp_path / "out"


def edit_one_document(corpus: Path) -> str:
    """Change a few characters in the middle of the first prose document; its window ids stay the same."""
    path = corpus / "prose.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    text = rows[0]["text"]
    middle = len(text) // 2
    rows[0]["text"] = text[:middle] + text[middle:middle + 12].swapcase() + text[middle + 12:]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows[0]["id"]


def fresh(config, folder: Path):
    """The same run into an empty folder: what a relaunch must reproduce."""
    shutil.rmtree(folder, ignore_errors=True)
    return run(config.replace(output_dir=str(folder)))


def test_an_edited_document_is_rescored_and_the_rest_reused(edited, tmp_path, capsys):
    config, corpus, out = edited
    before = selection(out)
    edited_id = edit_one_document(corpus)
    capsys.readouterr()
    run(config)
    printed = capsys.readouterr().out
    assert "the sources changed since the windows were built (changed " in printed and "prose.jsonl" in printed
    assert "reusing the windows" not in printed
    after = selection(out)
    reference = (fresh(config, tmp_path / "fresh"), selection(tmp_path / "fresh"))[1]
    assert after.equals(reference)  # bit for bit what a fresh run gives
    changed = [i for i, a, b in zip(after.column("id").to_pylist(), after.column("longattn_ds").to_pylist(),
                                    before.column("longattn_ds").to_pylist()) if a != b]
    assert changed and all(i.startswith(edited_id) for i in changed)
    markers = [json.loads(p.read_text()) for p in (out / "scores").glob("chunk-*.done")]
    assert sum(m.get("reused", 0) for m in markers) > 0  # unchanged windows were copied, not scored again


def test_old_scores_never_stick_to_new_text_when_windows_are_rebuilt(edited, tmp_path):
    config, corpus, out = edited
    edit_one_document(corpus)
    shutil.rmtree(out / "windows")  # the windows are rebuilt; the old chunks must not be taken for them
    run(config)
    assert selection(out).equals((fresh(config, tmp_path / "fresh"), selection(tmp_path / "fresh"))[1])


def test_an_added_file_and_a_renamed_category_are_noticed(edited, tmp_path, capsys):
    config, corpus, out = edited
    extra = corpus / "extra.jsonl"
    rows = [json.loads(line) for line in (corpus / "docs.jsonl").read_text().splitlines()]
    extra.write_text("".join(json.dumps({**row, "id": "extra/" + row["id"], "category": "extra"}) + "\n" for row in rows))
    grown = config.replace(sources=[*[s.to_dict() for s in config.sources], {"path": str(extra)}])
    capsys.readouterr()
    summary = run(grown)
    assert "added " in capsys.readouterr().out and summary["categories"]["extra"]["windows"] > 0
    renamed = grown.replace(sources=[{**s.to_dict(), "category": "renamed"} if s.path == str(extra) else s.to_dict()
                                     for s in grown.sources])
    summary = run(renamed)
    assert "renamed" in summary["categories"] and "extra" not in summary["categories"]
    assert selection(out).equals((fresh(renamed, tmp_path / "fresh"), selection(tmp_path / "fresh"))[1])


def test_a_flipped_bit_in_a_windows_shard_is_found_and_rebuilt(edited, capsys):
    config, _, out = edited
    shard = out / "windows" / f"{chunk_plan(out)[0]['shard']}.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    before = selection(out)
    capsys.readouterr()
    run(config)
    assert "does not match its recorded sha256 (corrupt or edited): rebuilding it" in capsys.readouterr().out
    assert selection(out).equals(before)


def test_a_damaged_window_inside_a_verified_file_stops_with_the_row(edited):
    config, _, out = edited
    from hf_longattn.run.context import Run
    from hf_longattn.run.score_step import chunk_windows

    chunk = chunk_plan(out)[0]
    path = out / "windows" / f"{chunk['shard']}.parquet"
    table = pq.read_table(path)
    ids = table.column("input_ids").to_pylist()
    ids[1][5] ^= 1
    import pyarrow as pa

    pq.write_table(table.set_column(table.schema.get_field_index("input_ids"), "input_ids",
                                    pa.array(ids, table.schema.field("input_ids").type)), path, row_group_size=4)
    from hf_longattn.run.records import Chunk

    with pytest.raises(LongAttnError, match=r"row 1 \(window .*\): its token ids do not match their recorded hash"):
        chunk_windows(Run(config, progress=False), Chunk(**chunk))


def test_colliding_categories_stop_before_scoring_and_a_rename_fixes_it(tiny_model, tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    sources = [{"path": str(corpus / "code.jsonl"), "category": "a/b"}, {"path": str(corpus / "docs.jsonl"), "category": "a_b"}]
    config = tiny_config(tiny_model, corpus, tmp_path / "out", sources=sources)
    with pytest.raises(LongAttnError, match=r"collide.*nothing was scored yet"):
        run(config)
    assert not (tmp_path / "out" / "scores").exists()
    fixed = config.replace(sources=[sources[0], {**sources[1], "category": "docs"}])
    assert sorted(run(fixed)["categories"]) == ["a/b", "docs"]


def test_a_failed_run_leaves_nothing_that_blocks_the_corrected_one(tiny_model, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", chars=300)
    config = tiny_config(tiny_model, corpus, tmp_path / "out", window_size=900)  # longer than any document
    with pytest.raises(LongAttnError, match="No window"):
        run(config)
    assert not (tmp_path / "out" / "fingerprint.json").exists()
    assert sorted(run(config.replace(window_size=64))["categories"]) == list(CATEGORIES)


def test_worker_processes_window_the_same_shards(finished_run, tmp_path):
    """``num_proc`` worker processes (spawned) give byte-identical windows shards."""
    config, _ = finished_run
    parallel = config.replace(output_dir=str(tmp_path / "parallel"), num_proc=2)
    LongAttnPipeline(parallel, progress=False).windows()
    ours = json.loads((tmp_path / "parallel" / "windows" / "windows_stats.json").read_text())["shards"]
    theirs = json.loads((Path(config.output_dir) / "windows" / "windows_stats.json").read_text())["shards"]
    assert [(s["name"], s["sha256"]) for s in ours] == [(s["name"], s["sha256"]) for s in theirs]

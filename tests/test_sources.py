"""Tests of hf_longattn.sources: jsonl, parquet, text files, folders, the embedded Python corpus, clear errors."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pathlib import Path

from hf_longattn.shards import iter_documents, read_sources
from hf_longattn.sources import SourceConfig, pydoc_documents, stdlib_documents


def test_sources_read_jsonl_parquet_text_and_folders(tmp_path):
    folder = tmp_path / "mine"
    (folder / "book").mkdir(parents=True)
    (folder / "book" / "a.txt").write_text("once upon a time")
    (folder / "notes.md").write_text("# notes")
    (folder / "image.bin").write_bytes(b"\x00\xff")
    pq.write_table(pa.table({"text": ["p0", "p1"], "category": ["law", "law"]}), folder / "rows.parquet")
    with gzip.open(folder / "more.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"id": "x1", "text": "j0"}) + "\n")
    docs = read_sources([SourceConfig(path=str(folder))])
    rows = {row["id"]: (row["category"], row["text"]) for row in docs}
    assert rows == {
        "mine/book/a.txt": ("book", "once upon a time"),
        "x1": ("more", "j0"),
        "mine/notes.md": ("mine", "# notes"),
        "mine/rows:0": ("law", "p0"),
        "mine/rows:1": ("law", "p1"),
    }
    assert docs.column_names == ["id", "category", "text", "source", "license"]
    one = read_sources(SourceConfig(path=str(folder / "rows.parquet"), category="forced", limit=1))
    assert (list(one["id"]), list(one["category"])) == (["rows:0"], ["forced"])


def test_sources_refuse_duplicates_and_missing_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "a", "body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"no text column 'text' .*Current columns: \['body', 'id'\]"):
        read_sources(SourceConfig(path=str(path)))
    source = SourceConfig(path=str(path), text_column="body")
    with pytest.raises(ValueError, match="Duplicate document id 'a'"):
        read_sources([source, source])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_sources(SourceConfig(path=str(tmp_path / "missing.jsonl")))


def test_embedded_corpus_is_python_code_and_docs():
    code = list(stdlib_documents())
    assert {"python-stdlib/json", "python-stdlib/asyncio"} <= {d["id"] for d in code}
    assert not any(d["id"].endswith(("/test", "/idlelib")) for d in code)
    json_doc = next(d for d in code if d["id"] == "python-stdlib/json")
    assert json_doc["text"].startswith("# file: json/__init__.py\n") and "# file: json/decoder.py" in json_doc["text"]
    docs = list(pydoc_documents())
    assert len(docs) >= 3 and all(d["text"].startswith("# topic: ") for d in docs)
    assert list(pydoc_documents()) == docs  # deterministic
    limited = list(iter_documents(SourceConfig(embedded="python-stdlib", limit=2)))
    assert [d["category"] for d in limited] == ["code", "code"]


# -- the pipeline, end to end ------------------------------------------------------------------------------


def test_a_hub_dataset_is_read_file_by_file_with_stable_ids(tmp_path):
    """A `hub:` source is split into its data files (as `datasets` resolves them) and each is streamed on its own."""
    from hf_longattn.shards import plan_input_shards, read_shard

    folder = tmp_path / "my-dataset"
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["a b c", "d e"]}), folder / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": ["f g"]}), folder / "data" / "train-00001-of-00002.parquet")
    sources = [SourceConfig(hub=str(folder))]
    plan = plan_input_shards(sources)
    assert [Path(s.name).name for s in plan] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    second = list(read_shard(sources, plan[1]))  # any task can read any shard alone: ids do not depend on order
    assert [(d["id"], d["category"]) for d in second] == [(f"{folder}:train:data/train-00001-of-00002:0", "my-dataset")]
    assert list(iter_documents(SourceConfig(hub=str(folder), limit=2)))[-1]["text"] == "d e"


def test_hub_files_of_one_name_in_two_folders_give_distinct_ids(tmp_path, tiny_model, capsys, monkeypatch):
    """``data/en/train-…jsonl`` and ``data/de/train-…jsonl`` without an id column: ids from the path in the repo."""
    from hf_longattn.cli import main

    folder = tmp_path / "multilingual"
    text = "the long range dependency of a window " * 60
    for language in ("en", "de"):
        (folder / "data" / language).mkdir(parents=True)
        (folder / "data" / language / "train-00000-of-00001.jsonl").write_text(json.dumps({"text": text}) + "\n")
    monkeypatch.chdir(tmp_path)
    status = main(["windows", "--model", str(tiny_model), "--window-size", "64", "--output-dir", "out", "--no-progress",
                   "--set", f"sources=[{{hub: {folder}}}]"])
    assert status == 0, capsys.readouterr().err
    doc_ids = set()
    for shard in (tmp_path / "out" / "windows").glob("shard-*.parquet"):
        doc_ids |= set(pq.read_table(shard, columns=["doc_id"]).column("doc_id").to_pylist())
    assert doc_ids == {f"{folder}:train:data/{language}/train-00000-of-00001:0" for language in ("en", "de")}


def test_remote_files_are_streamed_through_fsspec(monkeypatch):
    """A data file behind a URL (``hf://…`` on the Hub; ``memory://`` here) is read through fsspec, never copied whole."""
    import fsspec

    from hf_longattn import shards

    with fsspec.open("memory://repo@abc123/data/train.jsonl", "wb") as handle:
        handle.write(b'{"id": "r1", "text": "remote text"}\n{"id": "r2", "text": "more"}\n')
    monkeypatch.setattr(shards, "_hub_files", lambda source: ["memory://repo@abc123/data/train.jsonl"])
    sources = [SourceConfig(hub="org/repo", category="web")]
    plan = shards.plan_input_shards(sources)
    assert plan[0].identity.startswith("memory://repo@abc123/data/train.jsonl")  # the commit is its identity
    assert [d["id"] for d in shards.read_shard(sources, plan[0])] == ["r1", "r2"]


def test_changes_between_two_manifests_are_named(tmp_path):
    from hf_longattn.shards import manifest, manifest_changes, plan_input_shards

    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"id": name, "text": "x"}) + "\n")
    before = manifest(plan_input_shards([SourceConfig(path=str(tmp_path))]))
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": "a", "text": "changed"}) + "\n")
    (tmp_path / "b.jsonl").unlink()
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": "c", "text": "new"}) + "\n")
    changes = manifest_changes(before, plan_input_shards([SourceConfig(path=str(tmp_path))]))
    assert changes == [f"added {tmp_path / 'c.jsonl'}", f"removed {tmp_path / 'b.jsonl'}", f"changed {tmp_path / 'a.jsonl'}"]

"""Tests of hf_longattn.sources: jsonl, parquet, text files, folders, the embedded Python corpus, clear errors."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hf_longattn.sources import SourceConfig, iter_documents, pydoc_documents, read_sources, stdlib_documents


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

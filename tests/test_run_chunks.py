"""Tests of hf_longattn.run.chunks: ownership of chunks, markers that are trusted only when everything matches."""

from __future__ import annotations

import shutil

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from hf_longattn.run.chunks import check_chunk, num_chunks, owned_chunks
from hf_longattn.storage import atomic_write_json, sha256_file


def test_owned_chunks_cover_every_chunk_once():
    for total in (0, 1, 5, 17):
        for world in (1, 2, 3, 8):
            owned = [list(owned_chunks(total, world, rank)) for rank in range(world)]
            assert sum(owned, []) == list(range(total))  # contiguous, in rank order, disjoint
            assert max(map(len, owned)) - min(map(len, owned)) <= 1
            reference = datasets.Dataset.from_dict({"j": list(range(total))})
            if total >= world:
                assert owned == [reference.shard(world, rank, contiguous=True)["j"] for rank in range(world)]
    assert num_chunks(9, 4) == 3 and num_chunks(8, 4) == 2


def test_check_chunk_reasons(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b"]}), tmp_path / "chunk-000000.parquet")
    assert check_chunk(tmp_path, 0, 2, "fp") == "no completion marker (a parquet file without marker is not trusted)"
    record = {"rows": 2, "sha256": sha256_file(tmp_path / "chunk-000000.parquet"), "fingerprint": "fp"}
    atomic_write_json(tmp_path / "chunk-000000.done", record)
    assert check_chunk(tmp_path, 0, 2, "fp") is None
    assert check_chunk(tmp_path, 0, 3, "fp") == "marker says 2 rows, expected 3"
    assert check_chunk(tmp_path, 0, 2, "other") == "marker from another configuration"
    (tmp_path / "chunk-000000.parquet").write_bytes(b"x")
    assert "sha256 does not match" in check_chunk(tmp_path, 0, 2, "fp")
    (tmp_path / "chunk-000000.parquet").unlink()
    assert check_chunk(tmp_path, 0, 2, "fp") == "parquet file missing"
    (tmp_path / "chunk-000000.done").write_text("{truncated")
    assert check_chunk(tmp_path, 0, 2, "fp").startswith("unreadable marker")
    assert not list(tmp_path.glob(".*tmp-*"))
    shutil.rmtree(tmp_path)

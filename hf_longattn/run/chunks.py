"""Chunks, the unit of scoring work: the free `score_chunk`, and chunk files with completion markers.

A *chunk* is up to ``chunk_size`` consecutive windows of one windows shard (`hf_longattn.run.records.Chunk`).
`score_chunk` scores one with any scorer and returns an Arrow table; `write_chunk` stores it as
``scores/chunk-NNNNNN.parquet`` and then its ``.done`` marker, both atomically and fenced.
`check_chunk` trusts a chunk only when its marker parses, names this fingerprint and the expected
rows, and the parquet file has the sha256 the marker recorded — so killing a process at any moment
loses at most the chunks in flight. `owned_chunks` is the static assignment of hf_longattn 0.1
(every engine now claims chunks instead), kept for comparison in ``benchmarks/bench_scale.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import __version__
from .. import vocabulary as V
from .layout import chunk_name
from .. import storage
from ..storage import read_json, sha256_file


def num_chunks(num_windows: int, chunk_size: int) -> int:
    """``⌈num_windows / chunk_size⌉``."""
    return -(-int(num_windows) // int(chunk_size))


def owned_chunks(total_chunks: int, world_size: int, rank: int) -> range:
    """The chunk indices process ``rank`` scores: a contiguous block, like ``Dataset.shard(world_size, rank, contiguous=True)``.

    The first ``total_chunks % world_size`` ranks get one chunk more.

    Example:

    >>> [list(owned_chunks(5, 2, rank)) for rank in range(2)]
    [[0, 1, 2], [3, 4]]
    >>> [list(owned_chunks(2, 3, rank)) for rank in range(3)]
    [[0], [1], []]
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    div, mod = divmod(int(total_chunks), int(world_size))
    start = div * rank + min(rank, mod)
    return range(start, start + div + (1 if rank < mod else 0))


def score_chunk(scorer: Any, windows: Any, *, batch_size: int,
                on_batch: Callable[[int], None] | None = None) -> Any:
    """Score a chunk of windows with ``scorer``; any engine can call this.

    Args:
        scorer (`LongAttnScorer` or any registered scorer): called on dict batches with ``id`` and
            ``input_ids``; its ``output_features()`` give the columns.
        windows (`pyarrow.Table`): the chunk's windows, with at least ``id`` and ``input_ids``.
        batch_size (`int`): windows per scorer call.
        on_batch (`callable`, *optional*): called with the number of windows of each finished batch.

    Returns:
        `pyarrow.Table`: ``id`` then the scorer's columns, one row per window, in order.

    Example:

    >>> import pyarrow as pa
    >>> table = score_chunk(scorer, pa.table({"id": ["a/w00000"], "input_ids": [ids]}), batch_size=4)  # doctest: +SKIP
    """
    import pyarrow as pa

    features = scorer.output_features()
    columns: dict[str, list] = {V.ID: [], **{name: [] for name in features}}
    for low in range(0, windows.num_rows, batch_size):
        batch = windows.slice(low, batch_size).select([V.ID, V.INPUT_IDS]).to_pydict()
        scores = scorer(batch)
        columns[V.ID].extend(batch[V.ID])
        for name in features:
            columns[name].extend(scores[name])
        if on_batch is not None:
            on_batch(len(batch[V.ID]))
    schema = pa.schema([pa.field(V.ID, pa.string()), *features.arrow_schema])
    return pa.table(columns, schema=schema)


def write_chunk(scores_dir: Path, index: int, table: Any, record: Mapping[str, Any],
                before_commit: Callable[[], None] | None = None) -> None:
    """Write ``chunk-NNNNNN.parquet`` then its ``.done`` marker (``record`` + rows, ids, sha256), both atomically.

    An old marker is removed first, so that it never outlives the parquet file it describes.
    ``before_commit`` (a fencing check: this process still owns the chunk) runs before each of the
    three changes, so an owner that lost the chunk changes nothing.
    """
    import pyarrow.parquet as pq

    started = time.perf_counter()
    parquet = scores_dir / f"{chunk_name(index)}.parquet"
    marker = scores_dir / f"{chunk_name(index)}.done"
    if before_commit is not None:
        before_commit()
    marker.unlink(missing_ok=True)
    storage.atomic_write(parquet, lambda tmp: pq.write_table(table, tmp), before_commit=before_commit)
    ids = table.column(V.ID)
    storage.atomic_write_json(marker, {
        "chunk": index,
        "rows": table.num_rows,
        "first_id": ids[0].as_py() if table.num_rows else None,
        "last_id": ids[-1].as_py() if table.num_rows else None,
        "sha256": sha256_file(parquet),
        "hf_longattn_version": __version__,
        **record,
        "seconds": round(float(record.get("seconds", 0.0)) + time.perf_counter() - started, 3),
    }, before_commit=before_commit)


def check_chunk(scores_dir: Path, index: int, expected_rows: int, fingerprint: str, digest: str | None = None) -> str | None:
    """`None` if chunk ``index`` is complete and trustworthy, else the reason it must be (re)done.

    Valid means: the marker parses, names this fingerprint, ``expected_rows`` rows and (when
    given) the ``digest`` of the windows the chunk must hold, and the parquet file exists with the
    sha256 the marker recorded.
    """
    marker = scores_dir / f"{chunk_name(index)}.done"
    parquet = scores_dir / f"{chunk_name(index)}.parquet"
    if not marker.is_file():
        return "no completion marker" + (" (a parquet file without marker is not trusted)" if parquet.exists() else "")
    try:
        record = read_json(marker)
    except Exception as error:  # noqa: BLE001 - any unreadable marker means: redo the chunk
        return f"unreadable marker ({error})"
    return check_chunk_record(scores_dir, index, record, expected_rows, fingerprint, digest)


def unfinished_chunks(scores_dir: Path, plan: Any, fingerprint: str) -> list[int]:
    """Indices of the chunks of ``plan`` (a `ChunkPlan`) that `check_chunk` does not find complete, in order."""
    return [index for index, chunk in enumerate(plan.chunks)
            if check_chunk(scores_dir, index, chunk.rows, fingerprint, chunk.digest) is not None]


def check_chunk_record(scores_dir: Path, index: int, record: Any, expected_rows: int, fingerprint: str,
                       digest: str | None = None) -> str | None:
    """:func:`check_chunk` on a marker already read: ``record`` is its parsed content."""
    parquet = scores_dir / f"{chunk_name(index)}.parquet"
    if not isinstance(record, dict):
        return "unreadable marker"
    if record.get("fingerprint") != fingerprint:
        return "marker from another configuration"
    if record.get("rows") != expected_rows:
        return f"marker says {record.get('rows')} rows, expected {expected_rows}"
    if digest is not None and record.get("digest") != digest:
        return "the chunk holds other windows than the plan says (the windows changed)"
    if not parquet.is_file():
        return "parquet file missing"
    if sha256_file(parquet) != record.get("sha256"):
        return "parquet sha256 does not match its marker (corrupt or replaced)"
    return None

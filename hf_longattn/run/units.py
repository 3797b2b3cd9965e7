"""Units of work any engine can call (one process, accelerate, datatrove, Ray): window one input shard, read and check windows.

Each function is deterministic and keeps no global state: its output depends only on its
arguments, so any task on any machine computes the same thing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import vocabulary as V
from ..errors import LongAttnError

CARRIED = {V.CATEGORY: "string", V.SOURCE: "string", V.LICENSE: "string", V.DOC_NUM_TOKENS: "int64"}
"""Document columns every window carries."""
BYTE_SLACK = 16
"""A document of ``b`` UTF-8 bytes is tokenised only if ``4·b + 16 ≥ W``: a byte-level BPE gives at most one token
per byte, and the factor covers tokenizers whose normaliser expands text. Shorter ones are counted as too short."""


def windows_schema() -> Any:
    """Arrow schema of a windows shard: the window columns (no text), then :data:`CARRIED`."""
    from datasets import Value

    return V.window_features({name: Value(kind) for name, kind in CARRIED.items()}).arrow_schema


def _zero_counts() -> dict[str, int]:
    return {"documents": 0, "documents_too_short": 0, "tokens_documents": 0, "windows": 0}


def _batches(documents: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for document in documents:
        batch.append(document)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def window_documents(documents: Iterable[dict[str, Any]], tokenizer: Any, *, window_size: int, faithful: bool = False,
                     batch_documents: int = 16) -> Iterator[tuple[Any, dict[str, dict[str, int]]]]:
    """Documents → Algorithm 1 windows (token ids, no text), as Arrow tables, batch by batch, with counts.

    Yields ``(table, counts)`` per batch of documents: ``table`` has :func:`windows_schema`,
    ``counts`` is category → ``documents``, ``documents_too_short``, ``tokens_documents``,
    ``windows`` for that batch. Memory stays flat: one batch at a time.

    Args:
        documents (iterable of `dict`): rows with ``id``, ``category``, ``text`` (or ``input_ids``),
            ``source`` and ``license``.
        tokenizer: tokenises ``text`` (`hf_longattn.tokenization.document_token_ids`).
        window_size (`int`): W.
        faithful (`bool`, defaults to `False`): see `hf_longattn.windows.window_spans`.
        batch_documents (`int`, defaults to 16): documents tokenised together.
    """
    import pyarrow as pa

    from ..tokenization import document_token_ids
    from ..windows import SlidingWindows, num_windows

    windowing = SlidingWindows(None, window_size, faithful=faithful, decode=False)
    schema = windows_schema()
    for batch in _batches(documents, batch_documents):
        counts: dict[str, dict[str, int]] = {}
        long_enough = []
        for document in batch:
            category = counts.setdefault(document[V.CATEGORY], _zero_counts())
            category["documents"] += 1
            if document.get(V.INPUT_IDS) is None and 4 * len(document[V.TEXT].encode("utf-8", "surrogatepass")) + BYTE_SLACK < window_size:
                category["documents_too_short"] += 1  # cannot reach W tokens: not tokenised
            else:
                long_enough.append(document)
        if not long_enough:
            yield schema.empty_table(), counts
            continue
        columns = {name: [d.get(name) for d in long_enough] for name in (V.ID, V.TEXT, V.INPUT_IDS, *CARRIED)}
        token_ids = document_token_ids(tokenizer, columns, V.TEXT)
        lengths = [len(ids) for ids in token_ids]
        too_short = (num_windows(lengths, window_size, faithful) == 0).tolist()  # no window at all
        for document, length, short in zip(long_enough, lengths, too_short):
            category = counts[document[V.CATEGORY]]
            category["tokens_documents"] += length
            category["documents_too_short"] += short
        columns.update({V.INPUT_IDS: token_ids, V.DOC_NUM_TOKENS: lengths})
        del columns[V.TEXT]
        windows = windowing(columns)
        for category in windows[V.CATEGORY]:
            counts[category]["windows"] += 1
        yield pa.table(windows, schema=schema), counts


def window_shard(documents: Iterable[dict[str, Any]], tokenizer: Any, path: str | Path, *, window_size: int,
                 faithful: bool = False, row_group_rows: int = 64) -> dict[str, Any]:
    """Window the documents of one input shard into one parquet file, atomically; return its record.

    Row groups of ``row_group_rows`` windows let a chunk be read without reading the whole shard.

    Returns:
        `dict`: ``rows``, ``sha256`` of the file, ``categories`` (counts per category, see
        :func:`window_documents`) and ``seconds``.

    Example:

    >>> record = window_shard(read_shard(sources, shard), tokenizer, "windows/shard-x.parquet", window_size=8192)  # doctest: +SKIP
    """
    import pyarrow.parquet as pq

    from ..storage import atomic_write, sha256_file

    started = time.perf_counter()
    totals: dict[str, dict[str, int]] = {}
    rows = 0

    def write(temporary: Path) -> None:
        nonlocal rows
        with pq.ParquetWriter(temporary, windows_schema()) as writer:
            pending = []
            for table, counts in window_documents(documents, tokenizer, window_size=window_size, faithful=faithful):
                for category, values in counts.items():
                    total = totals.setdefault(category, _zero_counts())
                    for key, value in values.items():
                        total[key] += int(value)
                pending.append(table)
                if sum(t.num_rows for t in pending) >= row_group_rows:
                    rows += _flush(writer, pending, row_group_rows)
            rows += _flush(writer, pending, row_group_rows, final=True)

    atomic_write(path, write)
    return {"rows": rows, "sha256": sha256_file(path), "categories": dict(sorted(totals.items())),
            "seconds": round(time.perf_counter() - started, 3)}


def _flush(writer: Any, pending: list, row_group_rows: int, final: bool = False) -> int:
    """Write whole row groups of ``pending`` tables (all of them if ``final``); keep the rest pending."""
    import pyarrow as pa

    table = pa.concat_tables(pending) if pending else None
    pending.clear()
    if table is None or table.num_rows == 0:
        return 0
    whole = table.num_rows if final else table.num_rows - table.num_rows % row_group_rows
    if whole:
        writer.write_table(table.slice(0, whole), row_group_size=row_group_rows)
    if whole < table.num_rows:
        pending.append(table.slice(whole))
    return whole


def read_rows(path: str | Path, start: int, stop: int, columns: Sequence[str] | None = None) -> Any:
    """Rows ``[start, stop)`` of a parquet file, reading only the row groups that hold them.

    A damaged file raises a `LongAttnError` naming it (delete it and relaunch: it is rebuilt).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        groups, first, offset = [], None, 0
        for index in range(parquet.num_row_groups):
            size = parquet.metadata.row_group(index).num_rows
            if offset < stop and offset + size > start:
                groups.append(index)
                first = offset if first is None else first
            offset += size
        if not groups:
            return parquet.schema_arrow.empty_table() if columns is None else parquet.schema_arrow.empty_table().select(columns)
        table = parquet.read_row_groups(groups, columns=list(columns) if columns else None)
    except (OSError, pa.ArrowException) as error:
        raise LongAttnError(f"{path} is unreadable ({' '.join(str(error).split())[:200]}): delete it and relaunch; "
                            "it is rebuilt") from error
    return table.slice(start - first, stop - start)


def check_window_hashes(table: Any, where: str, first_row: int = 0) -> None:
    """Recompute every window's hash from its token ids; a mismatch (corrupt or edited file) raises, naming the row."""
    from ..windows import window_hash

    hashes = table.column(V.WINDOW_HASH).to_pylist()
    for offset, ids in enumerate(table.column(V.INPUT_IDS).to_numpy(zero_copy_only=False)):
        if window_hash(ids) != hashes[offset]:
            raise LongAttnError(
                f"{where}, row {first_row + offset} (window {table.column(V.ID)[offset].as_py()}): its token ids do not "
                "match their recorded hash, so the file is corrupt or was edited. Delete it and relaunch: it is rebuilt."
            )


def digest(ids: Sequence[str], categories: Sequence[str], hashes: Sequence[str]) -> str:
    """Identity of a list of windows (ids, categories and content hashes), for chunk markers."""
    h = hashlib.blake2b(digest_size=16)
    for window_id, category, window in zip(ids, categories, hashes):
        h.update(f"{window_id}\x1f{category}\x1f{window}\x1e".encode("utf-8", "surrogatepass"))
    return h.hexdigest()

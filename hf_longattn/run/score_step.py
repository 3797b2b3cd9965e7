"""Step 3, score: every task claims the next chunk without a valid marker and scores it; the merge checks them all.

A chunk (`hf_longattn.run.records.Chunk`) is trusted only for the very windows it scored: its
marker records the digest of its windows and the fingerprint, and its parquet file's sha256. The
windows are checked against their hashes before scoring; scores of windows whose content did not
change since an earlier plan are copied from ``scores/reuse.parquet``. A chunk is committed only by
its current owner (its claim and the launch's run lock).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .. import vocabulary as V
from ..errors import LongAttnError
from .chunks import check_chunk, score_chunk, unfinished_chunks, write_chunk
from .context import Run
from .layout import chunk_name
from .lock import claimed
from .records import ChunkPlan
from .windows_step import load_capped_windows, within_cap

logger = logging.getLogger(__name__)


def read_plan(run: Any) -> ChunkPlan:
    """``scores/plan.json``; a missing plan says to run the plan step."""
    if not run.folder.plan.is_file():
        raise LongAttnError(f"No chunk plan in {run.folder.scores}: run the `score` step (it plans the chunks first)")
    return ChunkPlan.read(run.folder.plan)


def pending_chunks(run: Any, plan: ChunkPlan | None = None) -> list[int]:
    """The chunks of the plan without a valid marker, in order."""
    return unfinished_chunks(run.folder.scores, plan or read_plan(run), run.fingerprint["fingerprint"])


def score_task(run: Run) -> dict[str, int]:
    """One task of the score step: for each scorer of the run in turn, claim and score every chunk without a valid marker.

    Returns:
        `dict[str, int]`: ``chunks_scored`` and ``windows_scored`` by this task (``windows_reused``
        of them copied from an earlier plan), and ``chunks_pending`` when it started, over all scorers.
    """
    totals: dict[str, int] = {}
    for view in run.scorer_runs():
        for key, value in _score_task(view, len(run.config.scorer_names()) > 1).items():
            totals[key] = totals.get(key, 0) + value
    return totals


def _score_task(run: Any, named: bool) -> dict[str, int]:
    """:func:`score_task` for one scorer (``run``: the run or a `hf_longattn.run.context.ScorerRun`)."""
    from tqdm.auto import tqdm

    from ..storage import remove_stale_temporaries

    executor, plan = run.executor, read_plan(run)
    fingerprint = run.fingerprint["fingerprint"]
    remove_stale_temporaries(run.folder.scores)
    todo = pending_chunks(run, plan)
    for index in todo:
        if run.folder.chunk_parquet(index).exists() or run.folder.chunk_marker(index).exists():
            reason = check_chunk(run.folder.scores, index, plan.chunks[index].rows, fingerprint, plan.chunks[index].digest)
            logger.warning("rank %d: redoing %s: %s", executor.rank, chunk_name(index), reason)
    print(f"[score{' ' + run.folder.scorer if named else ''}] rank {executor.rank}/{executor.world_size}: "
          f"{len(plan.chunks) - len(todo)} of {len(plan.chunks)} "
          f"chunks done, {len(todo)} to score (chunk_size={run.config.chunk_size})", flush=True)
    counts = {"chunks_pending": len(todo), "chunks_scored": 0, "windows_scored": 0, "windows_reused": 0}
    reuse = reuse_index(run) if todo else {}

    def done(index: int) -> bool:
        chunk = plan.chunks[index]
        return check_chunk(run.folder.scores, index, chunk.rows, fingerprint, chunk.digest) is None

    with tqdm(total=sum(plan.chunks[i].rows for i in todo),
              desc=f"Scoring windows{' with ' + run.folder.scorer if named else ''} (rank {executor.rank})",
              unit="window", position=executor.local_rank, disable=not run.progress) as bar:
        for index, claim in claimed(todo, run.folder.chunk_claim, run.launch, executor.rank, executor.world_size, done):
            try:
                reused = score_one_chunk(run, index, plan.chunks[index], reuse, bar.update,
                                         before_commit=lambda: (claim.check(), run.fence()))
            finally:
                claim.release()
            counts["chunks_scored"] += 1
            counts["windows_scored"] += plan.chunks[index].rows
            counts["windows_reused"] += reused
    return counts


def reuse_index(run: Any) -> dict[str, Any]:
    """``window_hash`` → its reusable score row (from ``reuse.parquet``), or empty."""
    import pyarrow.parquet as pq

    if not run.folder.reuse.is_file():
        return {}
    table = pq.read_table(run.folder.reuse)
    return {"table": table, "rows": {h: i for i, h in enumerate(table.column(V.WINDOW_HASH).to_pylist())}}


def chunk_windows(run: Any, chunk: Any) -> Any:
    """The windows of one chunk (rows of its shard range inside the cap), their token ids checked against their hashes."""
    from .units import check_window_hashes, read_rows

    path = run.folder.shard_parquet(chunk.shard)
    table = within_cap(read_rows(path, chunk.start, chunk.stop), run.windows_stats().cap)
    if table.num_rows != chunk.rows:
        raise LongAttnError(f"{path} holds {table.num_rows} windows where the plan expects {chunk.rows}: the windows "
                            f"changed under the plan. Run `hf-longattn score` again: it plans the chunks anew.")
    check_window_hashes(table, str(path), chunk.start)
    return table


def score_one_chunk(run: Any, index: int, chunk: Any, reuse: dict[str, Any], on_batch: Any,
                    before_commit: Any = None) -> int:
    """Score chunk ``index`` of the plan (copying reusable rows), write its parquet and marker; the windows reused."""
    import pyarrow as pa

    started = time.perf_counter()
    windows = chunk_windows(run, chunk)
    hashes = windows.column(V.WINDOW_HASH).to_pylist()
    known = [reuse["rows"].get(h) for h in hashes] if reuse else [None] * len(hashes)
    missing = [i for i, row in enumerate(known) if row is None]
    scored = score_chunk(run.scorer, windows.take(pa.array(missing, pa.int64())), batch_size=run.config.batch_size,
                         on_batch=on_batch) if missing else None
    if len(missing) < len(hashes):
        on_batch(len(hashes) - len(missing))
    table = _assemble(windows, scored, missing, known, reuse, run.scorer.output_features())
    write_chunk(run.folder.scores, index, table, {
        "shard": chunk.shard, "start": chunk.start, "stop": chunk.stop, "digest": chunk.digest,
        "fingerprint": run.fingerprint["fingerprint"], "rank": run.executor.rank,
        "world_size": run.executor.world_size, "reused": len(hashes) - len(missing),
        "seconds": time.perf_counter() - started,
    }, before_commit=before_commit or run.fence)
    return len(hashes) - len(missing)


def _assemble(windows: Any, scored: Any, missing: list[int], known: list, reuse: dict[str, Any], features: Any) -> Any:
    """The chunk's rows in order: ``id``, ``category``, ``window_hash``, then the score columns (scored now or reused)."""
    import pyarrow as pa

    names = list(features)
    parts = [scored.select(names)] if scored is not None else []
    reused = [row for row in known if row is not None]
    if reused:
        parts.append(reuse["table"].select(names).take(pa.array(reused, pa.int64())))
    # Position in `parts` stacked: fresh rows first (in `missing` order), then the reused ones (in chunk order).
    fresh, copied, order = iter(range(len(missing))), iter(range(len(missing), len(known))), []
    for row in known:
        order.append(next(fresh) if row is None else next(copied))
    scores = pa.concat_tables(parts).take(pa.array(order, pa.int64()))
    schema = pa.schema([pa.field(V.ID, pa.string()), pa.field(V.CATEGORY, pa.string()),
                        pa.field(V.WINDOW_HASH, pa.string()), *features.arrow_schema])
    columns = {name: scores.column(name) for name in names}
    return pa.table({V.ID: windows.column(V.ID), V.CATEGORY: windows.column(V.CATEGORY),
                     V.WINDOW_HASH: windows.column(V.WINDOW_HASH), **columns}, schema=schema)


def merged_scores(run: Run) -> Any:
    """Every scorer's chunks concatenated in plan order, each checked against the windows it must hold, side by side.

    Returns:
        `pyarrow.Table`: ``id``, ``category`` and the score columns of every scorer of the run
        (``config.scorer``'s first), one row per window inside the cap.
    """
    merged = None
    for view in run.scorer_runs():
        table = _merged_scores(view)
        if merged is None:
            merged = table
        else:
            for name in table.column_names[2:]:
                merged = merged.append_column(table.schema.field(name), table.column(name))
    return merged


def _merged_scores(run: Any) -> Any:
    """One scorer's chunks concatenated (:func:`merged_scores`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    stats, plan = run.windows_stats(), read_plan(run)
    if plan.windows_digest != stats.digest:
        raise LongAttnError(f"{run.folder.plan} was made for other windows: run the `score` step again")
    fingerprint = run.fingerprint["fingerprint"]
    problems, tables = [], []
    for index, chunk in enumerate(tqdm(plan.chunks, desc="Merging score chunks", unit="chunk", disable=not run.progress)):
        reason = check_chunk(run.folder.scores, index, chunk.rows, fingerprint, chunk.digest)
        if reason is not None:
            problems.append(f"{chunk_name(index)} ({reason})")
        else:
            tables.append(pq.read_table(run.folder.chunk_parquet(index)).drop_columns([V.WINDOW_HASH]))
    if problems:
        raise LongAttnError(f"{len(problems)} of {len(plan.chunks)} score chunk(s) are missing or invalid, e.g. "
                            f"{problems[:3]}: run the `score` step (again) to finish them")
    merged = pa.concat_tables(tables)
    reference = load_capped_windows(run, [V.ID, V.CATEGORY])
    if not (merged.column(V.ID).equals(reference.column(V.ID)) and merged.column(V.CATEGORY).equals(reference.column(V.CATEGORY))):
        raise LongAttnError(f"the score chunks do not hold the windows of {run.folder.windows}: delete {run.folder.scores} "
                            "and run the `score` step again")
    return merged

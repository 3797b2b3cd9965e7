"""Step 2, score: the main process plans the chunks; every process claims and scores the next free one; the merge checks them all.

A *chunk* is up to ``chunk_size`` consecutive windows of one windows shard. ``scores/plan.json``
lists them with a digest of their windows' ids and content hashes; a chunk's marker records that
digest, so a chunk is trusted only for the very windows it scored. When the windows change (a
source was edited, added or removed), the scores of every window whose content is unchanged are
kept in ``scores/reuse.parquet`` (keyed by the window's hash) and copied, not recomputed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .. import vocabulary as V
from ..errors import LongAttnError
from .chunks import check_chunk, check_chunk_record, score_chunk, write_chunk
from .context import Run
from .layout import chunk_name
from .lock import claimed, release_claim
from .storage import atomic_write, atomic_write_json, read_json, remove_stale_temporaries
from .windows_step import build_windows, keep_within_cap, kept_mask, load_kept_windows, prepare

logger = logging.getLogger(__name__)

REUSE_FILE = "reuse.parquet"
PLAN_FILE = "plan.json"


def score(run: Run) -> None:
    """Build or reuse the windows, plan the chunks, score every chunk not done yet (all processes), wait for all."""
    prepare(run, sources=True)
    build_windows(run)
    run.executor.run_on_main(lambda: plan_chunks(run))
    run.timed("score", lambda: score_claimed_chunks(run))
    run.executor.barrier()


def plan_chunks(run: Run) -> dict[str, Any]:
    """Main process: write ``scores/plan.json``; when the windows changed, keep reusable scores and drop stale chunks."""
    import pyarrow.parquet as pq

    from .units import digest

    stats, chunk_size = run.windows_stats(), run.config.chunk_size
    chunks = []
    for shard in stats["shards"]:
        table = pq.read_table(run.folder.windows / f"{shard['name']}.parquet", columns=[V.ID, V.CATEGORY, V.WINDOW_HASH])
        ids, hashes = table.column(V.ID).to_pylist(), table.column(V.WINDOW_HASH).to_pylist()
        categories = table.column(V.CATEGORY).to_pylist()
        rows = kept_mask(ids, categories, stats["cap"]).nonzero()[0]
        for low in range(0, len(rows), chunk_size):
            part = rows[low:low + chunk_size]
            chunks.append({"shard": shard["name"], "start": int(part[0]), "stop": int(part[-1]) + 1, "rows": len(part),
                           "digest": digest(*([column[r] for r in part] for column in (ids, categories, hashes)))})
    plan = {"windows_digest": stats["digest"], "chunk_size": chunk_size, "fingerprint": run.fingerprint["fingerprint"],
            "chunks": chunks}
    scores = run.folder.scores
    scores.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(scores)
    old = read_json(scores / PLAN_FILE, what="the chunk plan", remedy="delete it; it is rewritten") \
        if (scores / PLAN_FILE).is_file() else None
    if old != plan:
        _keep_reusable_scores(run, plan)
        atomic_write_json(scores / PLAN_FILE, plan)
    return plan


def _keep_reusable_scores(run: Run, plan: dict[str, Any]) -> None:
    """Gather the rows of every valid old chunk into ``reuse.parquet``; remove the chunks the new plan does not match."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scores, fingerprint = run.folder.scores, run.fingerprint["fingerprint"]
    tables = []
    if (scores / REUSE_FILE).is_file():
        tables.append(pq.read_table(scores / REUSE_FILE))
    stale = []
    for marker in sorted(scores.glob("chunk-*.done")):
        index = int(marker.stem.split("-")[1])
        expected = plan["chunks"][index] if index < len(plan["chunks"]) else None
        record = _marker(marker)
        if check_chunk_record(scores, index, record, record.get("rows"), fingerprint) is None:
            table = pq.read_table(run.folder.chunk_parquet(index))
            if V.WINDOW_HASH in table.column_names:
                tables.append(table)
        if expected is None or record.get("digest") != expected["digest"]:
            stale.append(index)
    if tables:
        reuse = pa.concat_tables(tables, promote_options="default")
        last = {h: i for i, h in enumerate(reuse.column(V.WINDOW_HASH).to_pylist())}  # the row `reuse_index` uses
        if len(last) < reuse.num_rows:
            reuse = reuse.take(pa.array(sorted(last.values()), pa.int64()))
        atomic_write(scores / REUSE_FILE, lambda tmp: pq.write_table(reuse, tmp))
    for index in stale:
        run.folder.chunk_marker(index).unlink(missing_ok=True)
        run.folder.chunk_parquet(index).unlink(missing_ok=True)
    if stale:
        run.print(f"[score] {len(stale)} chunk(s) hold other windows now: redoing them, copying the scores of "
                  "windows whose content did not change")


def _marker(path: Any) -> dict[str, Any]:
    try:
        record = read_json(path)
    except LongAttnError:
        return {}
    return record if isinstance(record, dict) else {}


def score_claimed_chunks(run: Run) -> None:
    """Claim and score, one after the other, every chunk without a valid marker (work spreads over all processes)."""
    from tqdm.auto import tqdm

    executor, scores = run.executor, run.folder.scores
    plan = read_json(scores / PLAN_FILE, what="the chunk plan", remedy="delete it and relaunch")
    fingerprint = run.fingerprint["fingerprint"]
    todo = []
    for index, chunk in enumerate(plan["chunks"]):
        reason = check_chunk(scores, index, chunk["rows"], fingerprint, chunk["digest"])
        if reason is not None:
            todo.append(index)
            if run.folder.chunk_parquet(index).exists() or run.folder.chunk_marker(index).exists():
                logger.warning("rank %d: redoing %s: %s", executor.rank, chunk_name(index), reason)
    print(f"[score] rank {executor.rank}/{executor.world_size}: {len(plan['chunks']) - len(todo)} of "
          f"{len(plan['chunks'])} chunks done, {len(todo)} to score (chunk_size={run.config.chunk_size})", flush=True)
    reuse = reuse_index(run) if todo else {}
    with tqdm(total=sum(plan["chunks"][i]["rows"] for i in todo), desc=f"Scoring windows (rank {executor.rank})",
              unit="window", position=executor.local_rank, disable=not run.progress) as bar:
        def done(index: int) -> bool:
            chunk = plan["chunks"][index]
            return check_chunk(scores, index, chunk["rows"], fingerprint, chunk["digest"]) is None

        for index in claimed(todo, lambda i: scores / f"{chunk_name(i)}.claim", run.launch, executor.rank,
                             executor.world_size, done):
            score_one_chunk(run, index, plan["chunks"][index], reuse, bar.update)
            release_claim(scores / f"{chunk_name(index)}.claim")


def reuse_index(run: Run) -> dict[str, Any]:
    """``window_hash`` → its reusable score row (from ``reuse.parquet``), or empty."""
    import pyarrow.parquet as pq

    path = run.folder.scores / REUSE_FILE
    if not path.is_file():
        return {}
    table = pq.read_table(path)
    return {"table": table, "rows": {h: i for i, h in enumerate(table.column(V.WINDOW_HASH).to_pylist())}}


def chunk_windows(run: Run, chunk: dict[str, Any]) -> Any:
    """The windows of one chunk (kept rows of its shard range), their token ids checked against their hashes."""
    from .units import check_window_hashes, read_rows

    path = run.folder.windows / f"{chunk['shard']}.parquet"
    table = keep_within_cap(read_rows(path, chunk["start"], chunk["stop"]), run.windows_stats()["cap"])
    if table.num_rows != chunk["rows"]:
        raise LongAttnError(f"{path} holds {table.num_rows} windows where the plan expects {chunk['rows']}: the windows "
                            f"changed under the plan. Delete {run.folder.scores / PLAN_FILE} and relaunch.")
    check_window_hashes(table, str(path), chunk["start"])
    return table


def score_one_chunk(run: Run, index: int, chunk: dict[str, Any], reuse: dict[str, Any], on_batch: Any) -> None:
    """Score chunk ``index`` of the plan (copying reusable rows) and write its parquet and marker atomically."""
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
        "shard": chunk["shard"], "start": chunk["start"], "stop": chunk["stop"], "digest": chunk["digest"],
        "fingerprint": run.fingerprint["fingerprint"], "rank": run.executor.rank,
        "world_size": run.executor.world_size, "reused": len(hashes) - len(missing),
        "seconds": time.perf_counter() - started,
    })


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
    """All chunks concatenated in plan order, each checked against the windows it must hold.

    Returns:
        `pyarrow.Table`: ``id``, ``category`` and the score columns, one row per kept window.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    scores, stats = run.folder.scores, run.windows_stats()
    if not (scores / PLAN_FILE).is_file():
        raise LongAttnError(f"No scores in {scores}: run the `score` step first")
    plan = read_json(scores / PLAN_FILE, what="the chunk plan", remedy="delete it and run the `score` step")
    if plan.get("windows_digest") != stats["digest"]:
        raise LongAttnError(f"{scores / PLAN_FILE} was made for other windows: run the `score` step again")
    fingerprint = run.fingerprint["fingerprint"]
    problems, tables = [], []
    for index, chunk in enumerate(tqdm(plan["chunks"], desc="Merging score chunks", unit="chunk", disable=not run.progress)):
        reason = check_chunk(scores, index, chunk["rows"], fingerprint, chunk["digest"])
        if reason is not None:
            problems.append(f"{chunk_name(index)} ({reason})")
        else:
            tables.append(pq.read_table(run.folder.chunk_parquet(index)).drop_columns([V.WINDOW_HASH]))
    if problems:
        raise LongAttnError(f"{len(problems)} of {len(plan['chunks'])} score chunk(s) are missing or invalid, e.g. "
                            f"{problems[:3]}: run the `score` step (again) to finish them")
    merged = pa.concat_tables(tables)
    reference = load_kept_windows(run, [V.ID, V.CATEGORY])
    if not (merged.column(V.ID).equals(reference.column(V.ID)) and merged.column(V.CATEGORY).equals(reference.column(V.CATEGORY))):
        raise LongAttnError(f"the score chunks do not hold the windows of {run.folder.windows}: delete {scores} and "
                            "run the `score` step again")
    return merged

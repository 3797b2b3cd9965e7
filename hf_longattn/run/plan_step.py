"""Step 2, plan (one task): count the windows and apply the per-category cap, then cut them into chunks for scoring.

``windows/windows_stats.json`` (`hf_longattn.run.records.WindowsStats`) lists the windows shards
in input order, the cap (the last window each capped category scores) and the counts per
category; its ``digest`` is the key of the windows. ``scores/plan.json``
(`~hf_longattn.run.records.ChunkPlan`) cuts the windows inside the cap into chunks of
``chunk_size`` windows of one shard, each with a digest of its windows' ids, categories and
content hashes. When the windows changed, the scores of every window whose content did not change
are kept in ``scores/reuse.parquet`` (keyed by the window hash) and chunks the new plan does not
match are removed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import vocabulary as V
from ..errors import LongAttnError
from .chunks import check_chunk_record
from .context import Run
from .graph import input_plan, plan_is_current, stale
from .records import ChunkMarker, ChunkPlan, ShardRecord, WindowsStats
from ..storage import atomic_write, json_sha256, remove_stale_temporaries
from .windows_step import cap_mask, window_key


def plan_task(run: Run) -> dict[str, int]:
    """The plan step (one task): ``windows_stats.json`` and ``scores/plan.json``, each rewritten only when stale."""
    if stale(run, "plan") is None:
        stats, plan = run.windows_stats(), ChunkPlan.read(run.folder.plan)
        run.print(f"[plan] reusing {run.folder.plan}: {stats.total['windows']} windows in {len(plan.chunks)} chunks")
        return {"windows": stats.total["windows"], "chunks": len(plan.chunks)}
    stats = write_stats(run)
    chunks = 0
    for view in run.scorer_runs():  # one plan per scorer (the same chunks), each with its scorer's fingerprint
        plan = ChunkPlan.read(view.folder.plan) if plan_is_current(view, stats) else write_plan(view, stats)
        chunks += len(plan.chunks)
    return {"windows": stats.total["windows"], "chunks": chunks}


def write_stats(run: Run) -> WindowsStats:
    """Gather the shard records, check ids and categories, apply the cap, and write ``windows_stats.json``."""
    from ..publication import split_names
    from ..shards import manifest

    plan, names, identity = input_plan(run)
    missing = [shard.name for shard, name in zip(plan, names) if not run.folder.shard_record(name).is_file()]
    if missing:
        raise LongAttnError(f"{len(missing)} input shard(s) have no windows yet, e.g. {missing[:3]}: run the windows "
                            "step (again) to finish them")
    records = [ShardRecord.read(run.folder.shard_record(name)) for name in names]
    ids, categories, keys = _window_keys(run, names)
    _check_unique(ids)
    try:
        split_names(sorted(set(categories)))
    except ValueError as error:
        raise LongAttnError(f"{error} (categories come from the sources; nothing was scored yet)") from error
    cap, inside = _cap(run.config.max_windows_per_category, categories, keys, ids)
    counts = _category_counts(run, records, categories, inside)
    if not inside.any():
        longest = max((c.get("tokens_documents", 0) for r in records for c in r.categories.values()), default=0)
        raise LongAttnError(
            f"No window: all {sum(c['documents'] for c in counts.values())} document(s) are shorter than window_size="
            f"{run.config.window_size} tokens (all their tokens together: {longest}). Lower window_size or add longer documents.")
    shards, offset = [], 0
    for name, record in zip(names, records):
        shards.append({"name": name, "input": record.input, "rows": record.rows,
                       "windows": int(inside[offset:offset + record.rows].sum()), "sha256": record.sha256})
        offset += record.rows
    totals = {key: sum(c[key] for c in counts.values()) for key in next(iter(counts.values()))}
    stats = WindowsStats(identity=identity, window_size=run.config.window_size, faithful=run.config.faithful,
                         digest=json_sha256([shards, cap]), manifest=manifest(plan), shards=shards, cap=cap,
                         categories=counts, total=totals, max_windows_per_category=run.config.max_windows_per_category)
    stats.write(run.folder.windows_stats, before_commit=run.fence)
    _remove_unlisted_shards(run, names)
    from ..storage import atomic_write_json

    atomic_write_json(run.folder.fingerprint, run.fingerprint, before_commit=run.fence)
    _print_stats(run, stats)
    return stats


def _window_keys(run: Run, names: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Ids, categories and cap keys (64 bits of BLAKE2b of the id) of every window, in plan order."""
    import pyarrow.parquet as pq

    ids: list[str] = []
    categories: list[str] = []
    for name in names:
        table = pq.read_table(run.folder.shard_parquet(name), columns=[V.ID, V.CATEGORY])
        ids += table.column(V.ID).to_pylist()
        categories += table.column(V.CATEGORY).to_pylist()
    keys = np.fromiter((window_key(i) for i in ids), dtype=np.uint64, count=len(ids))
    return ids, np.array(categories, dtype=object), keys


def _check_unique(ids: list[str]) -> None:
    if len(set(ids)) == len(ids):
        return
    seen: set[str] = set()
    duplicate = next(i for i in ids if i in seen or seen.add(i))
    raise LongAttnError(f"Duplicate window id {duplicate!r}: two documents share the id {duplicate.rsplit('/w', 1)[0]!r} "
                        "(ids must be unique across sources: set id_column, or do not list a source twice)")


def _cap(limit: int | None, categories: np.ndarray, keys: np.ndarray, ids: list[str]) -> tuple[dict, np.ndarray]:
    """The per-category cap ``{category: [key, id]}`` (the last window scored) and the mask of windows inside it."""
    inside = np.ones(len(ids), dtype=bool)
    cap: dict[str, list] = {}
    if limit is None:
        return cap, inside
    for category in sorted(set(categories.tolist())):
        rows = np.flatnonzero(categories == category)
        if len(rows) <= limit:
            continue
        order = sorted(rows.tolist(), key=lambda r: (int(keys[r]), ids[r]))
        last = order[limit - 1]
        cap[category] = [int(keys[last]), ids[last]]
        inside[np.array(order[limit:], dtype=np.int64)] = False
    return cap, inside


def _category_counts(run: Run, records: list[ShardRecord], categories: np.ndarray,
                     inside: np.ndarray) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for record in records:
        for category, values in record.categories.items():
            entry = counts.setdefault(category, {"documents": 0, "documents_too_short": 0, "tokens_documents": 0})
            for key in entry:
                entry[key] += values[key]
    for category, entry in counts.items():
        rows = categories == category
        entry["windows"] = int((rows & inside).sum())
        entry["windows_left_out"] = int((rows & ~inside).sum())
        entry["tokens_in"] = entry["windows"] * run.config.window_size
    return dict(sorted(counts.items()))


def _remove_unlisted_shards(run: Run, names: list[str]) -> None:
    listed = set(names)
    for path in run.folder.windows.glob("shard-*"):
        if path.name.split(".")[0] not in listed:
            path.unlink(missing_ok=True)


def _print_stats(run: Run, stats: WindowsStats) -> None:
    from ..counts import format_table

    run.print(format_table(
        ["category", "documents", "too short", "windows", "left out (cap)", "tokens (documents)", "tokens (windows)"],
        [[c, s["documents"], s["documents_too_short"], s["windows"], s["windows_left_out"], s["tokens_documents"],
          s["tokens_in"]] for c, s in [*stats.categories.items(), ("total", stats.total)]],
        title=f"[windows] W = {run.config.window_size} tokens → {run.folder.windows} (tokens (documents) counts the "
              "documents long enough to tokenise; windows of a document overlap, so they can hold more tokens)",
    ))


# -- the chunk plan ---------------------------------------------------------------------------------------


def write_plan(run: Any, stats: WindowsStats) -> ChunkPlan:
    """Write ``scores/plan.json`` for ``stats``; when it changes, keep reusable scores and drop stale chunks."""
    import pyarrow.parquet as pq

    from .units import digest

    chunk_size, chunks = run.config.chunk_size, []
    for shard in stats.shards:
        table = pq.read_table(run.folder.shard_parquet(shard["name"]), columns=[V.ID, V.CATEGORY, V.WINDOW_HASH])
        ids, hashes = table.column(V.ID).to_pylist(), table.column(V.WINDOW_HASH).to_pylist()
        categories = table.column(V.CATEGORY).to_pylist()
        rows = cap_mask(ids, categories, stats.cap).nonzero()[0]
        for low in range(0, len(rows), chunk_size):
            part = rows[low:low + chunk_size]
            chunks.append({"shard": shard["name"], "start": int(part[0]), "stop": int(part[-1]) + 1, "rows": len(part),
                           "digest": digest(*([column[r] for r in part] for column in (ids, categories, hashes)))})
    fingerprint = run.fingerprint["fingerprint"]
    plan = ChunkPlan(windows_digest=stats.digest, chunk_size=chunk_size, fingerprint=fingerprint, chunks=chunks,
                     key=ChunkPlan.key_of(stats.digest, chunk_size, fingerprint))
    run.folder.scores.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run.folder.scores)
    _keep_reusable_scores(run, plan)
    plan.write(run.folder.plan, before_commit=run.fence)
    return plan


def _keep_reusable_scores(run: Any, plan: ChunkPlan) -> None:
    """Gather the rows of every valid old chunk into ``reuse.parquet``; remove the chunks the new plan does not match."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder, fingerprint = run.folder, run.fingerprint["fingerprint"]
    tables = [pq.read_table(folder.reuse)] if folder.reuse.is_file() else []
    stale_chunks = []
    for marker_path in folder.chunk_markers():
        index = int(marker_path.stem.split("-")[1])
        expected = plan.chunks[index] if index < len(plan.chunks) else None
        marker = ChunkMarker.read_if_valid(marker_path)
        record = marker.to_json() if marker is not None else {}
        if marker is not None and check_chunk_record(folder.scores, index, record, marker.rows, fingerprint) is None:
            table = pq.read_table(folder.chunk_parquet(index))
            if V.WINDOW_HASH in table.column_names:
                tables.append(table)
        if expected is None or marker is None or marker.digest != expected.digest:
            stale_chunks.append(index)
    if tables and stale_chunks:
        reuse = pa.concat_tables(tables, promote_options="default")
        last = {h: i for i, h in enumerate(reuse.column(V.WINDOW_HASH).to_pylist())}  # the row `reuse_index` uses
        if len(last) < reuse.num_rows:
            reuse = reuse.take(pa.array(sorted(last.values()), pa.int64()))
        atomic_write(folder.reuse, lambda tmp: pq.write_table(reuse, tmp), before_commit=run.fence)
    for index in stale_chunks:
        folder.chunk_marker(index).unlink(missing_ok=True)
        folder.chunk_parquet(index).unlink(missing_ok=True)
    if stale_chunks:
        run.print(f"[plan] {len(stale_chunks)} chunk(s) hold other windows now: redoing them, copying the scores of "
                  "windows whose content did not change")

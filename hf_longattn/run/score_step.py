"""Step 2, score: every process scores its chunks (skipping those with a valid marker); then the merge checks them all.

Chunk ``j`` covers windows ``[j·chunk_size, (j+1)·chunk_size)``; it is scored by `score_chunk`
and stored by `write_chunk` (see `hf_longattn.run.chunks`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .. import vocabulary as V
from ..errors import LongAttnError
from .chunks import check_chunk, chunk_bounds, num_chunks, owned_chunks, score_chunk, write_chunk
from .context import Run
from .layout import chunk_name
from .windows_step import windows as load_windows

logger = logging.getLogger(__name__)


def score(run: Run) -> None:
    """Build or reuse the windows, score this process's chunks, then wait for every process."""
    windows = load_windows(run)
    run.timed("score", lambda: score_owned_chunks(run, windows))
    run.executor.barrier()


def chunks_to_do(run: Run, owned: range, size: int) -> list[int]:
    """The owned chunks without a valid marker (logging why an existing one is redone); stale temporaries removed."""
    scores_dir, fingerprint = run.folder.scores, run.fingerprint["fingerprint"]
    todo = []
    for index in owned:
        start, end = chunk_bounds(index, run.config.chunk_size, size)
        reason = check_chunk(scores_dir, index, end - start, fingerprint)
        if reason is not None:
            todo.append(index)
            if run.folder.chunk_parquet(index).exists() or run.folder.chunk_marker(index).exists():
                logger.warning("rank %d: redoing %s: %s", run.executor.rank, chunk_name(index), reason)
        for stale in scores_dir.glob(f".{chunk_name(index)}.*.tmp-*"):
            stale.unlink(missing_ok=True)
    return todo


def score_owned_chunks(run: Run, windows: Any) -> None:
    """Score the chunks this process owns (a contiguous block, `owned_chunks`) that are not done yet."""
    from tqdm.auto import tqdm

    executor, size, chunk_size = run.executor, len(windows), run.config.chunk_size
    total = num_chunks(size, chunk_size)
    mine = owned_chunks(total, executor.world_size, executor.rank)
    run.folder.scores.mkdir(parents=True, exist_ok=True)
    todo = chunks_to_do(run, mine, size)
    print(
        f"[score] rank {executor.rank}/{executor.world_size}: chunks {mine.start}–{mine.stop - 1} of {total} "
        f"({len(mine) - len(todo)} done, {len(todo)} to score, chunk_size={chunk_size})"
        if len(mine) else f"[score] rank {executor.rank}/{executor.world_size}: no chunk to score",
        flush=True,
    )
    if not todo:
        return
    n_todo = sum(chunk_bounds(j, chunk_size, size)[1] - chunk_bounds(j, chunk_size, size)[0] for j in todo)
    columns = windows.select_columns([V.ID, V.INPUT_IDS]).with_format("arrow")
    with tqdm(total=n_todo, desc=f"Scoring windows (rank {executor.rank})", unit="window",
              position=executor.local_rank, disable=not run.progress) as bar:
        for index in todo:
            started = time.perf_counter()
            start, end = chunk_bounds(index, chunk_size, size)
            table = score_chunk(run.scorer, columns[start:end], batch_size=run.config.batch_size, on_batch=bar.update)
            write_chunk(run.folder.scores, index, table, {
                "start": start, "end": end, "fingerprint": run.fingerprint["fingerprint"],
                "rank": executor.rank, "world_size": executor.world_size,
                "seconds": time.perf_counter() - started,
            })


def merged_scores(run: Run, windows: Any = None) -> Any:
    """All chunks concatenated in windows order, checked against the windows' ids (every window exactly once).

    Returns:
        `pyarrow.Table`: ``id``, ``category`` and the score columns, one row per window.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import load_from_disk
    from tqdm.auto import tqdm

    if windows is None:
        run.windows_stats()
        windows = load_from_disk(str(run.folder.windows))
    size = len(windows)
    total = num_chunks(size, run.config.chunk_size)
    fingerprint = run.fingerprint["fingerprint"]
    problems, tables = [], []
    for index in tqdm(range(total), desc="Merging score chunks", unit="chunk", disable=not run.progress):
        start, end = chunk_bounds(index, run.config.chunk_size, size)
        reason = check_chunk(run.folder.scores, index, end - start, fingerprint)
        if reason is not None:
            problems.append(f"{chunk_name(index)} ({reason})")
            continue
        tables.append(pq.read_table(run.folder.chunk_parquet(index)))
    if problems:
        raise LongAttnError(
            f"{len(problems)} of {total} score chunk(s) are missing or invalid, e.g. {problems[:3]}: "
            "run the `score` step (again) to finish them"
        )
    scores = pa.concat_tables(tables) if tables else None
    reference = windows.select_columns([V.ID, V.CATEGORY]).with_format("arrow")[:]
    if scores is None or scores.num_rows != size or not scores.column(V.ID).equals(reference.column(V.ID)):
        got = scores.column(V.ID).to_pylist() if scores is not None else []
        expected = reference.column(V.ID).to_pylist()
        first = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))
        raise LongAttnError(
            f"Score chunks do not match the windows ({len(got)} scored rows for {size} windows; first difference "
            f"at row {first}): the windows changed under the scores. Delete {run.folder.scores} and score again."
        )
    return scores.add_column(1, V.CATEGORY, reference.column(V.CATEGORY))

"""The job as stages of independent tasks for other engines (datatrove, Ray): each a function of (config, rank, world size).

Run the stages in this order, each after every task of the one before has finished; a stage
relaunched after a crash redoes only what has no valid completion record:

=========  =================================================  ======================================
stage      each task                                          writes
=========  =================================================  ======================================
windows    windows the input shards ``i ≡ rank (mod world)``  ``windows/shard-*.parquet`` + ``.json``
plan       (one task) counts, cap, chunk plan                 ``windows_stats.json``, ``scores/plan.json``
score      scores the chunks ``j ≡ rank (mod world)``          ``scores/chunk-*.parquet`` + ``.done``
fit        (one task) merges, fits the selector, summarises   ``selection.parquet``, ``selector.json``, ``summary.json``
export     decodes and writes the parts of shards ``i ≡ rank``  ``.hub.building-<tag>/data/*``
finish     (one task) card and plots; swaps in ``hub/``; push  ``hub/``
=========  =================================================  ======================================

The output is the run folder of ``hf-longattn run`` (`hf_longattn.run.layout`), with the same
file names, so runs on different engines can be compared file by file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import vocabulary as V
from ..config import RunConfig
from . import export_step, score_step, select_step, windows_step
from .context import Run
from .executor import TaskExecutor
from .storage import atomic_write_json, read_json

STAGES = ("windows", "plan", "score", "fit", "export", "finish")


def as_run_config(config: RunConfig | Mapping[str, Any] | str | os.PathLike) -> RunConfig:
    """A `RunConfig` from itself, its dict (what travels to other tasks) or a YAML path: ``as_run_config("my.yaml")``.

    Raises a `TypeError` for anything else.
    """
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return RunConfig.from_yaml(config)
    if isinstance(config, Mapping):
        return RunConfig.from_dict(dict(config))
    raise TypeError(f"config must be a RunConfig, a dict or a YAML path, got {type(config).__name__}")


def task_run(config: RunConfig | Mapping[str, Any] | str | os.PathLike, rank: int = 0, world_size: int = 1,
             device: str | None = None, local_rank: int = 0) -> Run:
    """The `Run` of one task: ``config`` (see :func:`as_run_config`), task ``rank`` of ``world_size``.

    Without ``device``, the task scores on ``cuda:<local_rank>`` when there is a GPU, else the CPU.
    """
    return Run(as_run_config(config), TaskExecutor(rank, world_size, device, local_rank), progress=False)


def windows_stage(config: Any, rank: int = 0, world_size: int = 1) -> dict[str, int]:
    """Window this task's input shards (those not done and checked); returns what it did.

    Returns:
        `dict[str, int]`: ``input_shards``, ``input_shards_built`` (the others were valid), and the sums
        over the records of its windows shards of ``documents``, ``documents_too_short``,
        ``tokens_documents`` and ``windows_cut`` (windows before ``max_windows_per_category``).
    """
    run = task_run(config, rank, world_size)
    windows_step.prepare(run, sources=True)
    plan, names, identity = windows_step.windows_plan(run)
    counts = {"input_shards": 0, "input_shards_built": 0}
    for index in range(rank, len(plan), world_size):
        counts["input_shards"] += 1
        if windows_step.shard_is_valid(run, names[index], plan[index], identity):
            record = read_json(run.folder.windows / f"{names[index]}.json")
        else:
            record = windows_step.window_one_shard(run, plan[index], names[index], identity)
            counts["input_shards_built"] += 1
        for category in record["categories"].values():
            for key, value in category.items():
                key = "windows_cut" if key == "windows" else key
                counts[key] = counts.get(key, 0) + value
    return counts


def plan_stage(config: Any) -> dict[str, int]:
    """One task: write the windows statistics and the chunk plan (every windows task must have finished)."""
    run = task_run(config)
    windows_step.prepare(run, sources=True)
    plan, names, identity = windows_step.windows_plan(run)
    recorded = read_json(run.folder.windows_stats) if run.folder.windows_stats.is_file() else {}
    if recorded.get("identity") != identity or [s["name"] for s in recorded.get("shards", [])] != names:
        windows_step.write_stats(run, plan, names, identity)
    chunks = score_step.plan_chunks(run)
    return {"windows": run.windows_stats()["total"]["windows"], "chunks": len(chunks["chunks"])}


def score_stage(config: Any, rank: int = 0, world_size: int = 1, device: str | None = None,
                local_rank: int = 0) -> dict[str, int]:
    """Score this task's chunks (``j ≡ rank``) that have no valid marker; resumable chunk by chunk.

    Returns:
        `dict[str, int]`: ``chunks`` (its own), ``chunks_scored`` (now), ``chunks_skipped`` (valid
        already), ``windows`` (of its chunks), ``windows_scored`` (now), ``scored_ok`` and ``not_ok``
        (statuses of the windows of its chunks).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    run = task_run(config, rank, world_size, device, local_rank)
    plan = read_json(run.folder.scores / score_step.PLAN_FILE, what="the chunk plan", remedy="run the plan stage")
    mine = range(rank, len(plan["chunks"]), world_size)
    todo = [j for j in pending_chunks(run, plan) if j % world_size == rank]
    reuse = score_step.reuse_index(run) if todo else {}
    counts = {"chunks": len(mine), "chunks_scored": len(todo), "chunks_skipped": len(mine) - len(todo),
              "windows": 0, "windows_scored": 0, "scored_ok": 0}
    for index in todo:
        score_step.score_one_chunk(run, index, plan["chunks"][index], reuse, lambda n: None)
        counts["windows_scored"] += plan["chunks"][index]["rows"]
    for index in mine:
        status = pq.read_table(run.folder.chunk_parquet(index), columns=[V.STATUS]).column(V.STATUS)
        counts["windows"] += len(status)
        counts["scored_ok"] += pc.sum(pc.equal(status, V.OK)).as_py() or 0
    counts["not_ok"] = counts["windows"] - counts["scored_ok"]
    return counts


def pending_chunks(run: Run | Any, plan: dict[str, Any] | None = None) -> list[int]:
    """The chunks of the plan without a valid marker (``run``: a `Run`, or a config for a task of its own)."""
    run = run if isinstance(run, Run) else task_run(run)
    plan = plan or read_json(run.folder.scores / score_step.PLAN_FILE, what="the chunk plan", remedy="run the plan stage")
    fingerprint = run.fingerprint["fingerprint"]
    return [j for j, chunk in enumerate(plan["chunks"])
            if score_step.check_chunk(run.folder.scores, j, chunk["rows"], fingerprint, chunk["digest"]) is not None]


def fit_stage(config: Any) -> dict[str, Any]:
    """One task: merge the chunks, fit the selector per category, write the selection and ``summary.json``."""
    return select_step.select(task_run(config))


def export_stage(config: Any, rank: int = 0, world_size: int = 1) -> dict[str, int]:
    """Write the export parts of this task's windows shards (``i ≡ rank``) into the building folder."""
    run = task_run(config, rank, world_size)
    shards = range(rank, len(run.windows_stats()["shards"]), world_size)
    export_step.export_shards(run, shards)
    return {"windows_shards": len(shards)}


def finish_stage(config: Any) -> Path:
    """One task: card and plots, ``hub/`` swapped in, ``summary.json`` rewritten; then the push when configured."""
    run = task_run(config)
    folder = export_step.finish_export_folder(run)
    atomic_write_json(run.folder.summary, select_step.summary(run))
    if run.config.push_to_hub:
        export_step.push(run)
    return folder

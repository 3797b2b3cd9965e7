"""The job's steps as stages of tasks, for any engine: what one task of a stage does, as a function of its run.

Every engine (`hf_longattn.run.driver.LocalEngine` for one process or an accelerate launch,
`hf_longattn.datatrove` for datatrove's local, Slurm and Ray executors, `hf_longattn.ray` for Ray)
only dispatches tasks: it runs :func:`run_task` in as many tasks as it likes for a stage with
``many=True`` — each task claims the next free unit (input shard, chunk, windows shard), so any
number of tasks on any machines share the work and a relaunch does only what is missing — and in
one task for the others. The driver (`hf_longattn.run.driver`) decides which stages run.

=========  ======  ==================================================  ===========================================
stage      tasks   each task                                           writes
=========  ======  ==================================================  ===========================================
probe      one     the scorer self-check (when configured)              ``probe/``
windows    many    claims input shards, windows those not valid        ``windows/shard-*.parquet`` + ``.json``
plan       one     counts, cap, chunk plan                              ``windows_stats.json``, ``scores/plan.json``
score      many    claims chunks without a valid marker, scores them   ``scores/chunk-*.parquet`` + ``.done``
select     one     merges, fits the selector                            ``selection.parquet``, ``selector.json``, ``selection.json``
export     many    claims windows shards, writes their export parts    ``.hub.building-<key>/data/*`` + part records
finish     one     numbers the parts, card and plots, swaps in hub/    ``hub/``, ``summary.json``
push       one     uploads hub/ (when configured)                       the Hub repository, ``push.json``
=========  ======  ==================================================  ===========================================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import RunConfig
from .context import Run
from .executor import TaskExecutor


@dataclass(frozen=True)
class Stage:
    """One stage: its name, whether many tasks share it, and what one task does (returns its counts)."""

    name: str
    many: bool
    task: Callable[[Run], dict[str, int]]


def _task(module: str, function: str) -> Callable[[Run], dict[str, int]]:
    def run(task_run: Run) -> dict[str, int]:
        import importlib

        return getattr(importlib.import_module(f".{module}", __package__), function)(task_run)

    return run


STAGES = {stage.name: stage for stage in (
    Stage("probe", False, _task("probe_step", "probe_task")),
    Stage("windows", True, _task("windows_step", "windows_task")),
    Stage("plan", False, _task("plan_step", "plan_task")),
    Stage("score", True, _task("score_step", "score_task")),
    Stage("select", False, _task("select_step", "select_task")),
    Stage("export", True, _task("export_step", "export_task")),
    Stage("finish", False, _task("finish_step", "finish_task")),
    Stage("push", False, _task("push_step", "push_task")),
)}
"""Every stage, in the order they run."""


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
             device: str | None = None, local_rank: int = 0, launch: str | None = None) -> Run:
    """The `Run` of one task: ``config`` (see :func:`as_run_config`), task ``rank`` of ``world_size`` of ``launch``.

    Without ``device``, the task scores on ``cuda:<local_rank>`` when there is a GPU, else the CPU.
    With ``launch`` (the driver's launch id), every commit checks that the launch still holds the run lock.
    """
    return Run(as_run_config(config), TaskExecutor(rank, world_size, device, local_rank), progress=False, launch=launch)


def run_task(config: Any, stage: str, rank: int = 0, world_size: int = 1, *, launch: str | None = None,
             device: str | None = None, local_rank: int = 0) -> dict[str, int]:
    """Do task ``rank`` of ``world_size`` of ``stage`` (one of :data:`STAGES`); return its counts (for stats).

    Example:

    >>> run_task("my.yaml", "score", rank=3, world_size=8, launch=launch_id)  # doctest: +SKIP
    {'chunks_pending': 12, 'chunks_scored': 2, 'windows_scored': 128, 'windows_reused': 0}
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {list(STAGES)}")
    if not STAGES[stage].many and world_size != 1:
        raise ValueError(f"the {stage} stage is one task: give its engine tasks=1 (got {world_size})")
    return STAGES[stage].task(task_run(config, rank, world_size, device, local_rank, launch))


# -- the functions of hf_longattn 0.2, each one stage's task ------------------------------------------------


def windows_stage(config: Any, rank: int = 0, world_size: int = 1, launch: str | None = None) -> dict[str, int]:
    """Task ``rank`` of the windows stage (:func:`run_task`)."""
    return run_task(config, "windows", rank, world_size, launch=launch)


def plan_stage(config: Any, launch: str | None = None) -> dict[str, int]:
    """The plan stage (:func:`run_task`)."""
    return run_task(config, "plan", launch=launch)


def score_stage(config: Any, rank: int = 0, world_size: int = 1, device: str | None = None, local_rank: int = 0,
                launch: str | None = None) -> dict[str, int]:
    """Task ``rank`` of the score stage (:func:`run_task`)."""
    return run_task(config, "score", rank, world_size, launch=launch, device=device, local_rank=local_rank)


def fit_stage(config: Any, launch: str | None = None) -> dict[str, int]:
    """The select stage, called *fit* in hf_longattn 0.2 (:func:`run_task`)."""
    return run_task(config, "select", launch=launch)


def export_stage(config: Any, rank: int = 0, world_size: int = 1, launch: str | None = None) -> dict[str, int]:
    """Task ``rank`` of the export stage (:func:`run_task`)."""
    return run_task(config, "export", rank, world_size, launch=launch)


def finish_stage(config: Any, launch: str | None = None) -> dict[str, int]:
    """The finish stage (:func:`run_task`); the push is a stage of its own now."""
    return run_task(config, "finish", launch=launch)


def pending_chunks(config: Any) -> list[int]:
    """The chunks of the plan without a valid marker (``config``: a `Run`, or a config for a task of its own)."""
    from .score_step import pending_chunks as pending

    return pending(config if isinstance(config, Run) else task_run(config))

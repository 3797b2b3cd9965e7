"""The one driver of the job: checks → run lock → the stale steps, dispatched to an engine → timings → summary.

Every way of running the job goes through :func:`drive`: ``hf-longattn COMMAND`` (one process, or
every process of ``accelerate launch``/``torchrun``), `LongAttnPipeline` in Python, the datatrove
recipe (local, Slurm and Ray executors) and the Ray recipe. Only the engine differs: it dispatches
the tasks of each stage (`hf_longattn.run.stages`) to its processes, tasks or nodes.

1. *Checks, before anything is written*: a push that cannot succeed (``HF_HUB_OFFLINE=1``), a run
   folder with symlinks, a model that does not exist or cannot take windows of W tokens, sources
   that do not resolve, a folder holding the results of another configuration.
2. *The run lock* (`hf_longattn.run.lock`): held for the whole command by the driver's process;
   every task of the launch checks it still holds it before each commit. An engine whose tasks
   outlive the driver (a Slurm job chain) leaves the lock to them: the last stage releases it.
3. *The plan* (`hf_longattn.run.graph.needed`): the steps from the first one that is not current
   through the command's target; ``export`` and ``push`` publish the last selection made.
4. *The stages*, in order, by the engine; each skips the units that are current.
5. *The summary*: ``summary.json`` and ``timings.json``, and the table the CLI prints.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from ..config import RunConfig
from ..errors import LongAttnError
from . import graph
from .context import Run
from .executor import Executor
from .stages import STAGES
from ..storage import atomic_write_json, read_json


class Engine:
    """Dispatches the tasks of the stages the driver asks for; subclasses say how (processes, datatrove, Ray)."""

    name = "engine"
    detached = False
    """Whether the engine's tasks outlive the driver's process (then they keep and release the run lock)."""

    def run(self, config: RunConfig, *, progress: bool = True) -> Run:
        """The `Run` the driver works with on this process."""
        return Run(config, progress=progress)

    def run_stages(self, run: Run, stages: list[str]) -> dict[str, float] | None:
        """Run ``stages`` in order (every task of one before the next); their wall times, or `None` once submitted."""
        raise NotImplementedError


class LocalEngine(Engine):
    """The processes of one launch (one process, or every process of ``accelerate launch``/``torchrun``).

    Every process runs every task of a many-task stage (claiming units), the main one alone a
    one-task stage; all wait for each other between stages.
    """

    name = "local"

    def __init__(self, executor: Executor | None = None) -> None:
        self.executor = executor

    def run(self, config: RunConfig, *, progress: bool = True) -> Run:
        return Run(config, self.executor, progress=progress)

    def run_stages(self, run: Run, stages: list[str]) -> dict[str, float]:
        timings = {}
        for name in stages:
            stage, started = STAGES[name], time.perf_counter()
            if stage.many:
                stage.task(run)
            else:
                run.executor.run_on_main(lambda stage=stage: stage.task(run))
            run.executor.barrier()
            timings[name] = round(time.perf_counter() - started, 3)
        return timings


def drive(config: RunConfig, target: str, *, engine: Engine | None = None, progress: bool = True) -> dict[str, Any]:
    """Run what ``target`` needs (a command: ``windows``, ``score``, ``select``, ``export``, ``push``, ``run`` or ``probe``).

    Returns the summary (`hf_longattn.run.select_step.summary`) once there is a selection, else ``{}``;
    ``{}`` on the other processes of a launch, and when the engine only submitted the stages.

    Example:

    >>> summary = drive(RunConfig.demo(output_dir="demo-out"), "run")  # doctest: +SKIP
    """
    engine = engine or LocalEngine()
    started, run = time.perf_counter(), engine.run(config, progress=progress)
    check(run, target)
    config, notice = graph.effective_config(config, target, run)
    if notice:
        run.print(notice)
        run = engine.run(config, progress=progress)
    with locked(run, engine):
        steps = run.executor.broadcast(graph.needed(run, target) if run.is_main else None)
        if steps:
            run.print(f"[{target}] to do: " + ", ".join(step for step, _ in steps))
            for step, reason in steps:
                run.print(f"  {step}: {reason}")
        else:
            run.print(f"[{target}] everything is current in {run.folder.root}")
        timings = engine.run_stages(run, [step for step, _ in steps])
        if timings is None or not run.is_main:
            return {}
        return finish(run, timings, time.perf_counter() - started)


def check(run: Run, target: str) -> None:
    """Everything that can fail before any work (see the module docstring): one line, and nothing written."""
    from .windows_step import check_push

    if target in ("run", "push"):
        check_push(run)
        if run.config.push_to_hub and run.is_main:  # the process that pushes needs a token
            from ..publication import check_token

            try:
                check_token(run.config.push_to_hub)
            except LongAttnError as error:
                raise LongAttnError(f"{error} Nothing was done.") from error
    run.folder.check_inside()
    run.check_model()
    if target in ("windows", "score", "run", "probe"):
        graph.input_plan(run)  # a missing path or an unreachable Hub source: one line
    if run.folder.fingerprint.is_file() and run.folder.windows_stats.is_file():
        stored = read_json(run.folder.fingerprint, what="the run's fingerprint",
                           remedy="delete it if the folder holds nothing else of value, or use another output_dir")
        ours = run.fingerprint
        if stored.get("fingerprint") != ours["fingerprint"]:
            old, new = stored.get("config", {}), ours["config"]
            changed = [f"{key}: {old.get(key)!r} → {new.get(key)!r}" for key in dict.fromkeys([*new, *old])
                       if old.get(key) != new.get(key)]
            raise LongAttnError(
                f"{run.folder.root} holds windows/scores of a different configuration "
                f"(changed: {'; '.join(changed) or 'unknown'}). Mixing them would corrupt the result: "
                "use another output_dir (--output-dir), or delete this one to start over.")


@contextlib.contextmanager
def locked(run: Run, engine: Engine) -> Iterator[None]:
    """Hold the run lock for the command (written then: ``config.yaml``); a detached engine's tasks keep it after."""
    with run.locked():
        if run.is_main:
            from ..storage import atomic_write_text

            atomic_write_text(run.folder.config, run.config.to_yaml(), before_commit=run.fence)
        if engine.detached:
            run.detach_lock()
        yield


def finish(run: Run, timings: dict[str, float], seconds: float) -> dict[str, Any]:
    """Main process: the step timings (``timings.json``) and, once there is a selection, ``summary.json``."""
    from .select_step import summary

    run.timings.update(timings)
    run.timings["total"] = round(seconds, 3)
    atomic_write_json(run.folder.timings, {**run.saved_timings(), **run.timings}, before_commit=run.fence)
    if graph.current_selection(run) is None:
        return {}
    result = summary(run)
    atomic_write_json(run.folder.summary, result, before_commit=run.fence)
    return result

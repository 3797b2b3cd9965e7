"""The LongABC job on one node as a short sequence of steps: windows → score → select → export → push (`LongAttnPipeline`)."""

from __future__ import annotations

import time
from typing import Any

from ..config import RunConfig
from . import export_step, score_step, select_step, windows_step
from .context import Run
from .executor import Executor
from .storage import atomic_write_json


class LongAttnPipeline:
    """Run the LongABC job step by step, resumably, on one or many processes (``accelerate launch`` / ``torchrun``).

    Steps (each also an ``hf-longattn`` subcommand): :meth:`windows`, :meth:`score`,
    :meth:`select`, :meth:`export`, :meth:`push`; :meth:`run` does them all and returns the
    summary. Each step reads what the previous one left in ``output_dir``, so steps can run in
    separate launches; ``score`` builds the windows when they are missing and ``export`` redoes
    the (cheap) selection when its settings changed. The steps themselves are functions of a
    `hf_longattn.run.context.Run` in ``hf_longattn/run/*_step.py``.

    Args:
        config (`RunConfig`): the run.
        progress (`bool`, defaults to `True`): show progress bars.
        executor (`Executor`, *optional*): the launch's processes (default: from the environment).

    Example:

    >>> summary = LongAttnPipeline(RunConfig.demo(output_dir="demo-out")).run()  # doctest: +SKIP
    >>> print(format_summary(summary))  # doctest: +SKIP
    """

    def __init__(self, config: RunConfig, *, progress: bool = True, executor: Executor | None = None) -> None:
        self.config = config
        self.run_state = Run(config, executor, progress=progress)

    # -- what the steps share ---------------------------------------------------------------------------
    output_dir = property(lambda self: self.run_state.folder.root)
    windows_dir = property(lambda self: self.run_state.folder.windows)
    scores_dir = property(lambda self: self.run_state.folder.scores)
    hub_dir = property(lambda self: self.run_state.folder.hub)
    probe_dir = property(lambda self: self.run_state.folder.probe)
    timings = property(lambda self: self.run_state.timings)
    scorer = property(lambda self: self.run_state.scorer)
    fingerprint = property(lambda self: self.run_state.fingerprint)
    is_main = property(lambda self: self.run_state.is_main)

    # -- the steps ---------------------------------------------------------------------------------------
    def prepare(self) -> None:
        windows_step.prepare(self.run_state)

    def check_push(self) -> None:
        windows_step.check_push(self.run_state)

    def windows(self) -> Any:
        with self.run_state.locked():
            return windows_step.windows(self.run_state)

    def windows_stats(self) -> dict[str, Any]:
        return self.run_state.windows_stats()

    def score(self) -> None:
        with self.run_state.locked():
            score_step.score(self.run_state)

    def merged_scores(self, windows: Any = None) -> Any:
        """All score chunks, checked (`score_step.merged_scores`); ``windows`` is ignored, kept for compatibility."""
        return score_step.merged_scores(self.run_state)

    def select(self) -> dict[str, Any]:
        with self.run_state.locked():
            return select_step.select(self.run_state)

    def summary(self, selection: Any = None, selector: Any = None) -> dict[str, Any]:
        return select_step.summary(self.run_state, selection, selector)

    def export(self) -> Any:
        with self.run_state.locked():
            return export_step.export(self.run_state)

    def push(self) -> str | None:
        with self.run_state.locked():
            return export_step.push(self.run_state)

    def probe(self) -> Any:
        with self.run_state.locked():
            return export_step.probe(self.run_state)

    def run(self) -> dict[str, Any]:
        """windows → score → select → export → push; returns the summary (empty on non-main processes).

        Stops before any work when ``push_to_hub`` is set under ``HF_HUB_OFFLINE=1``.
        """
        started = time.perf_counter()
        run = self.run_state
        windows_step.check_push(run)
        with run.locked():
            if self.config.probe and run.is_main:
                export_step.probe(run)
            score_step.score(run)
            select_step.select(run)  # the main process; the others wait in the export for it
            export_step.export(run)  # every process writes parts; the main one finishes
            if not run.is_main:
                return {}
            export_step.push(run)
            run.timings["total"] = round(time.perf_counter() - started, 3)
            result = select_step.summary(run)
            atomic_write_json(run.folder.summary, result)
        return result

"""`LongAttnPipeline`: the LongABC job in Python, one method per command, each through the one driver (`hf_longattn.run.driver`)."""

from __future__ import annotations

from typing import Any

from ..config import RunConfig
from . import driver
from .context import Run
from .executor import Executor


class LongAttnPipeline:
    """Run the LongABC job step by step, resumably, on one or many processes (``accelerate launch`` / ``torchrun``).

    Each method is an ``hf-longattn`` command: it runs, through `hf_longattn.run.driver.drive`, the
    steps its target needs that are not current (the run graph, `hf_longattn.run.graph`), so steps
    may run in separate launches and a relaunch redoes only what changed. :meth:`run` does them all
    and returns the summary.

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
        self.progress = progress
        self.engine = driver.LocalEngine(executor)
        self.run_state = Run(config, executor, progress=progress)

    # -- what the steps share ---------------------------------------------------------------------------
    output_dir = property(lambda self: self.run_state.folder.root)
    windows_dir = property(lambda self: self.run_state.folder.windows)
    scores_dir = property(lambda self: self.run_state.folder.scores)
    hub_dir = property(lambda self: self.run_state.folder.hub)
    probe_dir = property(lambda self: self.run_state.folder.probe)
    timings = property(lambda self: self.run_state.saved_timings())
    scorer = property(lambda self: self.run_state.scorer)
    fingerprint = property(lambda self: self.run_state.fingerprint)
    is_main = property(lambda self: self.run_state.is_main)

    def _drive(self, target: str) -> dict[str, Any]:
        return driver.drive(self.config, target, engine=self.engine, progress=self.progress)

    # -- the commands ------------------------------------------------------------------------------------
    def windows(self) -> Any:
        """``hf-longattn windows``; returns the windows as a `datasets.Dataset` (in memory: small runs)."""
        from .windows_step import load_windows

        self._drive("windows")
        return load_windows(self.run_state)

    def score(self) -> None:
        self._drive("score")

    def select(self) -> dict[str, Any]:
        return self._drive("select")

    def export(self) -> Any:
        self._drive("export")
        return self.run_state.folder.hub

    def push(self) -> str | None:
        """``hf-longattn push``: the URL of the repository, or `None` when ``push_to_hub`` is not set (nothing to do)."""
        if not self.config.push_to_hub:
            return None
        self._drive("push")
        from .records import PushRecord

        record = PushRecord.read_if_valid(self.run_state.folder.push_record)
        return record.url if record is not None else None

    def probe(self) -> Any:
        from ..probe.report import ProbeReport

        self._drive("probe")
        return ProbeReport.from_json(self.run_state.folder.probe_report)

    def run(self) -> dict[str, Any]:
        """Every step (and the push when ``push_to_hub`` is set); returns the summary (empty on non-main processes)."""
        return self._drive("run")

    # -- reading the run ---------------------------------------------------------------------------------
    def windows_stats(self) -> dict[str, Any]:
        return self.run_state.windows_stats().to_json()

    def merged_scores(self, windows: Any = None) -> Any:
        """All score chunks, checked (`score_step.merged_scores`); ``windows`` is ignored, kept for compatibility."""
        from .score_step import merged_scores

        return merged_scores(self.run_state)

    def summary(self, selection: Any = None, selector: Any = None) -> dict[str, Any]:
        from .select_step import summary

        return summary(self.run_state, selection, selector)

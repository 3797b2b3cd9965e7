"""`Run`: one configuration, its run folder and its processes, as one process sees them; what every step receives.

The scorer (with its weights) loads lazily, the first time a window is scored; the fingerprint
(what defines the scores) is computed once per process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..config import RunConfig
from ..errors import LongAttnError
from .executor import Executor, executor_from_environment
from .layout import RunFolder
from .storage import atomic_write_json, read_json

STEPS = ("windows", "score", "select", "export", "push")


class Run:
    """A run as one process sees it: ``config``, ``folder``, ``executor``, the lazy ``scorer`` and step timings.

    Args:
        config (`RunConfig`): the run.
        executor (`Executor`, *optional*): the launch's processes; default: from the environment
            (`hf_longattn.run.executor.executor_from_environment`).
        progress (`bool`, defaults to `True`): show progress bars.
    """

    def __init__(self, config: RunConfig, executor: Executor | None = None, *, progress: bool = True) -> None:
        self.config = config
        self.folder = RunFolder(config.output_dir)
        self._executor = executor
        self.progress = progress
        self.timings: dict[str, float] = {}
        self._scorer = None
        self._fingerprint: dict[str, Any] | None = None

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            self._executor = executor_from_environment()
        return self._executor

    @property
    def is_main(self) -> bool:
        return self.executor.is_main

    def print(self, message: str) -> None:
        """Print on the main process only."""
        if self.is_main:
            print(message, flush=True)

    @property
    def scorer(self) -> Any:
        """The registered scorer of ``config.scorer`` on this process's device (weights load on first use)."""
        if self._scorer is None:
            from ..registry import SCORERS

            self._scorer = SCORERS.get(self.config.scorer).from_run_config(self.config, self.executor.device)
        return self._scorer

    @property
    def fingerprint(self) -> dict[str, Any]:
        """``{"fingerprint": sha256, "config": RunConfig.fingerprint_config(...)}``."""
        if self._fingerprint is None:
            self._fingerprint = self.config.fingerprint(self.scorer.identity())
        return self._fingerprint

    def timed(self, step: str, function: Callable[[], Any]) -> Any:
        """Run ``function``, record its wall time under ``step`` (and in ``timings.json`` on the main process)."""
        start = time.perf_counter()
        result = function()
        self.timings[step] = round(time.perf_counter() - start, 3)
        if self.is_main:
            self.folder.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.folder.timings, {**self.saved_timings(), **self.timings})
        return result

    def saved_timings(self) -> dict[str, float]:
        """The step timings of earlier launches (``timings.json``), ordered like the steps."""
        path = self.folder.timings
        saved = read_json(path, what="step timings", remedy="delete it; it is rewritten") if path.is_file() else {}
        if not isinstance(saved, dict):
            raise LongAttnError(f"{path} (step timings) is not a JSON object: delete it; it is rewritten")
        order = [*STEPS, "total"]
        return dict(sorted(saved.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))

    def windows_stats(self) -> dict[str, Any]:
        """``windows/windows_stats.json``: counts per category (raises when the windows are not built)."""
        path = self.folder.windows_stats
        if not path.is_file():
            raise LongAttnError(f"No windows in {self.folder.windows}: run the `windows` step first")
        return read_json(path, what="windows statistics", remedy=f"delete {self.folder.windows} and relaunch")

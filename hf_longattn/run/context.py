"""`Run`: one configuration, its run folder and its processes, as one process sees them; what every step receives.

The scorer (with its weights) loads lazily, the first time a window is scored; the fingerprint
(what defines the scores) is computed once per process.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..config import RunConfig
from ..errors import LongAttnError
from .executor import Executor, executor_from_environment
from .layout import RunFolder
from ..storage import atomic_write_json, read_json

STEPS = ("windows", "score", "select", "export", "push")


class Run:
    """A run as one process sees it: ``config``, ``folder``, ``executor``, the lazy ``scorer`` and step timings.

    Args:
        config (`RunConfig`): the run.
        executor (`Executor`, *optional*): the launch's processes; default: from the environment
            (`hf_longattn.run.executor.executor_from_environment`).
        progress (`bool`, defaults to `True`): show progress bars.
    """

    def __init__(self, config: RunConfig, executor: Executor | None = None, *, progress: bool = True,
                 launch: str | None = None) -> None:
        from ..registry import SCORERS

        self.config = config
        self.folder = RunFolder(config.output_dir, SCORERS.resolve(config.scorer))
        self._executor = executor
        self.progress = progress
        self.timings: dict[str, float] = {}
        self._scorer = None
        self._fingerprint: dict[str, Any] | None = None
        self._launch: str | None = launch
        self.fenced = launch is not None  # a task of a launch that holds the run lock: every commit checks it still does
        self._lock = None
        self._lock_depth = 0
        self._model_checked = False
        self._scorer_runs: dict[str, ScorerRun] = {}

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
    def launch(self) -> str:
        """This launch's id, the same on every process of it (claims of another launch are stale)."""
        if self._launch is None:
            from .lock import new_launch_id

            self._launch = self.executor.broadcast(new_launch_id())
        return self._launch

    def fence(self) -> None:
        """Before a commit: raise `hf_longattn.run.lock.LostLock` (one line) if this launch no longer holds the folder.

        A task of a launch (``fenced``) checks that ``.lock`` still names its launch; a process used
        on its own (no driver, no lock) only checks that no other launch holds the folder.
        """
        from .lock import _look_settled, fence

        if self.fenced:
            if self._lock is not None:
                self._lock.check()
            else:
                fence(self.folder.root, self.launch)
            return
        seen = _look_settled(self.folder.lock)
        if seen is not None and (seen.record or {}).get("launch") not in (None, self._launch):
            fence(self.folder.root, self.launch)

    @contextlib.contextmanager
    def locked(self) -> Iterator[Run]:
        """Hold the run lock (main process) while the block runs; re-entrant, so steps may nest."""
        from .lock import RunLock

        created = False
        if self._lock_depth == 0:
            self.folder.check_inside()
            self.check_model()  # before the folder is touched: a mistyped model leaves nothing behind
            launch = self.launch  # a collective: every process gets here in the same order
            created = not self.folder.root.exists()

            def acquire() -> None:
                self._lock = RunLock(self.folder.root, launch).acquire()

            self.executor.run_on_main(acquire)  # refused: every process stops with the main one's message
            self.fenced = True
        self._lock_depth += 1
        failed = True
        try:
            yield self
            failed = False
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock is not None:
                self._lock.release()
                self._lock = None
                if failed and created:  # a first launch refused before writing anything leaves no folder behind
                    with contextlib.suppress(OSError):
                        self.folder.root.rmdir()

    def detach_lock(self) -> None:
        """Leave the run lock to the launch's tasks (a job chain that outlives this process): no heartbeat, no release."""
        if self._lock is not None:
            from .lease import detach

            detach(self._lock)
            self._lock = None

    def check_model(self) -> None:
        """Before any work: the model exists (a clear error for a mistyped name) and takes windows of W tokens."""
        if self._model_checked:
            return
        from ..model_checks import check_model, check_window_fits

        check_window_fits(self.config, check_model(self.config.model, self.config.revision))
        self._model_checked = True

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

    def for_scorer(self, name: str) -> Run | ScorerRun:
        """The run as scorer ``name``'s plan and score steps see it (the run itself for ``config.scorer``)."""
        if name == self.folder.scorer:
            return self
        if name not in self._scorer_runs:
            self._scorer_runs[name] = ScorerRun(self, name)
        return self._scorer_runs[name]

    def scorer_runs(self) -> list[Run | ScorerRun]:
        """One view per scorer of the run (`RunConfig.scorer_names`), ``config.scorer``'s first."""
        return [self.for_scorer(name) for name in self.config.scorer_names()]

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
        """The step timings of earlier launches (``timings.json``)."""
        path = self.folder.timings
        saved = read_json(path, what="step timings", remedy="delete it; it is rewritten") if path.is_file() else {}
        if not isinstance(saved, dict):
            raise LongAttnError(f"{path} (step timings) is not a JSON object: delete it; it is rewritten")
        return saved

    def all_timings(self) -> dict[str, float]:
        """The step timings of earlier launches updated with this launch's, ordered like the steps (then ``total``)."""
        order = [*STEPS, "total"]
        timings = {**self.saved_timings(), **self.timings}
        return dict(sorted(timings.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))

    def windows_stats(self) -> Any:
        """``windows/windows_stats.json`` as a `hf_longattn.run.records.WindowsStats` (raises when the windows are not built)."""
        from .records import WindowsStats

        path = self.folder.windows_stats
        if not path.is_file():
            raise LongAttnError(f"No windows in {self.folder.windows}: run the `windows` step first")
        return WindowsStats.read(path)


class ScorerRun:
    """The run as one more scorer's plan and score steps see it: its own scorer, fingerprint and ``scores/<name>/``.

    Everything else (configuration, executor, launch, lock, fence) is the run's.
    """

    def __init__(self, run: Run, name: str) -> None:
        self._run, self.name = run, name
        self.folder = run.folder.for_scorer(name)
        self._scorer = None
        self._fingerprint: dict[str, Any] | None = None

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._run, attribute)

    @property
    def scorer(self) -> Any:
        if self._scorer is None:
            from ..registry import SCORERS

            self._scorer = SCORERS.get(self.name).from_run_config(self._run.config, self._run.executor.device)
        return self._scorer

    @property
    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            self._fingerprint = self._run.config.fingerprint(self.scorer.identity(), self.name)
        return self._fingerprint

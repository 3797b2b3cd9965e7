"""The run folder: where each file of a run lives, and that none of them leads outside it.

A run lives in one ``output_dir``::

    config.yaml                  the resolved configuration of the last launch
    fingerprint.json             what defines the scores (model weights, W, k, layer, dtype, ...)
    windows/                     the windows, and windows/windows_stats.json (counts, sources, checksums)
    scores/chunk-000000.parquet  id + score columns of one chunk of windows
    scores/chunk-000000.done     its completion marker (rows, sha256, fingerprint, window hashes)
    selection.parquet            id, category, scores, longattn_lds, longattn_selected (windows order)
    selector.json                the fitted LongAttnSelector
    summary.json, timings.json   the per-category counts and the wall time of each step
    hub/                         the Hub-ready export (parquet configs, dataset card, plots)
    probe/                       the scorer self-check, when asked for
    .lock                        held by the launch using the folder (see `hf_longattn.run.lock`)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import LongAttnError

WINDOWS_STATS_FILE = "windows_stats.json"
FINGERPRINT_FILE = "fingerprint.json"
SELECTION_FILE = "selection.parquet"
SELECTOR_FILE = "selector.json"
SUMMARY_FILE = "summary.json"
TIMINGS_FILE = "timings.json"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"


def chunk_name(index: int) -> str:
    """``chunk-000042``."""
    return f"chunk-{index:06d}"


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run's files (nothing is created by looking at them).

    Example:

    >>> folder = RunFolder("longattn-demo")
    >>> folder.chunk_parquet(3).as_posix(), folder.selection.name
    ('longattn-demo/scores/chunk-000003.parquet', 'selection.parquet')
    """

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    config = property(lambda self: self.root / CONFIG_FILE)
    fingerprint = property(lambda self: self.root / FINGERPRINT_FILE)
    windows = property(lambda self: self.root / "windows")
    windows_stats = property(lambda self: self.root / "windows" / WINDOWS_STATS_FILE)
    scores = property(lambda self: self.root / "scores")
    selection = property(lambda self: self.root / SELECTION_FILE)
    selector = property(lambda self: self.root / SELECTOR_FILE)
    summary = property(lambda self: self.root / SUMMARY_FILE)
    timings = property(lambda self: self.root / TIMINGS_FILE)
    hub = property(lambda self: self.root / "hub")
    probe = property(lambda self: self.root / "probe")
    lock = property(lambda self: self.root / LOCK_FILE)

    def chunk_parquet(self, index: int) -> Path:
        return self.scores / f"{chunk_name(index)}.parquet"

    def chunk_marker(self, index: int) -> Path:
        return self.scores / f"{chunk_name(index)}.done"

    def managed(self) -> list[Path]:
        """Every path the run writes directly under ``root``."""
        return [self.config, self.fingerprint, self.windows, self.scores, self.selection, self.selector,
                self.summary, self.timings, self.hub, self.probe, self.lock]

    def check_inside(self) -> None:
        """Refuse a run folder whose own files or folders are symlinks (they would write elsewhere).

        Raises:
            `LongAttnError`: naming the symlink and where it points.
        """
        for path in self.managed():
            if path.is_symlink():
                raise LongAttnError(
                    f"{path} is a symlink to {os.readlink(path)}: hf_longattn writes only inside {self.root}. "
                    "Remove the link (or point output_dir at the real folder) and relaunch."
                )

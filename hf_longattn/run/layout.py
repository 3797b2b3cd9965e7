"""The run folder: where each file of a run lives, and that none of them leads outside it.

A run lives in one ``output_dir``; every path is built here and nowhere else::

    config.yaml                      the resolved configuration of the last launch
    fingerprint.json                 what defines the scores (model weights, W, k, layer, dtype, ...)
    windows/shard-<id>.parquet       windows of one input shard (token ids, window hashes), and
    windows/shard-<id>.json          its record (input identity, counts, sha256)
    windows/windows_stats.json       the windows: shards in order, the cap, counts per category
    scores/plan.json                 the chunks and the digest of each one's windows
    scores/chunk-000000.parquet      id + score columns of one chunk, and
    scores/chunk-000000.done         its completion marker (rows, sha256, fingerprint, windows digest)
    scores/reuse.parquet             scores of unchanged windows kept across a change of the windows
    scores/<scorer>/...              the same files for every scorer but LongAttn (``prolong_v1``, ``ladm_cds_v1``)
    selection.parquet                id, category, every scorer's columns, the selection score and flag
                                     (longattn_lds, longattn_selected), in windows order
    selector.json                    the fitted LongAttnSelector
    selection.json                   what the selection was made from (scores key, settings) and its key
    summary.json, timings.json       the per-category counts and the wall time of each step
    hub/                             the Hub-ready export; hub/hf_longattn_export.json is its record
    .hub.building-<key>/             an export being assembled (swapped in as hub/ when complete)
    push.json                        the last push: repository, export key, commit
    probe/                           the scorer self-check, when asked for (probe/probe.json: its key)
    compare/                         `hf-longattn compare`: compare.md, compare.json, plots
    .lock                            held by the launch using the folder (see `hf_longattn.run.lock`)
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
SELECTION_RECORD_FILE = "selection.json"
SUMMARY_FILE = "summary.json"
TIMINGS_FILE = "timings.json"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
PLAN_FILE = "plan.json"
REUSE_FILE = "reuse.parquet"
EXPORT_RECORD = "hf_longattn_export.json"
PUSH_RECORD_FILE = "push.json"
BUILDING_PREFIX = ".hub.building-"


def chunk_name(index: int) -> str:
    """``chunk-000042``."""
    return f"chunk-{index:06d}"


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run's files (nothing is created by looking at them).

    Example:

    >>> folder = RunFolder("longattn-demo")
    >>> folder.chunk_parquet(3).as_posix(), folder.selection.name, folder.shard_record("shard-ab").name
    ('longattn-demo/scores/chunk-000003.parquet', 'selection.parquet', 'shard-ab.json')
    >>> folder.for_scorer("prolong_v1").plan.as_posix()
    'longattn-demo/scores/prolong_v1/plan.json'
    """

    root: Path
    scorer: str

    def __init__(self, root: str | os.PathLike, scorer: str = "longattn_v1") -> None:
        object.__setattr__(self, "root", Path(root))
        object.__setattr__(self, "scorer", scorer)

    def for_scorer(self, name: str) -> RunFolder:
        """The same run folder, with ``scores`` the folder of scorer ``name`` (``scores/`` for LongAttn, else ``scores/<name>/``)."""
        return RunFolder(self.root, name)

    config = property(lambda self: self.root / CONFIG_FILE)
    fingerprint = property(lambda self: self.root / FINGERPRINT_FILE)
    windows = property(lambda self: self.root / "windows")
    windows_stats = property(lambda self: self.root / "windows" / WINDOWS_STATS_FILE)
    scores = property(lambda self: self.root / "scores" / ("" if self.scorer == "longattn_v1" else self.scorer))
    plan = property(lambda self: self.scores / PLAN_FILE)
    reuse = property(lambda self: self.scores / REUSE_FILE)
    selection = property(lambda self: self.root / SELECTION_FILE)
    selector = property(lambda self: self.root / SELECTOR_FILE)
    selection_record = property(lambda self: self.root / SELECTION_RECORD_FILE)
    summary = property(lambda self: self.root / SUMMARY_FILE)
    timings = property(lambda self: self.root / TIMINGS_FILE)
    hub = property(lambda self: self.root / "hub")
    export_record = property(lambda self: self.root / "hub" / EXPORT_RECORD)
    push_record = property(lambda self: self.root / PUSH_RECORD_FILE)
    probe = property(lambda self: self.root / "probe")
    probe_report = property(lambda self: self.root / "probe" / "report.json")
    probe_record = property(lambda self: self.root / "probe" / "probe.json")
    probe_image = property(lambda self: self.root / "probe" / "probe.png")
    compare = property(lambda self: self.root / "compare")
    lock = property(lambda self: self.root / LOCK_FILE)

    # -- windows ---------------------------------------------------------------------------------
    def shard_parquet(self, name: str) -> Path:
        return self.windows / f"{name}.parquet"

    def shard_record(self, name: str) -> Path:
        return self.windows / f"{name}.json"

    def shard_claim(self, name: str) -> Path:
        return self.windows / f"{name}.claim"

    # -- scores ----------------------------------------------------------------------------------
    def chunk_parquet(self, index: int) -> Path:
        return self.scores / f"{chunk_name(index)}.parquet"

    def chunk_marker(self, index: int) -> Path:
        return self.scores / f"{chunk_name(index)}.done"

    def chunk_claim(self, index: int) -> Path:
        return self.scores / f"{chunk_name(index)}.claim"

    def chunk_markers(self) -> list[Path]:
        return sorted(self.scores.glob("chunk-*.done"))

    # -- export ----------------------------------------------------------------------------------
    def building(self, key: str) -> Path:
        """Where the export of ``key`` is assembled before it replaces ``hub/`` (a relaunch resumes it)."""
        return self.root / f"{BUILDING_PREFIX}{key}"

    def buildings(self) -> list[Path]:
        return sorted(self.root.glob(f"{BUILDING_PREFIX}*"))

    def part_marker(self, key: str, shard: int) -> Path:
        """The record of the export parts of windows shard ``shard`` (its files and their sha256)."""
        return self.building(key) / ".parts" / f"{shard:05d}.done"

    def part_claim(self, key: str, shard: int) -> Path:
        return self.building(key) / ".parts" / f"{shard:05d}.claim"

    def managed(self) -> list[Path]:
        """Every path the run writes directly under ``root``."""
        return [self.config, self.fingerprint, self.windows, self.root / "scores", self.scores, self.selection, self.selector,
                self.selection_record, self.summary, self.timings, self.hub, self.push_record, self.probe, self.compare,
                self.lock]

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

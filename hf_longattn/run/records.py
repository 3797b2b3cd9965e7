"""The typed records of a run's artifacts: versioned dataclasses, to and from JSON, each read in one place.

Every artifact of a run records the *key* of exactly what it derives from (its upstream artifacts'
keys and the settings it reads); `hf_longattn.run.graph` computes the key an artifact should have
now and calls it current when the two are equal. A record is written last, atomically, after the
file it describes, so a record that parses describes a complete file.

==================  ===============================  =================================================
record              file                             derives from
==================  ===============================  =================================================
`ShardRecord`       ``windows/shard-<id>.json``      the input shard's identity, the windows identity
`WindowsStats`      ``windows/windows_stats.json``   the shards (names, sha256), the cap setting
`ChunkPlan`         ``scores/plan.json``             the windows, ``chunk_size``, the fingerprint
`ChunkMarker`       ``scores/chunk-*.done``          the chunk's windows digest, the fingerprint
`SelectionRecord`   ``selection.json``               the scores (every chunk's sha256), the settings
`PartRecord`        ``.hub.building-*/.parts/*.done``  the export key, one windows shard
`ExportRecord`      ``hub/hf_longattn_export.json``  the selection, the windows, the card settings, the probe
`PushRecord`        ``push.json``                    the export, the repository
`ProbeRecord`       ``probe/probe.json``             the model, W, k, the probe settings, the sources
==================  ===============================  =================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ..errors import LongAttnError
from ..storage import atomic_write_json, json_sha256, read_json

R = TypeVar("R", bound="Record")


@dataclass
class Record:
    """Base of every record: ``FORMAT`` (bumped when the fields change), JSON in and out with clear errors."""

    FORMAT: ClassVar[int] = 1
    WHAT: ClassVar[str] = "a record"
    REMEDY: ClassVar[str] = "delete it and relaunch: it is rebuilt"

    def to_json(self) -> dict[str, Any]:
        return {"format": self.FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls: type[R], data: Any, path: str | Path = "") -> R:
        """The record of ``data`` (unknown keys ignored, so older files with extra keys still read)."""
        if not isinstance(data, dict):
            raise LongAttnError(f"{path} ({cls.WHAT}) is not a JSON object: {cls.REMEDY}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise LongAttnError(f"{path} ({cls.WHAT}) lacks {missing}: {cls.REMEDY}")
        return cls(**{key: value for key, value in data.items() if key in names})

    @classmethod
    def read(cls: type[R], path: str | Path) -> R:
        """Read ``path``; a missing, unreadable or malformed file raises one `LongAttnError` naming it."""
        return cls.from_json(read_json(path, what=cls.WHAT, remedy=cls.REMEDY), path)

    @classmethod
    def read_if_valid(cls: type[R], path: str | Path) -> R | None:
        """The record at ``path``, or `None` when it is missing or cannot be read (then its artifact is redone)."""
        try:
            return cls.read(path) if Path(path).is_file() else None
        except LongAttnError:
            return None

    def write(self, path: str | Path, before_commit: Callable[[], None] | None = None) -> Path:
        """Write atomically (``before_commit``: a fencing check run right before the file is renamed into place)."""
        return atomic_write_json(path, self.to_json(), before_commit=before_commit)


@dataclass
class ShardRecord(Record):
    """One windows shard: its input (name, identity), the windows identity, rows, sha256 and counts per category."""

    WHAT: ClassVar[str] = "a windows shard record"
    input: str
    input_identity: str
    identity: str
    rows: int
    sha256: str
    categories: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    verified: str = ""
    """The launch that last checked the shard's file against ``sha256`` (each launch checks it once)."""


@dataclass
class WindowsStats(Record):
    """The windows of the run: the shards in order (with the windows each keeps under the cap), the cap, the counts.

    ``digest`` is the key of the windows: a hash of the shards (names, sha256) and the cap.
    """

    FORMAT: ClassVar[int] = 3
    WHAT: ClassVar[str] = "the windows statistics"
    identity: str
    window_size: int
    faithful: bool
    digest: str
    manifest: list[dict[str, Any]]
    shards: list[dict[str, Any]]
    cap: dict[str, list]
    categories: dict[str, dict[str, int]]
    total: dict[str, int]
    max_windows_per_category: int | None = None

    def shard_names(self) -> list[str]:
        return [shard["name"] for shard in self.shards]

    def shard_windows(self, index: int) -> int:
        """Windows of shard ``index`` inside the cap (``kept`` in files written before hf_longattn 0.3)."""
        shard = self.shards[index]
        return int(shard.get("windows", shard.get("kept", 0)))


@dataclass
class Chunk:
    """Up to ``chunk_size`` consecutive windows (rows ``[start, stop)`` inside the cap) of one windows shard."""

    shard: str
    start: int
    stop: int
    rows: int
    digest: str


@dataclass
class ChunkPlan(Record):
    """The chunks of the run; ``key`` = hash of the windows digest, ``chunk_size`` and the fingerprint."""

    FORMAT: ClassVar[int] = 2
    WHAT: ClassVar[str] = "the chunk plan"
    windows_digest: str
    chunk_size: int
    fingerprint: str
    chunks: list[Chunk]
    key: str = ""

    def __post_init__(self) -> None:
        self.chunks = [c if isinstance(c, Chunk) else Chunk(**c) for c in self.chunks]

    @staticmethod
    def key_of(windows_digest: str, chunk_size: int, fingerprint: str) -> str:
        return json_sha256({"windows": windows_digest, "chunk_size": chunk_size, "fingerprint": fingerprint})


@dataclass
class ChunkMarker(Record):
    """The completion marker of a chunk: what it scored (digest, fingerprint) and the sha256 of its parquet file."""

    WHAT: ClassVar[str] = "a chunk's completion marker"
    chunk: int
    rows: int
    sha256: str
    fingerprint: str
    digest: str | None = None
    shard: str | None = None
    start: int | None = None
    stop: int | None = None
    first_id: str | None = None
    last_id: str | None = None
    rank: int = 0
    world_size: int = 1
    reused: int = 0
    seconds: float = 0.0
    hf_longattn_version: str = ""


@dataclass
class SelectionRecord(Record):
    """What ``selection.parquet`` was made from: the scores' key and the selection settings; its own key and sha256."""

    WHAT: ClassVar[str] = "the selection record"
    REMEDY: ClassVar[str] = "run the `select` step again"
    key: str
    scores: str
    settings: dict[str, Any]
    sha256: str

    @staticmethod
    def key_of(scores_key: str, settings: dict[str, Any]) -> str:
        return json_sha256({"scores": scores_key, "settings": settings})


@dataclass
class PartRecord(Record):
    """The export parts of one windows shard: each file (relative to the building folder) with its rows and sha256."""

    WHAT: ClassVar[str] = "an export part record"
    key: str
    shard: int
    files: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ExportRecord(Record):
    """``hub/``: its key (also the tag in its file names) and what it was made from."""

    WHAT: ClassVar[str] = "the export's record"
    REMEDY: ClassVar[str] = "run the `export` step again"
    tag: str
    selection: str
    windows: str
    selection_key: str = ""
    probe: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class PushRecord(Record):
    """The last push of ``hub/``: the repository, the export's key and what the Hub answered."""

    WHAT: ClassVar[str] = "the push record"
    repo_id: str
    export: str
    url: str = ""
    pushed: str = ""


@dataclass
class ProbeRecord(Record):
    """The probe in ``probe/``: the key of what it scored (model, W, k, probe settings, sources)."""

    WHAT: ClassVar[str] = "the probe's record"
    key: str
    report_sha256: str

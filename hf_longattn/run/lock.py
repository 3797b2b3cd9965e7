"""Who may write a run folder: the run lock of one launch, and per-unit claims so that every process of it takes the next free unit.

*Run lock.* The main process of a launch holds ``output_dir/.lock`` (created with ``O_EXCL``; it
records pid, host, launch id and start time, and a heartbeat thread refreshes its modification
time). A second launch into the same folder stops with "another run (pid, host) is using this
folder". A lock is stale — and taken over — when its process is gone (same host) or its heartbeat
is older than :data:`STALE_AFTER` seconds (any host: a crashed node).

*Claims.* Units of work (input shards, chunks) are claimed with a file ``<unit>.claim`` created
with ``O_EXCL``, holding the launch id. Under the run lock only one launch writes the folder, so
a claim of another launch is left over from a dead one: it is taken over (renamed away first, so
that exactly one process wins). Every process walks the units from its own offset and takes the
next free one: the work spreads over every process of any launch, whatever finished before.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import LongAttnError

STALE_AFTER = float(os.environ.get("HF_LONGATTN_LOCK_STALE_S", 600))
"""Seconds without a heartbeat after which a run lock is stale (default 10 minutes)."""
HEARTBEAT = 30.0
"""Seconds between two refreshes of a held run lock."""


def new_launch_id() -> str:
    """A fresh id for one launch (shared by its processes through the executor's broadcast)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written or corrupt: judged by its age alone


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Create ``path`` with ``record`` if it does not exist (``O_EXCL``); `False` if it does."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(record, handle)
    return True


def _take_over(path: Path) -> None:
    """Remove a stale lock or claim so that exactly one contender can create it anew."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, aside)
        aside.unlink(missing_ok=True)


class RunLock:
    """The run lock of ``folder`` for one launch; use as a context manager (see the module docstring).

    Example:

    >>> import tempfile
    >>> with RunLock(tempfile.mkdtemp(), "launch-1") as lock:
    ...     lock.path.name
    '.lock'
    """

    def __init__(self, folder: str | os.PathLike, launch: str, *, stale_after: float = STALE_AFTER) -> None:
        self.path = Path(folder) / ".lock"
        self.launch = launch
        self.stale_after = stale_after
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def stale(self, record: dict[str, Any] | None) -> bool:
        """Whether a lock with ``record`` (as read from the file) no longer protects anything."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if record and record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
            return not _alive(record["pid"]) or age > self.stale_after
        return age > self.stale_after

    def acquire(self) -> RunLock:
        self._created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "launch": self.launch,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        for _ in range(3):
            if _create(self.path, record):
                self._thread = threading.Thread(target=self._beat, name="hf_longattn-lock", daemon=True)
                self._thread.start()
                return self
            holder = _read(self.path)
            if holder is not None and not self.stale(holder):
                holder = holder or {}
                raise LongAttnError(
                    f"another run (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
                    f"{holder.get('started', '?')}) is using {self.path.parent}: wait for it to finish, or use another "
                    f"output_dir. If that run is dead, delete {self.path} (it also expires {self.stale_after:.0f} s "
                    "after its last heartbeat)."
                )
            _take_over(self.path)
        raise LongAttnError(f"could not take the run lock {self.path}: it keeps changing hands; relaunch")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = _read(self.path)
        if holder is not None and holder.get("launch") == self.launch:
            self.path.unlink(missing_ok=True)
        if getattr(self, "_created", False):  # a launch that wrote nothing leaves no folder behind
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def claim(path: Path, launch: str, rank: int) -> bool:
    """Claim a unit of work through its claim file ``path``; `True` if this process now owns it.

    A claim of the same launch belongs to another process of it (`False`); a claim of another
    launch is stale (see the module docstring) and taken over.
    """
    record = {"launch": launch, "rank": rank, "pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        if _create(path, record):
            return True
        holder = _read(path)
        if holder is None:
            continue
        if holder.get("launch") == launch:
            return False
        _take_over(path)
    return _create(path, record)


def claimed(units: Iterable[Any], claim_file: Any, launch: str, rank: int, world_size: int,
            done: Any = None) -> Iterator[Any]:
    """Yield the units this process claims, walking all of them from its own offset (balanced over processes).

    A unit another process finished meanwhile (``done(unit)`` after the claim) is released and skipped.

    Args:
        units (iterable): the units still to do, in order.
        claim_file (`callable`): unit → its claim file `Path`.
        launch (`str`): this launch's id (`new_launch_id`, the same on every process of the launch).
        rank (`int`), world_size (`int`): this process among the launch's processes.
        done (`callable`, *optional*): unit → whether it is finished (its completion marker is valid).
    """
    units = list(units)
    if not units:
        return
    start = (rank * len(units)) // max(1, world_size)
    for unit in units[start:] + units[:start]:
        if claim(claim_file(unit), launch, rank):
            if done is not None and done(unit):
                release_claim(claim_file(unit))
                continue
            yield unit


def release_claim(path: Path) -> None:
    """Drop a claim once its unit is done (its completion marker written)."""
    path.unlink(missing_ok=True)

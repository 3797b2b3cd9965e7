"""Who may write a run folder: the run lock of one launch, and per-unit claims so that every process of it takes the next free unit.

*Run lock.* The main process of a launch holds ``output_dir/.lock``: a JSON record of its launch
id, a unique ``token``, pid, host and start time, whose mtime a heartbeat thread refreshes. A
second launch stops with "another run (pid, host) is using this folder". A lock is stale, and
taken over, when its process is gone (same host) or its heartbeat is older than
:data:`STALE_AFTER` s (any host: a crashed or paused node).

*Claims.* A unit of work (input shard, chunk) is claimed with a file ``<unit>.claim`` holding the
launch id and a token. Under the run lock one launch writes the folder, so a claim of another
launch is a dead one's: taken over. Every process walks the units from its own offset and takes
the next free one.

*How files change hands.* A record is only ever published complete: written to a unique hidden
temporary file, then ``os.link``-ed to its name, which fails if the name exists (where a file
system has no hard links: ``O_EXCL``, write and fsync; a reader may then meet a young half-written
file, left alone for :data:`TORN_AFTER` s). To take a stale record over, contenders first race for
its ticket ``.<name>.takeover-<token>`` (published the same way; the winner keeps it while it holds
the file); the winner renames the record to a unique aside name and reads it back: only if it is
the very record judged stale (same token, still stale) is it removed, else it is put back if the
name is still free. A release removes a file the same way, only if it still holds our token.

*Fencing.* An owner paused (SIGSTOP, a frozen VM) or cut off past the stale time may resume after
another launch took over. Every heartbeat reads the lock; one no longer ours marks it lost and
stops. :meth:`RunLock.check`, :func:`fence` (other processes of the launch) and
:meth:`Claim.check` raise :class:`LostLock` / :class:`LostClaim` unless the file still holds our
token: pass one as ``before_commit`` to `storage.atomic_write`, so that a resumed old owner
commits nothing and removes nothing of the new owner's.

*Guarantees and limits.* Local disks and NFS (v3, v4): ``link`` and ``rename`` are atomic on the
server; a ``link`` answered "exists" after a lost reply is recognised by the temporary file's link
count; records are read after ``open`` (close-to-open consistency). Staleness compares an mtime set
by the file server with this host's clock: clocks must agree within a small part of
``stale_after``, which must exceed the attribute cache time (``acregmax``, 60 s by default). A pid
is judged gone only on the same host and pid namespace. A paused owner can still race between its
last ``check()`` and its ``os.replace``: one system call locally, one RENAME round trip on NFS. A
takeover that finds a fresh record in place puts it back at once; that owner loses its file only
if yet another process publishes in those microseconds, and learns so at its next check. A crash
can leave hidden ``.<name>.new-*``, ``.aside-*`` or ``.takeover-*`` files behind: harmless.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import LongAttnError
from ..storage import storage_errors

STALE_AFTER = float(os.environ.get("HF_LONGATTN_LOCK_STALE_S", 600))
"""Seconds without a heartbeat after which a run lock is stale (default 10 minutes)."""
HEARTBEAT = float(os.environ.get("HF_LONGATTN_LOCK_HEARTBEAT_S", 30))
"""Seconds between two heartbeats of a held run lock (at most a quarter of its ``stale_after``)."""
TORN_AFTER = 10.0
"""Seconds after which an unreadable lock or claim file is a leftover (a crash, or the ``O_EXCL`` fallback)."""
ATTEMPTS = 5
"""Tries of create, judge, take over before giving up on a file that keeps changing hands."""

_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
_folders_without_links: set[str] = set()
_PID_NAMESPACE = os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else None


class LostLock(LongAttnError):
    """This launch no longer holds the run lock: another launch took it over (the message says which)."""


class LostClaim(LongAttnError):
    """This process no longer holds a unit's claim: another launch took it over; the unit is theirs."""


def new_launch_id() -> str:
    """A fresh id for one launch (shared by its processes through the executor's broadcast)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _record(launch: str, token: str, **extra: Any) -> dict[str, Any]:
    return {"launch": launch, "token": token, **extra, "pid": os.getpid(), "host": socket.gethostname(),
            "pidns": _PID_NAMESPACE, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as error:
        return error.errno != errno.ESRCH  # EPERM: another user's process
    return True


class _Seen:
    """A lock or claim file as read once through one descriptor: its record (`None` if unreadable), bytes, inode, mtime."""

    def __init__(self, raw: bytes, stat: os.stat_result) -> None:
        self.raw, self.ino, self.mtime = raw, stat.st_ino, stat.st_mtime
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        self.record: dict[str, Any] | None = record if isinstance(record, dict) else None
        self.token = self.record.get("token") if self.record else None

    def key(self) -> str:
        """This very record, as a file name part: its token, or a digest of an unreadable or old one's bytes and inode."""
        if isinstance(self.token, str) and self.token.isalnum():
            return self.token
        return hashlib.sha256(self.raw + str(self.ino).encode()).hexdigest()[:32]

    def age(self) -> float:
        return time.time() - self.mtime

    def dead_here(self) -> bool:
        """Whether the record names a process of this host and pid namespace that is gone."""
        record = self.record or {}
        pid = record.get("pid")
        return (record.get("host") == socket.gethostname() and record.get("pidns", _PID_NAMESPACE) == _PID_NAMESPACE
                and isinstance(pid, int) and not _alive(pid))

    def holder(self) -> str:
        record = self.record or {}
        return f"pid {record.get('pid', '?')} on {record.get('host', '?')}, started {record.get('started', '?')}"


def _look(path: Path, touch: str | None = None) -> _Seen | None:
    """Read ``path`` (`None` if absent); with ``touch``, refresh its mtime if and only if it holds that token."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        seen = _Seen(os.read(fd, 1 << 16), os.fstat(fd))  # a record is a few hundred bytes
        if touch is not None and seen.token == touch:
            os.utime(fd if os.utime in os.supports_fd else path)  # the very file read, even if renamed since
        return seen
    except OSError as error:
        if error.errno == errno.ESTALE:  # NFS: removed by another host since it was opened
            return None
        raise
    finally:
        os.close(fd)


def _look_settled(path: Path, touch: str | None = None) -> _Seen | None:
    """:func:`_look`, once more after a moment if absent (a takeover that renamed a fresh file puts it back at once)."""
    return _look(path, touch) or (time.sleep(0.05) or _look(path, touch))


def _publish(path: Path, record: dict[str, Any], *, sync: bool = False) -> bool:
    """Create ``path`` holding ``record``, complete, if it does not exist; `False` if it does.

    The record goes to a unique temporary file that is then hard-linked to ``path`` (atomic, and
    it fails if ``path`` exists). On NFS a retransmitted ``link`` may answer "exists" although it
    worked: the temporary file's link count tells. Where a file system has no hard links, ``path``
    is created with ``O_EXCL``, written and fsynced instead (a reader may then see it half-written).
    """
    data = json.dumps(record).encode()
    temporary = path.with_name(f".{path.name}.new-{uuid.uuid4().hex}")
    with storage_errors(path):
        if str(path.parent) in _folders_without_links:
            return _write(path, data, sync=True)
        try:
            _write(temporary, data, sync)
            os.link(temporary, path)
            return True
        except FileExistsError:
            return os.stat(temporary).st_nlink > 1
        except OSError as error:
            if error.errno not in _NO_HARD_LINKS:
                raise
            _folders_without_links.add(str(path.parent))
            return _write(path, data, sync=True)
        finally:
            temporary.unlink(missing_ok=True)


def _write(path: Path, data: bytes, sync: bool) -> bool:
    """Create ``path`` (``O_EXCL``) holding ``data``, or nothing; `False` if it exists."""
    try:
        handle = open(path, "xb")
    except FileExistsError:
        return False
    try:
        with handle:
            handle.write(data)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return True


def _take_over(path: Path, seen: _Seen, stale: Callable[[_Seen], bool]) -> Path | None:
    """Remove the record ``seen``, judged stale, from ``path``; the takeover ticket if exactly that record, still stale, went.

    Contenders for one stale record first race for its ticket ``.<name>.takeover-<token>``: only the
    winner renames, so contenders never move each other's fresh record aside; it keeps the ticket
    until it releases what it then publishes (:func:`_drop`). The others wait until the record is
    gone; if it is still there after :data:`TORN_AFTER` s, the ticket's taker died: the ticket goes.
    Between judging and this call is where contenders race: tests wrap this function to force a schedule.
    """
    ticket = path.with_name(f".{path.name}.takeover-{seen.key()}")
    if not _publish(ticket, _record("takeover", uuid.uuid4().hex)):
        deadline = time.monotonic() + TORN_AFTER
        while time.monotonic() < deadline:
            now = _look(path)
            if now is None or now.key() != seen.key():
                return None  # taken over, or released: judge again
            time.sleep(0.01)
        left = _look(ticket)
        if left is not None and left.token:
            _remove(ticket, left.token)
        return None
    if _move_away(path, lambda moved: moved.key() == seen.key() and stale(moved)):
        return ticket
    _drop(ticket)
    return None


def _drop(ticket: Path | None) -> None:
    if ticket is not None:
        ticket.unlink(missing_ok=True)


def _obtain(path: Path, record: dict[str, Any], stale: Callable[[_Seen], bool],
            sync: bool = False) -> tuple[bool, _Seen | None, Path | None]:
    """Publish ``record`` at ``path``, taking a stale record over: (published, the live record met, the ticket to keep)."""
    ticket = None
    try:
        for _ in range(ATTEMPTS):
            if _publish(path, record, sync=sync):
                kept, ticket = ticket, None
                return True, None, kept
            seen = _look(path)
            if seen is not None and not stale(seen):
                return False, seen, None
            if seen is not None:
                _drop(ticket)
                ticket = _take_over(path, seen, stale)
        return False, None, None
    finally:
        _drop(ticket)


def _move_away(path: Path, expected: Callable[[_Seen], bool]) -> bool:
    """Rename ``path`` to a unique aside name; delete it if ``expected`` of what moved, else put it back (if free)."""
    aside = path.with_name(f".{path.name}.aside-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    removed = False
    try:
        moved = _look(aside)
        removed = moved is not None and expected(moved)
    finally:
        if not removed:
            _put_back(aside, path)
        aside.unlink(missing_ok=True)
    return removed


def _put_back(aside: Path, path: Path) -> None:
    """Return a file moved aside to ``path``, unless someone published there meanwhile (its owner then learns at its next check)."""
    try:
        os.link(aside, path)
    except FileExistsError:
        pass
    except OSError as error:
        if error.errno not in _NO_HARD_LINKS:
            raise
        if not os.path.lexists(path):  # no hard links here: a rename that may, rarely, replace a newcomer
            os.rename(aside, path)


def _remove(path: Path, token: str) -> bool:
    """Remove ``path`` only if it holds ``token``; `True` if it did."""
    for _ in range(ATTEMPTS):
        seen = _look_settled(path)
        if seen is None or seen.token != token:
            return False
        if _move_away(path, lambda moved: moved.token == token):
            return True
    return False


class RunLock:
    """The run lock of ``folder`` for one launch; use as a context manager (see the module docstring).

    Args:
        folder (`str` or `os.PathLike`): the run folder (created if missing, removed again if left empty).
        launch (`str`): this launch's id (:func:`new_launch_id`).
        stale_after (`float`, defaults to :data:`STALE_AFTER`): seconds without heartbeat before another launch may take over.
        heartbeat (`float`, *optional*): seconds between heartbeats (default :data:`HEARTBEAT`, at most ``stale_after / 4``).

    Example:

    >>> import tempfile
    >>> with RunLock(tempfile.mkdtemp(), "launch-1") as lock:
    ...     lock.check()  # raises LostLock if another launch took the lock over
    ...     lock.path.name, lock.lost
    ('.lock', False)
    """

    def __init__(self, folder: str | os.PathLike, launch: str, *, stale_after: float = STALE_AFTER,
                 heartbeat: float | None = None) -> None:
        self.path, self.launch, self.stale_after = Path(folder) / ".lock", launch, stale_after
        self.heartbeat = heartbeat if heartbeat is not None else max(0.01, min(HEARTBEAT, stale_after / 4))
        self.token: str | None = None
        self._ticket: Path | None = None
        self._lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        """Whether a heartbeat or :meth:`check` found the lock taken over (the launch must stop)."""
        return self._lost

    def _stale(self, seen: _Seen) -> bool:
        return seen.age() > self.stale_after or seen.dead_here() or (seen.record is None and seen.age() > TORN_AFTER)

    def acquire(self) -> RunLock:
        """Take the lock: create it; a stale one is taken over (atomically, checked); a live one refuses, naming its holder."""
        self._created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.token, self._lost = uuid.uuid4().hex, False
        published, holder, self._ticket = _obtain(self.path, _record(self.launch, self.token), self._stale, sync=True)
        if holder is not None:
            raise LongAttnError(
                f"another run ({holder.holder()}) is using {self.path.parent}: wait for it to finish, or use another "
                f"output_dir. If that run is dead, delete {self.path} (it also expires {self.stale_after:.0f} s "
                "after its last heartbeat)."
            )
        if not published:
            raise LongAttnError(f"could not take the run lock {self.path}: it keeps changing hands; relaunch")
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="hf_longattn-lock", daemon=True)
        self._thread.start()
        return self

    def _mine(self, touch: bool = False) -> bool:
        seen = _look_settled(self.path, self.token if touch else None)
        return self.token is not None and seen is not None and seen.token == self.token

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                if self._mine(touch=True):
                    continue
            except OSError:
                continue  # a storage hiccup: judged again at the next beat
            self._lost = True
            return

    def check(self) -> None:
        """Fencing: raise :class:`LostLock` unless the lock file still holds this launch's token (one small read)."""
        if self._lost or not self._mine():
            self._lost = True
            raise LostLock(_lost_message(self.launch, self.path))

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, only if it is still ours; a folder this lock created and left empty goes too."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        _drop(self._ticket)
        self._ticket = None
        if self.token is None or self._lost or not _remove(self.path, self.token):
            return
        if getattr(self, "_created", False):  # a launch that wrote nothing leaves no folder behind
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _lost_message(launch: str, path: Path) -> str:
    seen = _look(path)
    other = f"another launch ({seen.holder()})" if seen is not None else "nobody (its lock file was removed)"
    return (f"this launch ({launch}) lost the run lock of {path.parent} to {other} while it was paused or cut off; "
            "it stopped before writing anything more. Let the other launch finish, or stop it and relaunch")


def fence(folder: str | os.PathLike, launch: str) -> None:
    """The run lock's fencing check for any process of a launch: raise :class:`LostLock` unless ``folder/.lock`` holds ``launch``.

    Example:

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with RunLock(folder, "launch-1"):
    ...     fence(folder, "launch-1")  # passes: launch-1 holds the lock
    """
    path = Path(folder) / ".lock"
    seen = _look_settled(path)
    if seen is None or (seen.record or {}).get("launch") != launch:
        raise LostLock(_lost_message(launch, path))


class Claim:
    """The claim of one unit held by this process: ``path`` holds ``token`` until :meth:`release`."""

    def __init__(self, path: Path, token: str, launch: str, ticket: Path | None = None) -> None:
        self.path, self.token, self.launch, self._ticket = path, token, launch, ticket

    def check(self) -> None:
        """Fencing: raise :class:`LostClaim` unless the claim file still holds this claim's token (one small read)."""
        seen = _look_settled(self.path)
        if seen is None or seen.token != self.token:
            now = f"now held by {seen.holder()}" if seen is not None else "its claim file was removed"
            raise LostClaim(f"{self.path}: this process (launch {self.launch}) lost the claim of this unit ({now}) "
                            "while it was paused or cut off; it committed nothing. Let the other launch finish, or "
                            "stop it and relaunch")

    def release(self) -> bool:
        """Remove the claim file if it still holds this claim's token; `True` if it did."""
        removed = _remove(self.path, self.token)
        _drop(self._ticket)
        self._ticket = None
        return removed


def _claim_stale(seen: _Seen, launch: str) -> bool:
    """A claim of another launch is stale (the run lock lets one launch write), and one of this launch whose process is
    gone from this host (a task that died and is retried); an unreadable one once it is old."""
    if seen.record is None:
        return seen.age() > TORN_AFTER
    return seen.record.get("launch") != launch or seen.dead_here()


def claim(path: str | os.PathLike, launch: str, rank: int) -> Claim | None:
    """Claim a unit of work through its claim file ``path``; the `Claim` if this process now owns it, else `None`.

    A claim of the same launch belongs to another process of it (`None`); a claim of another
    launch is stale (see the module docstring) and taken over, atomically and checked.

    Example:

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "chunk-000001.claim"
    >>> held = claim(path, "launch-1", rank=0)
    >>> claim(path, "launch-1", rank=1) is None, held.release(), path.exists()
    (True, True, False)
    """
    path, token = Path(path), uuid.uuid4().hex
    published, _, ticket = _obtain(path, _record(launch, token, rank=rank), lambda seen: _claim_stale(seen, launch))
    return Claim(path, token, launch, ticket) if published else None


def claimed(units: Iterable[Any], claim_file: Callable[[Any], Path], launch: str, rank: int, world_size: int,
            done: Callable[[Any], bool] | None = None) -> Iterator[tuple[Any, Claim]]:
    """Yield ``(unit, claim)`` for the units this process claims, walking all of them from its own offset (balanced).

    A unit already finished (``done(unit)``) is skipped; one finished meanwhile (``done(unit)`` after
    the claim) is released and skipped. Commit a unit's result with ``before_commit=claim.check``, then ``claim.release()``.

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
        if done is not None and done(unit):  # finished already: not worth a claim
            continue
        held = claim(claim_file(unit), launch, rank)
        if held is None:
            continue
        if done is not None and done(unit):  # finished meanwhile by the process that held it
            held.release()
            continue
        yield unit, held


def release_claim(path: str | os.PathLike) -> None:
    """Drop the claim file ``path`` whoever holds it (unconditional; prefer :meth:`Claim.release`, which checks)."""
    Path(path).unlink(missing_ok=True)

"""Files that are complete or absent: atomic writes and folder swaps, checksums, and JSON read with errors that name the file.

A reader sees either the old file, no file, or the complete new one: every file goes to a hidden
temporary name in the same folder, is fsynced, then renamed into place, and the folder is
fsynced. A crash leaves at most a hidden ``.<name>.tmp-<pid>`` behind, which the next writer of
that name removes. Storage errors (full, over quota, read-only) become a `LongAttnError` that
says what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import LongAttnError, is_storage_error, storage_error


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(value: Any) -> str:
    """Hex SHA-256 of ``value`` as JSON with sorted keys (anything JSON cannot write as its `str`).

    Example:

    >>> json_sha256({"b": 1, "a": [2]}) == json_sha256({"a": [2], "b": 1})
    True
    """
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder so that a rename inside it is durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_name(path: str | os.PathLike) -> Path:
    """``.<name>.tmp-<host>-<pid>`` next to ``path`` (two hosts sharing a folder never share a temporary file)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *,
                 before_commit: Callable[[], None] | None = None) -> Path:
    """Write ``path`` through ``write(temporary_path)``, fsync it and rename it into place atomically.

    ``before_commit`` runs right before the rename (a fencing check: the writer still owns the
    unit or the run lock); if it raises, the temporary file is removed and nothing is committed.

    Example:

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "a.txt"
    >>> atomic_write(target, lambda tmp: tmp.write_text("done")).read_text()
    'done'
    """
    path = Path(path)
    temporary = temporary_name(path)
    try:
        with storage_errors(path):
            write(temporary)
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
            if before_commit is not None:
                before_commit()
            os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a storage `OSError` (full, over quota, not writable) inside the block into a clear `LongAttnError`."""
    try:
        yield
    except OSError as error:
        if is_storage_error(error):
            raise storage_error(path, error) from error
        raise


def atomic_write_json(path: str | os.PathLike, data: Any, *, before_commit: Callable[[], None] | None = None) -> Path:
    """:func:`atomic_write` of ``data`` as indented, key-sorted JSON."""
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"
    return atomic_write_text(path, text, before_commit=before_commit)


def atomic_write_text(path: str | os.PathLike, text: str, *, before_commit: Callable[[], None] | None = None) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    def write(temporary: Path) -> None:
        temporary.write_text(text, encoding="utf-8")

    if before_commit is None:  # the two-argument call that wrappers of atomic_write (tests) expect
        return atomic_write(path, write)
    return atomic_write(path, write, before_commit=before_commit)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name; on success it replaces ``path`` whole, on failure nothing changes.

    Yields the temporary folder to fill. Storage errors become a clear `LongAttnError`; the
    temporary folder is removed either way.

    Example:

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "export"
    >>> with atomic_folder(target) as folder:
    ...     _ = (folder / "README.md").write_text("card")
    >>> sorted(p.name for p in target.iterdir())
    ['README.md']
    """
    path = Path(path)
    temporary = temporary_name(path)
    shutil.rmtree(temporary, ignore_errors=True)
    previous = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        with storage_errors(path):
            temporary.mkdir(parents=True)
            yield temporary
            for root, _, files in os.walk(temporary):
                for name in files:
                    with open(os.path.join(root, name), "rb+") as handle:
                        os.fsync(handle.fileno())
            _swap(temporary, path, previous)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)
    fsync_dir(path.parent)


def replace_folder(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put the finished folder ``new`` at ``path`` in one rename; what was there is removed after (restored on failure)."""
    new, path = Path(new), Path(path)
    previous = path.with_name(f".{path.name}.old-{os.getpid()}")
    with storage_errors(path):
        _swap(new, path, previous)
    shutil.rmtree(previous, ignore_errors=True)
    fsync_dir(path.parent)


def _swap(new: Path, path: Path, previous: Path) -> None:
    """Put folder ``new`` at ``path``; the folder there before goes to ``previous``, and comes back if this fails."""
    moved = path.exists()
    if moved:
        os.replace(path, previous)
    try:
        os.replace(new, path)
    except OSError:
        if moved:
            os.replace(previous, path)
        raise


def remove_stale_temporaries(folder: str | os.PathLike, pattern: str = ".*.tmp-*") -> None:
    """Remove leftovers of interrupted atomic writes in ``folder`` (files or folders matching ``pattern``).

    Only those of a process that is gone from this host: another process's write in flight (any
    task of any engine may call this at any time) and another host's are left alone.
    """
    for stale in Path(folder).glob(pattern):
        owner = stale.name.rsplit(".tmp-", 1)[-1]
        host, _, pid = owner.rpartition("-")
        if (host and host != socket.gethostname()) or (pid.isdigit() and _alive(int(pid))):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                stale.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return True


def read_json(path: str | os.PathLike, *, what: str = "", remedy: str = "delete it and relaunch") -> Any:
    """Parse a JSON file; a corrupt or unreadable one raises a `LongAttnError` naming it and what to do.

    Example:

    >>> import tempfile
    >>> bad = Path(tempfile.mkdtemp()) / "timings.json"
    >>> _ = bad.write_text("{trunc")
    >>> read_json(bad, what="step timings")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hf_longattn.errors.LongAttnError: .../timings.json (step timings) is not valid JSON (line 1, column 2: ...): delete it and relaunch
    """
    label = f"{path}" + (f" ({what})" if what else "")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LongAttnError(f"{label} is not UTF-8 text ({error.reason} at byte {error.start}): {remedy}") from error
    except OSError as error:
        raise LongAttnError(f"cannot read {label}: {error.strerror or error}: {remedy}") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise LongAttnError(
            f"{label} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}): {remedy}"
        ) from error

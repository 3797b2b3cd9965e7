"""A launch whose tasks outlive its driver (a Slurm job chain) keeps the run lock through them: they refresh it, the last releases it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .lock import RunLock, _look_settled, _remove, fence


def detach(lock: RunLock) -> None:
    """Keep ``lock`` but stop its heartbeat: the launch's tasks refresh it (:func:`touch`) and the last releases it."""
    lock._stop.set()
    if lock._thread is not None:
        lock._thread.join(timeout=5)
        lock._thread = None


def touch(folder: str | os.PathLike, launch: str) -> None:
    """Refresh the heartbeat of ``folder``'s run lock, which must hold ``launch`` (else `hf_longattn.run.lock.LostLock`)."""
    fence(folder, launch)
    with contextlib.suppress(OSError):
        os.utime(Path(folder) / ".lock")


def release_launch(folder: str | os.PathLike, launch: str) -> bool:
    """Remove ``folder``'s run lock if it still holds ``launch`` (the last task of a detached launch); `True` if it did."""
    path = Path(folder) / ".lock"
    seen = _look_settled(path)
    if seen is None or (seen.record or {}).get("launch") != launch or not seen.token:
        return False
    return _remove(path, seen.token)

"""The one error path: `LongAttnError` carries a one-line message that names the file or row and says what to do."""

from __future__ import annotations

import errno
import os

STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
"""Errors of the output storage itself (full, over quota, not writable): the job stops with a clear message."""


class LongAttnError(RuntimeError):
    """A step cannot go on; the message says why and what to do (the CLI prints it on one line, exit status 2)."""


PipelineError = LongAttnError
"""The name this error had before hf_longattn 0.2 (still raised, still caught)."""


def storage_error(path: str | os.PathLike, error: OSError, *, relaunch: bool = True) -> LongAttnError:
    """A `LongAttnError` for an `OSError` while writing ``path``: what failed, and what to do.

    Example:

    >>> str(storage_error("out/scores/chunk-000001.parquet", OSError(28, "No space left on device")))  # doctest: +ELLIPSIS
    'cannot write out/scores/chunk-000001.parquet: No space left on device (ENOSPC). ...'
    """
    code = errno.errorcode.get(error.errno, error.errno) if error.errno is not None else type(error).__name__
    what = f"cannot write {path}: {error.strerror or error} ({code})."
    if relaunch:
        what += (" Files already completed are intact and nothing partial was left; free space or fix "
                 "permissions, then relaunch the same command: finished work is skipped.")
    return LongAttnError(what)


def is_storage_error(error: BaseException) -> bool:
    """Whether ``error`` is an `OSError` of the storage itself (see :data:`STORAGE_ERRNOS`)."""
    return isinstance(error, OSError) and error.errno in STORAGE_ERRNOS

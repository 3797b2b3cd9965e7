"""The one error path: `LongAttnError` carries a one-line message that names the file or row and says what to do."""

from __future__ import annotations

import difflib
import errno
import os
import re
from collections.abc import Iterable

STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
"""Errors of the output storage itself (full, over quota, not writable): the job stops with a clear message."""


class LongAttnError(RuntimeError):
    """A step cannot go on; the message says why and what to do (the CLI prints it on one line, exit status 2)."""


EXTRA_OF_MODULE = {"datatrove": "datatrove", "orjson": "datatrove", "ray": "ray", "matplotlib": "plots",
                   "gguf": "gguf", "triton": "triton"}
"""The extra of hf-longattn that installs each optional module (pyproject.toml; tests/test_extras.py)."""


def missing_extra(error: ImportError) -> LongAttnError:
    """A one-line `LongAttnError` for a missing optional package, naming the extra that installs it.

    Example:

    >>> str(missing_extra(ImportError("Please install `orjson` to use JsonlWriter (`pip install orjson`).")))
    'Please install `orjson` to use JsonlWriter (`pip install orjson`). It comes with: pip install "hf-longattn[datatrove]"'
    """
    message = " ".join(str(error).split()).rstrip(".") or f"No module named {error.name!r}"
    module = (error.name or "").split(".")[0]
    if module not in EXTRA_OF_MODULE:
        module = next((m for m in EXTRA_OF_MODULE if re.search(rf"\b{m}\b", message)), "")
    if module:
        return LongAttnError(f'{message}. It comes with: pip install "hf-longattn[{EXTRA_OF_MODULE[module]}]"')
    return LongAttnError(f"{message}: install it, then run the same command again")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` to ``word``, or ``""`` when none is close.

    Example:

    >>> did_you_mean("windw_size", ["window_size", "seed"]), did_you_mean("zzz", ["window_size"])
    (" (did you mean 'window_size'?)", '')
    """
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


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

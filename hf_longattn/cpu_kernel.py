"""The compiled CPU kernel behind :func:`~hf_longattn.attention_stats.far_attention_sums`.

``csrc/far_row_sums.cpp`` registers ``torch.ops.hf_longattn.far_row_sums(scores, positions,
distances)``: for each row of a float32 score block ``(N, R, C)`` it takes the causal row maximum,
then computes **one** ``exp`` per visible score and accumulates, in the same pass, the softmax
normaliser ``Z`` and the far-prefix sums ``Σ_{i ≤ n−k} e_i`` and ``Σ_{i ≤ n−k} e_i²`` for every
threshold ``k``; it returns ``Σ p`` and ``Σ p²`` per row and threshold, float64 ``(N, T, R)``.
Far keys are a prefix of each row, so no element is masked. Each row is reduced by one thread in a
fixed order: the result does not depend on the number of threads.

The kernel is built on first use with torch's own extension builder
(`torch.utils.cpp_extension.load`, ninja and the system C++ compiler) for this CPU's vector ISA as
torch reports it (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2 or the portable
default) and cached by torch under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``), one build per ISA, rebuilt when the source changes. Building takes
about 10 s once per machine (logged at INFO while it runs); loading a built kernel takes well under
a second, silently.

Concurrent processes serialise the build on a lock of our own, ``hf_longattn.lock`` in the build
folder (an ``fcntl.flock`` that the OS releases when its holder dies, however it dies; the file
names the holder's pid and host). Up to torch 2.13, torch's own ``lock`` file in that folder stays
behind when a builder is killed and would make every later process wait forever: it is removed
(with a message) while we hold ours. From torch 2.14 that file is an OS lock that stays by design:
it is left alone, silently.
A process waits at most ``HF_LONGATTN_KERNEL_BUILD_TIMEOUT`` seconds (default 600) for the lock,
then warns, naming the holder, and uses the eager path. Where ``flock`` is unavailable (Windows,
some network filesystems) torch's lock alone is used, as before.

Where it cannot be built (no compiler, no ninja) :func:`far_row_sums_function` returns ``None``
once, with a warning, and callers use the eager torch path. Whether it is used at all is decided
in :mod:`hf_longattn.kernels` (``HF_LONGATTN_FUSED=0`` turns it off).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: no flock, torch's own lock file only
    fcntl = None

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "far_row_sums.cpp"

ISA_FLAGS = {  # torch's CPU capability → compiler flags of that vector ISA
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

LOCK_FILE = "hf_longattn.lock"  # our flock, next to torch's ``lock`` in the extension's build folder
TORCH_LOCK_FILE = "lock"  # torch's FileBaton: O_EXCL, no pid inside, left behind by a killed builder
TIMEOUT_VARIABLE = "HF_LONGATTN_KERNEL_BUILD_TIMEOUT"
DEFAULT_TIMEOUT = 600.0  # seconds to wait for another process's build before using the eager path
POLL_SECONDS = 0.05

_LOADED: dict[str, Callable | None] = {}


class BuildLockTimeout(TimeoutError):
    """Another process held the build lock longer than the timeout; its message is the one-line warning."""


def enabled() -> bool:
    """Whether the compiled CPU kernel may be used (``HF_LONGATTN_FUSED`` is not ``0``; read on every call)."""
    return os.environ.get("HF_LONGATTN_FUSED", "1") != "0"


def row_sums() -> Callable | None:
    """The compiled CPU row kernel, or ``None`` when it is switched off or cannot be built here."""
    return far_row_sums_function() if enabled() else None


def far_row_sums_function() -> Callable | None:
    """``torch.ops.hf_longattn.far_row_sums``, built and loaded on first call; ``None`` when unavailable.

    The op takes ``scores`` ``(N, R, C)`` float32 (scaled logits of ``R`` rows against keys
    ``0..C−1``), ``positions`` ``(R,)`` int64 (key ``i`` is visible to row ``n`` iff ``i ≤ n``) and
    ``distances`` ``(T,)`` int64 (key ``i`` is far iff ``i ≤ n − k``), and returns float64
    ``(N, T, R)`` tensors ``Σ_far p`` and ``Σ_far p²`` of each row's causal softmax ``p``.
    """
    if "function" not in _LOADED:
        _LOADED["function"] = _build()
    return _LOADED["function"]


def disable(error: BaseException) -> None:
    """Stop using the kernel in this process (it failed at run time), loudly, once."""
    logger.warning("hf_longattn: compiled attention-statistics kernel failed (%s); using the eager path", error)
    _LOADED["function"] = None


def _registered() -> bool:
    """Whether the op is already registered in this process (built or loaded earlier)."""
    return hasattr(torch.ops.hf_longattn, "far_row_sums")


def _extension(capability: str | None = None) -> tuple[str, list[str]]:
    """The extension's name and compiler flags for a vector ISA.

    Args:
        capability (`str`, *optional*): ``"AVX512"``, ``"AVX2"`` or anything else for the portable
            build; defaults to this CPU's (``torch.backends.cpu.get_cpu_capability()``).

    Returns:
        `tuple` of the extension name (also the name of its build folder) and the ``extra_cflags``.

    Example:
        >>> _extension("SVE256")[0]
        'hf_longattn_far_row_sums_default'
    """
    capability = capability or torch.backends.cpu.get_cpu_capability()
    if capability not in ISA_FLAGS:
        capability = "DEFAULT"  # portable code: at::vec falls back to plain loops
    flags = ["-O3", f"-DCPU_CAPABILITY={capability}"]
    if capability in ISA_FLAGS:
        flags += [f"-DCPU_CAPABILITY_{capability}", *ISA_FLAGS[capability]]
    return f"hf_longattn_far_row_sums_{capability.lower()}", flags


def _build(capability: str | None = None) -> Callable | None:
    """Build (or load the cached build of) the kernel for ``capability`` (default: this CPU's).

    Holds :func:`_build_lock` on the extension's build folder around ``cpp_extension.load``, so a
    builder killed earlier cannot make this process wait forever.

    Args:
        capability (`str`, *optional*): vector ISA to build for (see :func:`_extension`).

    Returns:
        The op, or ``None`` (with a warning) when it cannot be built or the lock was not free in time.

    Example:
        >>> _build("DEFAULT") is not None  # doctest: +SKIP  (needs a C++ compiler; ~10 s the first time)
        True
    """
    if _registered():
        return torch.ops.hf_longattn.far_row_sums
    from torch.utils import cpp_extension

    name, flags = _extension(capability)
    try:
        build_dir = _build_directory(name)
        with _build_lock(build_dir, _lock_timeout()):
            if build_dir is not None and not _is_built(build_dir, name):
                logger.info("building the CPU attention kernel once for this machine (~10 s): %s", build_dir)
            cpp_extension.load(
                name=name, sources=[str(SOURCE)], extra_cflags=flags, is_python_module=False, verbose=False
            )
        return torch.ops.hf_longattn.far_row_sums
    except BuildLockTimeout as error:
        logger.warning("%s", error)
        return None
    except Exception as error:  # noqa: BLE001 - no compiler/ninja: the eager path still works
        logger.warning(
            "hf_longattn: could not build the CPU attention-statistics kernel (%s); using the slower eager "
            "torch path. Install a C++ compiler and `pip install ninja` to enable it.",
            str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__,
        )
        return None


def _build_directory(name: str) -> Path | None:
    """torch's build folder for extension ``name`` (created if missing), as ``cpp_extension.load`` finds it.

    Args:
        name (`str`): the extension name.

    Returns:
        `Path` under ``TORCH_EXTENSIONS_DIR`` (or torch's default root), or ``None`` when this torch
        has no ``_get_build_directory`` (then no lock of ours is taken).

    Example:
        >>> _build_directory("hf_longattn_far_row_sums_avx2").name  # doctest: +SKIP
        'hf_longattn_far_row_sums_avx2'
    """
    from torch.utils import cpp_extension

    try:
        return Path(cpp_extension._get_build_directory(name, verbose=False))
    except AttributeError as error:  # private API: a future torch may move it
        logger.debug("hf_longattn: no build folder from torch (%s); using torch's lock only", error)
        return None


def _is_built(build_dir: Path, name: str) -> bool:
    """Whether a built library newer than the source is in ``build_dir`` (then loading it is quick).

    Args:
        build_dir (`Path`): the extension's build folder.
        name (`str`): the extension name (the library is ``<name>.so``).

    Example:
        >>> _is_built(Path("/nonexistent"), "hf_longattn_far_row_sums_avx2")
        False
    """
    from torch.utils import cpp_extension

    library = build_dir / f"{name}{getattr(cpp_extension, 'LIB_EXT', '.so')}"
    try:
        return library.stat().st_mtime >= SOURCE.stat().st_mtime
    except OSError:
        return False


def _lock_timeout() -> float:
    """Seconds to wait for the build lock: ``HF_LONGATTN_KERNEL_BUILD_TIMEOUT``, default 600.

    Example:
        >>> _lock_timeout()  # with HF_LONGATTN_KERNEL_BUILD_TIMEOUT unset
        600.0
    """
    value = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not value:
        return DEFAULT_TIMEOUT
    try:
        return max(0.0, float(value))
    except ValueError:
        logger.warning(
            "hf_longattn: %s=%r is not a number of seconds; waiting %g s", TIMEOUT_VARIABLE, value, DEFAULT_TIMEOUT
        )
        return DEFAULT_TIMEOUT


def torch_lock_blocks_while_it_exists() -> bool:
    """Whether torch's build ``lock`` blocks by its mere existence, so one left by a killed builder is stale.

    Up to torch 2.13 ``cpp_extension`` takes a ``FileBaton`` (``O_EXCL`` create, removed on release): a
    builder killed mid-build leaves the file and every later process waits forever. From torch 2.14 it
    takes an OS lock on that file (``FileLock``): the kernel frees it when its holder dies and the file
    stays by design, so it is neither removed nor reported.

    Example:
        >>> torch_lock_blocks_while_it_exists()  # torch 2.13  # doctest: +SKIP
        True
    """
    from torch.utils import cpp_extension

    return hasattr(cpp_extension, "FileBaton")


@contextlib.contextmanager
def _build_lock(build_dir: Path | None, timeout: float) -> Iterator[bool]:
    """Hold hf_longattn's lock on ``build_dir`` and clear torch's stale ``lock`` file there.

    The lock is an ``fcntl.flock`` on ``<build_dir>/hf_longattn.lock``: the OS releases it when its
    holder exits or is killed. Every hf_longattn process takes it before ``cpp_extension.load``, so
    while we hold it a torch ``lock`` file in ``build_dir`` that blocks by existing (torch ≤ 2.13, see
    :func:`torch_lock_blocks_while_it_exists`) was left by a killed process and is removed; torch ≥ 2.14's
    lock file is left alone. Where ``flock`` is unavailable nothing is locked or removed (torch's lock only).

    Args:
        build_dir (`Path`, *optional*): the extension's build folder; ``None``: lock nothing.
        timeout (`float`): seconds to wait for another holder.

    Yields:
        `bool`: whether the lock is held (``False``: ``flock`` unavailable, torch's behaviour).

    Raises:
        `BuildLockTimeout`: the lock was not free within ``timeout``; its message names the holder.

    Example:
        >>> with _build_lock(Path(tempfile.mkdtemp()), timeout=5) as held:  # doctest: +SKIP
        ...     held
        True
    """
    fd = _acquire(build_dir / LOCK_FILE, timeout) if build_dir is not None else None
    try:
        if fd is not None and torch_lock_blocks_while_it_exists() and (build_dir / TORCH_LOCK_FILE).exists():
            (build_dir / TORCH_LOCK_FILE).unlink(missing_ok=True)
            logger.info("hf_longattn: removed torch's stale build lock, left by a killed process: %s", build_dir)
        yield fd is not None
    finally:
        if fd is not None:
            _release(fd)


def _acquire(path: Path, timeout: float) -> int | None:
    """Take an exclusive ``flock`` on ``path``, waiting at most ``timeout`` seconds, and write our pid and host.

    Args:
        path (`Path`): the lock file (created if missing, never deleted).
        timeout (`float`): seconds to wait while another process holds it.

    Returns:
        The open file descriptor holding the lock, or ``None`` when ``flock`` is not available here.

    Raises:
        `BuildLockTimeout`: still held by another process after ``timeout`` seconds.

    Example:
        >>> fd = _acquire(Path(tempfile.mkdtemp()) / LOCK_FILE, timeout=5)  # doctest: +SKIP
    """
    if fcntl is None:
        logger.debug("hf_longattn: no fcntl.flock on this platform; using torch's build lock only")
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        logger.debug("hf_longattn: cannot open the build lock %s (%s); using torch's build lock only", path, error)
        return None
    start, announced = time.monotonic(), False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:  # held by another process (or another open of it in this one)
            waited = time.monotonic() - start
            if waited >= timeout:
                holder = _holder(fd)
                os.close(fd)
                raise BuildLockTimeout(
                    f"hf_longattn: waited {waited:.0f} s for the CPU kernel build lock {path}, held by {holder}; "
                    f"using the slower eager torch path. If that process is stuck, end it (the lock is freed when "
                    f"it exits) or set {TIMEOUT_VARIABLE} (seconds) to wait longer."
                ) from None
            if not announced and waited >= 5:
                logger.info("hf_longattn: waiting for %s to build the CPU kernel (lock %s)", _holder(fd), path)
                announced = True
            time.sleep(min(POLL_SECONDS, max(0.0, timeout - waited)))
        except OSError as error:  # ENOLCK, EOPNOTSUPP: some network filesystems
            os.close(fd)
            logger.debug("hf_longattn: flock unavailable on %s (%s); using torch's build lock only", path, error)
            return None
    _write_holder(fd)
    return fd


def _write_holder(fd: int) -> None:
    """Write ``pid <pid> on host <host>`` into the lock file we hold (best effort)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it (``pid 123 on host h``), or ``an unknown process``."""
    try:
        text = os.pread(fd, 256, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "an unknown process"


def _release(fd: int) -> None:
    """Clear our pid from the lock file, release the ``flock`` and close it (best effort)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)

"""The compiled CPU row-sum kernel (``csrc/far_row_sums.cpp``) against a float64 reference, and its fallbacks."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_longattn import attention_stats, cpu_kernel
from hf_longattn.attention_stats import far_attention_sums

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def far_row_sums():
    function = cpu_kernel.far_row_sums_function()
    assert function is not None, "the kernel must build wherever a C++ compiler exists"
    return function


def reference_row_sums(scores: torch.Tensor, positions: torch.Tensor, distances: torch.Tensor):
    """Per row: float64 causal softmax over keys ``i ≤ n``, summed over ``i ≤ n − k`` (p and p²)."""
    scores = scores.double()
    columns = torch.arange(scores.shape[-1])
    visible = columns[None, :] <= positions[:, None]  # (R, C)
    probabilities = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)  # (N, R, C)
    far = columns[None, None, :] <= (positions[None, :, None] - distances[:, None, None])  # (T, R, C)
    masked = probabilities[:, None] * far  # (N, T, R, C)
    return masked.sum(-1), masked.square().sum(-1)


@pytest.mark.parametrize("columns", [1, 15, 16, 17, 100, 333])
def test_matches_float64_reference(far_row_sums, columns):
    generator = torch.Generator().manual_seed(columns)
    rows = 7
    scores = torch.randn(3, rows, columns, generator=generator) * 4  # peaky rows, wide logit range
    positions = torch.randint(0, columns, (rows,), generator=generator)
    positions[0] = columns - 1  # one row sees every key
    distances = torch.tensor([5, 1, columns + 3, 2])  # unsorted; one larger than any position
    mass, square = far_row_sums(scores, positions, distances)
    expected_mass, expected_square = reference_row_sums(scores, positions, distances)
    assert mass.dtype == torch.float64 and mass.shape == (3, 4, rows)
    torch.testing.assert_close(mass, expected_mass, rtol=2e-6, atol=1e-12)
    torch.testing.assert_close(square, expected_square, rtol=2e-6, atol=1e-12)
    assert (mass[:, 2] == 0).all() and (square[:, 2] == 0).all()  # no key is that far


def test_scores_past_a_rows_position_are_never_read(far_row_sums):
    scores = torch.randn(2, 4, 64)
    positions = torch.tensor([10, 20, 30, 63])
    poisoned = scores.clone()
    for row, position in enumerate(positions.tolist()):
        poisoned[:, row, position + 1 :] = float("nan")  # future keys: must not leak into any sum
    distances = torch.tensor([3, 8])
    for clean, dirty in zip(far_row_sums(scores, positions, distances), far_row_sums(poisoned, positions, distances)):
        assert torch.equal(clean, dirty)


def test_result_does_not_depend_on_the_thread_count(far_row_sums):
    scores = torch.randn(6, 48, 2000)
    positions = torch.arange(1952, 2000)
    distances = torch.tensor([500, 1000])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = far_row_sums(scores, positions, distances)
        torch.set_num_threads(max(2, threads))
        multi = far_row_sums(scores, positions, distances)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(single, multi))


@pytest.mark.parametrize(
    ("scores", "positions", "distances", "message"),
    [
        (torch.randn(2, 3, 8, dtype=torch.float64), torch.arange(3), torch.tensor([1]), "float32"),
        (torch.randn(2, 3, 8), torch.arange(3).int(), torch.tensor([1]), "int64"),
        (torch.randn(2, 3, 8), torch.tensor([0, 1, 8]), torch.tensor([1]), "outside"),
        (torch.randn(2, 3, 8), torch.arange(3), torch.tensor([0]), ">= 1"),
    ],
)
def test_bad_input_is_refused(far_row_sums, scores, positions, distances, message):
    with pytest.raises(RuntimeError, match=message):
        far_row_sums(scores, positions, distances)


def test_environment_variable_turns_the_kernel_off(far_row_sums, monkeypatch):
    monkeypatch.setenv("HF_LONGATTN_FUSED", "0")
    from hf_longattn import kernels

    assert kernels.cpu_row_sums() is None and kernels.kernel_name("cpu") == "eager"
    with pytest.raises(RuntimeError, match="compiled CPU kernel"):
        far_attention_sums(torch.randn(1, 2, 32, 8), torch.randn(1, 1, 32, 8), [4], 0.3, fused=True)


def test_a_failing_kernel_falls_back_to_the_eager_path_once(far_row_sums, monkeypatch, caplog):
    query, key = torch.randn(1, 4, 96, 16), torch.randn(1, 2, 96, 16)
    expected = far_attention_sums(query, key, [24], 0.25, block_rows=16, fused=False)
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setitem(cpu_kernel._LOADED, "function", broken)
    with caplog.at_level(logging.WARNING, logger="hf_longattn.cpu_kernel"):
        sums = far_attention_sums(query, key, [24], 0.25, block_rows=16)
    assert len(calls) == 1 and "simulated kernel failure" in caplog.text
    assert torch.equal(sums.far_mass, expected.far_mass)
    assert cpu_kernel._LOADED["function"] is None  # off for the rest of the process


def test_a_failed_build_warns_and_leaves_the_eager_path(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension\nc++: command not found")

    monkeypatch.setattr(cpu_kernel, "_registered", lambda: False)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_kernel, "_LOADED", {})
    with caplog.at_level(logging.WARNING, logger="hf_longattn.cpu_kernel"):
        assert cpu_kernel.far_row_sums_function() is None
    assert "command not found" in caplog.text and "eager" in caplog.text
    query, key = torch.randn(1, 2, 40, 8), torch.randn(1, 1, 40, 8)
    eager = attention_stats.far_attention_sums(query, key, [10], 0.3, fused=False)
    assert torch.equal(attention_stats.far_attention_sums(query, key, [10], 0.3).far_mass, eager.far_mass)


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2"])
def test_other_vector_isas_build_and_agree(capability, tmp_path):
    """The portable build (any CPU) and the AVX2 build, each in a fresh process and build folder."""
    if capability == "AVX2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU cannot run AVX2 code")
    script = f"""
import torch
from hf_longattn import cpu_kernel
from tests.test_cpu_kernel import reference_row_sums
function = cpu_kernel._build({capability!r})
assert function is not None
generator = torch.Generator().manual_seed(0)
scores = torch.randn(2, 5, 77, generator=generator) * 4
positions = torch.tensor([76, 3, 40, 17, 60])
distances = torch.tensor([9, 2])
for ours, expected in zip(function(scores, positions, distances), reference_row_sums(scores, positions, distances)):
    torch.testing.assert_close(ours, expected, rtol=2e-6, atol=1e-12)
print("ok")
"""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / f"hf_longattn_far_row_sums_{capability.lower()}").is_dir()


ROOT = Path(__file__).resolve().parents[1]
posix_only = pytest.mark.skipif(cpu_kernel.fcntl is None or not hasattr(os, "killpg"), reason="needs flock and killpg")

# A fresh process that gets the kernel the way the scorer does and checks it against the eager path.
SUMS_SCRIPT = """
import logging, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
import torch
from hf_longattn import cpu_kernel, kernels
from hf_longattn.attention_stats import far_attention_sums
start = time.monotonic()
function = cpu_kernel.far_row_sums_function()  # seconds to build, load or give up: printed below
print("kernel", kernels.kernel_name("cpu"), f"{time.monotonic() - start:.2f}")
query, key = torch.randn(1, 4, 96, 16), torch.randn(1, 2, 96, 16)
eager = far_attention_sums(query, key, [24], 0.25, block_rows=16, fused=False)
ours = far_attention_sums(query, key, [24], 0.25, block_rows=16)
torch.testing.assert_close(ours.far_mass, eager.far_mass, rtol=1e-5, atol=1e-12)
torch.testing.assert_close(ours.far_square_mass, eager.far_square_mass, rtol=1e-5, atol=1e-12)
print("ok")
"""


def run_sums(extensions: Path, timeout: float = 300, **env) -> tuple[subprocess.CompletedProcess, float]:
    """Run :data:`SUMS_SCRIPT` with a private ``TORCH_EXTENSIONS_DIR``; the process and its wall time."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "HF_LONGATTN_FUSED": "1", **env}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", SUMS_SCRIPT], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc, time.monotonic() - start


@posix_only
def test_torchs_lock_file_is_removed_only_where_its_existence_blocks(tmp_path, monkeypatch, caplog):
    """torch ≤ 2.13 (FileBaton): a leftover ``lock`` is stale, removed with a message. torch ≥ 2.14 (FileLock):
    the file stays by design and a live holder may have it open: left alone, nothing said."""
    from torch.utils import cpp_extension

    caplog.set_level(logging.INFO, logger="hf_longattn")
    (tmp_path / "lock").touch()
    monkeypatch.setattr(cpp_extension, "FileBaton", object(), raising=False)  # torch ≤ 2.13
    with cpu_kernel._build_lock(tmp_path, timeout=5):
        pass
    assert not (tmp_path / "lock").exists() and "removed torch's stale build lock" in caplog.text

    caplog.clear()
    (tmp_path / "lock").touch()
    monkeypatch.delattr(cpp_extension, "FileBaton")  # torch ≥ 2.14
    with cpu_kernel._build_lock(tmp_path, timeout=5):
        pass
    assert (tmp_path / "lock").exists() and "lock" not in caplog.text


@posix_only
@pytest.mark.slow
@pytest.mark.skipif(not cpu_kernel.torch_lock_blocks_while_it_exists(), reason="torch ≥ 2.14 frees its build lock itself")
def test_a_builder_killed_mid_build_does_not_hang_the_next_process(tmp_path):
    """SIGKILL a process while it builds: torch's ``lock`` stays behind; on the old code the next one waited forever."""
    build_dir = tmp_path / cpu_kernel._extension()[0]
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "HF_LONGATTN_FUSED": "1"}
    builder = subprocess.Popen(
        [sys.executable, "-c", "from hf_longattn import cpu_kernel; cpu_kernel.far_row_sums_function()"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (build_dir / "lock").exists() and builder.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    caught = builder.poll() is None and (build_dir / "lock").exists()
    try:
        os.killpg(builder.pid, signal.SIGKILL)  # it and its ninja/compiler children, as a job scheduler does
    except ProcessLookupError:
        pass
    builder.wait(timeout=60)
    if not caught:  # it finished before we saw the lock: leave the file a killed builder leaves
        (build_dir / "lock").touch()
    assert (build_dir / "lock").exists()

    proc, seconds = run_sums(tmp_path)  # bounded: a hang fails here with TimeoutExpired
    assert "kernel cpp" in proc.stdout, proc.stderr[-4000:]
    assert "removed torch's stale build lock" in proc.stderr
    assert not (build_dir / "lock").exists()
    if caught:
        assert "building the CPU attention kernel once for this machine" in proc.stderr
    print(f"killed mid-build: {caught}; next process: {seconds:.1f} s ({proc.stdout.split()[2]} s to the kernel)")

    (build_dir / "lock").touch()  # a builder killed while loading the finished build (~4 ms window)
    proc, seconds = run_sums(tmp_path, timeout=120)
    assert "kernel cpp" in proc.stdout and "removed torch's stale build lock" in proc.stderr
    assert "building" not in proc.stderr  # a cached load stays silent
    print(f"stale lock over a finished build: recovered in {seconds:.1f} s ({proc.stdout.split()[2]} s to the kernel)")


@posix_only
def test_a_held_build_lock_times_out_to_the_eager_path_naming_the_holder(tmp_path):
    build_dir = tmp_path / cpu_kernel._extension()[0]
    build_dir.mkdir()
    with cpu_kernel._build_lock(build_dir, timeout=0) as held:
        assert held
        proc, seconds = run_sums(tmp_path, timeout=120, HF_LONGATTN_KERNEL_BUILD_TIMEOUT="2")
    assert "kernel eager" in proc.stdout, proc.stderr[-4000:]
    waited = float(proc.stdout.split()[2])  # in the child, from asking for the kernel to giving up
    assert 2 <= waited < 10, proc.stdout
    warning = next(line for line in proc.stderr.splitlines() if line.startswith("WARNING"))
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in warning
    assert str(build_dir / cpu_kernel.LOCK_FILE) in warning and "HF_LONGATTN_KERNEL_BUILD_TIMEOUT" in warning
    assert not list(build_dir.glob("*.so"))  # nothing was built behind the lock
    print(f"timed out and fell back in {seconds:.1f} s")


@posix_only
def test_the_build_lock_excludes_a_second_holder_and_is_freed_on_exit(tmp_path):
    (tmp_path / "lock").touch()  # torch's, as a killed builder leaves it
    with cpu_kernel._build_lock(tmp_path, timeout=0) as held:
        assert held and not (tmp_path / "lock").exists()
        assert (tmp_path / cpu_kernel.LOCK_FILE).read_text() == f"pid {os.getpid()} on host {socket.gethostname()}\n"
        start = time.monotonic()
        with (
            pytest.raises(cpu_kernel.BuildLockTimeout, match=f"held by pid {os.getpid()} on host"),
            cpu_kernel._build_lock(tmp_path, timeout=0.3),
        ):
            pass
        assert 0.3 <= time.monotonic() - start < 5
    with cpu_kernel._build_lock(tmp_path, timeout=0) as held:  # free again, and our pid was cleared
        assert held


@posix_only
def test_without_flock_torchs_own_lock_is_used_as_before(tmp_path, monkeypatch, caplog):
    class NoFlock:
        LOCK_EX, LOCK_NB, LOCK_UN = 2, 4, 8

        @staticmethod
        def flock(fd, operation):
            raise OSError(errno.ENOLCK, "No locks available")

    (tmp_path / "lock").touch()
    monkeypatch.setattr(cpu_kernel, "fcntl", NoFlock)
    with (
        caplog.at_level(logging.DEBUG, logger="hf_longattn.cpu_kernel"),
        cpu_kernel._build_lock(tmp_path, timeout=0) as held,
    ):
        assert not held
    assert (tmp_path / "lock").exists()  # not ours to remove without our lock
    assert "flock unavailable" in caplog.text
    monkeypatch.setattr(cpu_kernel, "fcntl", None)  # Windows
    with cpu_kernel._build_lock(tmp_path, timeout=0) as held:
        assert not held


@pytest.mark.parametrize(("value", "seconds"), [(None, 600.0), ("2", 2.0), ("0.5", 0.5), ("-1", 0.0), ("ten", 600.0)])
def test_the_lock_timeout_comes_from_the_environment(monkeypatch, value, seconds):
    if value is None:
        monkeypatch.delenv(cpu_kernel.TIMEOUT_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(cpu_kernel.TIMEOUT_VARIABLE, value)
    assert cpu_kernel._lock_timeout() == seconds

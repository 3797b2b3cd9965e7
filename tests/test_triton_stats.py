"""Tests for hf_longattn.triton_stats: the Triton kernel (interpreted on CPU) vs the float64 full-map reference.

Run: ``python -m pytest tests/test_triton_stats.py`` (about 20 s on 2 CPU cores). Triton decorates
its own library when first imported, so the numpy interpreter must be on before that import:
on a machine without CUDA this module turns it on itself if Triton is not imported yet; otherwise
(a GPU machine, or Triton imported earlier by another module) the interpreter tests run in a
subprocess with ``TRITON_INTERPRET=1`` and the CUDA test runs here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first `import triton`
pytest.importorskip("triton")

from hf_longattn import triton_stats  # noqa: E402
from hf_longattn.attention_stats import dependency_statistics, far_attention_sums  # noqa: E402
from hf_longattn.reference import causal_attention_map, sums_from_attention_map  # noqa: E402
from hf_longattn.kernels import attention_sums  # noqa: E402
from hf_longattn.triton_stats import triton_available, triton_far_attention_sums  # noqa: E402

INTERPRETER = triton_stats._interpreting()
needs_interpreter = pytest.mark.skipif(
    not INTERPRETER, reason="Triton was imported without TRITON_INTERPRET=1: see test_interpreter_tests_in_subprocess"
)


@pytest.mark.skipif(INTERPRETER, reason="for a CUDA GPU machine (without a GPU, conftest turns the Triton interpreter on "
                                        "and the interpreter tests run in this process)")
def test_interpreter_tests_in_subprocess():
    root = Path(__file__).resolve().parents[1]
    python_path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": python_path}
    command = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


def make_qk(batch, heads, kv_heads, length, head_dim, dtype=torch.float32, seed=0):
    """Random q (B, H, L, d) and k (B, H_kv, L, d) with peaky enough logits to make S2 informative."""
    generator = torch.Generator().manual_seed(seed)
    query = 1.5 * torch.randn(batch, heads, length, head_dim, generator=generator)
    key = 1.5 * torch.randn(batch, kv_heads, length, head_dim, generator=generator)
    return query.to(dtype), key.to(dtype)


def reference_sums(query, key, distances, scaling):
    """Float64 full-map S1/S2 from the (possibly bf16-rounded) q/k."""
    return sums_from_attention_map(causal_attention_map(query.double(), key.double(), scaling), distances)


def relative_error(actual, expected):
    return ((actual - expected).abs() / expected.abs().clamp_min(1e-300)).max().item()


def assert_sums_close(result, expected, rtol):
    assert result.length == expected.length
    assert result.far_mass.dtype == torch.float64 and result.far_mass.shape == expected.far_mass.shape
    # Thresholds >= L give exactly zero in both.
    assert torch.equal(result.far_mass == 0, expected.far_mass == 0)
    assert relative_error(result.far_mass, expected.far_mass) <= rtol
    assert relative_error(result.far_square_mass, expected.far_square_mass) <= rtol
    got, want = dependency_statistics(result), dependency_statistics(expected)
    assert relative_error(got.dependency_strength, want.dependency_strength) <= rtol
    assert relative_error(got.variance_per_head, want.variance_per_head) <= rtol
    assert relative_error(got.dependency_uniformity, want.dependency_uniformity) <= rtol


CASES = [
    # length, head_dim, heads, kv_heads, block_m, block_n
    (64, 16, 4, 2, 16, 16),
    (100, 64, 6, 3, 16, 32),
    (257, 16, 4, 2, 32, 16),
]


@pytest.mark.parametrize(("length", "head_dim", "heads", "kv_heads", "block_m", "block_n"), CASES)
@needs_interpreter
def test_matches_reference_fp32(length, head_dim, heads, kv_heads, block_m, block_n):
    query, key = make_qk(2, heads, kv_heads, length, head_dim)
    distances = [length // 4, 5, length - 1, length]
    scaling = head_dim**-0.5
    result = triton_far_attention_sums(query, key, distances, scaling, block_m=block_m, block_n=block_n)
    assert_sums_close(result, reference_sums(query, key, distances, scaling), rtol=1e-4)


@pytest.mark.parametrize(
    ("length", "head_dim", "heads", "kv_heads", "dtype"),
    [(100, 16, 4, 2, torch.bfloat16), (64, 64, 6, 3, torch.bfloat16), (64, 16, 4, 2, torch.float16)],
)
@needs_interpreter
def test_matches_reference_half_precision(length, head_dim, heads, kv_heads, dtype):
    query, key = make_qk(2, heads, kv_heads, length, head_dim, dtype=dtype, seed=1)
    distances = [length // 4, 5, length - 1, length]
    scaling = head_dim**-0.5
    result = triton_far_attention_sums(query, key, distances, scaling, block_m=16, block_n=32)
    # Reference from the same rounded q/k: only float32 logits/sums separate the two.
    assert_sums_close(result, reference_sums(query, key, distances, scaling), rtol=1e-3)


@needs_interpreter
def test_strided_inputs_odd_head_dim_and_skipped_blocks():
    """(B, L, H, d) views transposed to (B, H, L, d), d = 24 zero-padded to 32, first 4 query blocks skipped."""
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(1, 90, 4, 24, generator=generator).transpose(1, 2)  # (B, H, L, d), non-contiguous
    key = torch.randn(1, 90, 1, 24, generator=generator).transpose(1, 2)  # (B, H_kv, L, d), H_kv = 1
    distances = [70, 75]
    result = triton_far_attention_sums(query, key, distances, 0.3, block_m=16, block_n=16)
    assert_sums_close(result, reference_sums(query, key, distances, 0.3), rtol=1e-4)


@needs_interpreter
def test_a_wrong_threshold_is_detected():
    """The comparison can fail: k and k + 1 differ by a whole diagonal of the map."""
    query, key = make_qk(1, 2, 1, 64, 16, seed=3)
    result = triton_far_attention_sums(query, key, [16], 0.25, block_m=16, block_n=16)
    shifted = reference_sums(query, key, [17], 0.25)
    assert relative_error(result.far_mass, shifted.far_mass) > 1e-3
    with pytest.raises(AssertionError):
        assert_sums_close(result, shifted, rtol=1e-4)


@needs_interpreter
def test_matches_torch_blockwise():
    query, key = make_qk(1, 4, 2, 80, 16, seed=4)
    distances = [3, 20, 79]
    expected = far_attention_sums(query, key, distances, 0.25, block_rows=16)
    result = triton_far_attention_sums(query, key, distances, 0.25, block_m=16, block_n=32)
    assert_sums_close(result, expected, rtol=1e-4)


@needs_interpreter
def test_all_thresholds_past_the_window_give_zeros():
    query, key = make_qk(1, 2, 2, 32, 16)
    result = triton_far_attention_sums(query, key, [32, 40], 0.25)
    assert result.far_mass.shape == (1, 2, 2) and not result.far_mass.any() and not result.far_square_mass.any()


@needs_interpreter
def test_validation_errors(monkeypatch):
    query, key = make_qk(1, 4, 2, 32, 16)
    with pytest.raises(ValueError, match="GQA"):
        triton_far_attention_sums(query, key[:, :, :16], [8], 0.25)
    with pytest.raises(ValueError, match="positive"):
        triton_far_attention_sums(query, key, [0], 0.25)
    with pytest.raises(TypeError, match="float16"):
        triton_far_attention_sums(query.double(), key.double(), [8], 0.25)
    with pytest.raises(ValueError, match="power of two"):
        triton_far_attention_sums(query, key, [8], 0.25, block_m=24)
    monkeypatch.setattr(triton_stats, "_interpreting", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        triton_far_attention_sums(query, key, [8], 0.25)


def test_triton_available(monkeypatch):
    assert triton_available() == (INTERPRETER or torch.cuda.is_available())
    monkeypatch.setattr(triton_stats, "triton", None)
    assert not triton_available()


def test_dispatcher_uses_torch_for_cpu_tensors(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton kernel must not run for CPU tensors")

    monkeypatch.setattr(triton_stats, "triton_far_attention_sums", fail)
    query, key = make_qk(1, 4, 2, 48, 8)
    result = attention_sums(query, key, [12, 30], 8**-0.5, block_rows=16, block_m=32)  # block_m: ignored here
    expected = far_attention_sums(query, key, [12, 30], 8**-0.5, block_rows=16)
    torch.testing.assert_close(result.far_mass, expected.far_mass, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.far_square_mass, expected.far_square_mass, rtol=1e-12, atol=0)
    with pytest.raises(AssertionError, match="must not run"):
        attention_sums(query, key, [12], 8**-0.5, backend="triton")
    with pytest.raises(TypeError, match="block_bytes"):
        attention_sums(query, key, [12], 8**-0.5, block_size=16)
    with pytest.raises(ValueError, match="backend"):
        attention_sums(query, key, [12], 8**-0.5, backend="cuda")


COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hf_longattn.triton_stats import _kernel

kernel = _kernel(False)
for dtype, precision, capability in (("bf16", "tf32", 90), ("fp32", "ieee", 80)):
    constexprs = dict(NUM_T=8, T_PAD=8, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, INPUT_PRECISION=precision, UPCAST=False)
    pointers = dict(q_ptr="*" + dtype, k_ptr="*" + dtype, thresholds_ptr="*i32", out_ptr="*fp32")
    scalar = {"scale_log2": "fp32"}
    signature = {
        name: pointers.get(name, "constexpr" if name in constexprs else scalar.get(name, "i32"))
        for name in kernel.arg_names
    }
    source = ASTSource(kernel, signature, {(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})
    assert "cubin" in compiled.asm, compiled.asm.keys()
print("compiled")
"""


def test_kernel_compiles_for_ampere_and_hopper(tmp_path):
    """Compile to cubin ahead of time (no GPU needed): catches code the interpreter runs but the compiler rejects."""
    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[1]
    python_path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": python_path}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    command = [sys.executable, "-c", COMPILE_SCRIPT]
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETER, reason="needs a CUDA GPU and compiled Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernel_matches_reference(dtype):
    query, key = make_qk(2, 8, 2, 1000, 128, dtype=dtype, seed=5)
    query, key = query.cuda(), key.cuda()
    distances = [250, 7, 999, 1000]
    result = attention_sums(query, key, distances, 128**-0.5)
    assert result.far_mass.device.type == "cuda"
    expected = reference_sums(query.cpu(), key.cpu(), distances, 128**-0.5)
    got = type(expected)(result.far_mass.cpu(), result.far_square_mass.cpu(), result.length)
    assert_sums_close(got, expected, rtol=1e-4 if dtype == torch.float32 else 1e-3)

"""Far-region attention statistics with a fused Triton kernel for CUDA (online softmax, no L×L map).

Same quantities as :mod:`hf_longattn.attention_stats`, per head ``h`` and threshold ``k``:

* S1_h = Σ_{n−i ≥ k} M[n, i],   S2_h = Σ_{n−i ≥ k} M[n, i]²,   M = causal softmax(q kᵀ · scaling).

One program owns ``BLOCK_M`` query rows of one (batch, head) and streams the key blocks of its
causal range once, keeping per row (base-2 logits ``s``, FlashAttention-style online softmax):

* running max ``m`` and normaliser ``l = Σ_{i ≤ n} 2^(s_i − m)``,
* for every threshold ``a = Σ_far 2^(s_i − m)`` and ``b = Σ_far 2^(2(s_i − m))``;
  when the max grows from ``m`` to ``m'`` they are rescaled by ``α = 2^(m − m')``
  (``l``, ``a``) and ``α²`` (``b``).

At the end the row's far mass is ``a / l`` and its far square mass ``b / l²``. Each program sums
its rows in float32 and writes one partial per (threshold, head, query block); the host adds the
partials in float64 — deterministic, no atomics. Memory is O(L·d): the map is never formed.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence

import torch

from .attention_stats import FarAttentionSums

try:  # Triton is optional: `pip install hf-longattn[triton]` (it ships with torch on Linux + CUDA).
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_THRESHOLDS = 16


def _interpreting() -> bool:
    """Whether Triton runs kernels on the CPU with numpy, i.e. it was imported with ``TRITON_INTERPRET=1``.

    Triton decorates its own library (``tl.zeros``, the reductions) when it is imported, so the
    variable must be set before the first ``import triton``; setting it later changes nothing.
    """
    if triton is None:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old Triton
        return False
    return isinstance(getattr(tl.standard, "zeros", None), InterpretedFunction)


def triton_available() -> bool:
    """Whether the Triton kernel can run here: Triton importable, and CUDA present or the interpreter on.

    The interpreter is on when Triton was first imported with ``TRITON_INTERPRET=1``.

    Example:
        >>> isinstance(triton_available(), bool)
        True
    """
    return triton is not None and (torch.cuda.is_available() or _interpreting())


def _far_sums_kernel(
    q_ptr,
    k_ptr,
    thresholds_ptr,
    out_ptr,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_oc,
    stride_ot,
    stride_obh,
    stride_om,
    heads,
    groups,
    length,
    head_dim,
    last_block,
    min_distance,
    scale_log2,
    NUM_T: tl.constexpr,
    T_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Per (query block, batch·head): float32 partial sums of far mass and far square mass, per threshold.

    Writes ``out[0, t, bh, pid_m]`` = Σ_rows a_t / l and ``out[1, t, bh, pid_m]`` = Σ_rows b_t / l².

    Why one long function: it is one GPU program. Its 23 launch arguments are pointers, strides
    and compile-time sizes, and its loop keeps the running max, normaliser and per-threshold sums
    in registers; a helper ``@triton.jit`` function would only move the same lines elsewhere.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # Heaviest blocks (longest causal range) first, for a better tail on the GPU.
    start_m = (last_block - pid_m) * BLOCK_M
    batch = (pid_bh // heads).to(tl.int64)
    head = (pid_bh % heads).to(tl.int64)
    kv_head = head // groups  # GQA by index, as transformers' repeat_kv

    rows = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    dims = tl.arange(0, BLOCK_D)  # (BLOCK_D,), zero-padded past head_dim
    t_idx = tl.arange(0, T_PAD)  # (T_PAD,)
    q_ptrs = q_ptr + batch * stride_qb + head * stride_qh + rows[:, None] * stride_ql + dims[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(rows[:, None] < length) & (dims[None, :] < head_dim), other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST:  # exact; only for the interpreter, whose bfloat16 tl.dot is wrong (Triton 3.9)
        q = q.to(tl.float32)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base-2 logits)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running normaliser
    acc_a = tl.zeros([BLOCK_M, T_PAD], tl.float32)  # Σ_far 2^(s − m), one column per threshold
    acc_b = tl.zeros([BLOCK_M, T_PAD], tl.float32)  # Σ_far 2^(2(s − m))

    end_n = tl.minimum(start_m + BLOCK_M, length)  # causal range of the block's last row
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        k_ptrs = k_base + cols[None, :] * stride_kl + dims[:, None] * stride_kd
        k_mask = (cols[None, :] < length) & (dims[:, None] < head_dim)
        k_t = tl.load(k_ptrs, mask=k_mask, other=0.0)  # (BLOCK_D, BLOCK_N): keys transposed
        if UPCAST:
            k_t = k_t.to(tl.float32)
        scores = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N), fp32
        if start_n + BLOCK_N - 1 > start_m:  # the tile reaches the diagonal: mask future keys
            scores = tl.where(cols[None, :] <= rows[:, None], scores, float("-inf"))
        # Column 0 is visible to every row, so m_new is finite from the first tile on.
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        p_sum = tl.sum(p, 1)
        l_i = l_i * alpha + p_sum
        acc_a = acc_a * alpha[:, None]
        acc_b = acc_b * (alpha * alpha)[:, None]
        m_i = m_new
        # Tile entirely far for the smallest threshold: its full row sums serve every such threshold.
        p_sq = tl.zeros([BLOCK_M], tl.float32)
        if start_n + BLOCK_N - 1 + min_distance <= start_m:
            p_sq = tl.sum(p * p, 1)
        for t in tl.static_range(NUM_T):
            distance = tl.load(thresholds_ptr + t)
            selected = (t_idx == t)[None, :]  # (1, T_PAD)
            if start_n + BLOCK_N - 1 + distance <= start_m:
                # Every (row, key) of the tile is far: no mask needed.
                acc_a += tl.where(selected, p_sum[:, None], 0.0)
                acc_b += tl.where(selected, p_sq[:, None], 0.0)
            elif start_n + distance <= start_m + BLOCK_M - 1:
                # The tile straddles the far boundary i = n − k.
                p_far = tl.where(cols[None, :] <= rows[:, None] - distance, p, 0.0)
                acc_a += tl.where(selected, tl.sum(p_far, 1)[:, None], 0.0)
                acc_b += tl.where(selected, tl.sum(p_far * p_far, 1)[:, None], 0.0)

    inv_l = 1.0 / l_i
    valid = (rows < length)[:, None]  # padded rows past L contribute nothing
    mass = tl.where(valid, acc_a * inv_l[:, None], 0.0)  # (BLOCK_M, T_PAD): far mass per row
    square = tl.where(valid, acc_b * (inv_l * inv_l)[:, None], 0.0)  # far square mass per row
    out_ptrs = out_ptr + t_idx * stride_ot + pid_bh * stride_obh + pid_m * stride_om
    tl.store(out_ptrs, tl.sum(mass, 0), mask=t_idx < NUM_T)
    tl.store(out_ptrs + stride_oc, tl.sum(square, 0), mask=t_idx < NUM_T)


@functools.cache
def _kernel(interpret: bool):
    """The kernel, wrapped on first use for the mode Triton was imported in (compiled or numpy interpreter)."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_far_sums_kernel)
    return triton.runtime.jit.JITFunction(_far_sums_kernel)


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, value))))


def _check_inputs(query: torch.Tensor, key: torch.Tensor, min_distances: Sequence[int], block_m: int,
                  block_n: int) -> list[int]:
    """Validate the kernel's inputs (shapes, dtypes, device, block sizes, thresholds); return the thresholds."""
    if triton is None:
        raise ImportError("triton_far_attention_sums needs Triton: `pip install triton` (or hf-longattn[triton])")
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"query and key must be (B, H, L, d) tensors, got {tuple(query.shape)} and {tuple(key.shape)}")
    batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    if key.shape != (batch, kv_heads, length, head_dim) or kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} do not form a (GQA) attention pair")
    if query.dtype not in SUPPORTED_DTYPES or key.dtype != query.dtype:
        raise TypeError(
            f"query/key dtypes {query.dtype}/{key.dtype} not supported: both must be one of "
            f"{[str(d) for d in SUPPORTED_DTYPES]}"
        )
    if key.device != query.device:
        raise ValueError(f"query is on {query.device} but key is on {key.device}")
    if not query.is_cuda and not _interpreting():
        raise ValueError(
            f"the Triton kernel needs CUDA tensors (got {query.device}); to run it on the CPU set "
            "TRITON_INTERPRET=1 before Triton is first imported, or use far_attention_sums / attention_sums"
        )
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} > {MAX_HEAD_DIM} is not supported by the Triton kernel")
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {size}")
    distances = [int(k) for k in min_distances]
    if not distances or min(distances) < 1:
        raise ValueError(f"min_distances must be positive integers, got {list(min_distances)}")
    if len(distances) > MAX_THRESHOLDS:
        raise ValueError(f"at most {MAX_THRESHOLDS} thresholds per pass, got {len(distances)}")
    return distances


def triton_far_attention_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    min_distances: Sequence[int],
    scaling: float,
    *,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> FarAttentionSums:
    """S1 and S2 of the causal softmax map over the far region, per head, with one fused Triton kernel.

    Same inputs and outputs as :func:`hf_longattn.attention_stats.far_attention_sums`. Logits and all
    sums are float32 (``tl.dot`` with a float32 accumulator; float32 inputs use IEEE products, not
    TF32, which is exact but slower — feed bfloat16/float16 for speed); per-block partials are added
    in float64 on the host. ``d`` is zero-padded to a power of two (at most 256). Query blocks whose
    rows are all closer than ``min(min_distances)`` to the start are not launched.

    Args:
        query (`torch.Tensor`, ``(B, H, L, d)``, float16/bfloat16/float32, CUDA — or CPU under
            ``TRITON_INTERPRET=1``): query states after RoPE. Any strides.
        key (`torch.Tensor`, ``(B, H_kv, L, d)``, same dtype and device): key states, *not* repeated
            for GQA; query head ``h`` reads key head ``h // (H // H_kv)``.
        min_distances (sequence of `int`): thresholds k in tokens (at most 16); pair ``(n, i)`` is far
            when ``n − i >= k``. All are computed in the same pass.
        scaling (`float`): logit scale (``1/sqrt(d)`` for most models).
        block_m (`int`, defaults to 64): query rows per program (power of two, >= 16).
        block_n (`int`, defaults to 64): keys per tile (power of two, >= 16).
        num_warps (`int`, *optional*): Triton launch option; Triton's default if unset.
        num_stages (`int`, *optional*): Triton launch option; Triton's default if unset.

    Returns:
        `FarAttentionSums` with float64 ``(B, T, H)`` tensors, ``T = len(min_distances)``.

    Example:
        >>> q, k = torch.randn(1, 4, 64, 16, device="cuda"), torch.randn(1, 2, 64, 16, device="cuda")  # doctest: +SKIP
        >>> triton_far_attention_sums(q, k, [16], 16 ** -0.5).far_mass.shape  # doctest: +SKIP
        torch.Size([1, 1, 4])
    """
    distances = _check_inputs(query, key, min_distances, block_m, block_n)
    batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]

    n_thresholds = len(distances)
    far_mass = torch.zeros(batch, n_thresholds, heads, dtype=torch.float64, device=query.device)
    far_square_mass = torch.zeros_like(far_mass)
    first_row = min(distances)
    if first_row >= length or batch == 0 or heads == 0:
        return FarAttentionSums(far_mass, far_square_mass, length)

    # Thresholds >= L select nothing; clamping keeps them in int32.
    thresholds = torch.tensor([min(k, length) for k in distances], dtype=torch.int32, device=query.device)
    first_block = first_row // block_m  # earlier blocks only hold rows n < min(k): no far keys
    last_block = triton.cdiv(length, block_m) - 1
    n_blocks = last_block - first_block + 1
    partials = torch.empty(2, n_thresholds, batch * heads, n_blocks, dtype=torch.float32, device=query.device)
    launch = {name: value for name, value in (("num_warps", num_warps), ("num_stages", num_stages)) if value is not None}
    interpret = _interpreting()
    upcast = interpret and query.dtype == torch.bfloat16
    grid = (n_blocks, batch * heads)  # heaviest query blocks first, see the kernel
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        _kernel(interpret)[grid](
            query,
            key,
            thresholds,
            partials,
            *query.stride(),
            *key.stride(),
            *partials.stride(),
            heads,
            heads // kv_heads,
            length,
            head_dim,
            last_block,
            first_row,
            float(scaling) * math.log2(math.e),  # base-2 logits: exp(x) = 2^(x·log2 e)
            NUM_T=n_thresholds,
            T_PAD=_next_power_of_two(n_thresholds),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=max(16, _next_power_of_two(head_dim)),
            INPUT_PRECISION="ieee" if query.dtype == torch.float32 or upcast else "tf32",
            UPCAST=upcast,
            **launch,
        )
    # (2, T, B·H, blocks) → sum over blocks in float64 → (2, B, T, H)
    sums = partials.double().sum(-1).view(2, n_thresholds, batch, heads).transpose(1, 2)
    return FarAttentionSums(sums[0].contiguous(), sums[1].contiguous(), length)

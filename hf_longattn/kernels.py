"""The one place that picks the kernel for the far-region sums: Triton on CUDA, the compiled C++ kernel on CPU, or eager torch.

Three implementations compute the same float64 ``(B, T, H)`` sums S1 and S2 (see
:mod:`hf_longattn.attention_stats`):

* ``triton`` — :func:`hf_longattn.triton_stats.triton_far_attention_sums`, one pass with an online
  softmax; used for CUDA tensors when Triton imports.
* ``cpp`` — :mod:`hf_longattn.cpu_kernel`, one ``exp`` per visible score; used for CPU tensors
  when it builds (a C++ compiler and ninja) and ``HF_LONGATTN_FUSED`` is not ``0``.
* ``eager`` — blockwise torch, everywhere else (same numbers as ``cpp``, about 1.5× slower).

``HF_LONGATTN_FUSED`` is read on every call, so a process and the workers it spawns agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import cpu_kernel
from .attention_stats import FarAttentionSums, far_attention_sums

TRITON_OPTIONS = frozenset({"block_m", "block_n", "num_warps", "num_stages"})
TORCH_OPTIONS = frozenset({"block_rows", "block_bytes"})
BACKENDS = ("auto", "triton", "torch")


cpu_kernel_enabled = cpu_kernel.enabled
"""Whether the compiled CPU kernel may be used (`hf_longattn.cpu_kernel.enabled`)."""
cpu_row_sums = cpu_kernel.row_sums
"""The compiled CPU row kernel, or ``None`` (`hf_longattn.cpu_kernel.row_sums`)."""


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernel runs for tensors on ``device`` (CUDA, and Triton imports)."""
    from . import triton_stats

    return device.type == "cuda" and triton_stats.triton is not None


def kernel_name(device: str | torch.device) -> str:
    """``"triton"``, ``"cpp"`` or ``"eager"``: what :func:`attention_sums` uses for tensors on ``device``.

    Example:

    >>> kernel_name("cpu") in ("cpp", "eager")
    True
    """
    device = torch.device(device)
    if triton_usable(device):
        return "triton"
    if device.type == "cpu" and cpu_row_sums() is not None:
        return "cpp"
    return "eager"


def attention_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    min_distances: Sequence[int],
    scaling: float,
    *,
    backend: str = "auto",
    **options,
) -> FarAttentionSums:
    """Far-region S1/S2 per head with the best available kernel for the tensors' device.

    ``backend="auto"`` uses Triton for CUDA tensors when it imports, else the blockwise torch path
    (which uses the compiled C++ kernel on CPU when it can); ``"triton"`` and ``"torch"`` force one.
    All return the same numbers (up to float32 rounding).

    Args:
        query (`torch.Tensor`, ``(B, H, L, d)``): query states after RoPE.
        key (`torch.Tensor`, ``(B, H_kv, L, d)``): key states, not repeated for GQA.
        min_distances (sequence of `int`): thresholds k in tokens (far: ``n − i >= k``).
        scaling (`float`): logit scale.
        backend (`str`, defaults to `"auto"`): `"auto"`, `"triton"` or `"torch"`.
        **options: tuning knobs — Triton: ``block_m``, ``block_n``, ``num_warps``, ``num_stages``;
            torch: ``block_rows``, ``block_bytes``. Those of the backend not chosen are ignored
            (they change speed and memory, never the result).

    Returns:
        `FarAttentionSums` with float64 ``(B, T, H)`` tensors.

    Example:

    >>> q, k = torch.randn(1, 4, 64, 8), torch.randn(1, 2, 64, 8)
    >>> attention_sums(q, k, [16], 8 ** -0.5).far_mass.shape  # CPU tensors: torch path
    torch.Size([1, 1, 4])
    """
    unknown = set(options) - TRITON_OPTIONS - TORCH_OPTIONS
    if unknown:
        raise TypeError(
            f"unknown options {sorted(unknown)}; Triton options: {sorted(TRITON_OPTIONS)}, "
            f"torch options: {sorted(TORCH_OPTIONS)}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if triton_usable(query.device) else "torch"
    chosen = TRITON_OPTIONS if backend == "triton" else TORCH_OPTIONS
    kwargs = {name: value for name, value in options.items() if name in chosen}
    if backend == "triton":
        from .triton_stats import triton_far_attention_sums

        return triton_far_attention_sums(query, key, min_distances, scaling, **kwargs)
    return far_attention_sums(query, key, min_distances, scaling, **kwargs)

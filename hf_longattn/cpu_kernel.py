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
about 10 s once per machine; loading a built kernel takes well under a second.

Where it cannot be built (no compiler, no ninja) :func:`far_row_sums_function` returns ``None``
once, with a warning, and callers use the eager torch path. Whether it is used at all is decided
in :mod:`hf_longattn.kernels` (``HF_LONGATTN_FUSED=0`` turns it off).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "far_row_sums.cpp"

ISA_FLAGS = {  # torch's CPU capability → compiler flags of that vector ISA
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

_LOADED: dict[str, Callable | None] = {}


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


def _build(capability: str | None = None) -> Callable | None:
    """Build (or load the cached build of) the kernel for ``capability`` (default: this CPU's)."""
    if _registered():
        return torch.ops.hf_longattn.far_row_sums
    from torch.utils import cpp_extension

    capability = capability or torch.backends.cpu.get_cpu_capability()
    if capability not in ISA_FLAGS:
        capability = "DEFAULT"  # portable code: at::vec falls back to plain loops
    flags = ["-O3", f"-DCPU_CAPABILITY={capability}"]
    if capability in ISA_FLAGS:
        flags += [f"-DCPU_CAPABILITY_{capability}", *ISA_FLAGS[capability]]
    try:
        cpp_extension.load(
            name=f"hf_longattn_far_row_sums_{capability.lower()}",
            sources=[str(SOURCE)],
            extra_cflags=flags,
            is_python_module=False,
            verbose=False,
        )
        return torch.ops.hf_longattn.far_row_sums
    except Exception as error:  # noqa: BLE001 - no compiler/ninja: the eager path still works
        logger.warning(
            "hf_longattn: could not build the CPU attention-statistics kernel (%s); using the slower eager "
            "torch path. Install a C++ compiler and `pip install ninja` to enable it.",
            str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__,
        )
        return None

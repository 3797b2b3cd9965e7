"""Far-region attention statistics of causal softmax attention, computed blockwise (pure torch).

For one window of ``L`` tokens and one head ``h`` let ``M`` be the causal softmax attention map
(row ``n`` = query position, column ``i`` = key position, each row sums to 1) and
``F = {(n, i) : n - i >= min_distance}`` the far region. LongAttn needs, per head, only

* ``far_mass``        S1_h = Σ_{(n,i)∈F} M[n, i]      (units: attention mass summed over rows)
* ``far_square_mass`` S2_h = Σ_{(n,i)∈F} M[n, i]²

from which (see :func:`dependency_statistics`)

* dependency strength   P_h = S1_h / L               (mean far mass per row, in [0, 1])
* uniformity variance   V_h = (S2_h − S1_h² / N) / (N − 1),  N = L²
  (the unbiased variance over *all* L² entries of ``M·1_F`` — entries outside F count as zeros,
  as in the authors' reference code ``torch.var(M * mask)``)
* DS_T = mean_h P_h,  DU_T = −mean_h V_h.

The map is never materialised: query rows are processed in blocks of ``B_q`` rows against the
keys they can see, so the largest temporary is ``(B, H, B_q, L)`` — linear in ``L`` (on CPU
``B = 1``: windows go one at a time, so blocks stay cache-sized). Each row's softmax normaliser
is exact (the whole visible row is in the block). Rows ``n < min_distance`` have no far keys and
are skipped entirely. Scores and sums are float32; per-row results are
accumulated in float64, whatever the dtype of ``query``/``key``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import cpu_kernel

DEFAULT_BLOCK_BYTES = 4 * 2**20
"""Budget for one block of float32 scores, ``B · H · B_q · L · 4`` bytes."""


@dataclass(frozen=True)
class FarAttentionSums:
    """Per-head sums of the far-region attention map.

    Attributes:
        far_mass (`torch.Tensor`, float64, shape ``(B, T, H)``): S1 for each batch row, threshold
            and query head.
        far_square_mass (`torch.Tensor`, float64, shape ``(B, T, H)``): S2, same layout.
        length (`int`): L, the number of tokens of each window.
    """

    far_mass: torch.Tensor
    far_square_mass: torch.Tensor
    length: int


@dataclass(frozen=True)
class DependencyStatistics:
    """LongAttn statistics of a batch of windows.

    Attributes:
        dependency_strength (`torch.Tensor`, float64, ``(B, T)``): DS_T = mean_h S1_h / L.
        dependency_uniformity (`torch.Tensor`, float64, ``(B, T)``): DU_T = −mean_h V_h.
        strength_per_head (`torch.Tensor`, float64, ``(B, T, H)``): P_h.
        variance_per_head (`torch.Tensor`, float64, ``(B, T, H)``): V_h.
    """

    dependency_strength: torch.Tensor
    dependency_uniformity: torch.Tensor
    strength_per_head: torch.Tensor
    variance_per_head: torch.Tensor


def dependency_statistics(sums: FarAttentionSums) -> DependencyStatistics:
    """Turn far-region sums into DS_T and DU_T (float64).

    ``P_h = S1_h / L`` and ``V_h = (S2_h − S1_h²/N) / (N − 1)`` with ``N = L²``: the unbiased
    variance of the L² entries of the far-masked map, whose mean is ``S1_h / N``.
    """
    length = sums.length
    n_entries = float(length) ** 2
    strength = sums.far_mass / length
    variance = (sums.far_square_mass - sums.far_mass.square() / n_entries) / (n_entries - 1.0)
    return DependencyStatistics(
        dependency_strength=strength.mean(-1),
        dependency_uniformity=-variance.mean(-1),
        strength_per_head=strength,
        variance_per_head=variance,
    )


def windows_per_block(batch: int, device: torch.device) -> int:
    """How many windows of a batch share one score block: one on CPU (so blocks stay cache-sized, ~2×
    faster), the whole batch elsewhere."""
    return 1 if device.type == "cpu" else batch


def query_block_size(batch: int, heads: int, length: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Rows per query block so that one float32 score block ``(B, H, B_q, L)`` fits ``block_bytes``."""
    rows = block_bytes // max(1, 4 * batch * heads * length)
    return int(min(max(rows, 16), max(length, 16)))


def far_attention_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    min_distances: Sequence[int],
    scaling: float,
    *,
    block_rows: int | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    fused: bool | None = None,
) -> FarAttentionSums:
    """Blockwise S1 and S2 of the causal softmax attention map over the far region, per head.

    Args:
        query (`torch.Tensor`, ``(B, H, L, d)``): query states after RoPE (and q-norm).
        key (`torch.Tensor`, ``(B, H_kv, L, d)``): key states after RoPE, *not* repeated for GQA;
            query head ``h`` reads key head ``h // (H // H_kv)``, as in transformers' ``repeat_kv``.
        min_distances (sequence of `int`): thresholds k in tokens; pair ``(n, i)`` is far when
            ``n − i >= k``. Several thresholds are computed in the same pass.
        scaling (`float`): logit scale (``1/sqrt(d)`` for most models).
        block_rows (`int`, *optional*): query rows per block; derived from ``block_bytes`` if unset.
        block_bytes (`int`, defaults to 4 MiB): memory budget of one float32 score block (at least
            16 rows); small blocks stay in cache, which is ~2× faster than large ones on CPU.
        fused (`bool`, *optional*): use the compiled CPU kernel (:mod:`hf_longattn.cpu_kernel`:
            one ``exp`` per visible score, normaliser and far sums in the same pass) on CPU
            tensors; ``None`` (default) lets :mod:`hf_longattn.kernels` decide (the kernel when it
            builds and ``HF_LONGATTN_FUSED`` is not ``0``, else the eager torch path).

    Returns:
        `FarAttentionSums` with float64 ``(B, T, H)`` tensors, ``T = len(min_distances)``.

    Example:
        >>> q, k = torch.randn(1, 4, 64, 8), torch.randn(1, 2, 64, 8)
        >>> far_attention_sums(q, k, [16], 8 ** -0.5).far_mass.shape
        torch.Size([1, 1, 4])
    """
    batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    if key.shape != (batch, kv_heads, length, head_dim) or heads % kv_heads:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} do not form a (GQA) attention pair")
    distances = [int(k) for k in min_distances]
    if not distances or min(distances) < 1:
        raise ValueError(f"min_distances must be positive integers, got {list(min_distances)}")
    if windows_per_block(batch, query.device) < batch:
        # One window at a time: a window's sums cannot depend on the windows sharing its batch.
        if block_rows is None:
            block_rows = query_block_size(1, heads, length, block_bytes)
        per_window = [
            far_attention_sums(query[b : b + 1], key[b : b + 1], distances, scaling, block_rows=block_rows, fused=fused)
            for b in range(batch)
        ]
        return FarAttentionSums(torch.cat([sums.far_mass for sums in per_window]),
                                torch.cat([sums.far_square_mass for sums in per_window]), length)
    groups = heads // kv_heads
    far_mass = torch.zeros(batch, len(distances), heads, dtype=torch.float64, device=query.device)
    far_square_mass = torch.zeros_like(far_mass)
    first_row = min(distances)
    if first_row >= length:
        return FarAttentionSums(far_mass, far_square_mass, length)

    if block_rows is None:
        block_rows = query_block_size(batch, heads, length, block_bytes)
    # Fold the logit scale into q once; float32 scores whatever the model dtype.
    query = (query.float() * scaling).view(batch, kv_heads, groups, length, head_dim)  # (B, H_kv, G, L, d)
    key = key.float()  # (B, H_kv, L, d)

    row_sums = cpu_kernel.row_sums() if fused is not False and query.device.type == "cpu" else None
    if fused is True and row_sums is None:
        raise RuntimeError("fused=True needs the compiled CPU kernel: a CPU tensor, a C++ compiler and ninja")
    thresholds = torch.tensor(distances, device=query.device)
    for start in range(first_row, length, block_rows):
        stop = min(start + block_rows, length)
        rows = stop - start
        q_block = query[:, :, :, start:stop].reshape(batch, kv_heads, groups * rows, head_dim)
        row_pos = torch.arange(start, stop, device=query.device)
        # (B, H_kv, G·B_q, stop): every key a row of this block can see; row g·B_q + r is query head
        # kv·G + g at position start + r.
        scores = torch.matmul(q_block, key[:, :, :stop].transpose(-1, -2))
        if row_sums is not None and _add_kernel_block(row_sums, scores, row_pos, thresholds, far_mass, far_square_mass):
            continue
        row_sums = None  # the kernel is off, or failed once: eager from now on
        _add_eager_block(scores.view(batch, kv_heads, groups, rows, stop), row_pos, distances, far_mass, far_square_mass)
    return FarAttentionSums(far_mass, far_square_mass, length)


def _add_kernel_block(row_sums, scores: torch.Tensor, row_pos: torch.Tensor, thresholds: torch.Tensor,
                      far_mass: torch.Tensor, far_square_mass: torch.Tensor) -> bool:
    """Compiled path: add one block's far sums (``scores`` ``(B, H_kv, G·B_q, stop)``); `False` if the kernel failed."""
    batch, kv_heads, group_rows, stop = scores.shape
    groups = far_mass.shape[2] // kv_heads
    try:
        # (B·H_kv, T, G·B_q) float64 Σ_far p and Σ_far p² per row.
        mass, square = row_sums(scores.view(batch * kv_heads, group_rows, stop), row_pos.repeat(groups), thresholds)
    except Exception as error:  # noqa: BLE001 - fall back to the eager path, once, loudly
        cpu_kernel.disable(error)
        return False
    far_mass += _sum_rows_per_head(mass, batch, kv_heads, groups)
    far_square_mass += _sum_rows_per_head(square, batch, kv_heads, groups)
    return True


def _add_eager_block(scores: torch.Tensor, row_pos: torch.Tensor, distances: list[int], far_mass: torch.Tensor,
                     far_square_mass: torch.Tensor) -> None:
    """Eager path: add one block's far sums to ``far_mass`` / ``far_square_mass`` ``(B, T, H)`` (in place).

    ``scores`` ``(B, H_kv, G, B_q, stop)`` are the scaled logits of the block's rows ``row_pos``
    against keys ``0 .. stop − 1``; they are overwritten.
    """
    batch, heads = far_mass.shape[0], far_mass.shape[2]
    start, stop = int(row_pos[0]), scores.shape[-1]
    # Causal mask: only the diagonal tile [start, stop) × [start, stop) has future keys.
    scores[..., start:stop].masked_fill_(row_pos[None, :] > row_pos[:, None], -math.inf)
    scores -= scores.amax(-1, keepdim=True)
    weights = scores.exp_()  # unnormalised probabilities, in place: (B, H_kv, G, B_q, stop)
    inv_norm = 1.0 / weights.sum(-1, dtype=torch.float64)  # (B, H_kv, G, B_q)
    for t, distance in enumerate(distances):
        # Far keys of row n are [0, n − k]: a common prefix [0, start − k] plus a band.
        common = min(max(start - distance + 1, 0), stop)
        band_stop = min(max(stop - distance, 0), stop)
        mass = weights[..., :common].sum(-1, dtype=torch.float64)
        square = torch.linalg.vecdot(weights[..., :common], weights[..., :common]).double()
        if band_stop > common:
            band_cols = torch.arange(common, band_stop, device=scores.device)
            band = weights[..., common:band_stop] * (band_cols[None, :] <= row_pos[:, None] - distance)
            mass += band.sum(-1, dtype=torch.float64)
            square += torch.linalg.vecdot(band, band).double()
        # (B, H_kv, G, B_q) → per query head (B, H), summed over this block's rows.
        far_mass[:, t] += (mass * inv_norm).sum(-1).reshape(batch, heads)
        far_square_mass[:, t] += (square * inv_norm.square()).sum(-1).reshape(batch, heads)


def _sum_rows_per_head(values: torch.Tensor, batch: int, kv_heads: int, groups: int) -> torch.Tensor:
    """``(B·H_kv, T, G·B_q)`` per-row values → float64 ``(B, T, H)`` sums over the block's rows, ``h = kv·G + g``."""
    values = values.double().view(batch, kv_heads, values.shape[1], groups, -1).sum(-1)
    return values.permute(0, 2, 1, 3).reshape(batch, values.shape[2], kv_heads * groups)

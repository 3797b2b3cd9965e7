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
keys they can see, so the largest temporary is ``(B, H, B_q, L)`` — linear in ``L``. Each row's
softmax normaliser is exact (the whole visible row is in the block). Rows ``n < min_distance``
have no far keys and are skipped entirely. Scores and sums are float32; per-row results are
accumulated in float64, whatever the dtype of ``query``/``key``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

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
        fused (`bool`, *optional*): use the ``torch.compile``-fused row statistics (one pass over
            each score block instead of ~6); ``None`` (default) uses them when they compile, else
            the eager path; ``HF_LONGATTN_FUSED=0`` turns them off.

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

    row_sums = _fused_row_sums_function() if fused is not False else None
    if fused is True and row_sums is None:
        raise RuntimeError("fused=True needs torch.compile with a working C++ compiler (set CXX) or a GPU")
    thresholds = torch.tensor(distances, device=query.device)
    for start in range(first_row, length, block_rows):
        stop = min(start + block_rows, length)
        rows = stop - start
        q_block = query[:, :, :, start:stop].reshape(batch, kv_heads, groups * rows, head_dim)
        # (B, H_kv, G·B_q, stop): every key a row of this block can see.
        scores = torch.matmul(q_block, key[:, :, :stop].transpose(-1, -2))
        row_pos = torch.arange(start, stop, device=query.device)
        if row_sums is not None:
            try:
                mass, square = _fused_block(row_sums, q_block, key, row_pos, stop, thresholds, groups)
            except Exception as error:  # noqa: BLE001 - fall back to the eager path, once, loudly
                _disable_fused(error)
                row_sums = None
            else:
                far_mass += mass
                far_square_mass += square
                continue
        scores = scores.view(batch, kv_heads, groups, rows, stop)  # (B, H_kv, G, B_q, stop)
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
                band_cols = torch.arange(common, band_stop, device=query.device)
                band = weights[..., common:band_stop] * (band_cols[None, :] <= row_pos[:, None] - distance)
                mass += band.sum(-1, dtype=torch.float64)
                square += torch.linalg.vecdot(band, band).double()
            # (B, H_kv, G, B_q) → per query head (B, H), summed over this block's rows.
            far_mass[:, t] += (mass * inv_norm).sum(-1).reshape(batch, heads)
            far_square_mass[:, t] += (square * inv_norm.square()).sum(-1).reshape(batch, heads)
    return FarAttentionSums(far_mass, far_square_mass, length)


def fused_row_sums(scores: torch.Tensor, row_pos: torch.Tensor, distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row far mass and far square mass of one score block, in one pass (compiled by inductor).

    Args:
        scores: ``(N, R, C)`` float32 scaled logits of ``R`` query rows against keys ``0..C−1``.
        row_pos: ``(R,)`` absolute positions of the rows; key ``i`` is visible to row ``n`` iff ``i <= n``.
        distances: ``(T,)`` thresholds k; key ``i`` is far for row ``n`` iff ``i <= n − k``.

    Returns:
        ``(N, T, R)`` float32 ``Σ_far p`` and ``Σ_far p²`` with ``p`` the row's causal softmax.
    """
    columns = torch.arange(scores.shape[-1], device=scores.device)
    logits = scores.masked_fill(columns > row_pos[:, None], -math.inf)
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))  # (N, R, C)
    inv_norm = (1.0 / weights.sum(-1)).unsqueeze(-2)  # (N, 1, R)
    far = columns <= (row_pos[:, None] - distances[:, None, None])  # (T, R, C)
    far_weights = torch.where(far, weights.unsqueeze(-3), 0.0)  # (N, T, R, C), fused away by inductor
    return far_weights.sum(-1) * inv_norm, far_weights.square().sum(-1) * inv_norm.square()


_FUSED: dict[str, Callable | None] = {}


def _fused_block(
    row_sums: Callable,
    q_block: torch.Tensor,
    key: torch.Tensor,
    row_pos: torch.Tensor,
    stop: int,
    thresholds: torch.Tensor,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query block through the compiled row statistics; float64 ``(B, T, H)`` sums over its rows.

    Every call must hit the *same* compiled graph, or results would depend on which shapes the
    process saw first: the inputs are fresh contiguous tensors (no view bases to guard on), every
    dimension is unbacked (no 0/1 or equal-size specialisation), and grad mode is always off.
    """
    batch, kv_heads, group_rows, head_dim = q_block.shape
    rows = row_pos.shape[0]
    with torch.inference_mode():
        # (B·H_kv, G·B_q, stop): each row of the block against every key it can see.
        scores = torch.bmm(
            q_block.reshape(batch * kv_heads, group_rows, head_dim),
            key[:, :, :stop].reshape(batch * kv_heads, stop, head_dim).transpose(1, 2),
        )
        positions = row_pos.repeat(groups)  # (G·B_q,): row g·B_q + r is query position row_pos[r]
        distances = thresholds.clone()
        for tensor in (scores, positions, distances):
            for dim in range(tensor.dim()):
                torch._dynamo.decorators.mark_unbacked(tensor, dim)
        mass, square = row_sums(scores, positions, distances)  # (B·H_kv, T, G·B_q)
    # Sum over the block's rows, then (B, H_kv, T, G) → (B, T, H) with h = kv·G + g.
    def per_head(values: torch.Tensor) -> torch.Tensor:
        values = values.double().view(batch, kv_heads, -1, groups, rows).sum(-1)
        return values.permute(0, 2, 1, 3).reshape(batch, values.shape[2], kv_heads * groups)

    return per_head(mass), per_head(square)


def _fused_row_sums_function() -> Callable | None:
    """``torch.compile(fused_row_sums)`` when it can work here, else ``None`` (eager path).

    ``HF_LONGATTN_FUSED=0`` is read on every call, so a process and the workers it spawns agree.
    """
    if os.environ.get("HF_LONGATTN_FUSED", "1") == "0":
        return None
    if "function" not in _FUSED:
        has_compiler = shutil.which(os.environ.get("CXX", "g++")) is not None or torch.cuda.is_available()
        _FUSED["function"] = torch.compile(fused_row_sums, dynamic=True) if has_compiler else None
    return _FUSED["function"]


def _disable_fused(error: Exception) -> None:
    logger.warning("hf_longattn: fused attention statistics unavailable (%s); using the eager path", error)
    _FUSED["function"] = None

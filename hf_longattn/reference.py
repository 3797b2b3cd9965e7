"""Naive LongAttn statistics from the full L×L attention map — a float64 reference for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .attention_stats import FarAttentionSums


def far_mask(length: int, min_distance: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``(L, L)`` mask of the far region ``n − i >= min_distance`` (row n, column i)."""
    positions = torch.arange(length, device=device)
    return (positions[:, None] - positions[None, :]) >= min_distance


def causal_attention_map(query: torch.Tensor, key: torch.Tensor, scaling: float, dtype=torch.float64) -> torch.Tensor:
    """The full causal softmax map ``(B, H, L, L)`` in ``dtype``; GQA keys are repeated as ``repeat_kv`` does."""
    groups = query.shape[1] // key.shape[1]
    key = key.to(dtype).repeat_interleave(groups, dim=1)  # (B, H, L, d)
    scores = torch.matmul(query.to(dtype), key.transpose(-1, -2)) * scaling  # (B, H, L, L)
    length = query.shape[2]
    future = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def sums_from_attention_map(attention: torch.Tensor, min_distances: Sequence[int]) -> FarAttentionSums:
    """S1/S2 per head from a full attention map ``(B, H, L, L)``, in the reference code's style.

    The reference code computes ``(M * mask).sum() / L`` and ``torch.var(M * mask)`` per head; the
    same numbers follow from S1 = Σ_F M and S2 = Σ_F M² (see ``dependency_statistics``).
    """
    attention = attention.to(torch.float64)
    length = attention.shape[-1]
    mass, square = [], []
    for distance in min_distances:
        masked = attention * far_mask(length, int(distance), attention.device)  # (B, H, L, L)
        mass.append(masked.sum((-1, -2)))
        square.append(masked.square().sum((-1, -2)))
    return FarAttentionSums(torch.stack(mass, 1), torch.stack(square, 1), length)


def reference_variance(attention: torch.Tensor, min_distance: int) -> torch.Tensor:
    """``torch.var`` (unbiased, over all L² entries) of the far-masked map, per ``(B, H)`` — the reference code's V_h."""
    length = attention.shape[-1]
    masked = attention.to(torch.float64) * far_mask(length, min_distance, attention.device)
    return masked.flatten(-2).var(-1)

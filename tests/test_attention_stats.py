"""The blockwise far-region sums against the naive full-map float64 reference."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from hf_longattn.attention_stats import dependency_statistics, far_attention_sums, query_block_size
from hf_longattn.reference import causal_attention_map, reference_variance, sums_from_attention_map

HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
# fused=True raises if the compiled CPU kernel is unavailable, so a broken build fails these tests.
PATHS = [
    pytest.param(False, id="eager"),
    pytest.param(True, id="kernel", marks=pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")),
]


def _random_qk(batch, heads, kv_heads, length, dim, scale=3.0, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    query = (torch.randn(batch, heads, length, dim, generator=generator) * scale).to(dtype)
    key = (torch.randn(batch, kv_heads, length, dim, generator=generator) * scale).to(dtype)
    return query, key


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs() / expected.abs().clamp_min(1e-300)).max().item()


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "length", "dim", "distances", "block_rows"),
    [
        (2, 4, 2, 97, 16, [24, 5, 60], 16),
        (1, 4, 4, 64, 8, [16], None),
        (1, 9, 3, 300, 64, [75, 150, 299], 37),
        (3, 6, 1, 50, 32, [1, 49], 7),
    ],
)
def test_blockwise_sums_match_full_map(batch, heads, kv_heads, length, dim, distances, block_rows, fused):
    query, key = _random_qk(batch, heads, kv_heads, length, dim)
    sums = far_attention_sums(query, key, distances, dim**-0.5, block_rows=block_rows, fused=fused)
    attention = causal_attention_map(query, key, dim**-0.5)
    expected = sums_from_attention_map(attention, distances)
    assert sums.far_mass.dtype == torch.float64 and sums.far_mass.shape == (batch, len(distances), heads)
    assert _relative_error(sums.far_mass, expected.far_mass) < 1e-5
    assert _relative_error(sums.far_square_mass, expected.far_square_mass) < 1e-5
    stats, reference = dependency_statistics(sums), dependency_statistics(expected)
    assert _relative_error(stats.dependency_strength, reference.dependency_strength) < 1e-5
    assert _relative_error(stats.dependency_uniformity, reference.dependency_uniformity) < 1e-4


def test_variance_is_the_reference_codes_torch_var():
    query, key = _random_qk(1, 4, 2, 80, 16, seed=3)
    attention = causal_attention_map(query, key, 0.25)
    stats = dependency_statistics(far_attention_sums(query, key, [20], 0.25))
    expected = reference_variance(attention, 20)  # torch.var over all L² entries, unbiased
    assert _relative_error(stats.variance_per_head[:, 0], expected) < 1e-5
    strength = (attention * (torch.arange(80)[:, None] - torch.arange(80)[None, :] >= 20)).sum((-1, -2)) / 80
    assert _relative_error(stats.strength_per_head[:, 0], strength) < 1e-5


def test_block_size_and_path_do_not_change_results():
    query, key = _random_qk(1, 4, 2, 128, 16, seed=5)
    results = [
        far_attention_sums(query, key, [32, 7], 0.25, block_rows=rows, fused=fused).far_mass
        for rows in (1, 16, 33, 128, 500)
        for fused in (False, HAS_COMPILER)
    ]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("fused", PATHS)
def test_bf16_inputs_accumulate_in_float32(fused):
    query, key = _random_qk(1, 4, 2, 96, 16, seed=7, dtype=torch.bfloat16)
    sums = far_attention_sums(query, key, [24], 0.25, fused=fused)
    expected = sums_from_attention_map(causal_attention_map(query, key, 0.25), [24])  # same bf16 q/k, float64 map
    assert _relative_error(sums.far_mass, expected.far_mass) < 1e-5
    assert _relative_error(sums.far_square_mass, expected.far_square_mass) < 1e-5


def test_threshold_matters_and_short_windows_are_zero():
    query, key = _random_qk(1, 2, 1, 40, 8, seed=9)
    near, far = far_attention_sums(query, key, [5, 30], 0.3).far_mass[0]
    assert (near > far).all()  # a larger far region holds more mass: the test can tell thresholds apart
    assert far_attention_sums(query, key, [40], 0.3).far_mass.abs().max() == 0


def test_rejects_bad_shapes_and_thresholds():
    query, key = _random_qk(1, 4, 3, 10, 8)
    with pytest.raises(ValueError, match="GQA"):
        far_attention_sums(query, key, [2], 0.3)
    query, key = _random_qk(1, 4, 2, 10, 8)
    with pytest.raises(ValueError, match="positive"):
        far_attention_sums(query, key, [0], 0.3)


def test_block_size_budget_is_linear_in_length():
    assert query_block_size(1, 9, 32768, 256 * 2**20) * 9 * 32768 * 4 <= 256 * 2**20
    assert query_block_size(1, 9, 8192, 256 * 2**20) >= 4 * query_block_size(1, 9, 32768, 256 * 2**20) - 16
    assert query_block_size(1, 9, 32768) == 16  # the default budget: at least 16 rows

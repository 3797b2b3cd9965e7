"""LADM CDS (ladm_cds_v1): the blockwise core vs a float64 port of the official block, O(L) memory, the datasets scorer.

Tolerances: float32 scores vs the float64 port on the same query/key states, ≤ 1e-6 relative;
float64 states, ≤ 1e-12. End to end (our float32 model vs an independent float64 one) ≤ 1e-6 relative
(measured ≤ 1.5e-7 on the tiny models, 1.3e-8 on SmolLM2).
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from datasets import Dataset
from datasets.fingerprint import Hasher
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hf_longattn.scorers import ladm
from hf_longattn.scorers.ladm import LadmCdsScorer, ladm_cds, min_num_tokens, span_starts, span_sums
from hf_longattn.scorers.ladm_reference import (
    ABLATIONS,
    capture_query_key,
    cds_from_attention_map,
    official_block,
    official_source,
    run_official_block,
)

F32, F64, END_TO_END = 1e-6, 1e-12, 1e-6
SMALL = dict(span=16, d_cds=2, d_afs=1)  # min 97 tokens: fast settings for tiny models
SETTINGS = [dict(span=128, d_cds=4, d_afs=4), dict(span=16, d_cds=2, d_afs=1), dict(span=16, d_cds=1, d_afs=3),
            dict(span=8, d_cds=3, d_afs=2)]


def random_states(length, heads=4, kv_heads=2, dim=16, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    query = 3 * torch.randn(1, heads, length, dim, generator=generator)  # peaked attention: errors would show
    key = 3 * torch.randn(1, kv_heads, length, dim, generator=generator)
    return query.to(dtype), key.to(dtype)


def assert_close(actual, expected, rtol):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert np.all(np.abs(actual - expected) <= rtol * np.abs(expected)), (actual, expected, rtol)


def random_ids(lengths, vocab=320, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def run_map(scorer, ds, **kwargs):
    return ds.map(scorer, batched=True, features=scorer.features(ds.features), keep_in_memory=True, **kwargs)


# --- the port and the geometry ----------------------------------------------------------------------------
@pytest.mark.official
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_port_is_the_official_block(ablation):
    """Opt in (the official code is not shipped): ``LADM_OFFICIAL_REPO=<checkout> python -m pytest -m official tests/test_ladm.py``."""
    if not os.environ.get("LADM_OFFICIAL_REPO"):
        pytest.fail("set LADM_OFFICIAL_REPO to a checkout of github.com/ZNLP/LADM")
    source = official_source(os.environ["LADM_OFFICIAL_REPO"])
    assert source is not None
    for length, settings in [(2500, SETTINGS[0]), (333, SETTINGS[1]), (301, SETTINGS[3])]:
        query, key = random_states(length, dtype=torch.float64)
        chunk = dict(chunk_size=settings["span"], d_cds=settings["d_cds"], d_afs=settings["d_afs"], ablation=ablation)
        port = official_block(query, key, **chunk)
        assert torch.equal(run_official_block(source, query, key, **chunk, float64=True), port)
        assert_close(run_official_block(source, query.float(), key.float(), **chunk), port, 5e-6)  # as shipped


@pytest.mark.parametrize("length", [2304, 2305, 2432, 2433, 3000, 4097])
def test_span_geometry(length):
    starts = span_starts(length)
    assert (length >= min_num_tokens()) == bool(starts) and min_num_tokens() == 2305
    if starts:
        assert starts[0] == length - 128 and all(a - b == 512 for a, b in zip(starts, starts[1:]))
        assert starts[-1] > 128 + 4 * 512 >= starts[-1] - 512
        query, key = random_states(length, heads=2, kv_heads=1, dim=4)
        pfs = span_sums(query, key, 0.5).pfs
        assert [p.shape[1] for p in pfs] == [(t - 128) // 512 for t in starts] and min(p.shape[1] for p in pfs) >= 4


# --- the core vs the port, on the same states ---------------------------------------------------------------
@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_core_matches_port(settings, ablation):
    length = 2433 if settings["span"] == 128 else 411  # neither a multiple of the span
    for heads, kv_heads in [(4, 2), (3, 3)]:
        query, key = random_states(length, heads, kv_heads, seed=heads)
        port = official_block(query, key, scaling=0.25, chunk_size=settings["span"], d_cds=settings["d_cds"],
                              d_afs=settings["d_afs"], ablation=ablation)
        for fused in (False, None):
            ours = ladm_cds(query, key, 0.25, ablation=ablation, fused=fused, block_bytes=2**16, **settings)
            assert_close(ours, port, F32)
        assert_close(ladm_cds(query.double(), key.double(), 0.25, ablation=ablation, **settings), port, F64)


def test_batch_rows_are_independent_and_blocks_do_not_matter():
    query, key = random_states(400, seed=5)
    query, key = torch.cat([query, query.flip(2)]), torch.cat([key, key.flip(2)])  # (2, H, L, d)
    both = ladm_cds(query, key, 0.25, **SMALL)
    for b in range(2):
        alone = ladm_cds(query[b : b + 1], key[b : b + 1], 0.25, block_bytes=2**14, **SMALL)
        assert_close(alone, both[b : b + 1], F32)


# --- memory: no tensor beyond the states and one block of scores --------------------------------------------
class LargestTensor(TorchDispatchMode):
    """Records the most bytes of any new storage an operator returns (views of their inputs are not counted)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for value in tree_flatten(result)[0]:
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, value.untyped_storage().nbytes())
        return result


@pytest.mark.parametrize("fused", [False, None])
def test_memory_is_linear_in_length(fused):
    block_bytes = 2**18
    for length in (2560, 5120):
        query, key = random_states(length, heads=4, kv_heads=2, dim=16)
        with LargestTensor() as mode:
            ladm_cds(query, key, 0.25, block_bytes=block_bytes, fused=fused)
        bound = block_bytes  # one block of float32 scores; an L×L float32 matrix would be 4·L² bytes
        assert mode.largest <= bound < length * length // 8
        with LargestTensor() as official:  # the official block holds (B, H, span, t) at once: the test can fail
            official_block(query, key, scaling=0.25)
        assert official.largest > 2 * bound


# --- end to end: the scorer on tiny models and SmolLM2 ---------------------------------------------------------
def float64_model(folder):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager").eval()


def float64_reference(model, token_ids, layers, settings, ablation="none", maps=False):
    """CDS per layer of an independent float64 model: the port on its states (and from its attention maps)."""
    ids = torch.tensor([token_ids])
    states = capture_query_key(model, ids)
    chunk = dict(chunk_size=settings["span"], d_cds=settings["d_cds"], d_afs=settings["d_afs"], ablation=ablation)
    port = np.array([official_block(states[i][0], states[i][1], scaling=states[i][2], **chunk).item() for i in layers])
    if not maps:
        return port
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    return port, np.array([cds_from_attention_map(attentions[i], **chunk).item() for i in layers])


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "mistral", "qwen3"])
def test_tiny_models_match_float64_port(architecture, tiny_model_dir):
    folder = tiny_model_dir(architecture)
    rows = random_ids([300, 256], seed=1)  # 300 is not a multiple of the span
    ds = Dataset.from_dict({"input_ids": rows})
    scored32 = run_map(LadmCdsScorer(str(folder), max_length=4096, **SMALL), ds)
    scored64 = run_map(LadmCdsScorer(str(folder), max_length=4096, dtype="float64", **SMALL), ds)
    reference = float64_model(folder)
    for ids, row32, row64 in zip(rows, scored32, scored64):
        port, from_maps = float64_reference(reference, ids, [0, 1], SMALL, maps=True)
        assert row32["ladm_status"] == row64["ladm_status"] == "ok" and row32["ladm_num_tokens"] == len(ids)
        assert_close(row64["ladm_cds_by_layer"], port, F64)
        assert_close(row32["ladm_cds_by_layer"], port, END_TO_END)
        assert_close(row32["ladm_cds_by_layer"], from_maps, END_TO_END)  # eager maps: float32 softmax
        assert_close(row32["ladm_cds"], port.mean(), END_TO_END)


@pytest.mark.parametrize("ablation", ["no_std", "no_len_weight"])
def test_ablations_and_default_settings_end_to_end(ablation, tiny_model_dir):
    folder = tiny_model_dir("qwen2")
    ids = random_ids([2433], seed=3)
    defaults = dict(span=128, d_cds=4, d_afs=4)
    scorer = LadmCdsScorer(str(folder), max_length=4096, dtype="float64", ablation=ablation, layers=[1])
    row = run_map(scorer, Dataset.from_dict({"input_ids": ids}))[0]
    port = float64_reference(float64_model(folder), ids[0], [1], defaults, ablation)
    assert row["ladm_status"] == "ok" and "ladm_cds_by_layer" not in row
    assert_close(row["ladm_cds"], port[0], F64)


def test_one_layer_loads_one_layer(tiny_model_dir):
    folder = tiny_model_dir("llama", 3)
    ds = Dataset.from_dict({"input_ids": random_ids([200], seed=4)})
    everything = LadmCdsScorer(str(folder), max_length=4096, **SMALL)
    first = LadmCdsScorer(str(folder), max_length=4096, layers=[0], **SMALL)
    middle_last = LadmCdsScorer(str(folder), max_length=4096, layers=[2, 1], **SMALL)
    all_row, first_row, pair_row = (run_map(s, ds)[0] for s in (everything, first, middle_last))
    assert everything.layers == [0, 1, 2] and len(first.load().layers) == 1
    assert first.load_report.bytes_read < everything.load_report.bytes_read
    assert_close(first_row["ladm_cds"], all_row["ladm_cds_by_layer"][0], F32)
    assert_close(pair_row["ladm_cds_by_layer"], all_row["ladm_cds_by_layer"][:0:-1], F32)
    assert_close(all_row["ladm_cds"], np.mean(all_row["ladm_cds_by_layer"]), 1e-15)


@pytest.mark.smollm2
def test_smollm2_first_layer(smollm2_gguf, smollm2_reference_model):
    settings = dict(span=32, d_cds=2, d_afs=1)
    rows = random_ids([301, 256], vocab=49152, seed=6)
    scorer = LadmCdsScorer(str(smollm2_gguf), layers=[0], **settings)
    scored = run_map(scorer, Dataset.from_dict({"input_ids": rows}))
    for ids, row in zip(rows, scored):
        port = float64_reference(smollm2_reference_model, ids, [0], settings)
        assert row["ladm_status"] == "ok"
        assert_close(row["ladm_cds"], port[0], END_TO_END)


# --- statuses, types, datasets.map ------------------------------------------------------------------------------
def test_statuses_and_types_when_nothing_is_scored(tiny_model_dir):
    folder = tiny_model_dir("llama")
    scorer = LadmCdsScorer(str(folder), max_length=4096, **SMALL)
    ds = Dataset.from_dict({"input_ids": [[], None, [1] * 96, [1] * 96 + [320], [5] * 50 + [-1] * 50]})
    scored = run_map(scorer, ds, batch_size=5)
    assert scored["ladm_status"] == ["empty", "missing", "too_short", "bad_token", "bad_token"]
    assert scored["ladm_cds"] == [None] * 5 and scored["ladm_num_tokens"] == [0, 0, 96, 97, 100]
    assert "97" in scored["ladm_status_detail"][2] and "320" in scored["ladm_status_detail"][3]
    assert scored.features["ladm_cds"].dtype == "float64" and scored.features["ladm_cds_by_layer"].feature.dtype == "float64"
    assert scorer._model is None  # nothing to score: the model was never loaded
    nulls = run_map(scorer, Dataset.from_dict({"input_ids": [[1, None, 2] + [3] * 200]}))
    assert nulls[0]["ladm_status"] == "bad_token" and "null" in nulls[0]["ladm_status_detail"]


def test_text_column_and_validation_at_the_door(tiny_model):
    scorer = LadmCdsScorer(str(tiny_model), max_length=4096, **SMALL)
    texts = ["the long range dependency of a window " * 40, "", None, "short"]
    scored = run_map(scorer, Dataset.from_dict({"text": texts}), batch_size=2)
    assert scored["ladm_status"] == ["ok", "empty", "missing", "too_short"]
    assert scored[0]["ladm_cds"] > 0 and scored[0]["ladm_num_tokens"] > 97
    with pytest.raises(ValueError, match=r"current columns: \['body'\]"):
        scorer({"body": ["x"]})
    with pytest.raises(ValueError, match="column 'input_ids', row 0 of the batch"):
        scorer({"input_ids": ["not ids"]})
    for bad in (dict(span=0), dict(d_cds=1.5), dict(ablation="No"), dict(layers=[5]), dict(layers=0),
                dict(layers=[1, 1]), dict(max_length=96, **SMALL), dict(dtype="int8")):
        with pytest.raises(ValueError):
            LadmCdsScorer(str(tiny_model), **bad)


def test_map_batches_pickling_and_fingerprint(tiny_model_dir):
    folder = tiny_model_dir("llama")
    rows = random_ids([150, 97, 150, 180], seed=7)
    ds = Dataset.from_dict({"input_ids": rows, "id": ["a", "b", "c", "d"]})
    scorer = LadmCdsScorer(str(folder), max_length=4096, **SMALL)
    one_by_one = run_map(scorer, ds, batch_size=1)
    together = run_map(pickle.loads(pickle.dumps(scorer)), ds, batch_size=3, with_indices=True)
    assert one_by_one["ladm_status"] == ["ok"] * 4 and one_by_one["id"] == ["a", "b", "c", "d"]
    assert_close(together["ladm_cds"], one_by_one["ladm_cds"], F32)
    scorer.load()
    assert len(pickle.dumps(scorer)) < 10_000 and pickle.loads(pickle.dumps(scorer))._model is None
    same = LadmCdsScorer(str(folder), max_length=4096, **SMALL)
    assert Hasher.hash(scorer) == Hasher.hash(same)
    for change in (dict(d_cds=3), dict(d_afs=2), dict(ablation="no_std"), dict(layers=[0])):
        assert Hasher.hash(LadmCdsScorer(str(folder), max_length=4096, **{**SMALL, **change})) != Hasher.hash(same)


def test_errors_become_statuses(tiny_model_dir, monkeypatch):
    folder = tiny_model_dir("llama")
    ds = Dataset.from_dict({"input_ids": random_ids([120, 120], seed=8)})
    real = ladm.layer_statistic
    calls = []

    def out_of_memory_above_1mib(query, key, distances, scaling, block_bytes, **settings):
        calls.append(block_bytes)
        if block_bytes > 2**20:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB")
        return real(query, key, distances, scaling, block_bytes=block_bytes, **settings)

    monkeypatch.setattr(ladm, "layer_statistic", out_of_memory_above_1mib)
    scored = run_map(LadmCdsScorer(str(folder), max_length=4096, **SMALL), ds)
    assert scored["ladm_status"] == ["ok", "ok"] and min(calls) == 2**20  # halves, then 4 MiB → 1 MiB blocks

    monkeypatch.setattr(ladm, "layer_statistic", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
    scored = run_map(LadmCdsScorer(str(folder), max_length=4096, **SMALL), ds)
    assert scored["ladm_status"] == ["error", "error"] and scored["ladm_status_detail"][0] == "ValueError: boom"

    monkeypatch.setattr(ladm, "layer_statistic", real)
    monkeypatch.setattr(ladm, "cds_from_sums", lambda sums, ablation: torch.tensor([float("nan"), 1.0]))
    scored = run_map(LadmCdsScorer(str(folder), max_length=4096, **SMALL), ds, batch_size=2)
    assert scored["ladm_status"] == ["non_finite", "ok"] and scored["ladm_cds"][1] == 1.0

"""LongAttnScorer: exactness against the eager float64 attention map, batching, caching, bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from datasets import Dataset
from datasets.fingerprint import Hasher

from hf_longattn.attention_stats import dependency_statistics
from hf_longattn.reference import sums_from_attention_map
from hf_longattn.scorer import LongAttnScorer, min_distance_tokens

from .conftest import TINY_ARCHITECTURES
from .corpus import long_text

RTOL = 1e-4


def reference_scores(model, token_ids: list[int], distances: list[float | int], layer: int = 0):
    """DS_T and DU_T per threshold from the model's eager attention map (float64 model), full L×L."""
    with torch.no_grad():
        output = model(input_ids=torch.tensor([token_ids]), output_attentions=True, use_cache=False)
    attention = output.attentions[layer]  # (1, H, L, L)
    length = len(token_ids)
    ks = [min_distance_tokens(k, length) for k in distances]
    stats = dependency_statistics(sums_from_attention_map(attention, ks))
    return stats.dependency_strength[0].numpy(), stats.dependency_uniformity[0].numpy(), stats


def eager_reference_model(folder, num_layers: int = 1):
    from transformers import AutoModel

    return AutoModel.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float64, num_hidden_layers=num_layers
    ).eval()


def random_ids(lengths, vocab=320, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def run_map(scorer, ds, **kwargs):
    return ds.map(scorer, batched=True, features=scorer.features(ds.features), **kwargs)


def assert_close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert np.all(np.abs(actual - expected) <= rtol * np.abs(expected)), (actual, expected)


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_tiny_models_match_eager_reference(architecture, tiny_model_dir):
    folder = tiny_model_dir(architecture)
    distances = [0.25, 16, 0.5]
    scorer = LongAttnScorer(str(folder), min_distance=distances, per_head=True)
    rows = random_ids([200, 131, 64], seed=1)
    scored = run_map(scorer, Dataset.from_dict({"input_ids": rows}), keep_in_memory=True)
    reference = eager_reference_model(folder)
    for row, ids in zip(scored, rows):
        strength, uniformity, stats = reference_scores(reference, ids, distances)
        assert row["longattn_status"] == "ok"
        assert_close(row["longattn_ds"], strength[0])
        assert_close(row["longattn_du"], uniformity[0])
        assert_close(row["longattn_ds_by_distance"], strength)
        assert_close(row["longattn_du_by_distance"], uniformity)
        assert_close(row["longattn_ds_per_head"], stats.strength_per_head[0, 0].numpy())
        assert_close(row["longattn_du_per_head"], -stats.variance_per_head[0, 0].numpy())


def test_deeper_layer_and_several_layers_in_one_forward(tiny_model_dir):
    folder = tiny_model_dir("llama", 3)
    ids = random_ids([150], seed=2)
    reference = eager_reference_model(folder, 3)
    ds = Dataset.from_dict({"input_ids": ids})
    both = run_map(LongAttnScorer(str(folder), layer=[2, 0]), ds, keep_in_memory=True)[0]
    for position, layer in enumerate([2, 0]):
        strength, uniformity, _ = reference_scores(reference, ids[0], [0.25], layer=layer)
        single = run_map(LongAttnScorer(str(folder), layer=layer), ds, keep_in_memory=True)[0]
        assert_close(single["longattn_ds"], strength[0])
        assert_close(single["longattn_du"], uniformity[0])
        assert both["longattn_ds_by_layer"][position] == pytest.approx(single["longattn_ds"], rel=1e-12)
        assert both["longattn_du_by_layer"][position] == pytest.approx(single["longattn_du"], rel=1e-12)
    assert both["longattn_ds"] == both["longattn_ds_by_layer"][0]
    assert abs(both["longattn_ds_by_layer"][0] - both["longattn_ds_by_layer"][1]) > 1e-6


def test_mixed_length_batch_equals_rows_alone(tiny_model_dir):
    scorer = LongAttnScorer(str(tiny_model_dir("qwen2")), min_distance=[0.25, 8])
    rows = random_ids([90, 40, 90, 7, 200, 2], seed=3)
    together = run_map(scorer, Dataset.from_dict({"input_ids": rows}), batch_size=6, keep_in_memory=True)
    for ids, row in zip(rows, together):
        alone = run_map(scorer, Dataset.from_dict({"input_ids": [ids]}), keep_in_memory=True)[0]
        assert alone == row  # bit-identical, statuses included
    assert together["longattn_num_tokens"] == [len(r) for r in rows]


def test_status_and_nulls_for_empty_short_and_missing(tiny_model_dir):
    scorer = LongAttnScorer(str(tiny_model_dir("llama")), min_distance=10)
    rows = [random_ids([50])[0], [], random_ids([10])[0], None, [5, 400, 7] * 10, random_ids([11])[0]]
    ds = Dataset.from_dict({"id": [f"r{i}" for i in range(len(rows))], "input_ids": rows})
    scored = run_map(scorer, ds, keep_in_memory=True)
    assert scored["id"] == ds["id"]  # nothing dropped or reordered
    statuses = scored["longattn_status"]
    assert statuses[:4] == ["ok", "empty", "too_short", "missing"]
    assert statuses[4] == "bad_token"
    assert scored["longattn_status_detail"][4] == "token id 400 outside the vocabulary [0, 320)"
    assert scored["longattn_status_detail"][:4] == [None, None, "10 tokens, k = 10", None]
    assert statuses[5] == "ok"
    for row in scored:
        if row["longattn_status"] != "ok":
            assert row["longattn_ds"] is None and row["longattn_du"] is None
        else:
            assert np.isfinite(row["longattn_ds"]) and np.isfinite(row["longattn_du"])


def test_a_batch_with_no_scorable_row_keeps_the_declared_types(tiny_model_dir):
    scorer = LongAttnScorer(str(tiny_model_dir("llama")))
    ds = Dataset.from_dict({"input_ids": [[1], [], random_ids([64])[0]]})
    scored = run_map(scorer, ds, batch_size=2, keep_in_memory=True)
    assert scored.features["longattn_ds"].dtype == "float64"
    assert scored["longattn_status"] == ["too_short", "empty", "ok"]


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("input_ids", [[1, 2, 3], [1.5, 2.0]], r"column 'input_ids', row 1 of the batch \(id='b'\)"),
        ("input_ids", [[1, 2, 3], [[1, 2], [3]]], r"column 'input_ids', row 1 of the batch \(id='b'\)"),
        ("text", ["fine", 12], r"column 'text', row 1 of the batch \(id='b'\): expected a string"),
    ],
)
def test_wrong_types_raise_before_the_model_loads(tiny_model_dir, column, values, message):
    scorer = LongAttnScorer(str(tiny_model_dir("llama")))
    batch = {"id": ["a", "b"], column: values}
    with pytest.raises(ValueError, match=message):
        scorer(batch)
    assert scorer._model is None  # no model work was done
    with pytest.raises(ValueError, match="current columns"):
        scorer({"id": ["a"], "body": ["x"]})


def test_row_index_from_with_indices(tiny_model_dir):
    scorer = LongAttnScorer(str(tiny_model_dir("llama")))
    batch = {"text": ["ok", None, 7]}
    with pytest.raises(ValueError, match="row 42"):
        scorer(batch, [40, 41, 42])


def test_fingerprint_depends_on_configuration_only(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    first, second = LongAttnScorer(folder, min_distance=0.25), LongAttnScorer(folder, min_distance=0.25)
    first.load()  # weights in memory must not change the fingerprint
    assert Hasher.hash(first) == Hasher.hash(second)
    assert Hasher.hash(first) != Hasher.hash(LongAttnScorer(folder, min_distance=0.3))
    assert Hasher.hash(first) != Hasher.hash(LongAttnScorer(folder, layer=1))
    assert Hasher.hash(first) != Hasher.hash(LongAttnScorer(folder, dtype="bfloat16"))
    assert Hasher.hash(first) != Hasher.hash(LongAttnScorer(str(tiny_model_dir("mistral"))))


def test_fingerprint_follows_checkpoint_content(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), folder)
    before = Hasher.hash(LongAttnScorer(str(folder)))
    weights = load_file(folder / "model.safetensors")
    weights["model.embed_tokens.weight"][0, 0] += 1.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert Hasher.hash(LongAttnScorer(str(folder))) != before


def test_second_identical_map_reuses_the_cache(tiny_model_dir, tmp_path):
    folder = str(tiny_model_dir("llama"))
    Dataset.from_dict({"input_ids": random_ids([80, 60], seed=4)}).to_parquet(tmp_path / "in.parquet")
    ds = Dataset.from_parquet(str(tmp_path / "in.parquet"), cache_dir=str(tmp_path / "cache"))
    first = run_map(LongAttnScorer(folder), ds)
    fresh = LongAttnScorer(folder)
    second = run_map(fresh, ds)
    assert fresh._model is None  # served from the cache: the model was never loaded
    assert second.cache_files == first.cache_files
    assert second["longattn_ds"] == first["longattn_ds"]
    changed = LongAttnScorer(folder, min_distance=20)
    third = run_map(changed, ds)
    assert changed._model is not None and third.cache_files != first.cache_files


def test_pickle_round_trip_scores_the_same(tiny_model_dir):
    scorer = LongAttnScorer(str(tiny_model_dir("qwen3")), min_distance=[0.25, 0.5])
    batch = {"input_ids": random_ids([70, 33], seed=5)}
    expected = scorer(batch)
    clone = pickle.loads(pickle.dumps(scorer))
    assert clone.config == scorer.config and clone._model is None
    assert clone(batch) == expected
    assert len(pickle.dumps(scorer)) < 10_000  # configuration only, never weights


def test_with_rank_and_num_proc(tiny_model_dir, spawn_start_method):
    scorer = LongAttnScorer(str(tiny_model_dir("llama")))
    ds = Dataset.from_dict({"input_ids": random_ids([64, 80, 96, 50, 70, 90], seed=6)})
    parallel = ds.map(
        scorer, batched=True, batch_size=2, with_rank=True, num_proc=2, features=scorer.features(ds.features)
    )
    serial = run_map(scorer, ds, keep_in_memory=True)
    assert parallel["longattn_ds"] == serial["longattn_ds"]
    assert parallel["longattn_du"] == serial["longattn_du"]


def test_invalid_configuration_is_rejected(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    for kwargs in ({"min_distance": 1.5}, {"min_distance": 0}, {"layer": -1}, {"dtype": "int8"}, {"max_length": 1}):
        with pytest.raises(ValueError):
            LongAttnScorer(folder, **kwargs)
    with pytest.raises(FileNotFoundError):
        LongAttnScorer("./no/such/model.gguf")


# --- the real SmolLM2 (GGUF) on real windows --------------------------------------------------------

@pytest.mark.smollm2
def test_smollm2_matches_reference_on_real_windows(smollm2_gguf, smollm2_reference_model):
    scorer = LongAttnScorer(str(smollm2_gguf), min_distance=[0.25, 128, 0.5], max_length=1024)
    tokenizer = scorer.tokenizer
    windows, categories = [], []
    for category in ("code", "docs", "prose"):
        ids = tokenizer(long_text(category), add_special_tokens=False)["input_ids"]
        windows += [ids[1000:2024], ids[3000:3768]]
        categories += [category, category]
    scored = run_map(scorer, Dataset.from_dict({"category": categories, "input_ids": windows}), keep_in_memory=True)
    for row, ids in zip(scored, windows):
        strength, uniformity, _ = reference_scores(smollm2_reference_model, ids, [0.25, 128, 0.5])
        assert row["longattn_status"] == "ok"
        assert_close(row["longattn_ds_by_distance"], strength)
        assert_close(row["longattn_du_by_distance"], uniformity)
        assert 0.0 < row["longattn_ds"] < 1.0 and row["longattn_du"] < 0.0
    assert len(set(scored["longattn_ds"])) == len(windows)


@pytest.mark.smollm2
def test_smollm2_scores_text_columns(smollm2_gguf):
    scorer = LongAttnScorer(str(smollm2_gguf), max_length=256)
    text = long_text("prose")[:20_000]
    ds = Dataset.from_dict({"text": [text, "   ", "", None, "short"]})
    scored = run_map(scorer, ds, keep_in_memory=True)
    assert scored["longattn_status"][:4] == ["ok", "empty", "empty", "missing"]
    assert scored["longattn_num_tokens"][0] == 256
    direct = scorer({"input_ids": [scorer.tokenizer(text, truncation=True, max_length=256)["input_ids"]]})
    assert scored["longattn_ds"][0] == direct["longattn_ds"][0]

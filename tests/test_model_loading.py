"""First-layer-only loading: only the needed tensors and shards are read, with the same scores as a full load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_longattn.model_loading import load_attention_model, needed_tensor, resolve_source
from hf_longattn.scorer import LongAttnScorer

from .conftest import tiny_config


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    """A random 4-layer LLaMA saved in many small shards."""
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=4))
    folder = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(folder, max_shard_size="40KB")
    return folder


def test_needed_tensors():
    assert needed_tensor("embed_tokens.weight", 0)
    assert needed_tensor("layers.0.self_attn.q_proj.weight", 0)
    assert needed_tensor("layers.0.self_attn.k_norm.weight", 0)
    assert needed_tensor("layers.0.input_layernorm.weight", 0)
    assert not needed_tensor("layers.0.self_attn.v_proj.weight", 0)
    assert not needed_tensor("layers.0.self_attn.o_proj.weight", 0)
    assert not needed_tensor("layers.0.mlp.up_proj.weight", 0)
    assert not needed_tensor("layers.1.self_attn.q_proj.weight", 0)
    assert not needed_tensor("norm.weight", 0)
    assert needed_tensor("layers.0.mlp.up_proj.weight", 2)  # layers below a deeper scored layer run in full
    assert not needed_tensor("layers.2.mlp.up_proj.weight", 2)


def test_reads_only_needed_shards_and_scores_the_same(sharded_checkpoint, tmp_path):
    index = json.loads((sharded_checkpoint / "model.safetensors.index.json").read_text())
    all_shards = set(index["weight_map"].values())
    _, report = load_attention_model(resolve_source(str(sharded_checkpoint)), (0,), dtype=torch.float32)
    assert len(all_shards) > 3 and set(report.files) < all_shards
    assert report.bytes_read < report.checkpoint_bytes / 2

    # Delete every shard that holds no needed tensor: scoring still works and gives the same numbers.
    pruned = tmp_path / "pruned"
    shutil.copytree(sharded_checkpoint, pruned)
    for shard in all_shards - set(report.files):
        (pruned / shard).unlink()
    ids = torch.randint(0, 320, (3, 96), generator=torch.Generator().manual_seed(0)).tolist()
    full = AutoModelForCausalLM.from_pretrained(sharded_checkpoint, attn_implementation="eager", dtype=torch.float64)
    from hf_longattn.attention_stats import dependency_statistics
    from hf_longattn.reference import sums_from_attention_map

    pruned_scores = LongAttnScorer(str(pruned))({"input_ids": ids})
    for row, token_ids in enumerate(ids):
        with torch.no_grad():
            attention = full(input_ids=torch.tensor([token_ids]), output_attentions=True).attentions[0]
        expected = dependency_statistics(sums_from_attention_map(attention, [24]))
        assert pruned_scores["longattn_ds"][row] == pytest.approx(expected.dependency_strength.item(), rel=1e-4)
        assert pruned_scores["longattn_du"][row] == pytest.approx(expected.dependency_uniformity.item(), rel=1e-4)


def test_deeper_layer_needs_more_shards(sharded_checkpoint):
    _, first = load_attention_model(resolve_source(str(sharded_checkpoint)), (0,), dtype=torch.float32)
    _, deeper = load_attention_model(resolve_source(str(sharded_checkpoint)), (2,), dtype=torch.float32)
    assert deeper.bytes_read > first.bytes_read


def test_missing_needed_shard_is_a_clear_error(sharded_checkpoint, tmp_path):
    pruned = tmp_path / "broken"
    shutil.copytree(sharded_checkpoint, pruned)
    index = json.loads((pruned / "model.safetensors.index.json").read_text())
    (pruned / index["weight_map"]["model.embed_tokens.weight"]).unlink()
    with pytest.raises((FileNotFoundError, OSError)):
        load_attention_model(resolve_source(str(pruned)), (0,), dtype=torch.float32)


def test_layer_beyond_the_model_is_rejected(sharded_checkpoint):
    with pytest.raises(ValueError, match="does not exist"):
        load_attention_model(resolve_source(str(sharded_checkpoint)), (9,), dtype=torch.float32)


@pytest.mark.smollm2
@pytest.mark.parametrize("layer", [0, 2])
def test_gguf_dequantises_only_the_needed_tensors_exactly_as_transformers(smollm2_gguf, layer):
    from transformers import AutoModel

    model, report = load_attention_model(resolve_source(str(smollm2_gguf)), (layer,), dtype=torch.float32)
    reference = AutoModel.from_pretrained(  # transformers' own GGUF loader: every tensor de-quantised
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, num_hidden_layers=layer + 1, dtype=torch.float32
    ).state_dict()
    ours = model.state_dict()
    assert {f"layers.{layer}.self_attn.q_proj.weight", f"layers.{layer}.self_attn.k_proj.weight"} <= set(ours)
    assert f"layers.{layer}.self_attn.v_proj.weight" not in ours  # never read
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name  # incl. the reverse permutation of q/k rows
    assert report.bytes_read < 0.5 * report.checkpoint_bytes  # SmolLM2 layer 0: the embeddings + 3 small tensors


def test_the_smollm2_alias_works_for_every_scorer_class(smollm2_gguf, tmp_path, monkeypatch):
    """``ProLongScorer("smollm2")`` as ``hf-longattn run --model smollm2``: the alias is the installed GGUF, offline."""
    from hf_longattn.scorers.ladm import LadmCdsScorer
    from hf_longattn.scorers.prolong_scorer import ProLongScorer

    monkeypatch.chdir(tmp_path)  # no folder named smollm2 here
    assert resolve_source("smollm2") == resolve_source(str(smollm2_gguf))
    for scorer in (LongAttnScorer("smollm2"), ProLongScorer("smollm2", window_size=1024), LadmCdsScorer("smollm2", layers=[0])):
        assert scorer.source.kind == "gguf" and scorer.identity().startswith("gguf:")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source("./smollm3.gguf")

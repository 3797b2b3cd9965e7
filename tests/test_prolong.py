"""ProLong (prolong_v1): exact against the float64 port of the official code, seeded per window, the official defects fixed, statuses, datasets.map."""

from __future__ import annotations

import copy
import doctest
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
from datasets import Dataset
from datasets.fingerprint import Hasher

from hf_longattn import vocabulary as V
from hf_longattn.model_loading import causal_lm_fingerprint, load_causal_lm, resolve_source
from hf_longattn.scorers import prolong_scorer as S
from hf_longattn.scorers.prolong import (
    ProLongSettings,
    lds_from_perplexities,
    plan_window,
    prolong_scores,
    window_seed,
)
from hf_longattn.scorers.prolong_reference import reference_lds, reference_prolong, reference_scores
from hf_longattn.scorers.prolong_scorer import ProLongScorer

from .conftest import tiny_config
from .corpus import long_text

C = 16  # chunk_size in these tests: short windows, same code paths as 128
SETTINGS = ProLongSettings(chunk_size=C, window_size=12 * C, threshold=0.01)  # gain's N = 12, not the window's 9


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine these small forwards run several times faster than with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lm(architecture: str) -> torch.nn.Module:
    """A tiny random causal LM (float32, eval), q/k scaled up as in conftest so the context matters."""
    from transformers import AutoModelForCausalLM, OPTConfig

    torch.manual_seed(1234)
    if architecture == "opt":  # the paper's model family: learned absolute positions, no GQA
        config = OPTConfig(vocab_size=320, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=1024, word_embed_proj_dim=64)
    else:
        config = tiny_config(architecture)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                weight.mul_(8.0)
    return model


def random_window(num_tokens: int, seed: int = 0, vocab: int = 320) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, num_tokens).tolist()


def relative(ours, reference, floor: float = 1e-300) -> float:
    """Largest |ours − reference| / max(|reference|, floor) (a floor for values that can be 0, such as a row's DE)."""
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.max(np.abs(ours - reference) / np.maximum(np.abs(reference), floor)))


def compare(result, reference, tolerance: float) -> dict:
    """Every statistic of ``result`` against the float64 reference; the kept pairs must be the same ones."""
    used = np.unique(result.pairs)
    errors = {
        "single_ppl": relative(result.single_ppl[used], np.asarray(reference["single_ppl"])[used]),
        "pair_ppl": relative(result.pair_ppl, [reference["pair_ppl"][i][j] for i, j in result.pairs]),
        "row_entropy": relative(result.row_entropy[used], np.asarray(reference["dependency_entropy"])[used], floor=1e-3),
        "dependency_entropy": relative(result.dependency_entropy, reference["mean_dependency_entropy"]),
        "delta_ppl": relative(result.delta_ppl, reference["delta_ppl"]),
        "lds": relative(result.lds, reference["lds"]),
    }
    assert result.num_kept_pairs == len(reference["kept"])
    assert all(value <= tolerance for value in errors.values()), errors
    return errors


def reference_for(model, window, settings, result):
    segments = plan_window(window, settings, window_seed(window, settings.seed)).segments.tolist()
    return reference_prolong(model, segments, [tuple(p) for p in result.pairs.tolist()],
                             threshold=settings.threshold, max_segments=settings.max_segments)


# --- exactness --------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("sample_size", [None, 12])
def test_matches_float64_reference_on_tiny_models(architecture, sample_size):
    model = tiny_lm(architecture)
    model64 = copy.deepcopy(model).double()
    settings = ProLongSettings(**{**SETTINGS.__dict__, "sample_size": sample_size, "max_batch_tokens": 3 * C})
    window = random_window(9 * C + 5)  # 9 segments and a tail that is dropped
    ours = prolong_scores(model, [window], settings)[0]
    reference = reference_for(model64, window, settings, ours)
    assert ours.num_segments == 9 and ours.num_pairs == (36 if sample_size is None else 12)
    assert 0 < ours.num_kept_pairs < ours.num_pairs  # the threshold splits the pairs: a real test of it
    compare(ours, reference, 1e-5)  # float32 model (float64 losses): measured ≤ 6e-6
    compare(prolong_scores(model64, [window], settings)[0], reference, 1e-12)  # same model dtype: the algorithm only


# SmolLM2's tokens (add_special_tokens=False) of the first 83 tokens of tests/corpus.py's long_text("prose"):
# "Module difflib -- helpers for computing deltas between objects.\n\nFunction get_close_matches(word, …".
# Fixed here so the test does not parse the GGUF vocabulary a second time (~5 s) for a tokenizer.
SMOLLM2_PROSE = [
    14516, 673, 5474, 3009, 30402, 327, 7867, 1347, 33248, 826, 3401, 30, 198, 198, 18226, 820, 79, 7633, 79, 33402,
    24, 3002, 28, 7541, 28, 304, 45, 35, 28, 35481, 45, 32, 30, 38, 727, 472, 4076, 27314, 11604, 6373, 288, 1003,
    1398, 282, 260, 1450, 476, 12018, 2001, 18, 12643, 30, 198, 198, 18226, 2468, 79, 9880, 24, 81, 28, 278, 727,
    472, 1068, 827, 8639, 282, 12345, 28, 1003, 253, 15184, 281, 2468, 673, 4624, 30, 198, 198, 18226, 27625, 627,
]


@pytest.mark.smollm2
def test_matches_float64_reference_on_smollm2(smollm2_gguf):
    model = load_causal_lm(resolve_source(str(smollm2_gguf)), dtype=torch.float32)
    window = SMOLLM2_PROSE  # 5 segments of 16 and a tail of 3
    settings = [ProLongSettings(chunk_size=C, window_size=8 * C, sample_size=size) for size in (None, 6)]
    ours32 = [prolong_scores(model, [window], s)[0] for s in settings]
    assert all(0 < r.num_kept_pairs < r.num_pairs for r in ours32)  # the default threshold 0.1 splits them
    model.double()  # in place: one float64 SmolLM2 in memory, not two
    segments = plan_window(window, settings[0], 0).segments.tolist()
    everything = reference_prolong(model, segments, [(i, j) for i in range(5) for j in range(i)], max_segments=8)
    for setting, ours in zip(settings, ours32):
        reference = reference_scores(everything["single_ppl"], everything["pair_ppl"], ours.pairs.tolist(), max_segments=8)
        compare(ours, reference, 1e-5)  # float32 model vs the float64 reference: measured ≤ 4.4e-6 (PPLs)
        compare(prolong_scores(model, [window], setting)[0], reference, 1e-10)  # float64: the algorithm only


def test_formula_matches_reference_on_edge_rows():
    """Random perplexity matrices with sampled pairs, one-pair rows, underflowing and flat softmax rows."""
    rng = np.random.default_rng(7)
    for trial in range(40):
        size = int(rng.integers(2, 14))
        pairs = sorted(random.Random(trial).sample([(i, j) for i in range(size) for j in range(i)],
                                                   int(rng.integers(1, size * (size - 1) // 2 + 1))))
        single = rng.uniform(5, 2000, size)
        pair = single[[i for i, _ in pairs]] * rng.uniform(0.3, 1.3, len(pairs))
        if trial % 4 == 1:
            pair[0] -= 5000.0  # a raw ΔPPL 5000 above the rest: exp underflows to 0 (run.py's 1e-12 smoothing)
        if trial % 4 == 2:
            pair = single[[i for i, _ in pairs]] * 0.8  # every row flat: DE = 0 except one-pair rows
        matrix = np.full((size, size), np.inf)
        for (i, j), value in zip(pairs, pair):
            matrix[i, j] = value
        ours = lds_from_perplexities(single, np.array(pairs), pair, threshold=0.1, max_segments=size + 3)
        reference = reference_lds(single.tolist(), matrix.tolist(), threshold=0.1, max_segments=size + 3)
        assert relative(ours.lds, reference["lds"]) <= 1e-12 or abs(ours.lds - reference["lds"]) < 1e-12
        assert np.allclose(ours.row_entropy, reference["dependency_entropy"], rtol=1e-12, atol=1e-15)
        assert ours.num_kept_pairs == len(reference["kept"])
    # ΔPPL exactly at the threshold does not count (run.py:166: strictly greater); one-pair rows have DE = 1.
    at = lds_from_perplexities(np.array([9.0, 10.0]), np.array([[1, 0]]), np.array([9.0]), max_segments=4)
    assert at.num_kept_pairs == 0 and at.lds == 0.0 and at.row_entropy[1] == 1.0


# --- seeding: a window's pairs depend on its content only ---------------------------------------------------
def test_plan_cuts_segments_and_draws_pairs_per_window():
    settings = ProLongSettings(chunk_size=C, window_size=8 * C, sample_size=10)
    window = random_window(11 * C + 7)
    plan = plan_window(window, settings, seed=3)
    assert plan.segments.shape == (8, C)  # 11 full segments, 8 drawn in order (window_size // C)
    starts = [window.index(int(s[0])) for s in plan.segments]  # random ids: each segment found where it was cut
    assert starts == sorted(starts) and all(np.array_equal(window[k : k + C], s) for k, s in zip(starts, plan.segments))
    assert len(plan.pairs) == 10 and len({tuple(p) for p in plan.pairs.tolist()}) == 10
    assert (plan.pairs[:, 1] < plan.pairs[:, 0]).all()
    assert np.array_equal(plan.pairs, plan_window(window, settings, seed=3).pairs)
    assert not np.array_equal(plan.pairs, plan_window(window, settings, seed=4).pairs)
    assert window_seed(window) == window_seed(list(window)) != window_seed(window[::-1])


def test_short_windows_use_all_pairs_and_score():
    """run.py returns an all-inf matrix when a window has fewer pairs than sample_size (every window under ~4K tokens scores 0)."""
    model = tiny_lm("llama")
    window = random_window(5 * C, seed=2)
    result = prolong_scores(model, [window], ProLongSettings(chunk_size=C, window_size=12 * C, threshold=0.01))[0]
    assert result.num_pairs == 10  # all of them (sample_size = 500 by default)
    assert np.isfinite(result.pair_ppl).all() and result.finite
    assert result.num_kept_pairs > 0 and result.lds > 0


def test_score_does_not_depend_on_batch_order_or_size(tiny_model_dir):
    scorer = ProLongScorer(str(tiny_model_dir("llama")), chunk_size=C, window_size=8 * C, sample_size=6, threshold=0.01)
    windows = [random_window(n, seed=n) for n in (5 * C, 6 * C + 3, 7 * C, 4 * C, 8 * C)]
    ds = Dataset.from_dict({"input_ids": windows})
    outputs = [ds.map(scorer, batched=True, batch_size=size, features=scorer.features(ds.features), load_from_cache_file=False)
               for size in (1, 3, 5)]
    reversed_ds = ds.select(range(4, -1, -1)).map(scorer, batched=True, batch_size=2, load_from_cache_file=False)
    first = outputs[0][S.LDS]
    assert all(out[S.LDS] == first for out in outputs) and reversed_ds[S.LDS][::-1] == first  # bit for bit
    assert len(set(first)) == len(first) and max(first) > 0  # different windows, different draws and scores
    direct = prolong_scores(scorer.load(), windows, scorer.prolong_settings)
    assert [r.lds for r in direct] == first


# --- the scorer: statuses, types, datasets.map ------------------------------------------------------------
def test_statuses_and_typed_output(tiny_model_dir):
    scorer = ProLongScorer(str(tiny_model_dir("llama")), chunk_size=C, window_size=8 * C)
    rows = [random_window(3 * C), [], None, random_window(2 * C - 1), random_window(2 * C)[:-1] + [320],
            random_window(2 * C)[:-1] + [-1], [5] * (2 * C - 1) + [None]]
    ds = Dataset.from_dict({"input_ids": rows})
    out = ds.map(scorer, batched=True, batch_size=3, features=scorer.features(ds.features))
    assert out[S.STATUS] == [V.OK, V.EMPTY, V.MISSING, V.TOO_SHORT, V.BAD_TOKEN, V.BAD_TOKEN, V.BAD_TOKEN]
    assert set(out[S.STATUS]) <= set(V.STATUSES)
    assert out[S.STATUS_DETAIL][0] is None and "fewer than 2 segments" in out[S.STATUS_DETAIL][3]
    assert "320" in out[S.STATUS_DETAIL][4] and "null" in out[S.STATUS_DETAIL][6]
    assert out[S.LDS][0] is not None and out[S.LDS][1:] == [None] * 6
    assert out[S.NUM_TOKENS][:4] == [3 * C, 0, 0, 2 * C - 1] and out[S.NUM_PAIRS][0] == 3
    # A batch in which no row is scored keeps the declared types.
    bad = Dataset.from_dict({"input_ids": rows[1:4]}).map(scorer, batched=True, features=scorer.features(ds.features))
    assert {name: bad.features[name].dtype for name in S.COLUMN_TYPES} == S.COLUMN_TYPES
    assert list(scorer.output_features()) == list(S.COLUMN_TYPES)


def test_text_rows_are_tokenised_without_special_tokens(tiny_model):
    scorer = ProLongScorer(str(tiny_model), chunk_size=C, window_size=16 * C, threshold=0.01)
    texts = [long_text("prose")[:600], "   ", None, "x"]
    ds = Dataset.from_dict({"text": texts}).map(scorer, batched=True, batch_size=4)
    assert ds[S.STATUS] == [V.OK, V.EMPTY, V.MISSING, V.TOO_SHORT]
    ids = scorer.tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    assert ds[S.NUM_TOKENS][0] == len(ids) and ds[S.LDS][0] == prolong_scores(scorer.load(), [ids], scorer.prolong_settings)[0].lds


def test_bad_columns_raise_before_loading(tiny_model_dir):
    scorer = ProLongScorer(str(tiny_model_dir("llama")), chunk_size=C)
    with pytest.raises(ValueError, match="current columns"):
        scorer({"body": ["a"]})
    with pytest.raises(ValueError, match="expected a list of ints"):
        scorer({"input_ids": [[1.5, 2.0]]})
    with pytest.raises(ValueError, match="expected a string"):
        scorer({"text": [3]})
    assert scorer._model is None
    for bad in (dict(chunk_size=1), dict(sample_size=0), dict(window_size=C), dict(dtype="int8")):
        with pytest.raises(ValueError):
            ProLongScorer(str(tiny_model_dir("llama")), **{"chunk_size": C, **bad})


def test_pickled_and_fingerprinted_by_configuration(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    scorer = ProLongScorer(folder, chunk_size=C)
    before = Hasher.hash(scorer)
    scorer({"input_ids": [random_window(2 * C)]})  # loads the model
    assert scorer._model is not None and Hasher.hash(scorer) == before
    assert len(pickle.dumps(scorer)) < 4000 and pickle.loads(pickle.dumps(scorer))._model is None
    assert Hasher.hash(ProLongScorer(folder, chunk_size=C, threshold=0.2)) != before
    assert scorer.identity() == causal_lm_fingerprint(resolve_source(folder))


def test_non_finite_oom_and_errors_stay_on_their_row(tiny_model_dir, monkeypatch):
    scorer = ProLongScorer(str(tiny_model_dir("llama")), chunk_size=C, window_size=8 * C, max_batch_tokens=4 * C)
    windows = {"input_ids": [random_window(3 * C, seed=s) for s in range(3)]}
    calls = []
    real = S.prolong_scores

    def flaky(model, batch, settings):
        calls.append(settings.max_batch_tokens)
        if batch[0] == windows["input_ids"][0] and settings.max_batch_tokens > C:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB")
        if batch[0] == windows["input_ids"][1]:
            raise RuntimeError("CUDA error: an illegal memory access")
        return real(model, batch, settings)

    monkeypatch.setattr(S, "prolong_scores", flaky)
    out = scorer(windows)
    assert out[S.STATUS] == [V.OK, V.ERROR, V.OK] and calls[:3] == [4 * C, 2 * C, C]  # retried with half the tokens
    monkeypatch.setattr(S, "prolong_scores", real)
    with torch.no_grad():
        scorer.load().lm_head.weight[3, 0] = float("nan")
    out = scorer(windows)
    assert out[S.STATUS] == [V.NON_FINITE] * 3 and out[S.LDS] == [None] * 3


def test_docstring_examples():
    from hf_longattn.scorers import prolong, prolong_reference

    for module in (prolong, prolong_reference, S):
        assert doctest.testmod(module).failed == 0


def test_load_causal_lm_refuses_pickles(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    shutil.copy(tiny_model_dir("llama") / "config.json", tmp_path)  # the same model as a pickle, no safetensors
    torch.save(load_file(tiny_model_dir("llama") / "model.safetensors"), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled weights"):
        load_causal_lm(resolve_source(str(tmp_path)), dtype=torch.float32)
    model = load_causal_lm(resolve_source(str(tiny_model_dir("llama"))), dtype=torch.float32)
    assert model.get_output_embeddings() is not None and not model.training


# --- the output head only where a loss is needed, fused with the log-sum-exp --------------------------
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
def test_fused_head_equals_the_models_own_logits(dtype, tolerance):
    """`_head_perplexity` (head on the needed positions, a block at a time) = the float64 PPL of the model's full logits."""
    from hf_longattn.scorers import prolong as PL

    model = tiny_lm("qwen2").to(dtype)
    ids = torch.as_tensor(random_window(5 * C, seed=3)).view(5, C)
    with torch.inference_mode():
        fused, _ = PL._perplexity_forward(model, ids, ids[:, 1:])  # positions 0..C−2 of each segment
        plain = PL._perplexity(model(input_ids=ids).logits[:, :-1], ids[:, 1:])
    assert model not in PL._PLAIN_LOGITS and relative(fused, plain) <= tolerance


def test_post_processed_logits_fall_back_to_the_models_own():
    """A head with something after the projection (here a logit scale, as Cohere's) is scored from the model's logits."""
    from hf_longattn.scorers import prolong as PL

    model = tiny_lm("llama")
    model.lm_head.register_forward_hook(lambda _module, _args, logits: logits * 4.0)
    settings = ProLongSettings(**{**SETTINGS.__dict__, "max_batch_tokens": 3 * C})
    window = random_window(9 * C + 5)
    ours = prolong_scores(model, [window], settings)[0]
    assert model in PL._PLAIN_LOGITS
    compare(ours, reference_for(copy.deepcopy(model).double(), window, settings, ours), 1e-5)  # the hook is copied


def test_even_batches():
    from hf_longattn.scorers.prolong import _even_batches

    assert [len(b) for b in _even_batches(np.arange(33), 32)] == [17, 16]
    assert [len(b) for b in _even_batches(np.arange(64), 32)] == [32, 32] and _even_batches(np.arange(0), 32) == []

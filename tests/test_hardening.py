"""Hardening of LongAttnScorer: injected out-of-memory, fuzzed bad data (hypothesis), bit-for-bit reproducibility.

Run: ``python -m pytest -q tests/test_hardening.py`` (CPU, tiny random models, no network; ~1 min on 2 cores).
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pytest
import torch
from datasets import Dataset
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hf_longattn import scorer as scorer_module
from hf_longattn import kernels
from hf_longattn.scorer import LongAttnScorer
from hf_longattn.selection import LongAttnSelector

VOCAB = 320  # tiny_config's vocab_size
TEXT_MAX_LENGTH = 48
IDS_MAX_LENGTH = 96
SCORE_COLUMNS = ("longattn_ds", "longattn_du", "longattn_ds_by_distance", "longattn_du_by_distance")
FUZZ = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.19 GiB total capacity)"
# What torch itself raises when the CPU allocator fails: a RuntimeError that never says "out of memory".
CPU_OOM = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 140737488355328 bytes. Error code 12 (Cannot allocate memory)"
)


def random_ids(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def run_map(scorer, ds, **kwargs):
    kwargs.setdefault("keep_in_memory", True)
    return ds.map(scorer, batched=True, features=scorer.features(ds.features), **kwargs)


def bits(values):
    """Floats (or lists of floats, or None) as exact hex strings: equal bits ⇔ equal output."""
    if values is None:
        return None
    if isinstance(values, list):
        return [bits(v) for v in values]
    return float(values).hex()


def score_bits(scored) -> dict[str, list]:
    return {column: bits(list(scored[column])) for column in SCORE_COLUMNS if column in scored.column_names}


@pytest.fixture(scope="module")
def llama(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


# --- 1. out of memory, injected ----------------------------------------------------------------------


class FlakySums:
    """The real sums function, except that it raises ``error`` whenever ``fails(batch, block_bytes)``."""

    def __init__(self, real, fails, error):
        self.real, self.fails, self.error, self.calls = real, fails, error, []

    def __call__(self, query, key, min_distances, scaling, **options):
        batch, block_bytes = query.shape[0], options.get("block_bytes")  # query: (B, H, L, d)
        self.calls.append((batch, block_bytes))
        if self.fails(batch, block_bytes):
            raise self.error
        return self.real(query, key, min_distances, scaling, **options)


@pytest.fixture(scope="module")
def oom_windows():
    lengths = [120] * 5 + [80] * 3 + [33]
    return Dataset.from_dict({"id": [f"w{i}" for i in range(len(lengths))], "input_ids": random_ids(lengths, seed=11)})


@pytest.fixture(scope="module")
def unconstrained(llama, oom_windows):
    return run_map(LongAttnScorer(llama, min_distance=[0.25, 16]), oom_windows)


@pytest.mark.parametrize(
    "error", [torch.OutOfMemoryError(CUDA_OOM), RuntimeError(CPU_OOM), MemoryError()], ids=["cuda", "cpu", "python"]
)
def test_oom_on_batches_retries_in_halves_down_to_one_window(llama, oom_windows, unconstrained, monkeypatch, error):
    flaky = FlakySums(kernels.attention_sums, lambda batch, _: batch > 1, error)
    monkeypatch.setattr(kernels, "attention_sums", flaky)
    scored = run_map(LongAttnScorer(llama, min_distance=[0.25, 16]), oom_windows)
    assert scored["id"] == oom_windows["id"]
    assert scored["longattn_status"] == ["ok"] * len(oom_windows)
    assert score_bits(scored) == score_bits(unconstrained)  # same blocks, one window at a time: same bits
    assert max(batch for batch, _ in flaky.calls) == 5 and {1} <= {batch for batch, _ in flaky.calls}
    assert sum(batch == 1 for batch, _ in flaky.calls) == len(oom_windows)  # every window scored once alone


def test_oom_on_one_window_retries_with_smaller_blocks(llama, oom_windows, unconstrained, monkeypatch):
    limit = 4 * 2**20
    flaky = FlakySums(kernels.attention_sums, lambda batch, block: batch > 1 or block > limit,
                      torch.OutOfMemoryError(CUDA_OOM))
    monkeypatch.setattr(kernels, "attention_sums", flaky)
    scored = run_map(LongAttnScorer(llama, min_distance=[0.25, 16]), oom_windows)
    assert scored["longattn_status"] == ["ok"] * len(oom_windows)
    tried, budget = [], scorer_module.DEFAULT_BLOCK_BYTES
    while not tried or tried[-1] > limit:
        tried, budget = tried + [budget], budget // 4
    assert sorted({block for batch, block in flaky.calls if batch == 1}, reverse=True) == tried  # ÷4 until it fits
    assert sum(batch == 1 and block <= limit for batch, block in flaky.calls) == len(oom_windows)  # once each
    # Smaller blocks regroup the float32 sums: equal to rounding, not bit for bit (README, Hardening).
    for column in SCORE_COLUMNS:
        np.testing.assert_allclose(np.array(scored[column], dtype=np.float64),
                                   np.array(unconstrained[column], dtype=np.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError(CUDA_OOM), RuntimeError(CPU_OOM)], ids=["cuda", "cpu"])
def test_window_that_never_fits_gets_an_error_status_and_the_job_goes_on(
    llama, oom_windows, unconstrained, monkeypatch, error
):
    real = scorer_module.layer_attention_sums
    poisoned = oom_windows["input_ids"][3]
    attempts = []

    def layer_sums(model, input_ids, *args, **kwargs):  # input_ids: (B, L)
        if any(row == poisoned for row in input_ids.tolist()):
            attempts.append((input_ids.shape[0], kwargs.get("block_bytes")))
            raise error
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(scorer_module, "layer_attention_sums", layer_sums)
    scored = run_map(LongAttnScorer(llama, min_distance=[0.25, 16]), oom_windows, batch_size=4)
    statuses = list(scored["longattn_status"])
    assert statuses[3] == "oom" and scored["longattn_status_detail"][3].startswith(type(error).__name__)
    assert statuses[:3] + statuses[4:] == ["ok"] * (len(oom_windows) - 1)
    assert scored["longattn_ds"][3] is None and scored["longattn_du"][3] is None
    expected = score_bits(unconstrained)
    for column, values in score_bits(scored).items():
        assert values[:3] + values[4:] == expected[column][:3] + expected[column][4:]
    assert attempts[-1][0] == 1 and attempts[-1][1] < attempts[0][1]  # alone, then with smaller blocks


def test_other_errors_and_non_finite_scores_only_touch_their_own_window(
    llama, oom_windows, unconstrained, monkeypatch
):
    real = scorer_module.layer_attention_sums
    broken, overflowing = oom_windows["input_ids"][1], oom_windows["input_ids"][2]

    def layer_sums(model, input_ids, *args, **kwargs):
        rows = input_ids.tolist()
        if broken in rows:
            raise RuntimeError("kernel failed\nsecond line of the message")
        sums = real(model, input_ids, *args, **kwargs)
        if overflowing in rows:  # as if the model's activations overflowed for this one window
            for layer, value in sums.items():
                far_mass = value.far_mass.clone()  # (B, T, H)
                far_mass[rows.index(overflowing)] = float("nan")
                sums[layer] = dataclasses.replace(value, far_mass=far_mass)
        return sums

    monkeypatch.setattr(scorer_module, "layer_attention_sums", layer_sums)
    scored = run_map(LongAttnScorer(llama, min_distance=[0.25, 16]), oom_windows)
    statuses = list(scored["longattn_status"])
    assert (statuses[1], scored["longattn_status_detail"][1]) == ("error", "RuntimeError: kernel failed")
    assert statuses[2] == "non_finite" and scored["longattn_status_detail"][2].startswith("non-finite attention")
    assert [s for i, s in enumerate(statuses) if i not in (1, 2)] == ["ok"] * (len(oom_windows) - 2)
    expected = score_bits(unconstrained)
    for column, values in score_bits(scored).items():
        assert values[1] is None and values[2] is None
        assert [v for i, v in enumerate(values) if i not in (1, 2)] == [
            v for i, v in enumerate(expected[column]) if i not in (1, 2)
        ]


# --- 2. bad data, fuzzed --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_model_dir(llama, tmp_path_factory) -> str:
    """The tiny LLaMA with a byte-level tokenizer built offline: ids 0–255 bytes, 256 ``<s>`` (BOS), 320 ``<oov>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama-text")
    shutil.copytree(llama, folder, dirs_exist_ok=True)
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, **{f"<unused{i}>": i for i in range(257, VOCAB)}})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")
    tokenizer.add_tokens(["<oov>"])  # id 320: outside the model's vocabulary
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def text_scorer(text_model_dir):
    return LongAttnScorer(text_model_dir, max_length=TEXT_MAX_LENGTH, min_distance=[4, 0.25])


@pytest.fixture(scope="module")
def ids_scorer(llama):
    return LongAttnScorer(llama, max_length=IDS_MAX_LENGTH, min_distance=[0.5, 8])


def expected_row(token_ids, min_distance: float) -> tuple[str, int]:
    """The status and token count the scorer must give a row, written independently of the scorer."""
    if token_ids is None:
        return "missing", 0
    if None in token_ids:  # a missing id inside the row: reported, nothing scored
        return "bad_token", 0
    if not token_ids:
        return "empty", 0
    k = min_distance if isinstance(min_distance, int) else max(1, int(min_distance * len(token_ids)))
    if len(token_ids) <= k:
        return "too_short", len(token_ids)
    if min(token_ids) < 0 or max(token_ids) >= VOCAB:
        return "bad_token", len(token_ids)
    return "ok", len(token_ids)


def check_scored(scored, source, expected_ids, min_distance):
    """No row dropped or reordered; statuses as expected and explained; scores finite exactly for ok rows."""
    assert len(scored) == len(source) and scored["id"] == source["id"]
    for row, token_ids in zip(scored, expected_ids):
        status = row["longattn_status"]
        want, num_tokens = expected_row(token_ids, min_distance)
        event(f"status {want}")  # python -m pytest --hypothesis-show-statistics shows what the fuzzing reached
        assert status == want, (status, want, token_ids)
        assert (row["longattn_status_detail"] is None) == (status in ("ok", "empty", "missing")), row
        if status == "bad_token":
            assert "token id" in row["longattn_status_detail"]
        assert row["longattn_num_tokens"] == num_tokens
        if status == "ok":
            assert np.isfinite(row["longattn_ds"]) and 0.0 <= row["longattn_ds"] <= 1.0
            assert np.isfinite(row["longattn_du"]) and row["longattn_du"] <= 0.0
            assert all(v is None or np.isfinite(v) for v in row["longattn_ds_by_distance"] + row["longattn_du_by_distance"])
        else:
            assert all(row[column] is None for column in SCORE_COLUMNS), row


_texts = st.one_of(
    st.none(),
    st.just(""),
    st.text(max_size=30),  # any unicode but lone surrogates (Arrow cannot store those)
    st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), max_size=8),  # control / whitespace only
    st.text(min_size=1, max_size=6).map(lambda s: s * 2000),  # far longer than max_length
    st.sampled_from(["<oov>", "ab <oov> cd", "x", "\x00\x01\x02\x03", "\ufeff", " \t\n\r\x0b\x0c "]),
)


@FUZZ
@given(texts=st.lists(_texts, min_size=1, max_size=10), batch_size=st.integers(1, 10))
def test_fuzzed_text_never_crashes_drops_or_emits_non_finite(text_scorer, texts, batch_size):
    source = Dataset.from_dict({"id": [f"t{i}" for i in range(len(texts))], "text": texts})
    scored = run_map(text_scorer, source, batch_size=batch_size)
    tokenizer = text_scorer.tokenizer
    expected_ids = [
        None if text is None else [] if not text.strip()
        else tokenizer(text, truncation=True, max_length=TEXT_MAX_LENGTH)["input_ids"]
        for text in texts
    ]
    check_scored(scored, source, expected_ids, 4)
    for token_ids, status, detail in zip(expected_ids, scored["longattn_status"], scored["longattn_status_detail"]):
        if token_ids and VOCAB in token_ids and status != "too_short":  # "<oov>" is token 320
            assert (status, detail) == ("bad_token", f"token id {VOCAB} outside the vocabulary [0, {VOCAB})")


_token = st.one_of(st.integers(0, VOCAB - 1), st.integers(-(2**63), 2**63 - 1))
_ids = st.one_of(
    st.none(),
    st.just([]),
    st.lists(st.integers(0, VOCAB - 1), max_size=3 * IDS_MAX_LENGTH),  # in the vocabulary, up to 3 × max_length
    st.lists(_token, min_size=1, max_size=40),  # negative and ≥ vocab ids mixed in
    st.lists(st.one_of(st.integers(0, VOCAB - 1), st.none()), min_size=1, max_size=20),  # missing ids inside a row
)


@FUZZ
@given(rows=st.lists(_ids, min_size=1, max_size=10), batch_size=st.integers(1, 10))
def test_fuzzed_token_ids_never_crash_drop_or_emit_non_finite(ids_scorer, rows, batch_size):
    source = Dataset.from_dict({"id": [f"r{i}" for i in range(len(rows))], "input_ids": rows})
    scored = run_map(ids_scorer, source, batch_size=batch_size)
    expected_ids = [r if r is None or None in r else r[:IDS_MAX_LENGTH] for r in rows]
    check_scored(scored, source, expected_ids, 0.5)


_wrong_text = st.one_of(
    st.lists(st.one_of(st.none(), st.integers(-5, 5)), min_size=1).filter(lambda v: any(x is not None for x in v)),
    st.lists(st.floats(allow_nan=True), min_size=1),
    st.lists(st.lists(st.text(max_size=3), max_size=3), min_size=1),  # nested lists of text
    st.lists(st.lists(st.integers(0, 9), max_size=3), min_size=1),  # token ids in the text column
    st.lists(st.booleans(), min_size=1),
)
_wrong_ids = st.one_of(
    st.lists(st.lists(st.floats(allow_nan=True), min_size=1, max_size=4), min_size=1),  # floats
    st.lists(st.lists(st.lists(st.integers(0, 9), min_size=1), min_size=1, max_size=3), min_size=1),  # nested
    st.lists(st.text(min_size=1, max_size=5), min_size=1),  # text in the ids column
    st.lists(st.integers(0, 9), min_size=1),  # one int per row instead of a list
)


@FUZZ
@given(data=st.data())
def test_fuzzed_wrong_column_types_fail_clearly_before_any_work(llama, data):
    column = data.draw(st.sampled_from(["text", "input_ids"]))
    values = data.draw(_wrong_text if column == "text" else _wrong_ids)
    source = Dataset.from_dict({"id": [f"r{i}" for i in range(len(values))], column: values})
    scorer = LongAttnScorer(llama)
    with pytest.raises(ValueError, match=rf"column '{column}', row \d+ .*expected a"):
        run_map(scorer, source, batch_size=data.draw(st.integers(1, 4)))
    assert scorer._model is None and scorer._tokenizer is None  # nothing loaded, nothing scored


# --- 3. reproducibility -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def windows():
    lengths = [200] * 6 + [120] * 3 + [90, 50, 1]
    categories = ["book", "code"] * (len(lengths) // 2)
    ids = [f"{c}-{i:02d}" for i, c in enumerate(categories)]
    return Dataset.from_dict({"id": ids, "category": categories, "input_ids": random_ids(lengths, seed=7)})


def reproducible_scorer(llama):
    # A block budget of 64 query rows for one window of 200 tokens (4 heads, float32): a batch of 3 windows
    # would get 21-row blocks, so a window's blocks (and its bits) differ by batch unless the scorer fixes them.
    return LongAttnScorer(llama, min_distance=[0.25, 16], block_bytes=4 * 4 * 200 * 64)


def selected(scored, **selector_kwargs) -> tuple[list[str], dict[str, str | None]]:
    selector = LongAttnSelector(keep_fraction=0.5, **selector_kwargs).fit(scored)
    out = selector.transform(scored, keep_in_memory=True)
    kept = sorted(i for i, s in zip(out["id"], out["longattn_selected"]) if s)
    return kept, {i: bits(v) for i, v in zip(out["id"], out["longattn_lds"])}


def force_eager_sums(request) -> bool:
    """Turn off the compiled CPU kernel (needs a C++ compiler), here and in spawned workers, as on a
    machine without a compiler, until the test ends; False when it is not in use here anyway.

    Not ``monkeypatch.setenv``: ``datasets.map(num_proc=…)`` replaces ``os.environ`` with a copy, so
    monkeypatch would undo the change on the old mapping and leave the kernel off for later tests."""
    from hf_longattn import cpu_kernel

    if cpu_kernel.far_row_sums_function() is None:
        return False
    previous = os.environ.get("HF_LONGATTN_FUSED")
    os.environ["HF_LONGATTN_FUSED"] = "0"

    def restore():
        if previous is None:
            os.environ.pop("HF_LONGATTN_FUSED", None)
        else:
            os.environ["HF_LONGATTN_FUSED"] = previous

    request.addfinalizer(restore)
    return True


@pytest.fixture(params=["default", "eager"])
def sums_path(request):
    """The attention-sums path in use: this machine's default, and the eager torch path forced on."""
    if request.param == "eager" and not force_eager_sums(request):
        pytest.skip("attention_stats has no fused path: the default path is the eager one")
    return request.param


def test_scores_are_bit_identical_across_runs_and_batch_sizes(llama, windows, sums_path):
    reference = run_map(reproducible_scorer(llama), windows, batch_size=len(windows))
    assert list(reference["longattn_status"]).count("ok") == len(windows) - 1
    expected = score_bits(reference)
    for batch_size in (len(windows), 1, 3):  # twice with all rows, then one and three windows per batch
        again = run_map(reproducible_scorer(llama), windows, batch_size=batch_size)
        assert again["id"] == windows["id"] and score_bits(again) == expected, batch_size


def test_processes_and_selection_are_reproducible(llama, windows, spawn_start_method, request):
    force_eager_sums(request)  # spawned workers skip compiling (tests/test_scorer.py maps num_proc=2 by default)
    reference = run_map(reproducible_scorer(llama), windows, batch_size=3)
    scorer = reproducible_scorer(llama)
    parallel = windows.map(scorer, batched=True, batch_size=4, num_proc=2, features=scorer.features(windows.features))
    assert parallel["id"] == windows["id"] and score_bits(parallel) == score_bits(reference)

    # Identical scores give identical selections; the selected ids depend on scores and ids only, not row order.
    for kwargs in ({}, {"normalization": "minmax"}, {"method": "random", "seed": 3}):
        kept, lds = selected(reference, **kwargs)
        assert len(kept) == 5  # ⌊½ · 6⌋ books + ⌊½ · 5⌋ codes (one code window is too short)
        assert selected(parallel, **kwargs) == (kept, lds)
        shuffled = reference.shuffle(seed=1).select_columns(
            ["longattn_ds", "longattn_du", "longattn_status", "category", "id"])
        assert list(shuffled["id"]) != list(reference["id"])
        kept_shuffled, lds_shuffled = selected(shuffled, **kwargs)
        assert kept_shuffled == kept
        # LDS is bit-identical too: the group statistics are computed from sorted values.
        for row_id, value in lds.items():
            other = lds_shuffled[row_id]
            assert (value is None) == (other is None)
            if value is not None:
                assert other == value

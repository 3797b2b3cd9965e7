"""Tests for hf_longattn.windows: Algorithm 1 spans, SlidingWindows as a datasets map step, fingerprints."""

from __future__ import annotations

import doctest
import hashlib
import pickle
import random

import datasets
import numpy as np
import pytest
from datasets.fingerprint import Hasher
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import hf_longattn.windows as windows_module
from hf_longattn.windows import SlidingWindows, count_windows, num_windows, window_hash, window_spans

datasets.disable_progress_bars()

VOCAB_SIZE = 50


def make_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Word-level tokenizer built offline: ``"w{i}"`` → ``i + 1``, ``[UNK]`` → 0, split on whitespace."""
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def make_text(num_tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(VOCAB_SIZE)}" for _ in range(num_tokens))


def reference_spans(n: int, w: int, faithful: bool) -> list[tuple[int, int]]:
    """Direct transcription of the paper's Algorithm 1 (LONGATTN.md §1), in emission order."""
    out = []
    if n < w:
        return out
    l, r = 0, n
    while r - l > 3 * w:
        out.append((l, l + w))
        l = l + w
        out.append((r - w, r))
        r = r - w
    d = r - l
    if w < d <= 2 * w:
        out.append((l, l + w))
        out.append((r - w, r))
    elif 2 * w < d <= 3 * w:
        m = l + (d - w) // 2
        out.append((l, l + w))
        out.append((m, m + w))
        out.append((r - w, r))
    elif d == w and not faithful:  # the reference code emits nothing here
        out.append((l, l + w))
    return out


def boundary_lengths(w: int) -> list[int]:
    return [w - 1, w, w + 1, 2 * w, 2 * w + 1, 3 * w, 3 * w + 1, 4 * w, 10 * w + 7]


# -- window_spans ---------------------------------------------------------------------------


@pytest.mark.parametrize("w", [1, 2, 8, 32768])
@pytest.mark.parametrize("faithful", [False, True])
def test_spans_match_pseudo_code_on_boundaries(w, faithful):
    for n in boundary_lengths(w):
        assert window_spans(n, w, faithful) == sorted(reference_spans(n, w, faithful)), n


def test_spans_known_values():
    assert window_spans(25, 8) == [(0, 8), (8, 16), (9, 17), (17, 25)]
    assert window_spans(24, 8) == [(0, 8), (8, 16), (16, 24)]
    assert window_spans(32, 8) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert window_spans(9, 8) == [(0, 8), (1, 9)]
    assert window_spans(87, 8)[:3] == [(0, 8), (8, 16), (16, 24)]


def test_exactly_one_window_only_mode_difference():
    w = 8
    assert window_spans(w, w) == [(0, w)]
    assert window_spans(w, w, faithful=True) == []
    # Δ == W after the loop is unreachable for n > W: both modes agree everywhere else.
    for n in list(range(0, w)) + list(range(w + 1, 20 * w)):
        assert window_spans(n, w, faithful=True) == window_spans(n, w), n
    assert window_spans(32768, 32768) == [(0, 32768)]
    assert window_spans(32768, 32768, faithful=True) == []


@settings(max_examples=300, deadline=None)
@given(w=st.integers(1, 40), n=st.integers(0, 1000), faithful=st.booleans())
def test_spans_properties(w, n, faithful):
    spans = window_spans(n, w, faithful)
    assert spans == sorted(reference_spans(n, w, faithful))
    assert spans == sorted(spans) and len(set(spans)) == len(spans)
    assert all(end - start == w and 0 <= start and end <= n for start, end in spans)
    assert len(spans) == num_windows(n, w, faithful)
    if n > w or (n == w and not faithful):
        covered = np.zeros(n, dtype=bool)
        for start, end in spans:
            covered[start:end] = True
        assert covered.all()
    else:
        assert spans == []


def test_num_windows_closed_form():
    w = 8
    lengths = np.arange(0, 30 * w)
    for faithful in (False, True):
        expected = [len(window_spans(int(n), w, faithful)) for n in lengths]
        assert num_windows(lengths, w, faithful).tolist() == expected
    assert int(num_windows(10 * 32768 + 7, 32768)) == len(window_spans(10 * 32768 + 7, 32768))


def test_count_windows():
    w = 8
    lengths = [3, 8, 9, 24, 25, 87]
    expected_windows = sum(len(window_spans(n, w)) for n in lengths)
    assert count_windows(lengths, w) == {
        "documents": 6,
        "documents_too_short": 1,
        "windows": expected_windows,
        "tokens_documents": sum(lengths),
        "tokens_in": expected_windows * w,
    }
    faithful = count_windows(np.array(lengths), w, faithful=True)
    assert faithful["documents_too_short"] == 2 and faithful["windows"] == expected_windows - 1


def test_span_argument_errors():
    with pytest.raises(ValueError, match="window_size"):
        window_spans(10, 0)
    with pytest.raises(ValueError, match="num_tokens"):
        window_spans(-1, 4)


def test_docstring_examples():
    assert doctest.testmod(windows_module).failed == 0


# -- SlidingWindows ------------------------------------------------------------------------

W = 8
LENGTHS = [3, 7, 8, 9, 16, 17, 24, 25, 33, 87]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def docs():
    return datasets.Dataset.from_dict(
        {
            "id": [f"doc{i}" for i in range(len(LENGTHS))],
            "text": [make_text(n, seed=i) for i, n in enumerate(LENGTHS)],
            "category": ["Book" if i % 2 else "Code" for i in range(len(LENGTHS))],
            "source": [f"src{i % 3}" for i in range(len(LENGTHS))],
        }
    )


def run_windows(docs, windowing, **kwargs):
    return docs.map(
        windowing,
        batched=True,
        remove_columns=docs.column_names,
        features=windowing.output_features(docs.features),
        **kwargs,
    )


def test_windows_are_token_exact(tokenizer, docs):
    out = run_windows(docs, SlidingWindows(tokenizer, W))
    tokens_of = {row["id"]: tokenizer(row["text"], add_special_tokens=False)["input_ids"] for row in docs}
    assert len(out) == sum(len(window_spans(n, W)) for n in LENGTHS)
    for row in out:
        doc_tokens = tokens_of[row["doc_id"]]
        assert len(row["input_ids"]) == W == row["window_end"] - row["window_start"]
        assert row["input_ids"] == doc_tokens[row["window_start"] : row["window_end"]]
        assert (row["window_start"], row["window_end"]) == window_spans(len(doc_tokens), W)[row["window_index"]]
        assert row["id"] == f"{row['doc_id']}/w{row['window_index']:05d}"
        # the decoded text of a word-level window re-tokenises to the same ids
        assert tokenizer(row["text"], add_special_tokens=False)["input_ids"] == row["input_ids"]
    assert out.features["input_ids"].feature.dtype == "int32"


def test_columns_and_carried_values(tokenizer, docs):
    out = run_windows(docs, SlidingWindows(tokenizer, W))
    assert out.column_names == [
        "id", "doc_id", "window_index", "window_start", "window_end", "input_ids", "window_hash", "text", "category",
        "source",
    ]
    by_doc = {row["id"]: row for row in docs}
    for row in out:
        assert row["category"] == by_doc[row["doc_id"]]["category"]
        assert row["source"] == by_doc[row["doc_id"]]["source"]
    no_text = run_windows(docs, SlidingWindows(tokenizer, W, decode=False))
    assert "text" not in no_text.column_names and no_text["input_ids"] == out["input_ids"]


def test_ids_stable_across_batching_and_order(tokenizer, docs):
    reference = run_windows(docs, SlidingWindows(tokenizer, W))
    expected = dict(zip(reference["id"], reference["input_ids"]))
    assert len(expected) == len(reference)  # ids are unique
    for batch_size in (1, 3, 1000):
        out = run_windows(docs, SlidingWindows(tokenizer, W), batch_size=batch_size)
        assert dict(zip(out["id"], out["input_ids"])) == expected
    shuffled = docs.shuffle(seed=3).flatten_indices()
    out = run_windows(shuffled, SlidingWindows(tokenizer, W), batch_size=4)
    assert dict(zip(out["id"], out["input_ids"])) == expected
    assert out["id"] != reference["id"]  # the order did change, the ids did not


def test_short_documents_dropped_and_counted(tokenizer, docs):
    windowing = SlidingWindows(tokenizer, W)
    out = run_windows(docs, windowing, batch_size=4)
    assert not {"doc0", "doc1"} & set(out["doc_id"])  # 3 and 7 tokens < W
    assert windowing.stats == count_windows(LENGTHS, W)
    assert windowing.stats["documents_too_short"] == 2


def test_faithful_drops_exact_length_document(tokenizer, docs):
    default = run_windows(docs, SlidingWindows(tokenizer, W))
    faithful = run_windows(docs, SlidingWindows(tokenizer, W, faithful=True))
    assert default.filter(lambda r: r["doc_id"] == "doc2")["window_start"] == [0]  # 8 tokens == W
    assert "doc2" not in faithful["doc_id"]
    assert len(default) - len(faithful) == 1


def test_existing_input_ids_column_without_tokenizer():
    rng = np.random.default_rng(0)
    token_lists = [rng.integers(0, 1000, size=n).tolist() for n in (5, 8, 20)]
    ds = datasets.Dataset.from_dict(
        {"id": ["x", "y", "z"], "input_ids": token_lists, "attention_mask": [[1] * len(t) for t in token_lists], "lang": ["a", "b", "c"]}
    )
    windowing = SlidingWindows(None, W, decode=False)
    out = run_windows(ds, windowing)
    assert out.column_names == ["id", "doc_id", "window_index", "window_start", "window_end", "input_ids",
                                "window_hash", "lang"]
    assert out["window_hash"] == [window_hash(ids) for ids in out["input_ids"]]
    for row in out:
        doc = token_lists[["x", "y", "z"].index(row["doc_id"])]
        assert row["input_ids"] == doc[row["window_start"] : row["window_end"]]
    assert out["doc_id"].count("z") == 3 and "x" not in out["doc_id"]


def test_doc_id_is_content_hash_without_id_column(tokenizer):
    texts = [make_text(20, 1), make_text(9, 2)]
    a = run_windows(datasets.Dataset.from_dict({"text": texts}), SlidingWindows(tokenizer, W))
    b = run_windows(datasets.Dataset.from_dict({"text": texts[::-1]}), SlidingWindows(tokenizer, W), batch_size=1)
    assert sorted(a["id"]) == sorted(b["id"])
    expected = hashlib.sha1(texts[0].encode()).hexdigest()[:16]
    assert f"{expected}/w00000" in a["id"]


def test_missing_text_column_lists_columns(tokenizer):
    ds = datasets.Dataset.from_dict({"id": ["a"], "content": ["w1 w2"]})
    with pytest.raises(ValueError, match=r"'text'.*Current columns: \['id', 'content'\]"):
        ds.map(SlidingWindows(tokenizer, W), batched=True)


def test_non_string_text_names_column_and_row(tokenizer):
    windowing = SlidingWindows(tokenizer, W)
    with pytest.raises(ValueError, match=r"Column 'text'.*batch row 1.*NoneType"):
        windowing({"id": ["a", "b"], "text": ["w1", None]})
    ds = datasets.Dataset.from_dict({"id": ["a", "b", "c"], "body": ["w1 w2", "w3", None]})
    with pytest.raises(ValueError, match=r"Column 'body'.*row 2"):
        ds.map(SlidingWindows(tokenizer, W, text_column="body"), batched=True, batch_size=2, with_indices=True)
    with pytest.raises(ValueError, match=r"Column 'input_ids'.*batch row 0"):
        SlidingWindows(None, W, decode=False)({"id": ["a"], "input_ids": [None]})


def test_column_clash_and_bad_config(tokenizer):
    with pytest.raises(ValueError, match=r"\['window_index'\].*Current columns"):
        SlidingWindows(tokenizer, W)({"id": ["a"], "text": ["w1"], "window_index": [0]})
    with pytest.raises(ValueError, match="window_size"):
        SlidingWindows(tokenizer, 0)
    with pytest.raises(ValueError, match="decode=True needs a tokenizer"):
        SlidingWindows(None, W)


def test_output_features_on_all_short_input(tokenizer):
    ds = datasets.Dataset.from_dict({"id": ["a"], "text": ["w1 w2"], "category": ["Book"]})
    windowing = SlidingWindows(tokenizer, W)
    out = run_windows(ds, windowing)
    assert len(out) == 0
    assert out.features == windowing.output_features(ds.features)


def test_fingerprint_depends_only_on_config(tokenizer, docs):
    first, second = SlidingWindows(make_tokenizer(), W), SlidingWindows(make_tokenizer(), W)
    assert Hasher.hash(first) == Hasher.hash(second)
    # using the tokenizer (which mutates its backend state) or counting does not change the hash
    before = Hasher.hash(first)
    first.tokenizer(["w1 w2 w3"], truncation=True, max_length=2)
    run_windows(docs, first)
    assert first.stats["windows"] > 0 and Hasher.hash(first) == before
    # settings that do not change the windows (no truncation is applied) do not change the hash
    other = make_tokenizer()
    other.model_max_length, other.padding_side = 123, "left"
    assert Hasher.hash(SlidingWindows(other, W)) == before
    assert Hasher.hash(SlidingWindows(make_tokenizer(), W + 1)) != before
    assert Hasher.hash(SlidingWindows(make_tokenizer(), W, faithful=True)) != before
    assert Hasher.hash(SlidingWindows(make_tokenizer(), W, decode=False)) != before
    assert Hasher.hash(SlidingWindows(make_tokenizer(VOCAB_SIZE + 1), W)) != before
    assert run_windows(docs, first)._fingerprint == run_windows(docs, second)._fingerprint


def test_pickle_round_trip_and_num_proc(tokenizer, docs):
    windowing = SlidingWindows(tokenizer, W)
    windowing({"id": ["a"], "text": [make_text(20, 0)]})
    clone = pickle.loads(pickle.dumps(windowing))
    assert clone.stats["documents"] == 0 and clone.fingerprint_config() == windowing.fingerprint_config()
    single = run_windows(docs, windowing)
    parallel = run_windows(docs, clone, num_proc=2, batch_size=2)
    assert sorted(zip(single["id"], single["input_ids"])) == sorted(zip(parallel["id"], parallel["input_ids"]))

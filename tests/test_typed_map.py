"""Every function hf_longattn hands to ``datasets.map`` types its columns the same whatever the data and batching.

Run: ``python -m pytest -q tests/test_typed_map.py`` (CPU, tiny model, the two SmolLM2 reproductions; ~1 min on 2 cores).
"""

from __future__ import annotations

import datasets
import pytest
from datasets import Dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_longattn import LongAttnScorer, LongAttnSelector, SlidingWindows
from hf_longattn import vocabulary as V

MAX_LENGTH = 64
GOOD = "def score(window):\n    return window + 1\n" * 30
KINDS = {
    "ok": st.just(GOOD),
    "empty": st.just(""),
    "missing": st.none(),
    "whitespace": st.text(st.sampled_from(" \t\n\r\x0b\x0c\u00a0\u2028"), min_size=1, max_size=6),
    "too_short": st.sampled_from(["a", "x y", "def"]),
    "odd": st.sampled_from(["\x00\x01\x02" * 40, "\ufeff\ufffd" * 50, "é漢字🙂" * 30, "\xff\xfe\x80" * 40]),
    "very_long": st.just(GOOD * 40),
}
ROWS = st.lists(st.one_of(*KINDS.values()), min_size=1, max_size=12)
FUZZ = settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scorer(tiny_model) -> LongAttnScorer:
    return LongAttnScorer(str(tiny_model), max_length=MAX_LENGTH)


def score(scorer, texts, **map_kwargs):
    source = Dataset.from_dict({"id": [f"r{i}" for i in range(len(texts))], "text": texts})
    scored = source.map(scorer, batched=True, keep_in_memory=True, **map_kwargs)  # no features=: the point of it
    assert scored["id"] == source["id"]  # every row, in order
    assert scored["text"] == source["text"]
    assert scored.features == scorer.features(source.features)
    return scored


# -- the two reproductions of issue 16, with the real model ------------------------------------------------


@pytest.mark.smollm2
def test_a_first_batch_without_any_score_keeps_the_declared_types(smollm2_gguf):
    good = "def f(x):\n    return x + 1\n" * 100
    ds = Dataset.from_dict({"text": ["", None, "  "] * 3 + [good]})
    scorer = LongAttnScorer(str(smollm2_gguf), max_length=1024)
    scored = ds.map(scorer, batched=True, batch_size=3, keep_in_memory=True)
    assert scored["longattn_status"] == ["empty", "missing", "empty"] * 3 + ["ok"]
    assert scored.features == scorer.features(ds.features)
    assert 0 < scored["longattn_ds"][-1] < 1


@pytest.mark.smollm2
def test_a_status_detail_first_written_after_ok_rows(smollm2_gguf):
    good = "def f(x):\n    return x + 1\n" * 100
    ds = Dataset.from_dict({"text": [good] * 3 + ["a"]})
    scorer = LongAttnScorer(str(smollm2_gguf), max_length=1024)
    scored = ds.map(scorer, batched=True, batch_size=3, keep_in_memory=True)
    assert scored["longattn_status"] == ["ok"] * 3 + ["too_short"]
    assert scored["longattn_status_detail"][-1].startswith("1 tokens")
    assert scored.features == scorer.features(ds.features)


# -- properties: any rows, any batching ----------------------------------------------------------------------


@FUZZ
@given(texts=ROWS, batch_size=st.integers(1, 6), writer_batch_size=st.sampled_from([None, 1, 2, 3, 1000]))
def test_scorer_map_is_typed_whatever_the_rows_and_batching(scorer, texts, batch_size, writer_batch_size):
    scored = score(scorer, texts, batch_size=batch_size, writer_batch_size=writer_batch_size)
    for row in scored:
        assert row["longattn_status"] in V.STATUSES
        assert (row["longattn_ds"] is not None) == (row["longattn_status"] == V.OK)


@settings(max_examples=2, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.one_of(*KINDS.values()), min_size=4, max_size=8), batch_size=st.integers(1, 3))
def test_scorer_map_is_typed_across_processes(scorer, texts, batch_size, spawn_start_method):
    """``num_proc=2``: each process writes its own file; both must agree on the types (spawn is slow: 2 examples)."""
    score(scorer, texts, batch_size=batch_size, num_proc=2)


_scored_row = st.one_of(
    st.builds(lambda ds, du: (V.OK, ds, du), st.floats(0, 1), st.floats(-1e-3, 0)),
    st.sampled_from([(status, None, None) for status in V.STATUSES if status != V.OK]),
)


@FUZZ
@given(rows=st.lists(_scored_row, min_size=1, max_size=15), keep=st.floats(0, 1), batch_size=st.integers(1, 5),
       writer_batch_size=st.sampled_from([None, 1, 2, 1000]))
def test_selector_map_is_typed_whatever_the_rows_and_batching(rows, keep, batch_size, writer_batch_size):
    scored = Dataset.from_dict(
        {"id": [f"w{i}" for i in range(len(rows))], "category": ["a", "b"] * (len(rows) // 2) + ["a"] * (len(rows) % 2),
         V.STATUS: [r[0] for r in rows], V.DS: [r[1] for r in rows], V.DU: [r[2] for r in rows]},
        features=datasets.Features({"id": datasets.Value("string"), "category": datasets.Value("string"),
                                    V.STATUS: datasets.Value("string"), V.DS: datasets.Value("float64"),
                                    V.DU: datasets.Value("float64")}))
    selector = LongAttnSelector(keep_fraction=round(keep, 3)).fit(scored)
    selected = scored.map(selector.add_scores, batched=True, batch_size=batch_size,
                          writer_batch_size=writer_batch_size, keep_in_memory=True)
    assert selected["id"] == scored["id"]
    assert selected.features == selector.output_features(scored.features)
    assert [lds is not None for lds in selected[V.LDS]] == [r[0] == V.OK for r in rows]


def test_windows_map_types_carried_columns_from_the_input(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    docs = Dataset.from_dict({"id": ["first", "second"], "text": [GOOD, GOOD], "license": [None, "mit"]})
    windows = docs.map(SlidingWindows(tokenizer, window_size=32), batched=True, batch_size=1,
                       remove_columns=docs.column_names, keep_in_memory=True)
    assert windows.features == V.window_features({"license": datasets.Value("string")}, text=True)
    assert set(windows["license"]) == {None, "mit"}

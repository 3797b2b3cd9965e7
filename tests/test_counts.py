"""Tests of hf_longattn.counts: counts computed once from rows, the text tables."""

from __future__ import annotations

import pyarrow as pa

from hf_longattn.counts import category_counts, format_summary, format_table, row_counts


def selection_table():
    return pa.table({
        "id": ["a", "b", "c", "d", "e"], "category": ["x", "x", "x", "y", "y"],
        "longattn_ds": [0.1, 0.2, None, 0.3, 0.4], "longattn_du": [-1.0, -2.0, None, -1.0, -1.5],
        "longattn_num_tokens": [8, 8, 8, 8, 8], "longattn_status": ["ok", "ok", "oom", "ok", None],
        "longattn_lds": [1.0, -1.0, None, 0.0, None], "longattn_selected": [True, False, False, True, False],
    })


def test_row_counts_by_hand():
    counts = row_counts(selection_table())
    assert counts == {"windows": 5, "scored_ok": 3, "not_ok": {"null": 1, "oom": 1}, "kept": 2, "tokens_in": 40,
                      "tokens_out": 16, "median_ds": 0.2, "median_du": -1.0, "median_lds": 0.0}


def test_category_counts_join_documents_rows_and_thresholds():
    stats = {"x": {"documents": 2, "documents_too_short": 1, "tokens_documents": 30, "windows_left_out": 4}}
    counts = category_counts(selection_table(), stats, {"x": {"lds": 1.0, "id": "a"}})
    assert list(counts) == ["x", "y"]
    assert counts["x"]["documents"] == 2 and counts["x"]["windows_left_out"] == 4 and counts["x"]["threshold"] == 1.0
    assert counts["y"]["documents"] == 0 and counts["y"]["threshold"] is None and counts["y"]["not_ok"] == {"null": 1}
    assert list(counts["x"])[:5] == ["documents", "documents_too_short", "tokens_documents", "windows", "windows_left_out"]


def test_tables():
    assert format_table(["a", "n"], [["x", 1200], ["yy", None]]).splitlines() == ["a       n", "--  -----", "x   1,200", "yy      —"]
    summary = {"model": "m", "window_size": 8, "min_distance": 0.25, "min_distance_tokens": 2, "alpha": 0.5,
               "normalization": "zscore", "keep_fraction": 0.5, "selection_method": "lds",
               "categories": category_counts(selection_table()), "timings": {"score": 1.25}}
    text = format_summary(summary)
    assert text.splitlines()[0] == "LongAttn summary: model m, W = 8, k = 2, alpha = 0.5, zscore, keep 0.5 (lds)"
    assert "  oom=1  " in text and "  null=1  " in text and text.endswith("wall time: score 1.2 s")

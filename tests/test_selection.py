"""Tests for hf_longattn.selection: LDS by hand, per-group top-fraction cuts, the random baseline, persistence."""

from __future__ import annotations

import doctest
import json
import math
import pickle
import statistics

import datasets
import numpy as np
import pyarrow as pa
import pytest
from datasets.fingerprint import Hasher

import hf_longattn.selection as selection_module
from hf_longattn.selection import LongAttnSelector, lds_scores

datasets.disable_progress_bars()


def scored_dataset(n: int = 60, seed: int = 0, groups=("ArXiv", "Book", "Code"), bad_every: int = 7) -> datasets.Dataset:
    """Random scored windows; every ``bad_every``-th row is not ``ok`` or lacks a score."""
    rng = np.random.default_rng(seed)
    ds_values = rng.uniform(0.1, 0.6, n).round(3).tolist()
    du_values = (-rng.uniform(1e-7, 5e-6, n)).tolist()
    status = ["ok"] * n
    for i in range(0, n, bad_every):
        kind = (i // bad_every) % 3
        if kind == 0:
            status[i], ds_values[i], du_values[i] = "too_short", None, None
        elif kind == 1:
            status[i], ds_values[i], du_values[i] = "error", None, None
        else:
            ds_values[i] = None  # "ok" but without a score
    return datasets.Dataset.from_dict(
        {
            "id": [f"w{i:04d}" for i in range(n)],
            "category": [groups[i % len(groups)] for i in range(n)],
            "text": ["lorem ipsum"] * n,
            "longattn_ds": ds_values,
            "longattn_du": du_values,
            "longattn_status": status,
        },
        features=datasets.Features(
            {
                "id": datasets.Value("string"),
                "category": datasets.Value("string"),
                "text": datasets.Value("string"),
                "longattn_ds": datasets.Value("float64"),
                "longattn_du": datasets.Value("float64"),
                "longattn_status": datasets.Value("string"),
            }
        ),
    )


def expected_selection(ds: datasets.Dataset, keep_fraction: float, alpha=0.5, normalization="zscore") -> set[str]:
    """Independent re-implementation: per category, valid rows, sort by (−LDS, id), keep ⌊f·n⌋."""
    selected = set()
    for group in set(ds["category"]):
        rows = [
            r for r in ds
            if r["category"] == group and r["longattn_status"] == "ok"
            and r["longattn_ds"] is not None and r["longattn_du"] is not None
        ]
        scores = lds_scores([r["longattn_ds"] for r in rows], [r["longattn_du"] for r in rows], alpha, normalization)
        ranked = sorted(zip(scores.tolist(), [r["id"] for r in rows]), key=lambda t: (-t[0], t[1]))
        selected |= {row_id for _, row_id in ranked[: math.floor(round(keep_fraction * len(rows), 9))]}
    return selected


def selected_ids(ds: datasets.Dataset, selector: LongAttnSelector) -> set[str]:
    return set(ds.filter(selector, batched=True)["id"])


# -- lds_scores by hand ----------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_zscore_by_hand(alpha):
    ds_values, du_values = [1.0, 2.0, 3.0, 6.0], [-4.0, -1.0, -1.0, -2.0]
    mean_ds, std_ds = statistics.fmean(ds_values), statistics.pstdev(ds_values)
    mean_du, std_du = statistics.fmean(du_values), statistics.pstdev(du_values)
    expected = [(p - mean_ds) / std_ds + alpha * (u - mean_du) / std_du for p, u in zip(ds_values, du_values)]
    np.testing.assert_allclose(lds_scores(ds_values, du_values, alpha=alpha), expected, rtol=0, atol=1e-12)


def test_zscore_uses_population_std():
    # ddof = 0: Z of [0, 2] is [-1, 1] (ddof = 1 would give ±0.707)
    assert lds_scores([0.0, 2.0], [5.0, 5.0]).tolist() == [-1.0, 1.0]


def test_zscore_constant_column_gives_zero():
    # 0.1 * 3 has a rounding error in its mean; the constant column must still give Z = 0 exactly
    assert lds_scores([0.1, 0.1, 0.1], [-0.3, -0.3, -0.3]).tolist() == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(lds_scores([0.7, 0.7], [-1.0, -3.0], alpha=0.5), [0.5, -0.5])


def test_minmax_by_hand_matches_reference_code():
    ds_values, du_values = [0.2, 0.4, 0.6], [-3.0, -1.0, -2.0]
    # reference: P' = [0, .5, 1], V = −DU = [3, 1, 2] → V' = [1, 0, .5]; score = P' − 0.5·V'
    np.testing.assert_allclose(lds_scores(ds_values, du_values, normalization="minmax"), [-0.5, 0.5, 0.75], atol=1e-15)
    np.testing.assert_allclose(lds_scores(ds_values, du_values, alpha=1.0, normalization="minmax"), [-1.0, 0.5, 0.5], atol=1e-15)
    # all equal → 0.5 each: score = 0.5 − α·0.5
    assert lds_scores([0.3, 0.3], [-1.0, -1.0], normalization="minmax").tolist() == [0.25, 0.25]


def test_minmax_equals_shifted_paper_form():
    rng = np.random.default_rng(1)
    p, du = rng.uniform(0, 1, 50), -rng.uniform(1e-7, 1e-5, 50)
    for alpha in (0.0, 0.5, 1.0):
        minmax = lambda x: (x - x.min()) / (x.max() - x.min())  # noqa: E731
        paper_form = minmax(p) + alpha * minmax(du) - alpha  # DS' + α·DU' − α
        np.testing.assert_allclose(lds_scores(p, du, alpha, "minmax"), paper_form, atol=1e-12)
        assert (np.argsort(-lds_scores(p, du, alpha, "minmax")) == np.argsort(-paper_form)).all()


def test_unknown_normalization_lists_valid_ones():
    with pytest.raises(ValueError, match=r"'rank'.*\['zscore', 'minmax'\]"):
        lds_scores([1.0], [1.0], normalization="rank")
    with pytest.raises(ValueError, match=r"\['zscore', 'minmax'\]"):
        LongAttnSelector(normalization="rank")
    with pytest.raises(ValueError, match=r"unknown selection method 'best'; available: \['lds_v1', 'random_v1'\] "
                                         r"\(aliases: lds → lds_v1, random → random_v1\)"):
        LongAttnSelector(method="best")
    assert LongAttnSelector(method="lds_v1").fit(_tiny_scores()).summary() == LongAttnSelector().fit(_tiny_scores()).summary()


def test_non_finite_scores_rejected():
    with pytest.raises(ValueError, match="finite"):
        lds_scores([1.0, np.nan], [0.0, 0.0])


# -- LongAttnSelector ------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", ["zscore", "minmax"])
@pytest.mark.parametrize("keep_fraction", [0.5, 0.125, 1.0, 0.0])
def test_selection_matches_independent_implementation(normalization, keep_fraction):
    ds = scored_dataset()
    selector = LongAttnSelector(keep_fraction, normalization=normalization).fit(ds)
    assert selected_ids(ds, selector) == expected_selection(ds, keep_fraction, normalization=normalization)


def test_per_group_counts_and_summary():
    ds = scored_dataset(n=60, bad_every=7)
    selector = LongAttnSelector(0.5).fit(ds)
    out = selector.transform(ds)
    summary = {row["group"]: row for row in selector.summary()}
    assert sorted(summary) == ["ArXiv", "Book", "Code"]
    for group, row in summary.items():
        rows = out.filter(lambda r: r["category"] == group)
        valid = [r for r in rows if r["longattn_lds"] is not None]
        assert row["rows"] == len(rows) == 20
        assert row["valid"] == len(valid)
        assert row["kept"] == sum(rows["longattn_selected"]) == len(valid) // 2
        assert row["rows"] == row["valid"] + sum(row["not_ok"].values()) + row["invalid_scores"]
        kept = [r for r in valid if r["longattn_selected"]]
        last = sorted(kept, key=lambda r: (-r["longattn_lds"], r["id"]))[-1]
        assert row["threshold"] == {"lds": last["longattn_lds"], "id": last["id"]}
    total_not_ok = {}
    for row in summary.values():
        for status, count in row["not_ok"].items():
            total_not_ok[status] = total_not_ok.get(status, 0) + count
    assert total_not_ok == {"too_short": 3, "error": 3}
    assert sum(row["invalid_scores"] for row in summary.values()) == 3


def test_non_ok_rows_never_selected():
    ds = scored_dataset(n=90, bad_every=3)
    # give the broken rows the best possible scores: still not selected
    ds = ds.map(lambda r: {"longattn_ds": 100.0, "longattn_du": 0.0} if r["longattn_status"] != "ok" else {})
    for method in ("lds", "random"):
        selector = LongAttnSelector(1.0, method=method).fit(ds)
        out = selector.transform(ds)
        for row in out:
            ok = row["longattn_status"] == "ok" and row["longattn_ds"] is not None and row["longattn_du"] is not None
            assert row["longattn_selected"] == ok  # keep_fraction 1: every valid row, nothing else
            assert (row["longattn_lds"] is None) == (not ok)


def test_ties_broken_by_id():
    ids = ["e", "b", "d", "a", "c", "f"]
    ds = datasets.Dataset.from_dict(
        {
            "id": ids,
            "category": ["X"] * 6,
            "longattn_ds": [0.5, 0.5, 0.5, 0.5, 0.9, 0.1],
            "longattn_du": [-1.0] * 6,
            "longattn_status": ["ok"] * 6,
        }
    )
    # c is best, then a tie of a, b, d, e: keep 3 → c, a, b
    assert selected_ids(ds, LongAttnSelector(0.5).fit(ds)) == {"c", "a", "b"}
    # an all-equal group: the first ids win
    flat = ds.map(lambda r: {"longattn_ds": 0.3})
    assert selected_ids(flat, LongAttnSelector(0.5).fit(flat)) == {"a", "b", "c"}
    assert selected_ids(flat, LongAttnSelector(0.5, normalization="minmax").fit(flat)) == {"a", "b", "c"}


def test_order_and_sharding_independence():
    ds = scored_dataset(n=120, seed=5)
    for method in ("lds", "random"):
        reference = selected_ids(ds, LongAttnSelector(0.3, method=method).fit(ds))
        shuffled = ds.shuffle(seed=11)
        selector = LongAttnSelector(0.3, method=method).fit(shuffled)
        assert selected_ids(shuffled, selector) == reference
        assert selected_ids(shuffled.flatten_indices(), selector) == reference
        # any shard, any batch size: the same per-row answer
        shards = [ds.shard(num_shards=4, index=i) for i in range(4)]
        assert set().union(*(selected_ids(s, selector) for s in shards)) == reference
        out = ds.map(selector.add_scores, batched=True, batch_size=1, features=selector.output_features(ds.features))
        assert set(out.filter(lambda r: r["longattn_selected"])["id"]) == reference


def test_fit_honours_indices_mapping():
    ds = scored_dataset(n=60)
    subset = ds.filter(lambda r: r["category"] != "Code")
    selector = LongAttnSelector(0.5).fit(subset)
    assert [row["group"] for row in selector.summary()] == ["ArXiv", "Book"]
    assert sum(row["rows"] for row in selector.summary()) == len(subset) == 40


def test_random_baseline():
    ds = scored_dataset(n=120, seed=2)
    lds_selector = LongAttnSelector(0.25).fit(ds)
    first = LongAttnSelector(0.25, method="random", seed=7).fit(ds)
    again = LongAttnSelector(0.25, method="random", seed=7).fit(ds.shuffle(seed=1))
    other = LongAttnSelector(0.25, method="random", seed=8).fit(ds)
    picked = selected_ids(ds, first)
    assert picked == selected_ids(ds, again)
    assert picked != selected_ids(ds, other)
    assert picked != selected_ids(ds, lds_selector)
    assert [g["kept"] for g in first.summary()] == [g["kept"] for g in lds_selector.summary()]
    by_group = {}
    for row in ds.filter(lambda r: r["id"] in picked):
        by_group[row["category"]] = by_group.get(row["category"], 0) + 1
    assert by_group == {g["group"]: g["kept"] for g in first.summary()}


def test_keep_fraction_counts_decimally():
    n = 100
    ds = datasets.Dataset.from_dict(
        {
            "id": [f"r{i:03d}" for i in range(n)],
            "longattn_ds": np.linspace(0, 1, n).tolist(),
            "longattn_du": [0.0] * n,
            "longattn_status": ["ok"] * n,
        }
    )
    selector = LongAttnSelector(0.29, by=None).fit(ds)  # 0.29 * 100 = 28.999999999999996 in floats
    assert selector.summary()[0]["kept"] == 29 and selector.summary()[0]["group"] is None
    assert selected_ids(ds, selector) == {f"r{i:03d}" for i in range(n - 29, n)}
    assert LongAttnSelector(0.5).n_keep(7) == 3 and LongAttnSelector(0.5).n_keep(1) == 0


def test_round_trip_pickle_and_hash():
    ds = scored_dataset(n=60)
    selector = LongAttnSelector(0.4, alpha=0.25, normalization="minmax").fit(ds)
    restored = LongAttnSelector.from_dict(json.loads(json.dumps(selector.to_dict())))
    assert restored.to_dict() == selector.to_dict()
    assert restored.add_scores(ds[:]) == selector.add_scores(ds[:])
    clone = pickle.loads(pickle.dumps(selector))
    assert clone.add_scores(ds[:]) == selector.add_scores(ds[:])
    assert Hasher.hash(restored) == Hasher.hash(selector) == Hasher.hash(LongAttnSelector(0.4, alpha=0.25, normalization="minmax").fit(ds))
    assert Hasher.hash(LongAttnSelector(0.5, alpha=0.25, normalization="minmax").fit(ds)) != Hasher.hash(selector)
    assert Hasher.hash(LongAttnSelector(0.4, alpha=0.25, normalization="minmax").fit(ds.select(range(30)))) != Hasher.hash(selector)
    assert Hasher.hash(LongAttnSelector(0.4, alpha=0.25, normalization="minmax")) != Hasher.hash(selector)  # unfitted
    with pytest.raises(ValueError, match="Not a saved LongAttnSelector"):
        LongAttnSelector.from_dict({"config": {}})


def test_filter_end_to_end():
    ds = scored_dataset(n=60)
    selector = LongAttnSelector(0.5).fit(ds)
    direct = ds.filter(selector, batched=True, batch_size=7)
    via_column = selector.transform(ds).filter(selector, batched=True)
    assert direct["id"] == via_column["id"]
    assert set(direct["id"]) == expected_selection(ds, 0.5)
    assert direct.column_names == ds.column_names
    assert via_column.features["longattn_lds"].dtype == "float64"
    # a first batch without any valid row still types the columns (features= from output_features)
    first_bad = selector.transform(ds.select([0, 7, 14] + list(range(1, 7))), batch_size=3)
    assert first_bad["longattn_lds"][:3] == [None, None, None]


def test_input_validation():
    ds = scored_dataset(n=12)
    with pytest.raises(ValueError, match=r"\['source'\] not in the dataset. Current columns"):
        LongAttnSelector(by="source").fit(ds)
    null_group = datasets.Dataset.from_dict(
        {"id": ["a", "b", "c"], "category": ["X", None, "Y"], "longattn_ds": [1.0, 2.0, 3.0],
         "longattn_du": [0.0, 0.0, 0.0], "longattn_status": ["ok"] * 3}
    )
    with pytest.raises(ValueError, match=r"Column 'category'.*null at row 1"):
        LongAttnSelector().fit(null_group)
    assert LongAttnSelector(by=None).fit(null_group).summary()[0]["valid"] == 3
    duplicate = null_group.map(lambda r: {"id": "same", "category": "X"})
    with pytest.raises(ValueError, match="duplicate ids.*'same'"):
        LongAttnSelector().fit(duplicate)
    with pytest.raises(RuntimeError, match="not fitted"):
        LongAttnSelector().add_scores(ds[:])
    fitted = LongAttnSelector().fit(ds)
    unseen = {**ds[:2], "category": ["Music", "Music"]}
    with pytest.raises(ValueError, match=r"'Music' was not seen by fit.*Fitted groups"):
        fitted.add_scores(unseen)
    for bad in (-0.1, 1.5, "half"):
        with pytest.raises(ValueError, match="keep_fraction"):
            LongAttnSelector(bad)


def test_fit_on_arrow_table_and_empty():
    ds = scored_dataset(n=30)
    table = ds.data.table
    assert LongAttnSelector().fit(table).to_dict() == LongAttnSelector().fit(ds).to_dict()
    empty = ds.select([])
    assert LongAttnSelector().fit(empty).summary() == []
    assert LongAttnSelector(by=None).fit(pa.table({c: table.column(c).slice(0, 0) for c in table.column_names})).summary()[0]["rows"] == 0


def test_docstring_examples():
    assert doctest.testmod(selection_module).failed == 0


def test_lds_values_do_not_depend_on_row_order():
    from hf_longattn.selection import lds_scores

    rng = np.random.default_rng(3)
    strength, uniformity = rng.random(2001) * 0.3 + 0.1, -rng.random(2001) * 1e-7
    order = rng.permutation(2001)
    forward = lds_scores(strength, uniformity)
    shuffled = lds_scores(strength[order], uniformity[order])
    assert np.array_equal(forward[order], shuffled)  # bit-identical, not just close


def _tiny_scores():
    import pyarrow as pa

    return pa.table({"id": ["a", "b", "c"], "category": ["x"] * 3, "longattn_ds": [0.1, 0.3, 0.2],
            "longattn_du": [-1.0, -2.0, -3.0], "longattn_status": ["ok"] * 3})


def test_fitting_from_many_score_files_equals_fitting_the_merged_table(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(7)
    n = 500
    table = pa.table({
        "id": [f"doc{i // 7}/w{i % 7:05d}" for i in range(n)],
        "category": rng.choice(["book", "code", "arxiv"], n).tolist(),
        "longattn_ds": rng.uniform(0.1, 0.6, n).tolist(),
        "longattn_du": (-rng.uniform(1e-7, 1e-5, n)).tolist(),
        "longattn_status": rng.choice(["ok"] * 9 + ["oom"], n).tolist(),
        "longattn_num_tokens": [64] * n,  # a column the fit does not read
    })
    paths = []
    for number, start in enumerate(range(0, n, 37)):
        paths.append(tmp_path / f"chunk-{number:06d}.parquet")
        pq.write_table(table.slice(start, 37), paths[-1])
    for method in ("lds", "random"):
        merged = LongAttnSelector(keep_fraction=0.125, method=method).fit(table)
        files = LongAttnSelector(keep_fraction=0.125, method=method).fit_files(paths)
        shuffled = LongAttnSelector(keep_fraction=0.125, method=method).fit_files(paths[::-1])
        assert files.to_dict() == merged.to_dict() == shuffled.to_dict()
    with pytest.raises(ValueError, match=r"\['longattn_status'\] not in the score files"):
        LongAttnSelector().fit_files([pq.write_table(table.drop_columns(["longattn_status"]), tmp_path / "x.parquet")
                                      or tmp_path / "x.parquet"])

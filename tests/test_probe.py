"""Tests of hf_longattn.probe: AUC and top-fraction share by hand, control sampling rules, multi-layer scoring, the probe end to end."""

from __future__ import annotations

import gzip
import itertools
import json
import math

import numpy as np
import pytest

from hf_longattn.probe import (
    MEAN_OF_GROUPS,
    ProbeReport,
    add_probe_parser,
    auc,
    auc_label,
    auc_standard_error,
    main,
    probe,
    probe_samples,
    top_fraction_share,
    verdict_of,
)
from hf_longattn.selection import lds_scores
from hf_longattn.windows import window_spans


def brute_force_auc(real, control):
    pairs = [(1.0 if r > c else 0.5 if r == c else 0.0) for r, c in itertools.product(real, control)]
    return sum(pairs) / len(pairs)


# -- AUC and top-fraction share against hand-computed tables -------------------------------------------


@pytest.mark.parametrize(
    ("real", "control", "expected"),
    [
        ([3.0, 2.0, 1.0], [0.0], 1.0),  # every real above the control
        ([0.0], [1.0, 2.0], 0.0),  # every real below
        ([1.0, 2.0], [2.0, 3.0], 0.125),  # (1,2)=0 (1,3)=0 (2,2)=½ (2,3)=0 → ½ / 4
        ([0.1, 0.4, 0.35, 0.8], [0.2, 0.4, 0.6], 5.5 / 12),  # 0 + (1 + ½) + 1 + 3 = 5.5 of 12 pairs
        ([5.0, 5.0, 5.0], [5.0, 5.0], 0.5),  # all equal: every pair a tie
        ([2.0, 2.0, 1.0], [2.0, 1.0, 1.0], 6 / 9),  # each 2: ½ + 1 + 1; the 1: 0 + ½ + ½ → 2.5 + 2.5 + 1 of 9
    ],
)
def test_auc_hand_table(real, control, expected):
    assert auc(real, control) == pytest.approx(expected, abs=1e-12)
    assert auc(real, control) == pytest.approx(brute_force_auc(real, control), abs=1e-12)
    # Swapping the roles mirrors the AUC.
    assert auc(control, real) == pytest.approx(1.0 - expected, abs=1e-12)


def test_auc_random_ties_match_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(20):
        real, control = rng.integers(0, 4, size=rng.integers(1, 9)), rng.integers(0, 4, size=rng.integers(1, 9))
        assert auc(real, control) == pytest.approx(brute_force_auc(real.tolist(), control.tolist()), abs=1e-12)


def test_auc_empty_and_non_finite():
    assert math.isnan(auc([], [1.0])) and math.isnan(auc([1.0], []))
    with pytest.raises(ValueError, match="finite"):
        auc([float("nan")], [1.0])


def test_auc_standard_error_and_labels():
    # Hanley–McNeil at A = ½, n = m = 16: Q1 = Q2 = ⅓, SE² = (¼ + 15·(⅓ − ¼)·2) / 256 = 2.75 / 256.
    assert auc_standard_error(0.5, 16, 16) == pytest.approx(math.sqrt(2.75 / 256))
    assert auc_standard_error(1.0, 4, 4) == pytest.approx(0.0)
    assert math.isnan(auc_standard_error(0.5, 0, 3))
    assert [auc_label(a) for a in (0.6, 0.59, 0.41, 0.4, 0.1, math.nan)] == [
        "separates", "close to chance", "close to chance", "inverted", "inverted", "n/a",
    ]


@pytest.mark.parametrize(
    ("scores", "is_real", "keep_fraction", "expected"),
    [
        ([5, 4, 3, 2], [1, 0, 1, 0], 0.5, 0.5),  # keeps 5 (real) and 4 (control)
        ([5, 4, 3, 2], [1, 1, 0, 0], 0.5, 1.0),
        ([5, 4, 3, 2], [0, 0, 1, 1], 0.5, 0.0),
        ([3, 2, 2, 2, 1, 0], [1, 1, 0, 0, 1, 0], 0.5, 5 / 9),  # 1 above the cut + 2 of 3 tied places × ⅓ real
        ([1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0], 0.5, 0.5),  # all equal → the pool's real share
        ([1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], 0.5, 1 / 6),
        ([4, 3, 2, 1], [1, 0, 1, 0], 0.25, 1.0),  # keeps only the best
        ([4, 3, 2, 1], [1, 0, 1, 0], 1.0, 0.5),  # keeps everything
        ([9, 8, 7, 6, 5, 4, 3, 2, 1, 0], [1] * 3 + [0] * 7, 0.29, 1.0),  # ⌊0.29 · 10⌋ = 2, not 1
    ],
)
def test_top_fraction_share_hand_table(scores, is_real, keep_fraction, expected):
    assert top_fraction_share(scores, is_real, keep_fraction) == pytest.approx(expected, abs=1e-12)
    # Row order does not matter.
    order = np.random.default_rng(0).permutation(len(scores))
    shuffled = top_fraction_share(np.asarray(scores)[order], np.asarray(is_real)[order], keep_fraction)
    assert shuffled == pytest.approx(expected, abs=1e-12)


def test_top_fraction_share_nothing_kept_and_bad_input():
    assert math.isnan(top_fraction_share([1.0, 2.0], [True, False], 0.4))
    with pytest.raises(ValueError, match="same length"):
        top_fraction_share([1.0], [True, False])
    with pytest.raises(ValueError, match="keep_fraction"):
        top_fraction_share([1.0], [True], 1.5)


def _row(group, layer, auc_lds, auc_ds=0.5):
    return {"group": group, "layer": layer, "n_real": 4, "n_control": 4, "auc_lds": auc_lds, "auc_ds": auc_ds}


def test_verdict_best_layer_none_and_inverted():
    rows = [_row("a", 0, 0.45), _row("a", 3, 0.9), _row("b", 0, 0.35), _row("b", 3, 0.55),
            _row(MEAN_OF_GROUPS, 0, 0.40), _row(MEAN_OF_GROUPS, 3, 0.725)]
    verdict, best = verdict_of(rows)
    assert best == 3
    assert verdict.startswith("Layer 3 separates") and "0.72" in verdict and "Layer 0 (the paper's choice): 0.40" in verdict
    assert "a: layer 3 (0.90)" in verdict and "b: none separates (best layer 3, 0.55)" in verdict

    rows = [_row("a", 0, 0.30), _row("a", 3, 0.59), _row(MEAN_OF_GROUPS, 0, 0.30), _row(MEAN_OF_GROUPS, 3, 0.59)]
    verdict, best = verdict_of(rows)
    assert best is None
    assert verdict.startswith("None separates") and "0.59 (layer 3)" in verdict and "inverted" in verdict

    # A tie between layers goes to the shallower (cheaper) one.
    rows = [_row("a", 0, 0.7), _row("a", 5, 0.7), _row(MEAN_OF_GROUPS, 0, 0.7), _row(MEAN_OF_GROUPS, 5, 0.7)]
    assert verdict_of(rows)[1] == 0


# -- real windows and controls ---------------------------------------------------------------------------

LENGTHS = [500, 300, 90, 1000, 40, 900, 900, 2000]
GROUPS = ["a", "a", "a", "a", "a", "b", "b", "c"]  # c: a single document


def _sample(seed=0, lengths=LENGTHS, groups=GROUPS, window_size=70, num_windows=5, chunk_size=16, doc_ids=None):
    return probe_samples(lengths, groups, window_size=window_size, num_windows=num_windows, chunk_size=chunk_size,
                         seed=seed, doc_ids=doc_ids)


def test_samples_are_deterministic_and_seeded():
    first, counts = _sample(seed=7)
    again, counts_again = _sample(seed=7)
    assert first == again and counts == counts_again
    assert _sample(seed=8)[0] != first
    # A group's samples do not depend on other groups: drop group "b" and "a"/"c" are unchanged.
    keep = [i for i, g in enumerate(GROUPS) if g != "b"]
    ids = [f"doc{i}" for i in range(len(LENGTHS))]
    fewer, _ = _sample(seed=7, lengths=[LENGTHS[i] for i in keep], groups=[GROUPS[i] for i in keep],
                       doc_ids=[ids[i] for i in keep])

    def named(samples, doc_names):
        return [(s.id, s.kind, [(doc_names[d], a, b) for d, a, b in s.sources]) for s in samples if s.group != "b"]

    assert named(fewer, [ids[i] for i in keep]) == named(first, ids)


def test_real_windows_are_algorithm_1_spans():
    samples, counts = _sample()
    reals = [s for s in samples if s.kind == "real"]
    assert [counts[g]["real"] for g in "abc"] == [5, 5, 5]
    assert len({(s.group, s.sources) for s in reals}) == len(reals)  # without replacement
    for sample in reals:
        ((doc, start, end),) = sample.sources
        assert GROUPS[doc] == sample.group and LENGTHS[doc] >= 70
        assert (start, end) in window_spans(LENGTHS[doc], 70)
        assert sample.id.startswith(f"doc{doc}/w")
    # Fewer candidate windows than asked: all of them, and as many controls.
    samples, counts = _sample(lengths=[140, 140] + [69] * 10, groups=["x"] * 12, num_windows=50)
    assert counts["x"]["candidate_windows"] == 4 and counts["x"]["real"] == counts["x"]["control"] == 4
    # The real windows cover documents 0 and 1 entirely: the controls come from the short ones.
    assert {doc for s in samples if s.kind == "control" for doc, _, _ in s.sources} <= set(range(2, 12))


def test_controls_exact_length_own_group_disjoint_from_real_windows_and_each_other():
    samples, counts = _sample()
    tokens = [np.arange(n) + 10_000 * d for d, n in enumerate(LENGTHS)]  # token = document and position
    for group in "abc":
        reals = [s for s in samples if s.group == group and s.kind == "real"]
        controls = [s for s in samples if s.group == group and s.kind == "control"]
        assert len(controls) == len(reals) == 5
        used: dict[int, list[tuple[int, int]]] = {}
        for control in controls:
            assert control.num_tokens == 70 and len(control.token_ids(tokens)) == 70
            # Chunks of chunk_size tokens, the last one W mod chunk_size = 6.
            assert [b - a for _, a, b in control.sources] == [16, 16, 16, 16, 6]
            assert control.token_ids(tokens) == [t for d, a, b in control.sources for t in tokens[d][a:b].tolist()]
            for doc, start, end in control.sources:
                assert GROUPS[doc] == group  # own group only
                assert 0 <= start < end <= LENGTHS[doc]
                assert LENGTHS[doc] >= 16  # source documents: at least chunk_size tokens
                # Never a token of a sampled real window: [start, end) ∩ [a, b) = ∅ for every real span.
                for real in reals:
                    ((real_doc, a, b),) = real.sources
                    assert real_doc != doc or end <= a or b <= start
                # Nor of another chunk of any control of the group.
                for a, b in used.get(doc, []):
                    assert end <= a or b <= start
                used.setdefault(doc, []).append((start, end))
    assert counts["a"]["control_source_documents"] == 5  # 500, 300, 90, 1000 and 40 tokens (≥ chunk_size)


def test_control_chunk_boundaries_join_different_documents():
    samples, counts = _sample(num_windows=8)
    for sample in samples:
        if sample.kind == "control" and sample.group in ("a", "b"):
            docs = [doc for doc, _, _ in sample.sources]
            assert all(x != y for x, y in itertools.pairwise(docs))
    assert counts["a"]["same_document_joins"] == counts["b"]["same_document_joins"] == 0
    # A single document: every join is within it, never continuing the previous chunk.
    controls = [s for s in samples if s.group == "c" and s.kind == "control"]
    assert counts["c"]["same_document_joins"] == sum(len(s.sources) - 1 for s in controls) > 0
    for sample in controls:
        assert all(prev[2] != nxt[1] for prev, nxt in zip(sample.sources, sample.sources[1:]))


def test_controls_use_documents_of_at_least_chunk_size_and_fail_loudly():
    samples, counts = _sample(lengths=[200, 120, 120, 10], groups=["x"] * 4, window_size=64, num_windows=2)
    assert counts["x"]["control_source_documents"] == 3
    sources = {doc for s in samples if s.kind == "control" for doc, _, _ in s.sources}
    assert sources <= {0, 1, 2}
    with pytest.raises(ValueError, match="not enough text for one real window and one control.*--probe-chunk-size"):
        _sample(lengths=[70], groups=["x"], window_size=70, num_windows=2)
    with pytest.raises(ValueError, match="chunk_size"):
        _sample(chunk_size=40)
    with pytest.raises(ValueError, match="same length"):
        probe_samples([100], ["a", "b"], window_size=64)


def test_a_group_with_text_for_fewer_controls_gets_fewer_windows_not_an_error():
    """N is a maximum: 5 documents of 64 tokens hold at most 2 real windows and 2 controls of 64 tokens from the rest."""
    samples, counts = _sample(lengths=[64] * 5, groups=["x"] * 5, window_size=64, num_windows=8, chunk_size=16)
    assert counts["x"]["requested"] == 8 and counts["x"]["candidate_windows"] == 5
    assert 1 <= counts["x"]["real"] < 5 and counts["x"]["control"] == counts["x"]["real"]
    assert sum(s.kind == "real" for s in samples) == sum(s.kind == "control" for s in samples) == counts["x"]["real"]
    again, _ = _sample(lengths=[64] * 5, groups=["x"] * 5, window_size=64, num_windows=8, chunk_size=16)
    assert again == samples  # the same seed, the same windows


# -- scoring: several layers in one forward ------------------------------------------------------------


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(300)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def _documents(seed=0):
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    rows = []
    for category, lengths in (("arxiv", [600, 400, 300]), ("code", [700, 500])):
        for i, n in enumerate(lengths):
            # Text with some long-range structure: a block of words that comes back later.
            block = rng.integers(0, 300, size=24)
            words = np.concatenate([block, rng.integers(0, 300, size=n - 48), block])
            rows.append({"id": f"{category}-{i}", "category": category, "text": " ".join(f"w{w}" for w in words)})
    return Dataset.from_list(rows)


def test_several_layers_in_one_forward_equal_single_layers(tiny_model_dir):
    from datasets import Dataset

    from hf_longattn.scorer import LongAttnScorer

    folder = str(tiny_model_dir("llama", 3))
    rng = np.random.default_rng(1)
    ds = Dataset.from_dict({"input_ids": [rng.integers(0, 320, size=96).tolist() for _ in range(3)]})
    multi = LongAttnScorer(folder, layer=[0, 1, 2])
    both = ds.map(multi, batched=True, keep_in_memory=True, features=multi.features(ds.features))
    for position, layer in enumerate([0, 1, 2]):
        single = LongAttnScorer(folder, layer=layer)
        alone = ds.map(single, batched=True, keep_in_memory=True, features=single.features(ds.features))
        for row_multi, row_single in zip(both, alone):
            assert row_multi["longattn_ds_by_layer"][position] == pytest.approx(row_single["longattn_ds"], rel=1e-9)
            assert row_multi["longattn_du_by_layer"][position] == pytest.approx(row_single["longattn_du"], rel=1e-9)
    assert both["longattn_ds"] == [row[0] for row in both["longattn_ds_by_layer"]]
    assert len({round(v, 9) for v in both[0]["longattn_ds_by_layer"]}) == 3  # the layers differ


# -- the probe end to end ---------------------------------------------------------------------------


def test_probe_end_to_end_tiny_model(tiny_model_dir, tmp_path):
    folder = str(tiny_model_dir("llama", 3))
    kwargs = {"window_size": 64, "by": "category", "num_windows": 4, "chunk_size": 16, "seed": 3, "tokenizer": _tiny_tokenizer()}
    report = probe(folder, _documents(), layers="all", **kwargs)

    assert report.layers == [0, 1, 2] and report.groups == ["arxiv", "code"]
    assert len(report.rows) == 2 * 3 + 3
    for group in ("arxiv", "code"):
        assert report.counts[group]["real"] == report.counts[group]["control"] == 4
        assert report.counts[group]["not_scored"] == 0
    assert report.timings["windows_scored"] == 16 and report.timings["tokens_scored"] == 16 * 64
    for row in report.rows:
        for key in ("auc_ds", "auc_du", "auc_lds", "top_real_share"):
            assert 0.0 <= row[key] <= 1.0
        if row["group"] != MEAN_OF_GROUPS:
            assert row["n_real"] == row["n_control"] == 4
            assert 0.0 <= row["ds_real"] <= 1.0 and row["du_real"] <= 0.0

    # Each row is recomputable from the per-window scores in the report.
    for row in report.rows:
        if row["group"] == MEAN_OF_GROUPS:
            continue
        position = report.layers.index(row["layer"])
        members = [s for s in report.samples if s["group"] == row["group"]]
        ds = np.array([s["ds_by_layer"][position] for s in members])
        du = np.array([s["du_by_layer"][position] for s in members])
        real = np.array([s["kind"] == "real" for s in members])
        lds = lds_scores(ds, du, alpha=0.5)
        assert row["auc_ds"] == pytest.approx(brute_force_auc(ds[real], ds[~real]))
        assert row["auc_lds"] == pytest.approx(brute_force_auc(lds[real], lds[~real]))
        assert row["top_real_share"] == pytest.approx(top_fraction_share(lds, real, 0.5))
        assert row["ds_real"] == pytest.approx(ds[real].mean())
    mean_rows = [r for r in report.rows if r["group"] == MEAN_OF_GROUPS]
    for row in mean_rows:
        per_group = [r["auc_lds"] for r in report.rows if r["layer"] == row["layer"] and r["group"] != MEAN_OF_GROUPS]
        assert row["auc_lds"] == pytest.approx(np.mean(per_group))
    assert (report.best_layer is None) == report.verdict.startswith("None separates")

    # Scoring one layer alone gives the same windows and the same scores for it.
    single = probe(folder, _documents(), layers=[1], **kwargs)
    assert [s["id"] for s in single.samples] == [s["id"] for s in report.samples]
    for alone, together in zip(single.samples, report.samples):
        assert alone["ds_by_layer"][0] == pytest.approx(together["ds_by_layer"][1], rel=1e-9)
        assert alone["du_by_layer"][0] == pytest.approx(together["du_by_layer"][1], rel=1e-9)

    # Outputs: markdown (long and wide), JSON round trip, PNG.
    table = report.to_markdown()
    assert table.splitlines()[0].startswith("| group | layer | n real/ctrl") and len(table.splitlines()) == 2 + len(report.rows) + 2
    assert table.splitlines()[-1] == "Standard error of a per-group AUC near 0.5 (Hanley–McNeil): ±0.22 for 4 real vs 4 control windows."
    assert len(report.to_markdown("wide").splitlines()) == 2 + 3 + 2
    loaded = ProbeReport.from_json(report.to_json(tmp_path / "report.json"))
    assert loaded.rows == report.rows and loaded.verdict == report.verdict and loaded.samples == report.samples
    pytest.importorskip("matplotlib")
    png = report.plot(tmp_path / "probe.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_validates_input(tiny_model_dir):
    folder = str(tiny_model_dir("llama", 3))
    docs = _documents()
    with pytest.raises(ValueError, match="current columns"):
        probe(folder, docs, window_size=64, layers=0, by="source", tokenizer=_tiny_tokenizer())
    with pytest.raises(ValueError, match="the model has 3 layers"):
        probe(folder, docs, window_size=64, layers=[0, 3], tokenizer=_tiny_tokenizer())
    with pytest.raises(ValueError, match="max_length"):
        probe(folder, docs, window_size=2048, layers=0, tokenizer=_tiny_tokenizer())
    with pytest.raises(TypeError, match="layer"):
        probe(folder, docs, window_size=64, layers=0, layer=1)


def test_cli_on_pre_tokenised_jsonl(tiny_model_dir, tmp_path, capsys):
    import argparse

    folder = str(tiny_model_dir("llama", 3))
    rng = np.random.default_rng(5)
    data = tmp_path / "docs.jsonl.gz"
    with gzip.open(data, "wt", encoding="utf-8") as handle:
        for i, (category, n) in enumerate([("book", 400), ("book", 300), ("code", 250), ("code", 350)]):
            handle.write(json.dumps({"id": f"d{i}", "category": category, "input_ids": rng.integers(0, 320, n).tolist()}) + "\n")
    output = tmp_path / "out"
    argv = ["--model", folder, "--data", str(data), "--window-size", "64", "--layers", "0,2",
            "--num-windows", "3", "--chunk-size", "16", "--seed", "1", "--output", str(output)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| group | layer |" in printed and "book: 2 documents" in printed
    report = json.loads((output / "report.json").read_text())
    assert report["config"]["layers"] == [0, 2] and report["config"]["num_windows"] == 3
    lines = printed.strip().splitlines()
    assert report["verdict"] in lines
    assert lines[-1].startswith("For the run's layer 0: The probe found layer 0")  # what the run's summary says
    assert (output / "report.md").is_file()
    if pytest.importorskip("matplotlib"):
        assert (output / "probe.png").is_file()

    # The subcommand registers on any argparse sub-parser set.
    parser = argparse.ArgumentParser(prog="hf-longattn")
    add_probe_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["probe", *argv[:-2], "--layers", "all", "--by", "none"])
    assert args.func.__name__ == "run_probe_command" and args.probe_layers == "all" and args.window_size == 64

    # The pipeline's vocabulary: --input, --layer, --probe-num-windows, --probe-chunk-size, --output-dir, and
    # --min-distance in tokens; the report goes to output_dir/probe.
    run_dir = tmp_path / "run"
    new = ["--model", folder, "--input", str(data), "--window-size", "64", "--layer", "0,2", "--probe-num-windows", "3",
           "--probe-chunk-size", "16", "--seed", "1", "--min-distance", "16", "--output-dir", str(run_dir)]
    assert main(new) == 0
    again = json.loads((run_dir / "probe" / "report.json").read_text())
    assert again["config"]["min_distance"] == 16 and again["samples"][0]["id"] == report["samples"][0]["id"]


def test_cli_checks_the_window_against_the_context_like_a_run(tiny_model_dir, tmp_path, capsys):
    # The tiny model's context is 1024 tokens: W = 2048 is refused in one line before any work, and
    # accepted with context_length (a rope-scaled model), as `hf-longattn run` does.
    folder = str(tiny_model_dir("llama", 3))
    rng = np.random.default_rng(7)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"id": f"d{i}", "category": "book", "input_ids": rng.integers(0, 320, 2300).tolist()})
                            + "\n" for i in range(3)))
    argv = ["--model", folder, "--input", str(data), "--window-size", "2048", "--layer", "0",
            "--probe-num-windows", "1", "--probe-chunk-size", "512", "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "exceeds the context of model" in capsys.readouterr().err
    assert main([*argv, "--set", "context_length=4096"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["window_size"] == 2048 and report["timings"]["tokens_scored"] == 2 * 2048

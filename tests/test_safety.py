"""Safety: no custom code unless asked, no pickle unless asked, no token in any output, no path outside the export.

Run: ``python -m pytest -q tests/test_safety.py`` (CPU, tiny random models, no network; ~30 s on 2 cores).
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import pickle
import pkgutil
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset, DatasetDict
from datasets.fingerprint import Hasher
from hypothesis import event, given, settings
from hypothesis import strategies as st

import hf_longattn
from hf_longattn import model_loading
from hf_longattn.model_loading import ModelSource, load_attention_model
from hf_longattn.publication import export_dataset
from hf_longattn.scorer import LongAttnScorer
from hf_longattn.selection import LongAttnSelector

FAKE_TOKEN = "hf_FAKEsafetyTOKENdoNotLeak0123456789abcd"
VOCAB = 320


def random_ids(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


BATCH = {"input_ids": random_ids([60, 60, 45], seed=3)}


def copy_model(source: Path, target: Path, *, weights: bool = True) -> Path:
    target.mkdir(parents=True)
    for file in source.iterdir():
        if weights or file.suffix != ".safetensors":
            shutil.copy(file, target / file.name)
    return target


# --- trust_remote_code ------------------------------------------------------------------------------


def test_trust_remote_code_defaults_to_false_everywhere():
    """Every public callable of hf_longattn that takes ``trust_remote_code`` defaults it to False."""
    found = []
    for module_info in pkgutil.iter_modules(hf_longattn.__path__):
        try:
            module = importlib.import_module(f"hf_longattn.{module_info.name}")
        except Exception:  # noqa: BLE001, S112 - a module that does not import is another test's failure
            continue
        for name, value in vars(module).items():
            if getattr(value, "__module__", None) != module.__name__ or not callable(value):
                continue
            try:
                parameter = inspect.signature(value).parameters.get("trust_remote_code")
            except (TypeError, ValueError):
                continue
            if parameter is not None and parameter.default is not inspect.Parameter.empty:  # else always passed
                found.append(f"{module.__name__}.{name}")
                assert parameter.default is False, f"{module.__name__}.{name}: trust_remote_code={parameter.default!r}"
    for required in ("scorer.LongAttnScorer", "model_loading.load_config", "model_loading.load_tokenizer",
                     "model_loading.load_attention_model"):
        assert f"hf_longattn.{required}" in found


def write_custom_code(folder: Path, marker: Path, model_type: str) -> Path:
    """Point config.json / tokenizer_config.json at modelling code that, once imported, creates ``marker``."""
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil_code.EvilConfig", "AutoModel": "evil_code.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil_code.EvilTokenizer", None]}}))
    (folder / "evil_code.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('custom code ran')\n"
        "from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast\n"
        f"class EvilConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
        "class EvilModel(LlamaModel):\n    config_class = EvilConfig\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    return folder


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """Custom code that does run (the positive control) is copied here, not into ~/.cache."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))


def test_custom_code_in_a_model_folder_never_runs_by_default(tiny_model_dir, tmp_path, modules_cache):
    marker = tmp_path / "custom_code_ran"
    folder = write_custom_code(copy_model(tiny_model_dir("llama"), tmp_path / "custom"), marker, "hf_longattn_evil")
    scorer = LongAttnScorer(str(folder))
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # the model's config
        scorer(BATCH)
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # the tokenizer (max_length spares the config)
        LongAttnScorer(str(folder), max_length=64)({"text": ["some text to tokenize"]})
    assert not marker.exists()
    # Positive control: the marker works — opting in runs the folder's code.
    assert LongAttnScorer(str(folder), trust_remote_code=True).model_config.model_type == "hf_longattn_evil"
    assert marker.read_text() == "custom code ran"


def test_auto_map_on_a_known_architecture_uses_the_library_code(tiny_model_dir, tmp_path):
    marker = tmp_path / "custom_code_ran"
    folder = write_custom_code(copy_model(tiny_model_dir("llama"), tmp_path / "custom"), marker, "llama")
    scored = LongAttnScorer(str(folder))(BATCH)
    assert scored == LongAttnScorer(str(tiny_model_dir("llama")))(BATCH)
    assert not marker.exists()


# --- pickle checkpoints ----------------------------------------------------------------------------


class _RunsOnUnpickling:
    """Unpickling this creates a file: stands in for a malicious ``pytorch_model.bin``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def write_malicious_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_RunsOnUnpickling(marker)))


@pytest.fixture
def pickle_only(tiny_model_dir, tmp_path) -> Path:
    """The tiny LLaMA as ``pytorch_model.bin`` (a genuine state dict), no safetensors."""
    from safetensors.torch import load_file

    source = tiny_model_dir("llama")
    folder = copy_model(source, tmp_path / "pickle-only", weights=False)
    torch.save(load_file(source / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def test_pickle_only_checkpoint_is_refused_unless_allowed(tiny_model_dir, pickle_only, tmp_path):
    message = r"only pickled weights \(pytorch_model.bin\).*safetensors.*allow_pickle=True"
    scorer = LongAttnScorer(str(pickle_only))
    with pytest.raises(ValueError, match=message):
        scorer(BATCH)
    assert scorer._model is None

    marker = tmp_path / "unpickled"
    malicious = copy_model(pickle_only, tmp_path / "malicious", weights=False)
    write_malicious_pickle(malicious / "pytorch_model.bin", marker)
    with pytest.raises(ValueError, match=message):
        LongAttnScorer(str(malicious))(BATCH)
    LongAttnScorer(str(malicious))  # hashing the file for the cache key reads bytes, never unpickles
    assert not marker.exists()

    allowed = LongAttnScorer(str(pickle_only), allow_pickle=True)
    assert allowed(BATCH) == LongAttnScorer(str(tiny_model_dir("llama")))(BATCH)


def test_pickle_weights_key_the_cache(pickle_only):
    before = Hasher.hash(LongAttnScorer(str(pickle_only), allow_pickle=True))
    state = torch.load(pickle_only / "pytorch_model.bin", weights_only=True)
    state["model.embed_tokens.weight"][0, 0] += 1.0
    torch.save(state, pickle_only / "pytorch_model.bin")
    assert Hasher.hash(LongAttnScorer(str(pickle_only), allow_pickle=True)) != before


def test_safetensors_win_over_a_pickle_next_to_them(tiny_model_dir, tmp_path):
    marker = tmp_path / "unpickled"
    folder = copy_model(tiny_model_dir("llama"), tmp_path / "both")
    write_malicious_pickle(folder / "pytorch_model.bin", marker)
    expected = LongAttnScorer(str(tiny_model_dir("llama")))(BATCH)
    for allow_pickle in (False, True):
        assert LongAttnScorer(str(folder), allow_pickle=allow_pickle)(BATCH) == expected
    assert not marker.exists()


def test_hub_pickle_only_repo_is_refused_before_any_download(tiny_model_dir, monkeypatch):
    import huggingface_hub
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir("llama"))
    monkeypatch.setattr(model_loading, "load_config", lambda source, **kwargs: config)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: ["config.json", "pytorch_model.bin"])

    def no_download(*args, **kwargs):
        raise AssertionError("nothing may be downloaded")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    with pytest.raises(ValueError, match=r"someone/model has only pickled weights.*safetensors.*allow_pickle=True"):
        load_attention_model(ModelSource("hub", "someone/model"), (0,), dtype=torch.float32)


# --- the Hub token ---------------------------------------------------------------------------------


@pytest.fixture
def verbose_libraries():
    """Debug logging in transformers, datasets and huggingface_hub: the most they could ever print."""
    import datasets
    import huggingface_hub
    import transformers

    levels = (transformers.logging.get_verbosity(), datasets.logging.get_verbosity(),
              huggingface_hub.logging.get_verbosity())
    transformers.logging.set_verbosity_debug()
    datasets.logging.set_verbosity_debug()
    huggingface_hub.logging.set_verbosity_debug()
    yield
    transformers.logging.set_verbosity(levels[0])
    datasets.logging.set_verbosity(levels[1])
    huggingface_hub.logging.set_verbosity(levels[2])


def test_hub_token_never_reaches_logs_outputs_or_card(tiny_model_dir, tmp_path, monkeypatch, caplog, capfd,
                                                       verbose_libraries):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", FAKE_TOKEN)
    caplog.set_level(logging.DEBUG)
    Dataset.from_dict({
        "id": [f"w{i}" for i in range(6)], "category": ["book", "code"] * 3,
        "input_ids": random_ids([64, 64, 48, 48, 30, 2], seed=5),
    }).to_parquet(tmp_path / "windows.parquet")
    windows = Dataset.from_parquet(str(tmp_path / "windows.parquet"), cache_dir=str(tmp_path / "cache"))
    scorer = LongAttnScorer(str(tiny_model_dir("llama")))
    scored = windows.map(scorer, batched=True, features=scorer.features(windows.features))  # cache files on disk
    selector = LongAttnSelector(keep_fraction=0.5).fit(scored)
    scored = selector.transform(scored)
    summary = [{**row, "threshold": (row["threshold"] or {}).get("lds")} for row in selector.summary()]
    metadata = {**scorer.config, "summary": summary, "hf_token": FAKE_TOKEN,
                "push": {"token": FAKE_TOKEN, "repo": "me/x"}, "api_key": FAKE_TOKEN}
    by_category = DatasetDict({c: scored.filter(lambda r, c=c: r["category"] == c) for c in ("book", "code")})
    export_dataset(by_category, tmp_path / "export", metadata, repo_id="me/x")
    print(repr(scorer), selector)

    assert FAKE_TOKEN not in repr(scorer) and FAKE_TOKEN.encode() not in pickle.dumps(scorer)
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]
    assert leaks == []
    assert len(list((tmp_path / "export").rglob("*.parquet"))) >= 4 and (tmp_path / "export" / "README.md").is_file()
    captured = capfd.readouterr()
    assert FAKE_TOKEN not in captured.out and FAKE_TOKEN not in captured.err
    assert caplog.records and all(FAKE_TOKEN not in record.getMessage() for record in caplog.records)
    assert FAKE_TOKEN not in caplog.text


# --- output paths --------------------------------------------------------------------------------------

EVIL_NAMES = ["../../x", "/tmp/hf_longattn_escape", "..", "a/../../b", "..\\..\\win", "all", "nul\x00byte", "~/.ssh/x"]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def scored_splits(tiny_model_dir, ids: list[str], categories: list[str]) -> DatasetDict:
    windows = Dataset.from_dict({"id": ids, "category": categories,
                                 "input_ids": random_ids([40 + i for i in range(len(ids))], seed=9)})
    scorer = LongAttnScorer(str(tiny_model_dir("llama")))
    scored = windows.map(scorer, batched=True, features=scorer.features(windows.features), keep_in_memory=True)
    scored = LongAttnSelector(keep_fraction=0.5).fit(scored).transform(scored, keep_in_memory=True)
    return DatasetDict({c: scored.filter(lambda r, c=c: r["category"] == c, keep_in_memory=True)
                        for c in dict.fromkeys(categories)})


def assert_inside(folder: Path) -> None:
    for path in folder.rglob("*"):
        assert not path.is_symlink() and path.resolve().is_relative_to(folder.resolve()), path
    for split_dir in ("scored", "filtered"):
        for file in (folder / "data" / split_dir).iterdir():
            assert re.fullmatch(r"[A-Za-z0-9_]+-\d{5}-of-\d{5}-[0-9a-f]{12}\.parquet", file.name), file.name


def test_ids_and_categories_cannot_write_outside_the_export(tiny_model_dir, tmp_path):
    base = tmp_path / "deep" / "down"
    folder = base / "export"
    base.mkdir(parents=True)
    (tmp_path / "sibling.txt").write_text("untouched")
    ids = [f"{name}/{i}" for i, name in enumerate(EVIL_NAMES)] + ["../../x", "/etc/passwd"]
    categories = EVIL_NAMES + ["../../x", "/tmp/hf_longattn_escape"]
    scored = scored_splits(tiny_model_dir, ids, categories)
    before = tree(tmp_path)
    metadata = {"model": "../../model", "window_size": "../../W", "summary": [{"group": "../../x", "kept": 1}]}
    export_dataset(scored, folder, metadata, repo_id="../../repo", pretty_name="../../name", plots=True)
    assert tree(tmp_path) - before == {str(p.relative_to(tmp_path)) for p in [folder, *folder.rglob("*")]}
    assert (tmp_path / "sibling.txt").read_text() == "untouched"
    assert not Path("/tmp/hf_longattn_escape").exists()
    assert_inside(folder)
    written = pq.read_table(list((folder / "data" / "scored").glob("*.parquet"))).column("id").to_pylist()
    assert sorted(written) == sorted(ids)  # ids are data, kept exactly, never paths


def test_a_symlink_planted_in_the_export_folder_is_refused(tiny_model_dir, tmp_path):
    outside, folder = tmp_path / "outside", tmp_path / "export"
    outside.mkdir()
    folder.mkdir()
    (folder / "data").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="resolves outside"):
        export_dataset(scored_splits(tiny_model_dir, ["a", "b"], ["book", "book"]), folder, {}, plots=False)
    assert list(outside.iterdir()) == []


@pytest.fixture(scope="module")
def one_scored_window(tiny_model_dir):
    return scored_splits(tiny_model_dir, ["w"], ["book"])["book"]


@settings(max_examples=20, deadline=None, database=None)
@given(names=st.lists(st.text(max_size=12), min_size=1, max_size=3, unique=True), row_id=st.text(max_size=20))
def test_fuzzed_category_names_and_ids_stay_inside(one_scored_window, tmp_path_factory, names, row_id):
    root = tmp_path_factory.mktemp("fuzz")
    folder = root / "export"
    window = one_scored_window.map(lambda r: {"id": row_id}, keep_in_memory=True)
    try:
        export_dataset({name: window for name in names}, folder, {"model": row_id}, plots=False)
    except ValueError as error:  # two names that sanitise to the same split: refused, nothing written
        assert "collide" in str(error)
        assert not folder.exists()
        event("refused: names collide")
        return
    event("exported")
    assert tree(root) - {"export"} == {str(p.relative_to(root)) for p in folder.rglob("*")}
    assert_inside(folder)
    assert len(os.listdir(folder / "data" / "scored")) == len(names)


def test_hub_token_never_reaches_push_output_logs_or_the_hub(hub_client, tmp_path, monkeypatch, caplog, capfd,
                                                             verbose_libraries):
    """A push, a refused one and a failed one, with every library at debug level and the local Hub logging each request."""
    from hf_longattn.errors import LongAttnError
    from hf_longattn.publication import push_to_hub

    from .conftest import HUB_TOKEN
    from .test_publication import make_scored

    caplog.set_level(logging.DEBUG)
    folder = export_dataset(make_scored(), tmp_path / "export", {"hf_token": HUB_TOKEN}, repo_id="user/x", plots=False)
    push_to_hub(folder, "user/x")
    hub_client.store.create("other/y", "other")
    hub_client.fail("commit", 500)
    for repo in ("other/y", "user/z"):
        with pytest.raises(LongAttnError) as failed:
            push_to_hub(folder, repo)
        assert HUB_TOKEN not in str(failed.value)
    assert any(record.name == "local_hub" for record in caplog.records)  # the server's own log, captured too
    assert HUB_TOKEN not in caplog.text and all(HUB_TOKEN not in record.getMessage() for record in caplog.records)
    captured = capfd.readouterr()
    assert HUB_TOKEN not in captured.out and HUB_TOKEN not in captured.err
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and HUB_TOKEN.encode() in p.read_bytes()]
    assert leaks == []  # the export, the repos on the Hub, its LFS store

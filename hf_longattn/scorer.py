"""``LongAttnScorer``: LongAttn statistics as a batched, picklable, cache-friendly ``datasets.map`` function."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import __version__, kernels
from .config import check_min_distance, min_distance_tokens
from . import vocabulary as V
from .attention_hook import layer_attention_sums
from .attention_stats import (
    DEFAULT_BLOCK_BYTES,
    dependency_statistics,
    query_block_size,
    windows_per_block,
)
from .model_loading import (
    ModelSource,
    checkpoint_fingerprint,
    load_attention_model,
    load_config,
    load_tokenizer,
    resolve_source,
)
from .model_checks import model_context

logger = logging.getLogger(__name__)

STATUS_OK, STATUS_EMPTY, STATUS_MISSING, STATUS_TOO_SHORT = V.OK, V.EMPTY, V.MISSING, V.TOO_SHORT

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_MIN_BLOCK_BYTES = 1 << 20
_CONTEXT_WARNED: set[tuple[str, int, int]] = set()  # (model, max_length, context) warned about in this process


# torch's CPU allocator raises a plain RuntimeError: "DefaultCPUAllocator: can't allocate memory: ...".
_OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def _is_out_of_memory(error: BaseException) -> bool:
    message = str(error).lower()
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or any(m in message for m in _OUT_OF_MEMORY_MESSAGES)


@dataclass(frozen=True)
class _Row:
    """One input row after validation: its position in the batch, its token ids or why it has none."""

    position: int
    token_ids: list[int] | None
    status: str
    detail: str | None = None


class LongAttnScorer:
    """Scores windows with LongAttn's token-level attention statistics, for ``datasets.Dataset.map``.

    For each row (a window of ``L`` tokens) and each scored layer, with M the causal softmax
    attention map of a head and k = ``min_distance`` (a fraction of L, or tokens):

    - ``longattn_ds`` — dependency strength DS_T = mean_h (1/L)·Σ_{n−i≥k} M[n,i]
      (mean attention mass a row puts on keys at least k tokens back; in [0, 1]);
    - ``longattn_du`` — dependency uniformity DU_T = −mean_h Var(M·1_{n−i≥k}), the unbiased
      variance over all L² entries (reference-code convention; ≤ 0, closer to 0 = more uniform).

    Scores come from the model's own query/key states (after RoPE and q/k norms) through
    transformers' attention registry; the forward stops right after the scored layer's
    attention. Memory grows linearly with L (the L×L map is never formed); sums are float32
    per block and float64 across rows.

    Args:
        model (`str`): a Hub repo id, a local model folder (safetensors) or a local ``.gguf`` file.
        tokenizer (`str`, *optional*): tokenizer name or path; defaults to the model's.
        revision (`str`, *optional*): Hub revision; pin a commit hash for reproducible caching.
        text_column (`str`, defaults to ``"text"``): the column of texts to score.
        input_ids_column (`str`, defaults to ``"input_ids"``): a pre-tokenised column; used instead
            of ``text_column`` whenever the batch has it.
        max_length (`int`, *optional*): longest window scored; longer inputs are cut to their
            first ``max_length`` tokens (``longattn_num_tokens`` says how many were scored).
            Defaults to the model's ``max_position_embeddings``.
        min_distance (`float | int | list`, defaults to 0.25): k as a fraction of L (a float in
            (0, 1)) or in tokens (an int). A list scores several thresholds in one pass; the first
            one fills ``longattn_ds``/``longattn_du``, all fill ``longattn_*_by_distance``.
        layer (`int | list[int]`, defaults to 0): decoder layer(s) to score; a list scores all of
            them in one forward (``longattn_*_by_layer``), the first fills ``longattn_ds``.
        dtype (`str`, *optional*): ``"float32"``, ``"bfloat16"``, ``"float16"``; defaults to float32
            on CPU and the model's own dtype on GPU. Sums are float32/float64 regardless.
        device (`str`, *optional*): e.g. ``"cpu"`` or ``"cuda:1"``; by default ``cuda:(rank % n_gpus)``
            with ``with_rank=True``, ``cuda:0`` otherwise, or the CPU when there is no GPU.
        per_head (`bool`, defaults to `False`): also write ``longattn_ds_per_head``/``longattn_du_per_head``.
        max_batch_tokens (`int`, defaults to 65536): equal-length windows are run together up to
            this many tokens per forward. A window's score does not depend on which windows share its
            forward (bit for bit on the CPU). On an error a forward is retried in halves, and a single
            window that runs out of memory is retried with 4× smaller blocks down to 1 MiB.
        block_bytes (`int`, defaults to 4 MiB): memory budget of one block of attention scores.
        trust_remote_code (`bool`, defaults to `False`): allow custom modelling code from the Hub.
        allow_pickle (`bool`, defaults to `False`): allow ``pytorch_model.bin`` (pickle) checkpoints.

    Output columns: ``longattn_ds``, ``longattn_du`` (float64, null unless ok),
    ``longattn_num_tokens`` (int64), ``longattn_min_distance`` (int64, k in tokens),
    ``longattn_status`` (one of `hf_longattn.vocabulary.STATUSES`: ``ok``, ``empty``, ``missing``,
    ``too_short``, ``bad_token``, ``oom``, ``non_finite``, ``error``), ``longattn_status_detail``
    (the reason in words, null when ok), and the
    list columns named above when asked for. These types are declared (:meth:`output_features`) and
    hold in every batch, even one in which no row could be scored: ``features=`` is not needed.

    Example:
        >>> from datasets import Dataset
        >>> scorer = LongAttnScorer("path/to/SmolLM2-135M-Instruct.Q4_1.gguf", max_length=8192)
        >>> ds = Dataset.from_dict({"text": [open("long.txt").read()]})
        >>> ds = ds.map(scorer, batched=True, batch_size=8)
        >>> ds[0]["longattn_status"], ds[0]["longattn_ds"]  # doctest: +SKIP
        ('ok', 0.2871...)
    """

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        revision: str | None = None,
        text_column: str = "text",
        input_ids_column: str = "input_ids",
        max_length: int | None = None,
        min_distance: float | int | Sequence[float | int] = 0.25,
        layer: int | Sequence[int] = 0,
        dtype: str | None = None,
        device: str | None = None,
        per_head: bool = False,
        max_batch_tokens: int = 65536,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
    ):
        distances = list(min_distance) if isinstance(min_distance, (list, tuple)) else [min_distance]
        for value in distances:
            check_min_distance(value)
        layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
        if not layers or any(not isinstance(i, int) or i < 0 for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"layer must be a non-negative int or a list of distinct ones, got {layer!r}")
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        source = resolve_source(model, revision)
        self.config = {
            "model": str(model),
            "tokenizer": tokenizer,
            "revision": revision,
            "text_column": text_column,
            "input_ids_column": input_ids_column,
            "max_length": max_length,
            "min_distance": distances,
            "layer": layers,
            "dtype": dtype,
            "device": device,
            "per_head": per_head,
            "max_batch_tokens": int(max_batch_tokens),
            "block_bytes": int(block_bytes),
            "trust_remote_code": trust_remote_code,
            "allow_pickle": allow_pickle,
            # Identity of the weights and of the code, for datasets' fingerprint (see __getstate__).
            "checkpoint": checkpoint_fingerprint(source, tuple(layers)),
            "hf_longattn_version": __version__,
        }
        self._reset_runtime()

    # --- pickling and fingerprinting: configuration only, never weights -------------------------
    def __getstate__(self) -> dict:
        """Only the configuration: datasets hashes this (not weights in memory) to fingerprint a map."""
        return {"config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.config = state["config"]
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._source: ModelSource | None = None
        self._model_config = None
        self._tokenizer = None
        self._model = None
        self._device: torch.device | None = None
        self.load_report = None

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.config.items() if v is not None and k != "checkpoint"}
        return f"LongAttnScorer({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    # --- output schema ---------------------------------------------------------------------------
    @property
    def output_columns(self) -> list[str]:
        """Names of the columns this scorer writes."""
        return list(self.output_features())

    def output_features(self):
        """`datasets.Features` of the columns this scorer writes (`hf_longattn.vocabulary.score_features`)."""
        return V.score_features(distances=len(self.config["min_distance"]), layers=len(self.config["layer"]),
                                per_head=self.config["per_head"])

    def features(self, input_features):
        """The full `datasets.Features` of ``ds.map(self, ...)``: ``input_features`` plus the score columns.

        ``map`` gives these without being told; pass them as ``features=`` to cast the input columns too.

        Example:
            >>> ds.map(scorer, batched=True).features == scorer.features(ds.features)  # doctest: +SKIP
            True
        """
        from datasets import Features

        merged = dict(input_features)
        merged.update(self.output_features())
        return Features(merged)

    # --- lazy, per-process runtime ---------------------------------------------------------------
    @property
    def source(self) -> ModelSource:
        if self._source is None:
            self._source = resolve_source(self.config["model"], self.config["revision"])
        return self._source

    @property
    def model_config(self):
        """The model's config (cheap: no weights)."""
        if self._model_config is None:
            self._model_config = load_config(self.source, trust_remote_code=self.config["trust_remote_code"])
        return self._model_config

    @property
    def max_length(self) -> int:
        return self.config["max_length"] or self.model_context

    @property
    def model_context(self) -> int:
        """The longest input the model was trained for (`hf_longattn.model_checks.model_context`)."""
        return model_context(self.model_config)

    @classmethod
    def from_run_config(cls, config, device: str | None = None) -> LongAttnScorer:
        """The scorer a run (`hf_longattn.config.RunConfig`) asks for: windows of ``window_size`` tokens on ``device``."""
        from .model_loading import resolve_model

        return cls(resolve_model(config.model), tokenizer=config.tokenizer, revision=config.revision,
                   max_length=config.window_size, min_distance=config.min_distance, layer=config.layer,
                   dtype=config.dtype, device=device)

    def identity(self) -> str:
        """What identifies the weights this scorer reads (`hf_longattn.model_loading.checkpoint_fingerprint`)."""
        return self.config["checkpoint"]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(
                self.source, self.config["tokenizer"], trust_remote_code=self.config["trust_remote_code"]
            )
        return self._tokenizer

    def _select_device(self, rank: int | None) -> torch.device:
        if self.config["device"] is not None:
            return torch.device(self.config["device"])
        if torch.cuda.is_available():
            return torch.device(f"cuda:{(rank or 0) % torch.cuda.device_count()}")
        return torch.device("cpu")

    def _model_dtype(self, device: torch.device) -> torch.dtype:
        if self.config["dtype"] is not None:
            return _DTYPES[self.config["dtype"]]
        if device.type == "cpu":
            return torch.float32
        native = getattr(self.model_config, "dtype", None) or getattr(self.model_config, "torch_dtype", None)
        return native if isinstance(native, torch.dtype) else _DTYPES.get(str(native), torch.bfloat16)

    def load(self, rank: int | None = None):
        """Load the model once per process (called on the first batch); returns it."""
        if self._model is None:
            self._device = self._select_device(rank)
            self._model, self.load_report = load_attention_model(
                self.source,
                tuple(self.config["layer"]),
                dtype=self._model_dtype(self._device),
                device=self._device,
                trust_remote_code=self.config["trust_remote_code"],
                allow_pickle=self.config["allow_pickle"],
            )
            logger.info("hf_longattn: loaded %s on %s (%s)", self.config["model"], self._device, self.load_report)
            self._warn_beyond_context()
        return self._model

    def _warn_beyond_context(self) -> None:
        """Warn (once per process and setting) when ``max_length`` exceeds the model's context."""
        key = (self.config["model"], self.config["max_length"] or 0, self.model_context)
        if key[1] > key[2] and key not in _CONTEXT_WARNED:
            _CONTEXT_WARNED.add(key)
            logger.warning(
                "hf_longattn: max_length=%d exceeds the model's context (%d tokens, from its config): windows "
                "longer than that are scored at positions the model never saw, so their attention means little",
                key[1], key[2])

    # --- the map function --------------------------------------------------------------------------
    def __call__(self, batch: dict[str, list], *extra) -> dict[str, list]:
        """Score one batch; ``extra`` holds what ``with_indices=True`` / ``with_rank=True`` pass.

        Returns the score columns only, as lists that carry their declared Arrow types
        (`hf_longattn.vocabulary.TypedColumn`), so ``datasets`` types them the same whatever the
        batch holds; it keeps the input columns, rows and order.
        """
        indices = next((e for e in extra if isinstance(e, (list, range, np.ndarray))), None)
        rank = next((e for e in extra if isinstance(e, int) and not isinstance(e, bool)), None)
        rows = self._validate(batch, indices)  # raises before any model work
        rows = self._tokenize(rows, batch)
        size = len(rows)
        out: dict[str, list] = {name: [None] * size for name in self.output_features()}
        out[V.NUM_TOKENS] = [len(r.token_ids) if r.token_ids is not None else 0 for r in rows]
        out[V.STATUS] = [r.status for r in rows]
        out[V.STATUS_DETAIL] = [r.detail for r in rows]
        out[V.MIN_DISTANCE] = [
            min_distance_tokens(self.config["min_distance"][0], n) if n else None for n in out[V.NUM_TOKENS]
        ]
        pending = [r for r in rows if r.status == STATUS_OK]
        if pending:
            self.load(rank)
            self._score_rows(pending, out)
        return V.typed_columns(self.output_features(), out)

    def _validate(self, batch: dict[str, list], indices) -> list[_Row]:
        id_column = self.config["input_ids_column"]
        column = id_column if id_column in batch else self.config["text_column"]
        if column not in batch:
            raise ValueError(
                f"LongAttnScorer needs a {self.config['text_column']!r} (text) or {id_column!r} (token ids) column; "
                f"current columns: {sorted(batch)}"
            )
        rows = []
        for position, value in enumerate(batch[column]):
            where = _describe_row(batch, position, indices)
            if value is None:
                rows.append(_Row(position, None, STATUS_MISSING))
            elif column == id_column:
                token_ids = _as_token_ids(value, column, where)
                if None in token_ids:  # a null inside a list of ints: bad data, reported on the row
                    detail = f"token id missing (null) at position {token_ids.index(None)}"
                    rows.append(_Row(position, None, V.BAD_TOKEN, detail))
                else:
                    rows.append(_Row(position, token_ids, STATUS_OK))
            elif isinstance(value, str):
                rows.append(_Row(position, None, STATUS_OK if value.strip() else STATUS_EMPTY))
            else:
                raise ValueError(
                    f"column {column!r}, {where}: expected a string (or None), got {type(value).__name__} {value!r:.60}"
                )
        return rows

    def _tokenize(self, rows: list[_Row], batch: dict[str, list]) -> list[_Row]:
        """Fill token ids of text rows; cut to ``max_length``; flag empty, too short and bad-id rows."""
        max_length = self.max_length
        text_rows = [r for r in rows if r.token_ids is None and r.status == STATUS_OK]
        encoded = {}
        if text_rows:
            texts = [batch[self.config["text_column"]][r.position] for r in text_rows]
            ids = self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
            encoded = {r.position: list(i) for r, i in zip(text_rows, ids)}
        vocab_size = int(self.model_config.vocab_size)
        checked = []
        for row in rows:
            token_ids = encoded.get(row.position, row.token_ids)
            status, detail = row.status, row.detail
            if token_ids is not None:
                token_ids = token_ids[:max_length]
                if status == STATUS_OK:
                    status, detail = _status_of(token_ids, self.config["min_distance"][0], vocab_size)
            checked.append(_Row(row.position, token_ids, status, detail))
        return checked

    def _score_rows(self, rows: list[_Row], out: dict[str, list]) -> None:
        by_length: dict[int, list[_Row]] = {}
        for row in rows:
            by_length.setdefault(len(row.token_ids), []).append(row)
        for length, group in sorted(by_length.items()):
            per_forward = max(1, self.config["max_batch_tokens"] // length)
            for start in range(0, len(group), per_forward):
                self._score_group(group[start : start + per_forward], out, self.config["block_bytes"])

    def _score_group(self, group: list[_Row], out: dict[str, list], block_bytes: int) -> None:
        """Score equal-length rows together; on an error retry in halves (so a failure stays with its own
        window), and on out-of-memory of a single window retry with blocks 4× smaller, down to 1 MiB."""
        try:
            self._forward(group, out, block_bytes)
        except Exception as error:  # noqa: BLE001 - a long job must not die on one window
            out_of_memory = _is_out_of_memory(error)
            if out_of_memory and self._device is not None and self._device.type == "cuda":
                torch.cuda.empty_cache()
            if len(group) > 1:
                half = len(group) // 2
                self._score_group(group[:half], out, block_bytes)
                self._score_group(group[half:], out, block_bytes)
                return
            if out_of_memory and block_bytes // 4 >= _MIN_BLOCK_BYTES:
                self._score_group(group, out, block_bytes // 4)
                return
            first_line = str(error).splitlines()[0] if str(error) else ""
            status = V.OOM if out_of_memory else V.ERROR
            detail = f"{type(error).__name__}: {first_line}"[:300]
            logger.warning("hf_longattn: %d window(s) not scored: %s (%s)", len(group), status, detail)
            for row in group:
                out[V.STATUS][row.position] = status
                out[V.STATUS_DETAIL][row.position] = detail

    def _block_rows(self, length: int, block_bytes: int) -> int:
        """Query rows per block of the torch backend, sized for the most windows of ``length`` one block holds.

        Fixed per (length, configuration), never per batch: a window's float32 block sums (so its score,
        bit for bit) must not depend on how many windows share its forward (batch size, retry in halves).
        """
        largest_batch = windows_per_block(max(1, self.config["max_batch_tokens"] // length), self._device)
        return query_block_size(largest_batch, int(self.model_config.num_attention_heads), length, block_bytes)

    def _forward(self, group: list[_Row], out: dict[str, list], block_bytes: int) -> None:
        length = len(group[0].token_ids)
        distances = [min_distance_tokens(k, length) for k in self.config["min_distance"]]
        valid = [d < length for d in distances]
        input_ids = torch.tensor([r.token_ids for r in group], dtype=torch.long, device=self._device)  # (B, L)
        sums = layer_attention_sums(
            self._model, input_ids, self.config["layer"], [d for d, ok in zip(distances, valid) if ok],
            kernels.attention_sums, block_bytes=block_bytes, block_rows=self._block_rows(length, block_bytes),
        )
        stats = {layer: dependency_statistics(s) for layer, s in sums.items()}
        first = stats[self.config["layer"][0]]
        strength = first.dependency_strength.cpu().numpy()  # (B, T_valid)
        uniformity = first.dependency_uniformity.cpu().numpy()
        finite = np.ones(len(group), dtype=bool)  # (B,): one window's overflow never voids the others
        for layer_stats in stats.values():
            for values in (layer_stats.dependency_strength, layer_stats.dependency_uniformity):
                finite &= np.isfinite(values.cpu().numpy()).all(axis=1)
        if not finite.all():
            detail = "non-finite attention statistics (overflow in the model's activations?)"
            logger.warning("hf_longattn: %d window(s) not scored: %s", int((~finite).sum()), detail)
            for b in np.flatnonzero(~finite):
                out[V.STATUS][group[b].position] = V.NON_FINITE
                out[V.STATUS_DETAIL][group[b].position] = detail
        # Column of each threshold in the computed (valid-only) statistics; None where L <= k.
        distance_columns = [int(c) if ok else None for c, ok in zip(np.cumsum(valid) - 1, valid)]
        for b, row in enumerate(group):
            if not finite[b]:
                continue
            position = row.position
            out[V.DS][position] = float(strength[b, 0])
            out[V.DU][position] = float(uniformity[b, 0])
            if V.DS_BY_DISTANCE in out:
                out[V.DS_BY_DISTANCE][position] = [
                    None if c is None else float(strength[b, c]) for c in distance_columns
                ]
                out[V.DU_BY_DISTANCE][position] = [
                    None if c is None else float(uniformity[b, c]) for c in distance_columns
                ]
            if V.DS_BY_LAYER in out:
                layers = self.config["layer"]
                out[V.DS_BY_LAYER][position] = [float(stats[i].dependency_strength[b, 0]) for i in layers]
                out[V.DU_BY_LAYER][position] = [float(stats[i].dependency_uniformity[b, 0]) for i in layers]
            if V.DS_PER_HEAD in out:
                out[V.DS_PER_HEAD][position] = first.strength_per_head[b, 0].tolist()
                out[V.DU_PER_HEAD][position] = (-first.variance_per_head[b, 0]).tolist()


def _status_of(token_ids: list[int], min_distance: float | int, vocab_size: int) -> tuple[str, str | None]:
    """``(status, detail)`` of a row's token ids before scoring."""
    if not token_ids:
        return STATUS_EMPTY, None
    if len(token_ids) <= min_distance_tokens(min_distance, len(token_ids)):
        return STATUS_TOO_SHORT, f"{len(token_ids)} tokens, k = {min_distance_tokens(min_distance, len(token_ids))}"
    low, high = min(token_ids), max(token_ids)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        return V.BAD_TOKEN, f"token id {bad} outside the vocabulary [0, {vocab_size})"
    return STATUS_OK, None


def _as_token_ids(value, column: str, where: str) -> list[int | None]:
    """The row's token ids; ``None`` marks a null id (bad data); any other type is a configuration error."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
            raise ValueError(f"column {column!r}, {where}: expected a 1-D array of ints, got {value.dtype} {value.shape}")
        return value.tolist()
    if isinstance(value, (list, tuple)) and all(
        t is None or (isinstance(t, (int, np.integer)) and not isinstance(t, bool)) for t in value
    ):
        return [None if t is None else int(t) for t in value]
    raise ValueError(f"column {column!r}, {where}: expected a list of ints (token ids), got {type(value).__name__} {value!r:.60}")


def _describe_row(batch: dict[str, list], position: int, indices) -> str:
    where = f"row {int(indices[position])}" if indices is not None else f"row {position} of the batch"
    if "id" in batch and batch["id"][position] is not None:
        where += f" (id={batch['id'][position]!r})"
    return where

"""``ProLongScorer``: ProLong's LDS (``prolong_v1``) as a batched, picklable, cache-friendly ``datasets.map`` function."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from .. import __version__
from .. import vocabulary as V
from ..model_loading import ModelSource, causal_lm_fingerprint, load_causal_lm, load_config, load_tokenizer, resolve_source
from ..scorer import _DTYPES, _as_token_ids, _describe_row, _is_out_of_memory
from .prolong import ProLongResult, ProLongSettings, num_segments, prolong_scores

logger = logging.getLogger(__name__)

NAME = "prolong_v1"
LDS = "prolong_lds"
DELTA_PPL = "prolong_delta_ppl"
DEPENDENCY_ENTROPY = "prolong_dependency_entropy"
NUM_PAIRS = "prolong_num_pairs"
NUM_KEPT_PAIRS = "prolong_num_kept_pairs"
NUM_SEGMENTS = "prolong_num_segments"
NUM_TOKENS = "prolong_num_tokens"
STATUS = "prolong_status"
STATUS_DETAIL = "prolong_status_detail"
COLUMN_TYPES = {LDS: "float64", DELTA_PPL: "float64", DEPENDENCY_ENTROPY: "float64", NUM_PAIRS: "int64",
                NUM_KEPT_PAIRS: "int64", NUM_SEGMENTS: "int64", NUM_TOKENS: "int64", STATUS: "string",
                STATUS_DETAIL: "string"}
"""The columns `ProLongScorer` writes, in order, with their Arrow types."""
COLUMN_DESCRIPTIONS = {
    LDS: "ProLong's long-dependency score LDS = Σ over pairs with ΔPPL > threshold of (ΔPPL + distance gain)·DE (null unless ok)",
    DELTA_PPL: "mean ΔPPL_ij = (PPL_i − PPL_i|j)/PPL_i over the pairs above the threshold (null when none is)",
    DEPENDENCY_ENTROPY: "mean dependency entropy DE_i over the segments that have a scored pair (null unless ok)",
    NUM_PAIRS: "segment pairs (i, j) scored: all, or sample_size drawn with the window's seed",
    NUM_KEPT_PAIRS: "pairs with ΔPPL above the threshold (the terms of the LDS)",
    NUM_SEGMENTS: "segments of chunk_size tokens the window was cut into",
    NUM_TOKENS: "tokens of the window (the row's token ids, or its text tokenised without special tokens)",
    STATUS: "`ok`, or why the window was not scored (hf_longattn.vocabulary.STATUSES)",
    STATUS_DETAIL: "the reason of a status other than `ok` in words (null when ok)",
}
"""One line per column, for the dataset card."""


@dataclass(frozen=True)
class _Row:
    """One input row after validation: its position in the batch, its token ids or why it has none."""

    position: int
    token_ids: list[int] | None
    status: str
    detail: str | None = None


class ProLongScorer:
    """Scores windows with ProLong's long-dependency score (arXiv 2405.17915), for ``datasets.Dataset.map``.

    Each row (a window's token ids, or a text tokenised without special tokens) is cut into
    segments of ``chunk_size`` tokens; the LDS combines, over segment pairs (i, j), how much
    segment j lowers segment i's perplexity (ΔPPL), how far apart they are, and how concentrated
    row i's dependencies are (DE). See `hf_longattn.scorers.prolong` for the formula, the official
    code's lines and the defects fixed.

    Args:
        model (`str`): a Hub repo id, a local model folder (safetensors) or a local ``.gguf`` file;
            any causal LM (the paper uses facebook/opt-350m).
        tokenizer (`str`, *optional*): tokenizer name or path for text rows; defaults to the model's.
        revision (`str`, *optional*): Hub revision; pin a commit hash for reproducible caching.
        text_column (`str`, defaults to ``"text"``): the column of texts to score.
        input_ids_column (`str`, defaults to ``"input_ids"``): a pre-tokenised column; used instead
            of ``text_column`` whenever the batch has it.
        chunk_size, sample_size, threshold, window_size, seed, max_batch_tokens: see `ProLongSettings`
            (defaults 128, 500, 0.1, 32768, 11, 4096: the official script's).
        dtype (`str`, *optional*): ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"float64"``; defaults to
            float32 on CPU and the model's own dtype on GPU. Losses are float64 regardless.
        device (`str`, *optional*): e.g. ``"cpu"`` or ``"cuda:1"``; by default ``cuda:(rank % n_gpus)``
            with ``with_rank=True``, or the CPU when there is no GPU.
        trust_remote_code (`bool`, defaults to `False`): allow custom modelling code from the Hub.
        allow_pickle (`bool`, defaults to `False`): allow ``pytorch_model.bin`` (pickle) checkpoints.

    Output columns (`COLUMN_TYPES`): ``prolong_lds``, ``prolong_delta_ppl``, ``prolong_dependency_entropy``
    (float64, null unless ok), ``prolong_num_pairs``, ``prolong_num_kept_pairs``, ``prolong_num_segments``,
    ``prolong_num_tokens`` (int64), ``prolong_status`` (one of `hf_longattn.vocabulary.STATUSES`;
    ``too_short`` means fewer than 2 segments) and ``prolong_status_detail``. Pass
    ``features=scorer.features(ds.features)`` so the types hold even when no row of a batch is scored.

    Example:
        >>> from datasets import Dataset
        >>> scorer = ProLongScorer("path/to/SmolLM2-135M-Instruct.Q4_1.gguf", window_size=8192)  # doctest: +SKIP
        >>> ds = Dataset.from_dict({"text": [open("long.txt").read()]})  # doctest: +SKIP
        >>> ds = ds.map(scorer, batched=True, batch_size=4, features=scorer.features(ds.features))  # doctest: +SKIP
        >>> ds[0]["prolong_status"], ds[0]["prolong_num_pairs"]  # a text of ≥ 33 segments: 500 pairs drawn  # doctest: +SKIP
        ('ok', 500)
    """

    def __init__(self, model: str, *, tokenizer: str | None = None, revision: str | None = None,
                 text_column: str = "text", input_ids_column: str = "input_ids", chunk_size: int = 128,
                 sample_size: int | None = 500, threshold: float = 0.1, window_size: int = 32768, seed: int = 11,
                 max_batch_tokens: int = 4096, dtype: str | None = None, device: str | None = None,
                 trust_remote_code: bool = False, allow_pickle: bool = False):
        settings = ProLongSettings(chunk_size=chunk_size, sample_size=sample_size, threshold=float(threshold),
                                   window_size=window_size, seed=seed, max_batch_tokens=max_batch_tokens)
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        source = resolve_source(model, revision)
        self.config = {
            "scorer": NAME, "model": str(model), "tokenizer": tokenizer, "revision": revision,
            "text_column": text_column, "input_ids_column": input_ids_column,
            **{name: getattr(settings, name) for name in settings.__dataclass_fields__},
            "dtype": dtype, "device": device, "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle,
            # Identity of the weights and of the code, for datasets' fingerprint (see __getstate__).
            "checkpoint": causal_lm_fingerprint(source), "hf_longattn_version": __version__,
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

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.config.items() if v is not None and k != "checkpoint"}
        return f"ProLongScorer({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @property
    def settings(self) -> ProLongSettings:
        """The `ProLongSettings` of this configuration."""
        return ProLongSettings(**{name: self.config[name] for name in ProLongSettings.__dataclass_fields__})

    def identity(self) -> str:
        """What identifies the weights this scorer reads (`hf_longattn.model_loading.causal_lm_fingerprint`)."""
        return self.config["checkpoint"]

    # --- output schema ---------------------------------------------------------------------------
    @property
    def output_columns(self) -> list[str]:
        """Names of the columns this scorer writes."""
        return list(COLUMN_TYPES)

    def output_features(self):
        """`datasets.Features` of the columns this scorer writes (types fixed, never inferred)."""
        from datasets import Features, Value

        return Features({name: Value(kind) for name, kind in COLUMN_TYPES.items()})

    def features(self, input_features):
        """The full `datasets.Features` of ``ds.map(self, ...)``: ``input_features`` plus the score columns.

        Example:
            >>> ds = ds.map(scorer, batched=True, features=scorer.features(ds.features))  # doctest: +SKIP
        """
        from datasets import Features

        return Features({**input_features, **self.output_features()})

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
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.source, self.config["tokenizer"],
                                             trust_remote_code=self.config["trust_remote_code"])
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
        """Load the whole causal LM once per process (called on the first batch with a row to score); returns it."""
        if self._model is None:
            self._device = self._select_device(rank)
            self._model = load_causal_lm(self.source, dtype=self._model_dtype(self._device), device=self._device,
                                         trust_remote_code=self.config["trust_remote_code"],
                                         allow_pickle=self.config["allow_pickle"])
            logger.info("hf_longattn: loaded %s on %s for %s", self.config["model"], self._device, NAME)
        return self._model

    # --- the map function --------------------------------------------------------------------------
    def __call__(self, batch: dict[str, list], *extra) -> dict[str, list]:
        """Score one batch; ``extra`` holds what ``with_indices=True`` / ``with_rank=True`` pass.

        Returns the score columns only; ``datasets`` keeps the input columns, rows and order.
        """
        indices = next((e for e in extra if isinstance(e, (list, range, np.ndarray))), None)
        rank = next((e for e in extra if isinstance(e, int) and not isinstance(e, bool)), None)
        rows = self._tokenize(self._validate(batch, indices), batch)  # raises before any model work
        out: dict[str, list] = {name: [None] * len(rows) for name in COLUMN_TYPES}
        settings = self.settings
        for row in rows:
            count = len(row.token_ids) if row.token_ids is not None else 0
            out[NUM_TOKENS][row.position] = count
            out[NUM_SEGMENTS][row.position] = num_segments(count, settings)
            out[STATUS][row.position], out[STATUS_DETAIL][row.position] = row.status, row.detail
        pending = [r for r in rows if r.status == V.OK]
        if pending:
            self.load(rank)
            for row in pending:
                self._score_row(row, settings, out)
        return out

    def _validate(self, batch: dict[str, list], indices) -> list[_Row]:
        id_column, text_column = self.config["input_ids_column"], self.config["text_column"]
        column = id_column if id_column in batch else text_column
        if column not in batch:
            raise ValueError(f"ProLongScorer needs a {text_column!r} (text) or {id_column!r} (token ids) column; "
                             f"current columns: {sorted(batch)}")
        rows = []
        for position, value in enumerate(batch[column]):
            where = _describe_row(batch, position, indices)
            if value is None:
                rows.append(_Row(position, None, V.MISSING))
            elif column == id_column:
                token_ids = _as_token_ids(value, column, where)
                if None in token_ids:  # a null inside a list of ints: bad data, reported on the row
                    rows.append(_Row(position, None, V.BAD_TOKEN, f"token id missing (null) at position {token_ids.index(None)}"))
                else:
                    rows.append(_Row(position, token_ids, V.OK))
            elif isinstance(value, str):
                rows.append(_Row(position, None, V.OK if value.strip() else V.EMPTY))
            else:
                raise ValueError(f"column {column!r}, {where}: expected a string (or None), got {type(value).__name__} {value!r:.60}")
        return rows

    def _tokenize(self, rows: list[_Row], batch: dict[str, list]) -> list[_Row]:
        """Token ids of text rows (no special tokens: run.py:211-214 turns BOS/EOS off); flag empty, short, bad rows."""
        text_rows = [r for r in rows if r.token_ids is None and r.status == V.OK]
        encoded = {}
        if text_rows:
            texts = [batch[self.config["text_column"]][r.position] for r in text_rows]
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            encoded = {r.position: list(i) for r, i in zip(text_rows, ids)}
        checked = []
        for row in rows:
            token_ids = encoded.get(row.position, row.token_ids)
            status, detail = row.status, row.detail
            if token_ids is not None and status == V.OK:
                status, detail = self._status_of(token_ids)
            checked.append(_Row(row.position, token_ids, status, detail))
        return checked

    def _status_of(self, token_ids: list[int]) -> tuple[str, str | None]:
        """``(status, detail)`` of a row's token ids before scoring."""
        size = self.config["chunk_size"]
        if not token_ids:
            return V.EMPTY, None
        if len(token_ids) < 2 * size:
            return V.TOO_SHORT, f"{len(token_ids)} tokens: fewer than 2 segments of chunk_size={size}"
        vocab_size = int(self.model_config.vocab_size)
        low, high = min(token_ids), max(token_ids)
        if low < 0 or high >= vocab_size:
            return V.BAD_TOKEN, f"token id {low if low < 0 else high} outside the vocabulary [0, {vocab_size})"
        return V.OK, None

    def _score_row(self, row: _Row, settings: ProLongSettings, out: dict[str, list]) -> None:
        """Score one window; on out-of-memory retry with half the tokens per forward, down to one segment."""
        budget = settings.max_batch_tokens
        while True:
            try:
                result = prolong_scores(self._model, [row.token_ids], replace(settings, max_batch_tokens=budget))[0]
                break
            except Exception as error:  # noqa: BLE001 - a long job must not die on one window
                out_of_memory = _is_out_of_memory(error)
                if out_of_memory and self._device is not None and self._device.type == "cuda":
                    torch.cuda.empty_cache()
                if out_of_memory and budget // 2 >= settings.chunk_size:
                    budget //= 2
                    continue
                first_line = str(error).splitlines()[0] if str(error) else ""
                detail = f"{type(error).__name__}: {first_line}"[:300]
                self._report(row, V.OOM if out_of_memory else V.ERROR, detail, out)
                return
        if not result.finite:
            self._report(row, V.NON_FINITE, "non-finite perplexity or LDS (overflow in the model's logits?)", out)
            return
        self._write(row.position, result, out)

    @staticmethod
    def _report(row: _Row, status: str, detail: str, out: dict[str, list]) -> None:
        logger.warning("hf_longattn: window not scored by %s: %s (%s)", NAME, status, detail)
        out[STATUS][row.position], out[STATUS_DETAIL][row.position] = status, detail

    @staticmethod
    def _write(position: int, result: ProLongResult, out: dict[str, list]) -> None:
        out[LDS][position] = result.lds
        out[DELTA_PPL][position] = result.delta_ppl
        out[DEPENDENCY_ENTROPY][position] = result.dependency_entropy
        out[NUM_PAIRS][position] = result.num_pairs
        out[NUM_KEPT_PAIRS][position] = result.num_kept_pairs
        out[NUM_SEGMENTS][position] = result.num_segments

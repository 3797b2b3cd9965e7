"""The scorer plugin protocol: `WindowScorer`, what a scorer declares (columns, ranking, settings, model needs, cost), and the `datasets.map` glue every scorer shares.

A scorer is a class registered under a versioned name in `hf_longattn.registry.SCORERS`. It
declares, as class attributes and class methods (so that selection, counts, the card, plots, the
probe and the engines can read them without loading a model):

* ``name``, ``label``, ``prefix``: ``"prolong_v1"``, ``"ProLong (arXiv 2405.17915)"``, ``"prolong"``;
  every column it writes starts with ``prefix`` and its status columns are
  ``<prefix>_num_tokens``, ``<prefix>_status``, ``<prefix>_status_detail``;
* ``description`` and ``citation``: what it measures in a few sentences, and its BibTeX (the card);
* ``SETTINGS``: its own settings and their defaults (configured under ``scorer_settings``), which
  enter the fingerprint of its scores; :meth:`columns` (name, type, one line each: the Features,
  the card and the export read them); :meth:`ranking`: the value selection ranks by and how it is
  normalised per category; :meth:`model_needs` (what is loaded: one layer's q/k, several layers,
  the whole model's logits) and :meth:`cost` (multiply-adds per window, for the comparison);
* :meth:`from_run_config`: the instance a run scores with.

An instance is a ``datasets.map`` function (``batched=True``): it validates the rows before any
model work (a wrong type raises, naming the column and row), tokenises text rows, flags empty,
missing, too short and bad-token rows on their own row (never dropped), loads the model once per
process on the first row to score, and returns its columns with their declared types. It pickles
(and fingerprints, for the `datasets` cache) as its configuration only. A subclass writes
:meth:`_load_model` and :meth:`_score_rows`, and the rule for a too-short row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .. import vocabulary as V

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
MIN_BLOCK_BYTES = 1 << 20
OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")
"""torch's CPU allocator raises a plain RuntimeError: "DefaultCPUAllocator: can't allocate memory: ..."."""


def is_out_of_memory(error: BaseException) -> bool:
    message = str(error).lower()
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or any(m in message for m in OUT_OF_MEMORY_MESSAGES)


@dataclass(frozen=True)
class Column:
    """One column a scorer writes: its name, its type (``float64``, ``int64``, ``string``, ``list<float64>``), one line."""

    name: str
    dtype: str
    description: str

    def feature(self) -> Any:
        from datasets import List, Value

        return List(Value(self.dtype[5:-1])) if self.dtype.startswith("list<") else Value(self.dtype)


@dataclass(frozen=True)
class Ranking:
    """What selection ranks windows by, per category.

    Attributes:
        terms (`tuple`): ``(column, weight)`` pairs; the selection score of a window is
            ``Σ weight · N(column)``, N the per-category normalisation (z-score or min-max); a
            weight may name a configuration key (``"alpha"``).
        score (`str`): the column the selection score is written to (``longattn_lds``).
        selected (`str`): the column of the selection flag (``longattn_selected``).
        label (`str`): the score in words, for the card and the summary (``LDS_T``).
    """

    terms: tuple[tuple[str, float | str], ...]
    score: str
    selected: str
    label: str


@dataclass(frozen=True)
class Row:
    """One input row after validation: its position in the batch, its token ids or why it has none."""

    position: int
    token_ids: list[int] | None
    status: str
    detail: str | None = None


class WindowScorer:
    """Base of every scorer plugin (see the module docstring); not used on its own."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    prefix: ClassVar[str] = ""
    SETTINGS: ClassVar[dict[str, Any]] = {}
    description: ClassVar[str] = ""
    """What the scorer measures, in a few sentences of markdown (the dataset card's method section)."""
    citation: ClassVar[str] = ""
    """The method's BibTeX entry (the dataset card's citation)."""
    ranking_label: ClassVar[str] = ""
    """The ranking value in words (``LDS (ProLong)``); default: its column's name."""
    add_special_tokens: ClassVar[bool] = True
    truncate: ClassVar[bool] = True
    window_keyword: ClassVar[str] = "max_length"
    """The constructor's keyword that `from_run_config` passes the run's ``window_size`` to."""

    # -- the protocol ------------------------------------------------------------------------------
    @classmethod
    def settings_of(cls, config: Any) -> dict[str, Any]:
        """This scorer's settings in a `RunConfig`: ``SETTINGS`` updated with ``scorer_settings[name]``."""
        given = (getattr(config, "scorer_settings", None) or {}).get(cls.name) or {}
        unknown = sorted(set(given) - set(cls.SETTINGS))
        if unknown:
            from ..errors import did_you_mean

            raise ValueError(f"scorer_settings.{cls.name}: unknown setting(s) {unknown}{did_you_mean(unknown[0], cls.SETTINGS)}"
                             f"; {cls.name} has {sorted(cls.SETTINGS)}")
        return {**cls.SETTINGS, **given}

    @classmethod
    def columns(cls, settings: dict[str, Any]) -> list[Column]:
        """Every column this scorer writes with ``settings``, in order (the status columns last)."""
        raise NotImplementedError

    @classmethod
    def status_columns(cls) -> tuple[str, str, str]:
        """``(num_tokens, status, status_detail)`` column names."""
        return f"{cls.prefix}_num_tokens", f"{cls.prefix}_status", f"{cls.prefix}_status_detail"

    @classmethod
    def common_columns(cls) -> list[Column]:
        tokens, status, detail = cls.status_columns()
        return [Column(tokens, "int64", "number of tokens scored (L)"),
                Column(status, "string", "`ok`, or why the window was not scored: " + ", ".join(
                    f"`{s}`" for s in V.STATUSES if s != V.OK)),
                Column(detail, "string", "the reason of a status other than `ok` in words (null when ok)")]

    @classmethod
    def ranking(cls, settings: dict[str, Any]) -> Ranking:
        """By default the first column, normalised per category; selection writes ``<prefix>_selection_score`` and
        ``<prefix>_selected``."""
        first = cls.columns(settings)[0]
        return Ranking(((first.name, 1.0),), f"{cls.prefix}_selection_score", f"{cls.prefix}_selected",
                       cls.ranking_label or first.name)

    @classmethod
    def model_needs(cls, settings: dict[str, Any]) -> str:
        """What is loaded of the model, in words."""
        raise NotImplementedError

    @classmethod
    def cost(cls, window_size: int, model_config: Any, settings: dict[str, Any]) -> float:
        """Multiply-adds to score one window of ``window_size`` tokens (an estimate, for the comparison)."""
        raise NotImplementedError

    @classmethod
    def from_run_config(cls, config: Any, device: str | None = None) -> WindowScorer:
        """The scorer a run (`hf_longattn.config.RunConfig`) asks for, on ``device``."""
        from ..model_loading import resolve_model

        return cls(resolve_model(config.model), tokenizer=config.tokenizer, revision=config.revision,
                   dtype=config.dtype, device=device, **{cls.window_keyword: config.window_size}, **cls.settings_of(config))

    # -- configuration, pickling, fingerprint -----------------------------------------------------------
    def _set_config(self, model: str, checkpoint: str, **values: Any) -> None:
        from .. import __version__

        self.config = {"scorer": self.name, "model": str(model), **values, "checkpoint": checkpoint,
                       "hf_longattn_version": __version__}
        self._reset_runtime()

    def __getstate__(self) -> dict:
        """Only the configuration: datasets hashes this (not weights in memory) to fingerprint a map."""
        return {"config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.config = state["config"]
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._source = self._model_config = self._tokenizer = self._model = self._device = None
        self.load_report = None

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.config.items() if v is not None and k not in ("checkpoint", "scorer")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def identity(self) -> str:
        """What identifies the weights this scorer reads."""
        return self.config["checkpoint"]

    @property
    def settings(self) -> dict[str, Any]:
        return {name: self.config[name] for name in self.SETTINGS if name in self.config}

    def output_features(self) -> Any:
        """`datasets.Features` of the columns this scorer writes (declared, never inferred from the data)."""
        from datasets import Features

        return Features({column.name: column.feature() for column in self.columns(self.settings)})

    @property
    def output_columns(self) -> list[str]:
        return list(self.output_features())

    def features(self, input_features: Any) -> Any:
        """The full `datasets.Features` of ``ds.map(self, ...)``: ``input_features`` plus the score columns."""
        from datasets import Features

        return Features({**input_features, **self.output_features()})

    # -- lazy, per-process runtime ---------------------------------------------------------------------
    @property
    def source(self) -> Any:
        from ..model_loading import resolve_source

        if self._source is None:
            self._source = resolve_source(self.config["model"], self.config.get("revision"))
        return self._source

    @property
    def model_config(self) -> Any:
        """The model's config (cheap: no weights)."""
        from ..model_loading import load_config

        if self._model_config is None:
            self._model_config = load_config(self.source, trust_remote_code=self.config["trust_remote_code"])
        return self._model_config

    @property
    def model_context(self) -> int:
        from ..model_checks import model_context

        return model_context(self.model_config)

    @property
    def max_length(self) -> int:
        return self.config.get("max_length") or self.model_context

    @property
    def tokenizer(self) -> Any:
        from ..model_loading import load_tokenizer

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.source, self.config.get("tokenizer"),
                                             trust_remote_code=self.config["trust_remote_code"])
        return self._tokenizer

    def _select_device(self, rank: int | None) -> torch.device:
        if self.config.get("device") is not None:
            return torch.device(self.config["device"])
        if torch.cuda.is_available():
            return torch.device(f"cuda:{(rank or 0) % torch.cuda.device_count()}")
        return torch.device("cpu")

    def _model_dtype(self, device: torch.device) -> torch.dtype:
        """The configured dtype; else float32 on the CPU and the model's own dtype elsewhere."""
        if self.config.get("dtype") is not None:
            return DTYPES[self.config["dtype"]]
        if device.type == "cpu":
            return torch.float32
        native = getattr(self.model_config, "dtype", None) or getattr(self.model_config, "torch_dtype", None)
        return native if isinstance(native, torch.dtype) else DTYPES.get(str(native), torch.bfloat16)

    def load(self, rank: int | None = None) -> Any:
        """Load the model once per process (called on the first batch with a row to score); returns it."""
        if self._model is None:
            self._device = self._select_device(rank)
            self._model = self._load_model(self._device, self._model_dtype(self._device))
            logger.info("hf_longattn: loaded %s on %s for %s (%s)", self.config["model"], self._device, self.name,
                        self.load_report)
        return self._model

    def _load_model(self, device: torch.device, dtype: torch.dtype) -> Any:
        raise NotImplementedError

    # -- the map function ----------------------------------------------------------------------------
    def __call__(self, batch: dict[str, list], *extra: Any) -> dict[str, list]:
        """Score one batch; ``extra`` holds what ``with_indices=True`` / ``with_rank=True`` pass.

        Returns the score columns only, as lists that carry their declared Arrow types
        (`hf_longattn.vocabulary.TypedColumn`); ``datasets`` keeps the input columns, rows and order.
        """
        indices = next((e for e in extra if isinstance(e, (list, range, np.ndarray))), None)
        rank = next((e for e in extra if isinstance(e, int) and not isinstance(e, bool)), None)
        rows = self._tokenize(self._validate(batch, indices), batch)  # raises before any model work
        features = self.output_features()
        out: dict[str, list] = {name: [None] * len(rows) for name in features}
        tokens, status, detail = self.status_columns()
        out[tokens] = [len(r.token_ids) if r.token_ids is not None else 0 for r in rows]
        out[status] = [r.status for r in rows]
        out[detail] = [r.detail for r in rows]
        self._fill_unscored(rows, out)
        pending = [r for r in rows if r.status == V.OK]
        if pending:
            self.load(rank)
            self._score_rows(pending, out)
        return V.typed_columns(features, out)

    def _fill_unscored(self, rows: list[Row], out: dict[str, list]) -> None:
        """Columns every row gets, scored or not (none by default)."""

    def _score_rows(self, rows: list[Row], out: dict[str, list]) -> None:
        raise NotImplementedError

    def _score_by_length(self, rows: list[Row], out: dict[str, list],
                         forward: Callable[[list[Row], dict[str, list], int], None]) -> None:
        """``forward`` on groups of equal-length rows, at most ``max_batch_tokens`` tokens each, via :meth:`_in_halves`."""
        by_length: dict[int, list[Row]] = {}
        for row in rows:
            by_length.setdefault(len(row.token_ids), []).append(row)
        for length, group in sorted(by_length.items()):
            per_forward = max(1, self.config["max_batch_tokens"] // length)
            for start in range(0, len(group), per_forward):
                self._in_halves(group[start : start + per_forward], out, self.config["block_bytes"], forward)

    def _validate(self, batch: dict[str, list], indices: Any) -> list[Row]:
        id_column, text_column = self.config["input_ids_column"], self.config["text_column"]
        column = id_column if id_column in batch else text_column
        if column not in batch:
            raise ValueError(f"{type(self).__name__} needs a {text_column!r} (text) or {id_column!r} (token ids) column; "
                             f"current columns: {sorted(batch)}")
        rows = []
        for position, value in enumerate(batch[column]):
            where = describe_row(batch, position, indices)
            if value is None:
                rows.append(Row(position, None, V.MISSING))
            elif column == id_column:
                token_ids = as_token_ids(value, column, where)
                if None in token_ids:  # a null inside a list of ints: bad data, reported on the row
                    rows.append(Row(position, None, V.BAD_TOKEN, f"token id missing (null) at position {token_ids.index(None)}"))
                else:
                    rows.append(Row(position, token_ids, V.OK))
            elif isinstance(value, str):
                rows.append(Row(position, None, V.OK if value.strip() else V.EMPTY))
            else:
                raise ValueError(f"column {column!r}, {where}: expected a string (or None), got {type(value).__name__} {value!r:.60}")
        return rows

    def _tokenize(self, rows: list[Row], batch: dict[str, list]) -> list[Row]:
        """Fill token ids of text rows; cut to ``max_length`` (scorers that truncate); flag empty, short, bad rows."""
        max_length = self.max_length if self.truncate else None
        text_rows = [r for r in rows if r.token_ids is None and r.status == V.OK]
        encoded = {}
        if text_rows:
            texts = [batch[self.config["text_column"]][r.position] for r in text_rows]
            options = {"truncation": True, "max_length": max_length} if max_length else {}
            ids = self.tokenizer(texts, add_special_tokens=self.add_special_tokens, **options)["input_ids"]
            encoded = {r.position: list(i) for r, i in zip(text_rows, ids)}
        vocab_size = int(self.model_config.vocab_size)
        checked = []
        for row in rows:
            token_ids, status, detail = encoded.get(row.position, row.token_ids), row.status, row.detail
            if token_ids is not None:
                token_ids = token_ids[:max_length] if max_length else token_ids
                if status == V.OK:
                    status, detail = self._status_of(token_ids, vocab_size)
            checked.append(Row(row.position, token_ids, status, detail))
        return checked

    def _status_of(self, token_ids: list[int], vocab_size: int) -> tuple[str, str | None]:
        """``(status, detail)`` of a row's token ids before scoring: empty, too short (:meth:`_too_short`), bad token."""
        if not token_ids:
            return V.EMPTY, None
        short = self._too_short(token_ids)
        if short is not None:
            return V.TOO_SHORT, short
        low, high = min(token_ids), max(token_ids)
        if low < 0 or high >= vocab_size:
            return V.BAD_TOKEN, f"token id {low if low < 0 else high} outside the vocabulary [0, {vocab_size})"
        return V.OK, None

    def _too_short(self, token_ids: list[int]) -> str | None:
        """Why the row is too short to score, in words, or `None`."""
        return None

    # -- failures stay with their own window ---------------------------------------------------------
    def _in_halves(self, group: list[Row], out: dict[str, list], block_bytes: int,
                   forward: Callable[[list[Row], dict[str, list], int], None]) -> None:
        """``forward`` equal-length rows together; on an error retry in halves (a failure stays with its own window),
        and on out-of-memory of a single window retry with blocks 4× smaller, down to 1 MiB."""
        try:
            forward(group, out, block_bytes)
        except Exception as error:  # noqa: BLE001 - a long job must not die on one window
            out_of_memory = is_out_of_memory(error)
            if out_of_memory and self._device is not None and self._device.type == "cuda":
                torch.cuda.empty_cache()
            if len(group) > 1:
                half = len(group) // 2
                self._in_halves(group[:half], out, block_bytes, forward)
                self._in_halves(group[half:], out, block_bytes, forward)
            elif out_of_memory and block_bytes // 4 >= MIN_BLOCK_BYTES:
                self._in_halves(group, out, block_bytes // 4, forward)
            else:
                self._report(group, V.OOM if out_of_memory else V.ERROR, error_detail(error), out)

    def _report(self, rows: list[Row], status: str, detail: str, out: dict[str, list]) -> None:
        """Mark ``rows`` with ``status`` and ``detail`` (their scores stay null) and log it once; no rows, nothing."""
        if not rows:
            return
        logger.warning("hf_longattn: %d window(s) not scored by %s: %s (%s)", len(rows), self.name, status, detail)
        _, status_column, detail_column = self.status_columns()
        for row in rows:
            out[status_column][row.position] = status
            out[detail_column][row.position] = detail


def error_detail(error: BaseException) -> str:
    first_line = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {first_line}"[:300]


def as_token_ids(value: Any, column: str, where: str) -> list[int | None]:
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


def describe_row(batch: dict[str, list], position: int, indices: Any) -> str:
    where = f"row {int(indices[position])}" if indices is not None else f"row {position} of the batch"
    if "id" in batch and batch["id"][position] is not None:
        where += f" (id={batch['id'][position]!r})"
    return where


def full_layer_cost(length: int, model_config: Any) -> float:
    """Multiply-adds of one decoder layer over ``length`` tokens: q, k, v, o projections, the MLP, causal attention."""
    hidden, inner = int(model_config.hidden_size), int(getattr(model_config, "intermediate_size", 4 * model_config.hidden_size))
    return float(length * (4 * hidden * hidden + 3 * hidden * inner) + length * length * hidden)

"""``LadmCdsScorer``: LADM's contextual dependency score (``ladm_cds_v1``) as a batched, picklable ``datasets.map`` function."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from .. import __version__
from .. import vocabulary as V
from ..attention_hook import layer_attention_sums
from ..attention_stats import DEFAULT_BLOCK_BYTES
from ..model_checks import model_context
from ..model_loading import checkpoint_fingerprint, load_attention_model, load_config, load_tokenizer, resolve_source
from ..scorer import _DTYPES, _MIN_BLOCK_BYTES, _as_token_ids, _describe_row, _is_out_of_memory, _Row
from .ladm_stats import (  # noqa: F401 - the math, re-exported: `from hf_longattn.scorers.ladm import ladm_cds`
    D_AFS,
    D_CDS,
    SCORER_NAME,
    SPAN,
    SpanSums,
    cds_from_sums,
    check_settings,
    ladm_cds,
    layer_statistic,
    min_num_tokens,
    span_afs,
    span_starts,
    span_sums,
)

logger = logging.getLogger(__name__)

CDS = "ladm_cds"
CDS_BY_LAYER = "ladm_cds_by_layer"
NUM_TOKENS = "ladm_num_tokens"
STATUS = "ladm_status"
STATUS_DETAIL = "ladm_status_detail"
COLUMN_DESCRIPTIONS = {
    CDS: "LADM's contextual dependency score, mean over the scored layers (null when the status is not ok)",
    CDS_BY_LAYER: "CDS of each scored layer, in the order of `layers`",
    NUM_TOKENS: "number of tokens scored (L)",
    STATUS: "`ok`, or why the window was not scored (`hf_longattn.vocabulary.STATUSES`)",
    STATUS_DETAIL: "the reason of a status other than `ok` in words (null when ok)",
}
"""Every column the scorer can write, with its meaning."""


def ladm_features(layers: int = 1):
    """`datasets.Features` of the columns `LadmCdsScorer` writes; ``ladm_cds_by_layer`` when ``layers > 1``.

    Example:

    >>> list(ladm_features()), list(ladm_features(layers=30))[1]
    (['ladm_cds', 'ladm_num_tokens', 'ladm_status', 'ladm_status_detail'], 'ladm_cds_by_layer')
    """
    from datasets import Features, List, Value

    columns = {CDS: Value("float64")}
    if layers > 1:
        columns[CDS_BY_LAYER] = List(Value("float64"))
    columns.update({NUM_TOKENS: Value("int64"), STATUS: Value("string"), STATUS_DETAIL: Value("string")})
    return Features(columns)


class LadmCdsScorer:
    """Scores windows with LADM's contextual dependency score (CDS), for ``datasets.Dataset.map``.

    Per window of L tokens and scored layer: 128-token query spans taken backwards from the end
    every ``span·d_cds`` tokens, each span's softmax over the keys before it, PFS at distances that
    are multiples of ``span·d_afs``, AFS = Σ PFS·(distance/L)·std(PFS)·(span start/L), CDS = the mean
    of AFS over spans (`hf_longattn.scorers.ladm_stats`), then the mean over layers. Memory is linear
    in L; the forward stops right after the deepest scored layer's attention scores.

    Args:
        model (`str`): a Hub repo id, a local model folder (safetensors) or a local ``.gguf`` file.
        tokenizer (`str`, *optional*): tokenizer name or path; defaults to the model's.
        revision (`str`, *optional*): Hub revision; pin a commit hash for reproducible caching.
        text_column (`str`, defaults to ``"text"``): the column of texts to score.
        input_ids_column (`str`, defaults to ``"input_ids"``): a pre-tokenised column, used whenever present.
        max_length (`int`, *optional*): longer inputs are cut to their first ``max_length`` tokens;
            defaults to the model's ``max_position_embeddings``.
        span (`int`, defaults to `128`): tokens per query span (LADM's ``attn_chunk_size``).
        d_cds (`int`, defaults to `4`): spans every ``span·d_cds`` tokens.
        d_afs (`int`, defaults to `4`): PFS distances are multiples of ``span·d_afs``; a window needs
            ``2·span + 4·span·d_afs + 1`` tokens (2305 by default), else its status is ``too_short``.
        layers (`list[int]`, *optional*): decoder layers scored, one forward; defaults to all (as LADM).
            ``[0]`` loads only the first layer's embeddings and q/k projections.
        ablation (`str`, defaults to ``"none"``): LADM's ``--ablation``: ``"none"`` (official ``'No'``),
            ``"no_std"`` or ``"no_len_weight"``.
        dtype (`str`, *optional*): ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"float64"``; defaults
            to float32 on CPU, the model's own dtype on GPU. Scores are float32 or wider regardless.
        device (`str`, *optional*): e.g. ``"cuda:1"``; by default ``cuda:(rank % n_gpus)`` or the CPU.
        max_batch_tokens (`int`, defaults to 65536): equal-length windows share a forward up to this.
        block_bytes (`int`, defaults to 4 MiB): memory budget of one block of attention scores; on
            out-of-memory a window is retried with blocks 4× smaller, down to 1 MiB.
        trust_remote_code (`bool`, defaults to `False`), allow_pickle (`bool`, defaults to `False`):
            as for `hf_longattn.LongAttnScorer`.

    Output columns (`ladm_features`): ``ladm_cds`` (float64, null unless ok), ``ladm_cds_by_layer``
    (with several layers), ``ladm_num_tokens``, ``ladm_status`` (one of `hf_longattn.vocabulary.STATUSES`),
    ``ladm_status_detail``. Pass ``features=scorer.features(ds.features)`` so the types hold even
    when no row of a batch is scored.

    Example:
        >>> from datasets import Dataset
        >>> scorer = LadmCdsScorer("path/to/SmolLM2-135M-Instruct.Q4_1.gguf", max_length=8192)
        >>> ds = Dataset.from_dict({"text": [open("long.txt").read()]})
        >>> ds = ds.map(scorer, batched=True, batch_size=4, features=scorer.features(ds.features))
        >>> ds[0]["ladm_status"], ds[0]["ladm_cds"]  # doctest: +SKIP
        ('ok', 0.0123...)
    """

    def __init__(self, model: str, *, tokenizer: str | None = None, revision: str | None = None,
                 text_column: str = "text", input_ids_column: str = "input_ids", max_length: int | None = None,
                 span: int = SPAN, d_cds: int = D_CDS, d_afs: int = D_AFS, layers: Sequence[int] | None = None,
                 ablation: str = "none", dtype: str | None = None, device: str | None = None,
                 max_batch_tokens: int = 65536, block_bytes: int = DEFAULT_BLOCK_BYTES,
                 trust_remote_code: bool = False, allow_pickle: bool = False):
        check_settings(span, d_cds, d_afs, ablation)
        if layers is not None and (isinstance(layers, (int, str)) or not layers
                                   or any(not isinstance(i, int) or i < 0 for i in layers) or len(set(layers)) != len(layers)):
            raise ValueError(f"layers must be None (all) or a list of distinct non-negative ints, got {layers!r}")
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if max_length is not None and max_length < min_num_tokens(span, d_afs):
            raise ValueError(f"max_length={max_length} leaves no span: LADM needs {min_num_tokens(span, d_afs)} tokens "
                             f"with span={span}, d_afs={d_afs}")
        source = resolve_source(model, revision)
        num_layers = int(load_config(source, trust_remote_code=trust_remote_code).num_hidden_layers)
        if layers is not None and max(layers) >= num_layers:
            raise ValueError(f"layer {max(layers)} does not exist: the model has {num_layers} layers (0 … {num_layers - 1})")
        self.layers = list(range(num_layers)) if layers is None else list(layers)
        self.config = {
            "scorer": SCORER_NAME, "model": str(model), "tokenizer": tokenizer, "revision": revision,
            "text_column": text_column, "input_ids_column": input_ids_column, "max_length": max_length,
            "span": span, "d_cds": d_cds, "d_afs": d_afs, "layers": None if layers is None else list(layers),
            "ablation": ablation, "dtype": dtype, "device": device, "max_batch_tokens": int(max_batch_tokens),
            "block_bytes": int(block_bytes), "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle,
            # Identity of the weights and of the code, for datasets' fingerprint (see __getstate__).
            "checkpoint": checkpoint_fingerprint(source, tuple(self.layers)), "hf_longattn_version": __version__,
        }
        self._reset_runtime()

    # --- pickling and fingerprinting: configuration only, never weights ---------------------------
    def __getstate__(self) -> dict:
        """Only the configuration (and the resolved layers): what datasets hashes to fingerprint a map."""
        return {"config": self.config, "layers": self.layers}

    def __setstate__(self, state: dict) -> None:
        self.config, self.layers = state["config"], state["layers"]
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._source = self._model_config = self._tokenizer = self._model = self._device = None
        self.load_report = None

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.config.items() if v is not None and k != "checkpoint"}
        return f"LadmCdsScorer({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def identity(self) -> str:
        """What identifies the weights this scorer reads (`hf_longattn.model_loading.checkpoint_fingerprint`)."""
        return self.config["checkpoint"]

    # --- output schema -------------------------------------------------------------------------------
    def output_features(self):
        """`datasets.Features` of the columns this scorer writes (`ladm_features`)."""
        return ladm_features(len(self.layers))

    @property
    def output_columns(self) -> list[str]:
        """Names of the columns this scorer writes."""
        return list(self.output_features())

    def features(self, input_features):
        """The full `datasets.Features` of ``ds.map(self, ...)``: ``input_features`` plus the score columns.

        Example:
            >>> ds = ds.map(scorer, batched=True, features=scorer.features(ds.features))  # doctest: +SKIP
        """
        from datasets import Features

        return Features({**input_features, **self.output_features()})

    # --- lazy, per-process runtime -------------------------------------------------------------------
    @property
    def source(self):
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
        return self.config["max_length"] or model_context(self.model_config)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.source, self.config["tokenizer"],
                                             trust_remote_code=self.config["trust_remote_code"])
        return self._tokenizer

    def load(self, rank: int | None = None):
        """Load the model up to the deepest scored layer, once per process (on the first batch); returns it."""
        if self._model is None:
            device = self.config["device"]
            if device is None:
                device = f"cuda:{(rank or 0) % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
            self._device = torch.device(device)
            self._model, self.load_report = load_attention_model(
                self.source, tuple(self.layers), dtype=self._model_dtype(), device=self._device,
                trust_remote_code=self.config["trust_remote_code"], allow_pickle=self.config["allow_pickle"])
            logger.info("hf_longattn: loaded %s on %s for %s (%s)", self.config["model"], self._device, SCORER_NAME,
                        self.load_report)
        return self._model

    def _model_dtype(self) -> torch.dtype:
        """The configured dtype; else float32 on CPU and the model's own dtype elsewhere (as `LongAttnScorer`)."""
        if self.config["dtype"] is not None:
            return _DTYPES[self.config["dtype"]]
        if self._device.type == "cpu":
            return torch.float32
        native = getattr(self.model_config, "dtype", None) or getattr(self.model_config, "torch_dtype", None)
        return native if isinstance(native, torch.dtype) else _DTYPES.get(str(native), torch.bfloat16)

    # --- the map function ----------------------------------------------------------------------------
    def __call__(self, batch: dict[str, list], *extra) -> dict[str, list]:
        """Score one batch; ``extra`` holds what ``with_indices=True`` / ``with_rank=True`` pass.

        Returns the score columns only; ``datasets`` keeps the input columns, rows and order.
        """
        indices = next((e for e in extra if isinstance(e, (list, range, np.ndarray))), None)
        rank = next((e for e in extra if isinstance(e, int) and not isinstance(e, bool)), None)
        rows = self._tokenize(self._validate(batch, indices), batch)  # raises before any model work
        out: dict[str, list] = {name: [None] * len(rows) for name in self.output_features()}
        out[NUM_TOKENS] = [len(r.token_ids) if r.token_ids is not None else 0 for r in rows]
        out[STATUS] = [r.status for r in rows]
        out[STATUS_DETAIL] = [r.detail for r in rows]
        pending = [r for r in rows if r.status == V.OK]
        if pending:
            self.load(rank)
            by_length: dict[int, list[_Row]] = {}
            for row in pending:
                by_length.setdefault(len(row.token_ids), []).append(row)
            for length, group in sorted(by_length.items()):
                per_forward = max(1, self.config["max_batch_tokens"] // length)
                for first in range(0, len(group), per_forward):
                    self._score_group(group[first : first + per_forward], out, self.config["block_bytes"])
        return out

    def _validate(self, batch: dict[str, list], indices) -> list[_Row]:
        id_column, text_column = self.config["input_ids_column"], self.config["text_column"]
        column = id_column if id_column in batch else text_column
        if column not in batch:
            raise ValueError(f"LadmCdsScorer needs a {text_column!r} (text) or {id_column!r} (token ids) column; "
                             f"current columns: {sorted(batch)}")
        rows = []
        for position, value in enumerate(batch[column]):
            where = _describe_row(batch, position, indices)
            if value is None:
                rows.append(_Row(position, None, V.MISSING))
            elif column == id_column:
                token_ids = _as_token_ids(value, column, where)
                if None in token_ids:
                    detail = f"token id missing (null) at position {token_ids.index(None)}"
                    rows.append(_Row(position, None, V.BAD_TOKEN, detail))
                else:
                    rows.append(_Row(position, token_ids, V.OK))
            elif isinstance(value, str):
                rows.append(_Row(position, None, V.OK if value.strip() else V.EMPTY))
            else:
                raise ValueError(f"column {column!r}, {where}: expected a string (or None), got "
                                 f"{type(value).__name__} {value!r:.60}")
        return rows

    def _tokenize(self, rows: list[_Row], batch: dict[str, list]) -> list[_Row]:
        """Fill token ids of text rows; cut to ``max_length``; flag empty, too short and bad-id rows."""
        text_rows = [r for r in rows if r.token_ids is None and r.status == V.OK]
        encoded = {}
        if text_rows:
            texts = [batch[self.config["text_column"]][r.position] for r in text_rows]
            ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
            encoded = {r.position: list(i) for r, i in zip(text_rows, ids)}
        checked = []
        for row in rows:
            token_ids, status, detail = encoded.get(row.position, row.token_ids), row.status, row.detail
            if token_ids is not None:
                token_ids = token_ids[: self.max_length]
                if status == V.OK:
                    status, detail = self._status_of(token_ids)
            checked.append(_Row(row.position, token_ids, status, detail))
        return checked

    def _status_of(self, token_ids: list[int]) -> tuple[str, str | None]:
        if not token_ids:
            return V.EMPTY, None
        needed = min_num_tokens(self.config["span"], self.config["d_afs"])
        if len(token_ids) < needed:
            return V.TOO_SHORT, (f"{len(token_ids)} tokens: LADM needs at least {needed} "
                                 f"(2·span + 4·span·d_afs + 1, span={self.config['span']}, d_afs={self.config['d_afs']})")
        vocab_size = int(self.model_config.vocab_size)
        low, high = min(token_ids), max(token_ids)
        if low < 0 or high >= vocab_size:
            return V.BAD_TOKEN, f"token id {low if low < 0 else high} outside the vocabulary [0, {vocab_size})"
        return V.OK, None

    def _score_group(self, group: list[_Row], out: dict[str, list], block_bytes: int) -> None:
        """Score equal-length rows together; on an error retry in halves, and on out-of-memory of a
        single window retry with blocks 4× smaller, down to 1 MiB (as `LongAttnScorer`)."""
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
            elif out_of_memory and block_bytes // 4 >= _MIN_BLOCK_BYTES:
                self._score_group(group, out, block_bytes // 4)
            else:
                status = V.OOM if out_of_memory else V.ERROR
                detail = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"[:300]
                logger.warning("hf_longattn: %d window(s) not scored by %s: %s (%s)", len(group), SCORER_NAME, status,
                               detail)
                for row in group:
                    out[STATUS][row.position], out[STATUS_DETAIL][row.position] = status, detail

    def _forward(self, group: list[_Row], out: dict[str, list], block_bytes: int) -> None:
        input_ids = torch.tensor([r.token_ids for r in group], dtype=torch.long, device=self._device)  # (B, L)
        settings = {name: self.config[name] for name in ("span", "d_cds", "d_afs")}
        sums = layer_attention_sums(self._model, input_ids, self.layers, (), layer_statistic,
                                    block_bytes=block_bytes, **settings)
        by_layer = torch.stack([cds_from_sums(sums[layer], self.config["ablation"]) for layer in self.layers], 1)
        by_layer = by_layer.cpu().numpy()  # (B, layers) float64
        finite = np.isfinite(by_layer).all(axis=1)
        for b, row in enumerate(group):
            if not finite[b]:
                out[STATUS][row.position] = V.NON_FINITE
                out[STATUS_DETAIL][row.position] = "non-finite CDS (overflow in the model's activations?)"
                continue
            out[CDS][row.position] = float(by_layer[b].mean())
            if CDS_BY_LAYER in out:
                out[CDS_BY_LAYER][row.position] = by_layer[b].tolist()

"""``LongAttnScorer``: LongAttn statistics (``longattn_v1``) as a batched, picklable, cache-friendly ``datasets.map`` function."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import kernels
from . import vocabulary as V
from .attention_hook import layer_attention_sums
from .attention_stats import DEFAULT_BLOCK_BYTES, dependency_statistics, query_block_size, windows_per_block
from .config import check_min_distance, min_distance_tokens
from .model_loading import checkpoint_fingerprint, load_attention_model, resolve_source
from .card import LONGATTN_BIBTEX
from .scorers.base import DTYPES, Column, Ranking, Row, WindowScorer, as_token_ids, describe_row, full_layer_cost, is_out_of_memory

logger = logging.getLogger(__name__)

STATUS_OK, STATUS_EMPTY, STATUS_MISSING, STATUS_TOO_SHORT = V.OK, V.EMPTY, V.MISSING, V.TOO_SHORT
_DTYPES, _Row, _as_token_ids, _describe_row, _is_out_of_memory = DTYPES, Row, as_token_ids, describe_row, is_out_of_memory
"""Their names before the scorers shared `hf_longattn.scorers.base`."""
_CONTEXT_WARNED: set[tuple[str, int, int]] = set()  # (model, max_length, context) warned about in this process


class LongAttnScorer(WindowScorer):
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

    name = "longattn_v1"
    label = "LongAttn (arXiv 2502.16860)"
    prefix = "longattn"
    description = (
        "each window goes through one decoder layer (the first, as in the paper); per head, the causal softmax attention "
        "map restricted to keys at least k tokens back gives DS_T (`longattn_ds`: the mean attention mass a query row "
        "puts there) and DU_T (`longattn_du`: minus the variance of that far map, closer to 0 = more uniform); within "
        "each category LDS_T = Z(DS_T) + α·Z(DU_T) (`longattn_lds`).")
    citation = LONGATTN_BIBTEX
    SETTINGS = {"min_distance": 0.25, "layer": 0}
    """Its settings in a run come from the run's keys ``min_distance`` and ``layer`` (`from_run_config`)."""

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
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        source = resolve_source(model, revision)
        self._set_config(
            model, checkpoint_fingerprint(source, tuple(layers)), tokenizer=tokenizer, revision=revision,
            text_column=text_column, input_ids_column=input_ids_column, max_length=max_length,
            min_distance=distances, layer=layers, dtype=dtype, device=device, per_head=per_head,
            max_batch_tokens=int(max_batch_tokens), block_bytes=int(block_bytes),
            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    # --- the protocol -----------------------------------------------------------------------------
    @classmethod
    def settings_of(cls, config: Any) -> dict[str, Any]:
        """A run's LongAttn settings: its ``min_distance`` and ``layer`` keys."""
        return {"min_distance": config.min_distance, "layer": config.layer}

    @classmethod
    def columns(cls, settings: dict[str, Any]) -> list[Column]:
        distances, layers = settings.get("min_distance", 0.25), settings.get("layer", 0)
        features = V.score_features(distances=len(distances) if isinstance(distances, (list, tuple)) else 1,
                                    layers=len(layers) if isinstance(layers, (list, tuple)) else 1,
                                    per_head=bool(settings.get("per_head", False)))
        return [Column(name, getattr(feature, "dtype", "list<float64>"), V.COLUMN_DESCRIPTIONS[name])
                for name, feature in features.items()]

    @classmethod
    def ranking(cls, settings: dict[str, Any]) -> Ranking:
        return Ranking(((V.DS, 1.0), (V.DU, "alpha")), V.LDS, V.SELECTED, "LDS_T")

    @classmethod
    def model_needs(cls, settings: dict[str, Any]) -> str:
        layers = settings.get("layer", 0)
        deepest = max(layers) if isinstance(layers, (list, tuple)) else layers
        return (f"the token embeddings and decoder layers 0–{deepest - 1} in full, then layer {deepest}'s input norm and "
                "q/k projections (no o_proj, MLP, later layers or lm_head)" if deepest else
                "the token embeddings and layer 0's input norm and q/k projections (no o_proj, MLP, later layers or lm_head)")

    @classmethod
    def cost(cls, window_size: int, model_config: Any, settings: dict[str, Any]) -> float:
        """Multiply-adds per window: the layers below the deepest scored one in full, then its q/k and the causal QKᵀ."""
        layers = settings.get("layer", 0)
        deepest = max(layers) if isinstance(layers, (list, tuple)) else layers
        return float(deepest * full_layer_cost(window_size, model_config)
                     + window_size * (2 * int(model_config.hidden_size) ** 2 + window_size * int(model_config.hidden_size) / 2))

    @property
    def settings(self) -> dict[str, Any]:
        return {"min_distance": self.config["min_distance"], "layer": self.config["layer"],
                "per_head": self.config["per_head"]}

    def output_features(self):
        """`datasets.Features` of the columns this scorer writes (`hf_longattn.vocabulary.score_features`)."""
        return V.score_features(distances=len(self.config["min_distance"]), layers=len(self.config["layer"]),
                                per_head=self.config["per_head"])

    # --- the model ------------------------------------------------------------------------------------
    def _load_model(self, device: torch.device, dtype: torch.dtype) -> Any:
        model, self.load_report = load_attention_model(
            self.source, tuple(self.config["layer"]), dtype=dtype, device=device,
            trust_remote_code=self.config["trust_remote_code"], allow_pickle=self.config["allow_pickle"])
        self._warn_beyond_context()
        return model

    def _warn_beyond_context(self) -> None:
        """Warn (once per process and setting) when ``max_length`` exceeds the model's context."""
        key = (self.config["model"], self.config["max_length"] or 0, self.model_context)
        if key[1] > key[2] and key not in _CONTEXT_WARNED:
            _CONTEXT_WARNED.add(key)
            logger.warning(
                "hf_longattn: max_length=%d exceeds the model's context (%d tokens, from its config): windows "
                "longer than that are scored at positions the model never saw, so their attention means little",
                key[1], key[2])

    # --- the rows -------------------------------------------------------------------------------------
    def _fill_unscored(self, rows: list[Row], out: dict[str, list]) -> None:
        out[V.MIN_DISTANCE] = [min_distance_tokens(self.config["min_distance"][0], n) if n else None
                               for n in out[V.NUM_TOKENS]]

    def _too_short(self, token_ids: list[int]) -> str | None:
        k = min_distance_tokens(self.config["min_distance"][0], len(token_ids))
        return f"{len(token_ids)} tokens, k = {k}" if len(token_ids) <= k else None

    def _score_rows(self, rows: list[Row], out: dict[str, list]) -> None:
        self._score_by_length(rows, out, self._forward)

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
            self._report([group[b] for b in np.flatnonzero(~finite)], V.NON_FINITE,
                         "non-finite attention statistics (overflow in the model's activations?)", out)
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

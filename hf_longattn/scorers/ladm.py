"""``LadmCdsScorer``: LADM's contextual dependency score (``ladm_cds_v1``) as a batched, picklable ``datasets.map`` function."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from .. import vocabulary as V
from ..attention_hook import layer_attention_sums
from ..attention_stats import DEFAULT_BLOCK_BYTES
from ..model_loading import checkpoint_fingerprint, load_attention_model, load_config, resolve_source
from .base import DTYPES, Column, Row, WindowScorer, full_layer_cost
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
COLUMN_TYPES = {CDS: "float64", CDS_BY_LAYER: "list<float64>", NUM_TOKENS: "int64", STATUS: "string", STATUS_DETAIL: "string"}


def ladm_features(layers: int = 1):
    """`datasets.Features` of the columns `LadmCdsScorer` writes; ``ladm_cds_by_layer`` when ``layers > 1``.

    Example:

    >>> list(ladm_features()), list(ladm_features(layers=30))[1]
    (['ladm_cds', 'ladm_num_tokens', 'ladm_status', 'ladm_status_detail'], 'ladm_cds_by_layer')
    """
    from datasets import Features

    return Features({c.name: c.feature() for c in LadmCdsScorer.columns({"layers": list(range(layers))})})


class LadmCdsScorer(WindowScorer):
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

    name = SCORER_NAME
    label = "LADM's contextual dependency score (arXiv 2503.02502)"
    prefix = "ladm"
    ranking_label = "CDS (LADM)"
    description = (
        "query spans of `span` tokens are taken backwards from the window's end every span·`d_cds` tokens; each span's "
        "attention to the keys before it, summed over its queries and averaged over heads, gives a pooled score (PFS) "
        "at distances that are multiples of span·`d_afs`; AFS = Σ PFS·(distance/L)·std(PFS)·(span start/L); "
        "`ladm_cds` is the mean of AFS over spans and over the scored `layers`.")
    citation = """@article{chen2025ladm,
  title   = {LADM: Long-context Training Data Selection with Attention-based Dependency Measurement for LLMs},
  author  = {Chen, Jianghao and Wu, Junhong and Xu, Yangyifan and Zhang, Jiajun},
  journal = {arXiv preprint arXiv:2503.02502},
  year    = {2025},
  url     = {https://arxiv.org/abs/2503.02502}
}"""
    SETTINGS = {"span": SPAN, "d_cds": D_CDS, "d_afs": D_AFS, "layers": None, "ablation": "none"}

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
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if max_length is not None and max_length < min_num_tokens(span, d_afs):
            raise ValueError(f"max_length={max_length} leaves no span: LADM needs {min_num_tokens(span, d_afs)} tokens "
                             f"with span={span}, d_afs={d_afs}")
        source = resolve_source(model, revision)
        num_layers = int(load_config(source, trust_remote_code=trust_remote_code).num_hidden_layers)
        if layers is not None and max(layers) >= num_layers:
            raise ValueError(f"layer {max(layers)} does not exist: the model has {num_layers} layers (0 … {num_layers - 1})")
        self.layers = list(range(num_layers)) if layers is None else list(layers)
        self._set_config(
            model, checkpoint_fingerprint(source, tuple(self.layers)), tokenizer=tokenizer, revision=revision,
            text_column=text_column, input_ids_column=input_ids_column, max_length=max_length, span=span,
            d_cds=d_cds, d_afs=d_afs, layers=None if layers is None else list(layers), ablation=ablation, dtype=dtype,
            device=device, max_batch_tokens=int(max_batch_tokens), block_bytes=int(block_bytes),
            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    # --- pickling and fingerprinting: configuration only, never weights ---------------------------
    def __getstate__(self) -> dict:
        """Only the configuration (and the resolved layers): what datasets hashes to fingerprint a map."""
        return {"config": self.config, "layers": self.layers}

    def __setstate__(self, state: dict) -> None:
        self.config, self.layers = state["config"], state["layers"]
        self._reset_runtime()

    # --- the protocol ----------------------------------------------------------------------------------
    @classmethod
    def columns(cls, settings: dict) -> list[Column]:
        layers = settings.get("layers")
        names = [CDS, *([CDS_BY_LAYER] if layers is None or len(layers) > 1 else [])]
        return [Column(name, COLUMN_TYPES[name], COLUMN_DESCRIPTIONS[name]) for name in names] + cls.common_columns()

    @classmethod
    def model_needs(cls, settings: dict) -> str:
        layers = settings.get("layers")
        if layers is None:
            return "every decoder layer's q/k (the layers before the last in full; no lm_head)"
        below = "layer 0" if max(layers) == 1 else f"layers 0–{max(layers) - 1}"
        return (f"the token embeddings and decoder {below} in full, then layer {max(layers)}'s q/k "
                "(no lm_head)" if max(layers) else "the token embeddings and layer 0's q/k projections")

    @classmethod
    def cost(cls, window_size: int, model_config, settings: dict) -> float:
        """Multiply-adds per window: the layers below the deepest scored one in full, then every scored layer's q/k and
        span scores (each span of 128 queries against the keys before it, every span·d_cds tokens)."""
        layers = settings.get("layers")
        scored = int(model_config.num_hidden_layers) if layers is None else len(layers)
        deepest = int(model_config.num_hidden_layers) - 1 if layers is None else max(layers)
        hidden, span = int(model_config.hidden_size), settings.get("span", SPAN)
        spans = range(window_size - span, span, -span * settings.get("d_cds", D_CDS))
        return float(deepest * full_layer_cost(window_size, model_config)
                     + scored * (window_size * 2 * hidden * hidden + sum(span * t * hidden for t in spans)))

    @property
    def settings(self) -> dict:
        """The settings with ``layers`` resolved (all layers as a list), so that `columns` matches what is written."""
        return {**super().settings, "layers": list(self.layers)}

    # --- the model and the rows --------------------------------------------------------------------
    def _load_model(self, device: torch.device, dtype: torch.dtype):
        """The model up to the deepest scored layer's attention."""
        model, self.load_report = load_attention_model(
            self.source, tuple(self.layers), dtype=dtype, device=device,
            trust_remote_code=self.config["trust_remote_code"], allow_pickle=self.config["allow_pickle"])
        return model

    def _too_short(self, token_ids: list[int]) -> str | None:
        needed = min_num_tokens(self.config["span"], self.config["d_afs"])
        if len(token_ids) < needed:
            return (f"{len(token_ids)} tokens: LADM needs at least {needed} "
                    f"(2·span + 4·span·d_afs + 1, span={self.config['span']}, d_afs={self.config['d_afs']})")
        return None

    def _score_rows(self, rows: list[Row], out: dict[str, list]) -> None:
        self._score_by_length(rows, out, self._forward)

    def _forward(self, group: list[Row], out: dict[str, list], block_bytes: int) -> None:
        input_ids = torch.tensor([r.token_ids for r in group], dtype=torch.long, device=self._device)  # (B, L)
        settings = {name: self.config[name] for name in ("span", "d_cds", "d_afs")}
        sums = layer_attention_sums(self._model, input_ids, self.layers, (), layer_statistic,
                                    block_bytes=block_bytes, **settings)
        by_layer = torch.stack([cds_from_sums(sums[layer], self.config["ablation"]) for layer in self.layers], 1)
        by_layer = by_layer.cpu().numpy()  # (B, layers) float64
        finite = np.isfinite(by_layer).all(axis=1)
        self._report([row for b, row in enumerate(group) if not finite[b]], V.NON_FINITE,
                     "non-finite CDS (overflow in the model's activations?)", out)
        for b, row in enumerate(group):
            if not finite[b]:
                continue
            out[CDS][row.position] = float(by_layer[b].mean())
            if CDS_BY_LAYER in out:
                out[CDS_BY_LAYER][row.position] = by_layer[b].tolist()

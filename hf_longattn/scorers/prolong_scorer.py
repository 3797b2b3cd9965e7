"""``ProLongScorer``: ProLong's LDS (``prolong_v1``) as a batched, picklable, cache-friendly ``datasets.map`` function."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from .. import vocabulary as V
from ..model_loading import causal_lm_fingerprint, load_causal_lm, resolve_source
from .base import DTYPES, Column, Row, WindowScorer, full_layer_cost, error_detail, is_out_of_memory
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


class ProLongScorer(WindowScorer):
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

    name = NAME
    label = "ProLong's long-dependency score (arXiv 2405.17915)"
    prefix = "prolong"
    ranking_label = "LDS (ProLong)"
    description = (
        "each window is cut into segments of `chunk_size` tokens; for segment pairs (i, j), j < i (all, or `sample_size` "
        "drawn with the window's own seed), ΔPPL_ij = (PPL_i − PPL_i|j)/PPL_i is how much segment j lowers segment i's "
        "perplexity; `prolong_lds` = Σ over pairs with ΔPPL > `threshold` of (ΔPPL_ij + distance gain)·DE_i, DE_i the "
        "dependency entropy of row i. Perplexities come from the whole causal LM, in float64.")
    citation = """@article{chen2024prolong,
  title   = {Long Context is Not Long at All: A Prospector of Long-Dependency Data for Large Language Models},
  author  = {Chen, Longze and Liu, Ziqiang and He, Wanwei and Li, Yunshui and Luo, Run and Yang, Min},
  journal = {arXiv preprint arXiv:2405.17915},
  year    = {2024},
  url     = {https://arxiv.org/abs/2405.17915}
}"""
    SETTINGS = {"chunk_size": 128, "sample_size": 500, "threshold": 0.1, "seed": 11}
    add_special_tokens = False  # run.py:211-214 turns BOS/EOS off
    truncate = False  # a window longer than window_size keeps window_size // chunk_size segments, drawn in order
    window_keyword = "window_size"

    def __init__(self, model: str, *, tokenizer: str | None = None, revision: str | None = None,
                 text_column: str = "text", input_ids_column: str = "input_ids", chunk_size: int = 128,
                 sample_size: int | None = 500, threshold: float = 0.1, window_size: int = 32768, seed: int = 11,
                 max_batch_tokens: int = 4096, dtype: str | None = None, device: str | None = None,
                 trust_remote_code: bool = False, allow_pickle: bool = False):
        settings = ProLongSettings(chunk_size=chunk_size, sample_size=sample_size, threshold=float(threshold),
                                   window_size=window_size, seed=seed, max_batch_tokens=max_batch_tokens)
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        source = resolve_source(model, revision)
        self._set_config(
            model, causal_lm_fingerprint(source), tokenizer=tokenizer, revision=revision, text_column=text_column,
            input_ids_column=input_ids_column, **{name: getattr(settings, name) for name in settings.__dataclass_fields__},
            dtype=dtype, device=device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    # --- the protocol ----------------------------------------------------------------------------------
    @classmethod
    def columns(cls, settings: dict) -> list[Column]:
        names = [LDS, DELTA_PPL, DEPENDENCY_ENTROPY, NUM_PAIRS, NUM_KEPT_PAIRS, NUM_SEGMENTS]
        return [Column(name, COLUMN_TYPES[name], COLUMN_DESCRIPTIONS[name]) for name in names] + cls.common_columns()

    @classmethod
    def model_needs(cls, settings: dict) -> str:
        return "the whole causal LM with its lm_head (segment perplexities need every layer's logits)"

    @classmethod
    def cost(cls, window_size: int, model_config, settings: dict) -> float:
        """Multiply-adds per window: every segment once through the whole model (C tokens, and the lm_head), then each
        pair's C−1 tokens of segment i through the KV cache of segment j (2C keys)."""
        size = int(settings.get("chunk_size", 128))
        segments = max(2, window_size // size)
        pairs = segments * (segments - 1) // 2
        if settings.get("sample_size") is not None:
            pairs = min(pairs, int(settings["sample_size"]))
        layers, vocab = int(model_config.num_hidden_layers), int(model_config.vocab_size)
        hidden = int(model_config.hidden_size)
        segment = layers * full_layer_cost(size, model_config) + size * hidden * vocab
        pair = layers * full_layer_cost(size - 1, model_config) + (size - 1) * (size * hidden + hidden * vocab)
        return float(min(segments, 2 * pairs) * segment + pairs * pair)

    @property
    def prolong_settings(self) -> ProLongSettings:
        """The `ProLongSettings` of this configuration."""
        return ProLongSettings(**{name: self.config[name] for name in ProLongSettings.__dataclass_fields__})

    # --- the model and the rows --------------------------------------------------------------------
    def _load_model(self, device: torch.device, dtype: torch.dtype):
        """The whole causal LM (segment perplexities need the logits)."""
        self.load_report = "whole causal LM"
        return load_causal_lm(self.source, dtype=dtype, device=device, trust_remote_code=self.config["trust_remote_code"],
                              allow_pickle=self.config["allow_pickle"])

    def _too_short(self, token_ids: list[int]) -> str | None:
        size = self.config["chunk_size"]
        return f"{len(token_ids)} tokens: fewer than 2 segments of chunk_size={size}" if len(token_ids) < 2 * size else None

    def _fill_unscored(self, rows: list[Row], out: dict[str, list]) -> None:
        settings = self.prolong_settings
        for row in rows:
            out[NUM_SEGMENTS][row.position] = num_segments(len(row.token_ids) if row.token_ids is not None else 0, settings)

    def _score_rows(self, rows: list[Row], out: dict[str, list]) -> None:
        settings = self.prolong_settings
        for row in rows:
            self._score_row(row, settings, out)

    def _score_row(self, row: Row, settings: ProLongSettings, out: dict[str, list]) -> None:
        """Score one window; on out-of-memory retry with half the tokens per forward, down to one segment."""
        budget = settings.max_batch_tokens
        while True:
            try:
                result = prolong_scores(self._model, [row.token_ids], replace(settings, max_batch_tokens=budget))[0]
                break
            except Exception as error:  # noqa: BLE001 - a long job must not die on one window
                out_of_memory = is_out_of_memory(error)
                if out_of_memory and self._device is not None and self._device.type == "cuda":
                    torch.cuda.empty_cache()
                if out_of_memory and budget // 2 >= settings.chunk_size:
                    budget //= 2
                    continue
                self._report([row], V.OOM if out_of_memory else V.ERROR, error_detail(error), out)
                return
        if not result.finite:
            self._report([row], V.NON_FINITE, "non-finite perplexity or LDS (overflow in the model's logits?)", out)
            return
        self._write(row.position, result, out)

    @staticmethod
    def _write(position: int, result: ProLongResult, out: dict[str, list]) -> None:
        out[LDS][position] = result.lds
        out[DELTA_PPL][position] = result.delta_ppl
        out[DEPENDENCY_ENTROPY][position] = result.dependency_entropy
        out[NUM_PAIRS][position] = result.num_pairs
        out[NUM_KEPT_PAIRS][position] = result.num_kept_pairs
        out[NUM_SEGMENTS][position] = result.num_segments

"""`probe()`: sample real windows and controls of the same documents, score every layer in one pass, report per layer and group."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import vocabulary as V
from .report import ProbeReport
from .sampling import probe_samples
from .statistics import layer_rows, verdict_of

logger = logging.getLogger(__name__)

ALL_GROUPS = "all"
"""Group name used when ``by=None``."""


def load_documents(data: Any, text_column: str = V.TEXT) -> Any:
    """Documents as a `datasets.Dataset`: a Dataset as is, else files or folders read by `hf_longattn.sources`.

    Example:

    >>> load_documents("docs/").column_names  # doctest: +SKIP
    ['id', 'category', 'text', 'source', 'license']
    """
    from datasets import Dataset

    from ..shards import read_sources
    from ..sources import SourceConfig

    if isinstance(data, Dataset):
        return data
    paths = data if isinstance(data, (list, tuple)) else [data]
    if not all(isinstance(path, (str, Path)) for path in paths):
        raise TypeError(f"data must be a datasets.Dataset, a path or a list of paths, got {type(data).__name__}")
    return read_sources([SourceConfig(path=str(path), text_column=text_column) for path in paths])


def parse_layers(layers: Any, num_layers: int) -> list[int]:
    """Layers as sorted distinct ints in ``[0, num_layers)``: from an int, a list, ``"0,4,8"`` or ``"all"``.

    Example:

    >>> parse_layers("0,4", 8), parse_layers("all", 3)
    ([0, 4], [0, 1, 2])
    """
    if isinstance(layers, str):
        if layers.strip().lower() == "all":
            return list(range(num_layers))
        layers = [int(x) for x in layers.replace(" ", "").split(",") if x]
    elif isinstance(layers, int):
        layers = [layers]
    layers = [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < num_layers]
    if not layers or bad or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct ints in [0, {num_layers - 1}] (the model has {num_layers} layers) "
                         f"or 'all', got {layers}")
    return sorted(layers)


def probe(
    model: str,
    data: Any,
    *,
    window_size: int,
    layers: int | Sequence[int] | str,
    by: str | None = "category",
    num_windows: int = 32,
    chunk_size: int = 256,
    seed: int = 0,
    keep_fraction: float = 0.5,
    alpha: float = 0.5,
    text_column: str = "text",
    tokenizer: Any = None,
    id_column: str = "id",
    batch_size: int = 4,
    **scorer_kwargs: Any,
) -> ProbeReport:
    """Check whether a scoring model's layers tell real windows from shuffled-chunk controls on your data.

    Draws ``num_windows`` real windows and as many controls per group (`probe_samples`), scores
    all of them with one `LongAttnScorer` over every layer in ``layers`` (one forward per batch of
    windows), and reports per layer and group mean DS_T / DU_T, AUCs and the top-fraction share,
    with a verdict (thresholds: `hf_longattn.probe`).

    Args:
        model (`str`): Hub id, local folder, ``.gguf`` file or ``"smollm2"``, as for the pipeline.
        data (`datasets.Dataset`, `str`, `Path` or a list of them): documents, or files and folders
            read like the pipeline's ``path:`` sources. Needs ``text_column`` or ``input_ids``.
        window_size (`int`): W, tokens per window (at most the model's ``max_position_embeddings``).
        layers (`int`, list of `int`, or ``"all"``): decoder layers to score (``"0,4,8"`` works too).
        by (`str`, *optional*, defaults to `"category"`): group column; `None` for one group.
        num_windows (`int`, defaults to `32`): N, real windows (and controls) per group.
        chunk_size (`int`, defaults to `256`): tokens per control chunk (the config's ``probe_chunk_size``).
        seed (`int`, defaults to `0`): sampling seed.
        keep_fraction (`float`, defaults to `0.5`): the top fraction for ``top_real_share``.
        alpha (`float`, defaults to `0.5`): weight of DU_T in LDS.
        text_column (`str`, defaults to `"text"`): the text column.
        tokenizer (*optional*): a tokenizer object or name; defaults to the model's. Documents are
            tokenised like the pipeline's (`hf_longattn.tokenization.document_token_ids`).
        id_column (`str`, defaults to `"id"`): document ids for the real windows' ids, if present.
        batch_size (`int`, defaults to `4`): windows per ``map`` batch (progress granularity).
        **scorer_kwargs: passed to ``LongAttnScorer`` (``min_distance``, ``dtype``, ``device``, …).

    Returns:
        `ProbeReport`.

    Example:

    >>> report = probe("smollm2", "docs/", window_size=4096, layers="0,9,18,29", num_windows=16)  # doctest: +SKIP
    >>> print(report.to_markdown("wide")); report.plot("probe.png"); print(report.verdict)  # doctest: +SKIP
    """
    from ..model_loading import load_config, resolve_model, resolve_source
    from ..scorer import LongAttnScorer

    started = time.perf_counter()
    if {"layer", "text_column", "input_ids_column"} & set(scorer_kwargs):
        raise TypeError(f"probe() sets layer, text_column and input_ids_column itself; got {sorted(scorer_kwargs)}")
    documents = load_documents(data, text_column)
    columns = documents.column_names
    if by is not None and by not in columns:
        raise ValueError(f"group column by={by!r} not in the data; current columns: {columns} (or pass by=None)")
    if V.INPUT_IDS not in columns and text_column not in columns:
        raise ValueError(f"the data needs a {text_column!r} (text) or 'input_ids' column; current columns: {columns}")
    model = resolve_model(model)
    model_config = load_config(resolve_source(model, scorer_kwargs.get("revision")),
                               trust_remote_code=scorer_kwargs.get("trust_remote_code", False))
    layer_list = parse_layers(layers, int(model_config.num_hidden_layers))
    scorer = LongAttnScorer(model, layer=layer_list, **scorer_kwargs)
    if window_size > scorer.max_length:
        raise ValueError(f"window_size {window_size} exceeds the scorer's max_length {scorer.max_length}")
    groups, doc_ids, token_lists = _documents_as_tokens(documents, scorer, tokenizer, by, id_column, text_column)
    tokenized = time.perf_counter()
    samples, counts = probe_samples([len(t) for t in token_lists], groups, window_size=window_size,
                                    num_windows=num_windows, chunk_size=chunk_size, seed=seed, doc_ids=doc_ids)
    logger.info("hf_longattn.probe: samples per group: %s", counts)
    sampled = time.perf_counter()
    scores = _score_samples(scorer, samples, token_lists, doc_ids, batch_size, len(layer_list))
    for group in counts:
        counts[group]["not_scored"] = sum(1 for s in scores if s["group"] == group and s["status"] != V.OK)
    finished = time.perf_counter()

    rows = layer_rows(scores, layer_list, sorted(counts), alpha, keep_fraction)
    verdict, best_layer = verdict_of(rows)
    config = {
        "model": str(model), "window_size": window_size, "layers": layer_list, "by": by, "num_windows": num_windows,
        "chunk_size": chunk_size, "seed": seed, "keep_fraction": keep_fraction, "alpha": alpha,
        "min_distance": scorer.config["min_distance"][0], "scorer": {k: v for k, v in scorer.config.items() if k != "checkpoint"},
    }
    moments = (started, tokenized, sampled, finished, time.perf_counter())
    timings = {name: round(b - a, 3) for name, a, b in zip(("tokenize_s", "sample_s", "score_s"), moments, moments[1:])}
    timings.update(total_s=round(moments[-1] - started, 3), windows_scored=len(samples),
                   tokens_scored=int(sum(s.num_tokens for s in samples)))
    return ProbeReport(rows, verdict, best_layer, config, counts, timings, scores)


def _documents_as_tokens(documents: Any, scorer: Any, tokenizer: Any, by: str | None, id_column: str,
                         text_column: str) -> tuple[list[str], list[str], list[np.ndarray]]:
    """Groups, document ids and token ids of every document (the pipeline's tokenisation)."""
    from ..tokenization import document_token_ids

    if by is None:
        groups = [ALL_GROUPS] * len(documents)
    else:
        groups = list(documents[by])
        if any(g is None for g in groups):
            raise ValueError(f"column {by!r} has null values; fill them (e.g. with 'unknown') or pass by=None")
        groups = [str(g) for g in groups]
    columns = documents.column_names
    doc_ids = [str(i) for i in documents[id_column]] if id_column in columns else [f"doc{i}" for i in range(len(documents))]
    pretokenised = V.INPUT_IDS in columns and documents.data.column(V.INPUT_IDS).null_count == 0
    if pretokenised:
        tokenizer = None  # never needed: every document has its token ids
    elif tokenizer is None:
        tokenizer = scorer.tokenizer
    elif isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    wanted = [c for c in (text_column, V.INPUT_IDS) if c in columns]
    token_lists: list[np.ndarray] = []
    documents = documents.select_columns(wanted)
    for start in range(0, len(documents), 16):
        batch = documents[start : start + 16]
        batch.setdefault(text_column, [""] * len(batch[wanted[0]]))
        token_lists += document_token_ids(tokenizer, batch, text_column)
    return groups, doc_ids, token_lists


def _score_samples(scorer: Any, samples: list, token_lists: list[np.ndarray], doc_ids: list[str], batch_size: int,
                   num_layers: int) -> list[dict[str, Any]]:
    """Score every sample over all layers in one pass; one dict per sample with its per-layer DS_T / DU_T."""
    from datasets import Dataset

    windows = Dataset.from_dict({
        V.ID: [s.id for s in samples], "group": [s.group for s in samples], "kind": [s.kind for s in samples],
        V.INPUT_IDS: [s.token_ids(token_lists) for s in samples],
    })
    scored = windows.map(scorer, batched=True, batch_size=batch_size, keep_in_memory=True,
                         features=scorer.features(windows.features),
                         desc=f"probe: scoring {len(windows)} windows × {num_layers} layers")
    table = scored.remove_columns(V.INPUT_IDS).to_dict()
    if num_layers > 1:
        ds_by_layer, du_by_layer = table[V.DS_BY_LAYER], table[V.DU_BY_LAYER]
    else:
        ds_by_layer, du_by_layer = [[v] for v in table[V.DS]], [[v] for v in table[V.DU]]
    scores = []
    for i, sample in enumerate(samples):
        ok = table[V.STATUS][i] == V.OK
        scores.append({
            "id": sample.id, "group": sample.group, "kind": sample.kind,
            "sources": [[doc_ids[d], start, end] for d, start, end in sample.sources],
            "status": table[V.STATUS][i],
            "ds_by_layer": list(ds_by_layer[i]) if ok else [None] * num_layers,
            "du_by_layer": list(du_by_layer[i]) if ok else [None] * num_layers,
        })
    return scores


def probe_run_config(config: Any, documents: Any, *, by: str | None = "category", device: str | None = None) -> ProbeReport:
    """The probe of a run configuration (`hf_longattn.config.RunConfig`): its model, W, layers and settings over ``documents``.

    The scorer's limit is the run's: ``context_length`` when set, else the model's context. The
    caller checks the model first (`hf_longattn.model_checks.check_window_fits`), as a run does.

    Example:

    >>> report = probe_run_config(RunConfig.demo(probe_layers="0,9"), read_sources(RunConfig.demo().sources))  # doctest: +SKIP
    """
    return probe(
        config.model, documents, window_size=config.window_size, layers=config.probe_layers, by=by,
        num_windows=config.probe_num_windows, chunk_size=config.probe_chunk_size, seed=config.seed,
        keep_fraction=config.keep_fraction, alpha=config.alpha, tokenizer=config.tokenizer,
        min_distance=config.min_distance, dtype=config.dtype, device=device, revision=config.revision,
        max_length=config.context_length,
    )

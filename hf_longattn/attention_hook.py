"""Capture the LongAttn statistics of chosen layers through transformers' attention-function registry.

The model is loaded with ``attn_implementation="hf_longattn"``. Every decoder layer then calls
:func:`longattn_attention` with its own query/key states — after RoPE and q/k norms, before GQA
repetition — exactly as it would call SDPA. For the layers being scored the function computes the
far-region sums (:mod:`hf_longattn.attention_stats`) from those states; the deepest scored layer
then stops the forward (no ``o_proj``, MLP, later layers or ``lm_head``). Layers below it run
SDPA as usual, causal, so their outputs feed the next layer unchanged.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention_stats import FarAttentionSums, far_attention_sums

ATTENTION_NAME = "hf_longattn"
"""The ``attn_implementation`` name under which the capturing attention function is registered."""

SumsFunction = Callable[..., FarAttentionSums]


class StopForward(Exception):
    """Raised by the deepest scored layer to end the forward pass right after its attention scores."""


@dataclass
class AttentionCollector:
    """What one forward pass should measure, and what it measured.

    Attributes:
        layers (`tuple[int, ...]`): decoder layer indices to score.
        min_distances (`tuple[int, ...]`): far-region thresholds k, in tokens.
        sums_function: computes `FarAttentionSums` from ``(query, key, min_distances, scaling)``.
        results (`dict[int, FarAttentionSums]`): filled per layer during the forward.
    """

    layers: tuple[int, ...]
    min_distances: tuple[int, ...]
    sums_function: SumsFunction = far_attention_sums
    sums_kwargs: dict = field(default_factory=dict)
    results: dict[int, FarAttentionSums] = field(default_factory=dict)


_ACTIVE: contextvars.ContextVar[AttentionCollector | None] = contextvars.ContextVar("hf_longattn_collector", default=None)


def longattn_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention function registered as ``hf_longattn``: records statistics, otherwise behaves as SDPA.

    ``query`` is ``(B, H, L, d)`` and ``key`` ``(B, H_kv, L, d)``, both after RoPE.
    """
    collector = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if collector is not None and layer in collector.layers:
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        collector.results[layer] = collector.sums_function(
            query, key, collector.min_distances, float(scaling), **collector.sums_kwargs
        )
        if layer == max(collector.layers):
            raise StopForward
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def register_attention() -> None:
    """Register :func:`longattn_attention` (and the SDPA mask builder) under ``ATTENTION_NAME``; idempotent."""
    AttentionInterface.register(ATTENTION_NAME, longattn_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@contextmanager
def collecting(collector: AttentionCollector) -> Iterator[AttentionCollector]:
    """Make ``collector`` the active one for forwards run inside the ``with`` block (per thread/task)."""
    token = _ACTIVE.set(collector)
    try:
        yield collector
    finally:
        _ACTIVE.reset(token)


@torch.inference_mode()
def layer_attention_sums(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    layers: Sequence[int],
    min_distances: Sequence[int],
    sums_function: SumsFunction = far_attention_sums,
    **sums_kwargs,
) -> dict[int, FarAttentionSums]:
    """Run ``model`` on ``input_ids`` ``(B, L)`` (no padding) and return far-region sums per scored layer.

    The model must have been built with ``attn_implementation=ATTENTION_NAME``.
    """
    if model.config._attn_implementation != ATTENTION_NAME:
        raise ValueError(
            f"the model uses attn_implementation={model.config._attn_implementation!r}; "
            f"load it with attn_implementation={ATTENTION_NAME!r} (see hf_longattn.model_loading)"
        )
    collector = AttentionCollector(tuple(layers), tuple(int(k) for k in min_distances), sums_function, sums_kwargs)
    with collecting(collector):
        try:
            model(input_ids=input_ids, use_cache=False)
        except StopForward:
            pass
    missing = sorted(set(collector.layers) - set(collector.results))
    if missing:
        raise RuntimeError(
            f"layers {missing} never called the attention registry; this architecture does not route its "
            f"attention through transformers' AttentionInterface, or has fewer layers"
        )
    return collector.results

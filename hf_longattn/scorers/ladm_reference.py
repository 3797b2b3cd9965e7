"""A plain float64 port of LADM's CDS block (full span×prefix attention matrices) — a reference for tests and benchmarks.

The official code is ``modeling_llama2.py`` of https://github.com/ZNLP/LADM (commit 853d7c1),
``LlamaFlashAttention2.forward``, the block marked ``# start jhchen`` (lines 534–570), with the
settings of ``score.py`` (``interval = attn_chunk_size·d_afs``, ``stride = attn_chunk_size·d_cds``,
``keep_at_start = attn_chunk_size``, line 361–365 of the model file) and the mean over all layers
of ``score.py`` (``all_attn.mean(dim=0)``). :func:`official_block` follows it statement by
statement; the only changes are float64 everywhere (the official softmax is float32, then cast to
the model's float16 before the sums) and a ``scaling`` argument (``1/sqrt(head_dim)`` there).

:func:`cds_from_attention_map` computes the same numbers from the model's causal attention map
(``output_attentions=True``): a span's softmax over the keys before the span is the causal row
restricted to those keys and renormalised, so it needs no query/key states at all.
"""

from __future__ import annotations

import math
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

ABLATIONS = ("none", "no_std", "no_len_weight")
"""The official ``--ablation`` values (``'No'`` there is ``"none"`` here)."""


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(B, H_kv, L, d)`` → ``(B, H_kv·n_rep, L, d)``, query head ``h`` reading key head ``h // n_rep`` (transformers')."""
    batch, kv_heads, length, dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    expanded = hidden_states[:, :, None, :, :].expand(batch, kv_heads, n_rep, length, dim)
    return expanded.reshape(batch, kv_heads * n_rep, length, dim)


def _cds_loop(part_weights: Callable[[int, int], torch.Tensor], q_len: int, chunk_size: int, d_cds: int, d_afs: int,
              ablation: str) -> torch.Tensor:
    """Lines 538–569: ``part_weights(start, end)`` gives line 545's ``(B, start)`` weights of a span."""
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    stride, interval, keep_at_start = chunk_size * d_cds, chunk_size * d_afs, chunk_size
    all_afs = []
    for start_idx in range(q_len - chunk_size, keep_at_start + 4 * interval, -stride):
        end_idx = min(start_idx + chunk_size, q_len)
        context_len_ratio = start_idx / q_len
        part_attn_weights = part_weights(start_idx, end_idx)  # bs, start_idx
        all_pfs = []
        intervals = []
        for distance in range(interval, q_len + interval, interval):
            if start_idx - distance < keep_at_start:
                break
            pfs = part_attn_weights[:, start_idx - distance : end_idx - distance].sum(dim=-1)
            all_pfs.append(pfs)
            intervals.append(distance)
        all_pfs = torch.stack(all_pfs, dim=-1)  # bs, interval_num
        all_pfs_std = all_pfs.std(dim=1)  # bs; torch's default: the sample (n − 1) std
        if ablation != "no_len_weight":
            all_pfs = all_pfs * (torch.tensor(intervals, dtype=all_pfs.dtype, device=all_pfs.device) / q_len)
        afs = all_pfs.sum(dim=1)  # bs
        if ablation != "no_std":
            afs = afs * all_pfs_std
        if ablation != "no_len_weight":
            afs = afs * context_len_ratio
        all_afs.append(afs)
    if not all_afs:  # the official code fails here (torch.stack of an empty list)
        raise ValueError(f"no span: {q_len} tokens ≤ 2·{chunk_size} + 4·{interval}")
    return torch.stack(all_afs, dim=1).mean(dim=1)  # bs


def official_block(query_states: torch.Tensor, key_states: torch.Tensor, *, scaling: float | None = None,
                   chunk_size: int = 128, d_cds: int = 4, d_afs: int = 4, ablation: str = "none",
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """CDS of one layer, ``(B,)``, from post-RoPE states ``(B, H, L, d)`` and ``(B, H_kv, L, d)``; full matrices.

    Example:
        >>> q, k = torch.randn(1, 4, 200, 8), torch.randn(1, 2, 200, 8)
        >>> official_block(q, k, chunk_size=8, d_cds=2, d_afs=2).shape
        torch.Size([1])
    """
    q_len, head_dim = query_states.shape[2], query_states.shape[3]
    scaling = head_dim**-0.5 if scaling is None else scaling
    query_states = query_states.to(dtype)
    key_states = repeat_kv(key_states.to(dtype), query_states.shape[1] // key_states.shape[1])

    def part_weights(start_idx: int, end_idx: int) -> torch.Tensor:
        scores = torch.matmul(query_states[:, :, start_idx:end_idx, :], key_states[:, :, :start_idx, :].transpose(2, 3))
        weights = torch.softmax(scores * scaling, dim=-1)  # bs, num_heads, chunk_size, start_idx
        return weights.sum(dim=2).mean(dim=1)  # bs, start_idx

    return _cds_loop(part_weights, q_len, chunk_size, d_cds, d_afs, ablation)


def cds_from_attention_map(attention: torch.Tensor, *, chunk_size: int = 128, d_cds: int = 4, d_afs: int = 4,
                           ablation: str = "none") -> torch.Tensor:
    """CDS of one layer, ``(B,)``, from its causal attention map ``(B, H, L, L)`` (rows renormalised to the prefix).

    Example:
        >>> scores = torch.randn(1, 2, 200, 200).masked_fill(torch.ones(200, 200, dtype=torch.bool).triu(1), -torch.inf)
        >>> cds_from_attention_map(scores.softmax(-1), chunk_size=8, d_cds=2, d_afs=2).shape
        torch.Size([1])
    """
    attention = attention.to(torch.float64)

    def part_weights(start_idx: int, end_idx: int) -> torch.Tensor:
        rows = attention[:, :, start_idx:end_idx, :start_idx]  # bs, num_heads, chunk_size, start_idx
        weights = rows / rows.sum(dim=-1, keepdim=True)
        return weights.sum(dim=2).mean(dim=1)

    return _cds_loop(part_weights, attention.shape[-1], chunk_size, d_cds, d_afs, ablation)


def official_source(location: str | Path) -> str | None:
    """Text of the official ``modeling_llama2.py`` from a LADM checkout or bare git folder; ``None`` if absent."""
    location = Path(location)
    if (location / "modeling_llama2.py").is_file():
        return (location / "modeling_llama2.py").read_text()
    if location.is_dir():
        shown = subprocess.run(["git", f"--git-dir={location}", "show", "HEAD:modeling_llama2.py"],
                               capture_output=True, text=True, check=False)
        return shown.stdout if shown.returncode == 0 else None
    return None


def run_official_block(source: str, query_states: torch.Tensor, key_states: torch.Tensor, *, chunk_size: int = 128,
                       d_cds: int = 4, d_afs: int = 4, ablation: str = "none", float64: bool = False) -> torch.Tensor:
    """Run the official block verbatim (the ``# start jhchen`` … ``# end jhchen`` lines around ``all_afs``).

    ``source`` is the text :func:`official_source` returns. The states are used in their own dtype, as
    the official code does (softmax in float32, then cast back to that dtype; distances/L in torch's
    default dtype); ``float64=True`` runs the same statements with a float64 softmax and default dtype.
    """
    lines = source.splitlines()
    middle = next(i for i, line in enumerate(lines) if line.strip() == "all_afs = []")
    first = max(i for i in range(middle) if lines[i].strip() == "# start jhchen")
    last = next(i for i in range(middle, len(lines)) if lines[i].strip() == "# end jhchen")
    block = textwrap.dedent("\n".join(lines[first : last + 1]))
    heads, kv_heads = query_states.shape[1], key_states.shape[1]
    settings = SimpleNamespace(chunk_size=chunk_size, stride=chunk_size * d_cds, keep_at_start=chunk_size,
                               interval=chunk_size * d_afs, ablation="No" if ablation == "none" else ablation,
                               num_key_value_groups=heads // kv_heads, head_dim=query_states.shape[-1])
    nn = torch.nn
    if float64:  # the same `nn.functional.softmax(x, dim=-1, dtype=torch.float32)` call, kept in float64
        nn = SimpleNamespace(functional=SimpleNamespace(softmax=lambda x, dim, dtype: torch.softmax(x, dim, dtype=x.dtype)))
    namespace = {"self": settings, "query_states": query_states, "key_states": key_states, "value_states": key_states,
                 "q_len": query_states.shape[2], "torch": torch, "nn": nn, "math": math, "repeat_kv": repeat_kv}
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if float64 else default_dtype)
    try:
        exec(compile(block, "modeling_llama2.py (LADM, official block)", "exec"), namespace)  # noqa: S102
    finally:
        torch.set_default_dtype(default_dtype)
    return namespace["cds"]


CAPTURE_NAME = "ladm_reference_capture"


@torch.no_grad()
def capture_query_key(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{layer: (query, key, scaling)}`` of every decoder layer of a full forward of ``model``.

    Independent of `hf_longattn.attention_hook`: the states are recorded by an attention function of
    its own, which then runs transformers' SDPA attention in the states' own dtype (its eager attention
    would take the softmax in float32, even for a float64 model), so every layer sees its usual input.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    captured: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def record(module, query, key, value, attention_mask, scaling=None, **kwargs):
        scaling = module.scaling if scaling is None else scaling
        captured[module.layer_idx] = (query.clone(), key.clone(), float(scaling))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register(CAPTURE_NAME, record)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_NAME)
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return captured

"""LADM's contextual dependency score (arXiv 2503.02502) of one layer from its query/key states: exact span sums, O(L) memory, pure torch.

For a window of L tokens and one layer, with ``I = span·d_afs`` (the PFS spacing) and
``stride = span·d_cds`` (the span spacing) — official code: https://github.com/ZNLP/LADM,
``modeling_llama2.py`` lines 534–570 (commit 853d7c1), ported in :mod:`.ladm_reference`:

* query spans ``[t, t + span)`` for ``t = L − span, L − span − stride, …`` while ``t > span + 4·I``
  (line 539; the last span ends at L, whatever L mod span);
* each span query's softmax runs over the keys ``[0, t)`` only — not its causal row (line 542–544);
* ``A_t(i)`` = Σ over the span's queries of those weights, mean over query heads (line 545; a GQA
  head reads key head ``h // (H / H_kv)``);
* ``PFS_t(j) = Σ_{i ∈ [t − j·I, t − j·I + span)} A_t(i)`` for ``j = 1 … J_t``, ``J_t = ⌊(t − span)/I⌋``:
  the first ``span`` keys are never sampled (lines 549–555);
* ``AFS_t = Σ_j PFS_t(j)·(j·I/L) · std_j(PFS_t) · (t/L)``, std the sample (n − 1) one (lines 557–565;
  ablation ``"no_std"`` drops the std, ``"no_len_weight"`` both length weights);
* ``CDS`` = mean over spans of AFS_t (line 569), then the mean over the scored layers (``score.py``).

Only the sampled blocks' sums are kept: per span, its ``H·span`` query rows go in blocks of rows,
each against all ``t`` keys, so the largest temporary is one ``(H_kv, rows, t)`` float32 block
(``block_bytes``); never an L×L matrix. Exp sums are float32, per-row masses float64.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..attention_stats import DEFAULT_BLOCK_BYTES
from .ladm_reference import ABLATIONS

logger = logging.getLogger(__name__)

SCORER_NAME = "ladm_cds_v1"
SPAN, D_CDS, D_AFS = 128, 4, 4
"""Official defaults: ``attn_chunk_size`` 128, ``d_cds`` 4, ``d_afs`` 4 (``score.py``, ``launch.sh``)."""
MIN_DISTANCES = 4
"""A span needs more than 4 sampled distances (``keep_at_start + 4·interval``, line 539): at least 4."""


def check_settings(span: int, d_cds: int, d_afs: int, ablation: str) -> None:
    """Raise a `ValueError` naming the first bad LADM setting (validation at the door)."""
    for name, value in (("span", span), ("d_cds", d_cds), ("d_afs", d_afs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {list(ABLATIONS)} (the official 'No' is 'none'), got {ablation!r}")


def span_starts(length: int, span: int = SPAN, d_cds: int = D_CDS, d_afs: int = D_AFS) -> list[int]:
    """Start of every query span of a window of ``length`` tokens, the last span first (official order).

    Args:
        length (`int`): L, tokens in the window.
        span (`int`, defaults to `128`): tokens per query span (official ``attn_chunk_size``).
        d_cds (`int`, defaults to `4`): spans start every ``span·d_cds`` tokens, backwards from ``L − span``.
        d_afs (`int`, defaults to `4`): PFS distances are multiples of ``span·d_afs``.

    Example:

    >>> span_starts(3000), span_starts(2304)
    ([2872, 2360], [])
    """
    return list(range(length - span, span + MIN_DISTANCES * span * d_afs, -span * d_cds))


def min_num_tokens(span: int = SPAN, d_afs: int = D_AFS) -> int:
    """The shortest window that has a span: ``2·span + 4·span·d_afs + 1`` tokens (2305 by default).

    Example:

    >>> min_num_tokens(), min_num_tokens(16, 1)
    (2305, 97)
    """
    return 2 * span + MIN_DISTANCES * span * d_afs + 1


@dataclass(frozen=True)
class SpanSums:
    """The PFS of every span of a batch of windows, for one layer.

    Attributes:
        pfs (`tuple[torch.Tensor, ...]`): per span, float64 ``(B, J_t)``: ``pfs[s][b, j − 1]`` = PFS at
            distance ``j·span·d_afs``.
        starts (`tuple[int, ...]`): the spans' starts t, as :func:`span_starts` lists them.
        length (`int`): L.
        span (`int`), d_afs (`int`): the settings the sums were taken with.
    """

    pfs: tuple[torch.Tensor, ...]
    starts: tuple[int, ...]
    length: int
    span: int
    d_afs: int


def span_sums(query: torch.Tensor, key: torch.Tensor, scaling: float, *, span: int = SPAN, d_cds: int = D_CDS,
              d_afs: int = D_AFS, block_bytes: int = DEFAULT_BLOCK_BYTES, fused: bool | None = None) -> SpanSums:
    """PFS of every span (LADM lines 539–555), blockwise: never more than ``block_bytes`` of scores at once.

    Args:
        query (`torch.Tensor`, ``(B, H, L, d)``): query states after RoPE (and q-norm).
        key (`torch.Tensor`, ``(B, H_kv, L, d)``): key states after RoPE, not repeated for GQA.
        scaling (`float`): logit scale (``1/sqrt(d)`` in LADM's LLaMA code).
        span (`int`, defaults to `128`), d_cds (`int`, defaults to `4`), d_afs (`int`, defaults to `4`):
            see :func:`span_starts`.
        block_bytes (`int`, defaults to 4 MiB): budget of one block of scores.
        fused (`bool`, *optional*): use the compiled CPU row kernel (``hf_longattn/csrc``) for float32
            CPU scores; ``None`` uses it when it is available (``HF_LONGATTN_FUSED`` not ``0``).

    Returns:
        `SpanSums` (float64).

    Example:

    >>> q, k = torch.randn(1, 4, 200, 8), torch.randn(1, 2, 200, 8)
    >>> sums = span_sums(q, k, 8 ** -0.5, span=8, d_cds=2, d_afs=2)
    >>> sums.starts, [tuple(p.shape) for p in sums.pfs]
    ((192, 176, 160, 144, 128, 112, 96, 80), [(1, 11), (1, 10), (1, 9), (1, 8), (1, 7), (1, 6), (1, 5), (1, 4)])
    """
    check_settings(span, d_cds, d_afs, "none")
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if key.shape != (batch, kv_heads, length, dim) or heads % kv_heads:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} do not form a (GQA) attention pair")
    starts = span_starts(length, span, d_cds, d_afs)
    compute = torch.promote_types(query.dtype, torch.float32)  # float32 scores, float64 if given float64
    row_sums = _row_kernel(fused, query.device, compute)
    groups = heads // kv_heads
    queries = query.view(batch, kv_heads, groups, length, dim)  # (B, H_kv, G, L, d); head h = kv·G + g
    keys = key.to(compute)  # (B, H_kv, L, d)
    pfs = []
    for start in starts:
        per_window = []
        for b in range(batch):  # one window at a time: its sums never depend on its batch
            # Only the span's queries are scaled (a copy of q would be the largest tensor): (H_kv, G·span, d).
            rows = (queries[b, :, :, start : start + span].to(compute) * scaling).reshape(kv_heads, groups * span, dim)
            masses = _span_masses(rows, keys[b, :, :start], span, span * d_afs, block_bytes, row_sums)
            per_window.append(masses / heads)  # Σ over the span's queries, mean over the H heads
        pfs.append(torch.stack(per_window))  # (B, J_t)
    return SpanSums(tuple(pfs), tuple(starts), length, span, d_afs)


def _row_kernel(fused: bool | None, device: torch.device, compute: torch.dtype):
    """The compiled row kernel when asked for (or allowed) and usable here, else ``None`` (eager)."""
    if fused is False or device.type != "cpu" or compute != torch.float32:
        if fused:
            raise RuntimeError("fused=True needs float32 CPU tensors")
        return None
    from .. import kernels

    kernel = kernels.cpu_row_sums()
    if fused and kernel is None:
        raise RuntimeError("fused=True needs the compiled CPU kernel: a C++ compiler and ninja")
    return kernel


def _span_masses(rows: torch.Tensor, keys: torch.Tensor, span: int, interval: int, block_bytes: int,
                 row_sums) -> torch.Tensor:
    """Float64 ``(J,)``: Σ over ``rows`` ``(H_kv, R, d)`` of the softmax mass on key block j = 1 … J.

    Block j is keys ``[t − j·I, t − j·I + span)`` of ``keys`` ``(H_kv, t, d)``; each row's softmax runs over all t keys.
    """
    kv_heads, num_rows, _ = rows.shape
    start = keys.shape[1]
    blocks = (start - span) // interval  # J: blocks never reach the first `span` keys (line 550)
    per_block = max(1, min(num_rows, block_bytes // (rows.element_size() * kv_heads * start)))
    total = torch.zeros(blocks, dtype=torch.float64, device=rows.device)
    for first in range(0, num_rows, per_block):
        scores = torch.matmul(rows[:, first : first + per_block], keys.transpose(-1, -2))  # (H_kv, R_b, t)
        if row_sums is not None:
            masses = _kernel_masses(row_sums, scores, span, interval, blocks)
        else:
            masses = _eager_masses(scores, span, interval, blocks)
        total += masses.sum((0, 1))
    return total


def _eager_masses(scores: torch.Tensor, span: int, interval: int, blocks: int) -> torch.Tensor:
    """``(H_kv, R, J)`` float64 per-row softmax mass on blocks j = 1 … J (``scores`` is overwritten)."""
    start = scores.shape[-1]
    scores -= scores.amax(-1, keepdim=True)
    weights = scores.exp_()  # unnormalised probabilities
    norm = weights.sum(-1, dtype=torch.float64)  # (H_kv, R)
    # Keys [t − J·I, t) as J rows of I keys: block j = J − c is the first `span` keys of row c.
    sampled = weights[..., start - blocks * interval :].unflatten(-1, (blocks, interval))[..., :span]
    block_sums = sampled.sum(-1, dtype=torch.float64).flip(-1)  # (H_kv, R, J), j = 1 … J
    return block_sums / norm[..., None]


def _kernel_masses(row_sums, scores: torch.Tensor, span: int, interval: int, blocks: int) -> torch.Tensor:
    """``(H_kv, R, J)`` float64 per-row block masses as differences of the C++ kernel's prefix masses.

    With every row placed at position ``t − 1`` (all t keys visible), threshold k gives the mass of keys
    ``[0, t − 1 − k]``: block j is ``prefix(j·I − span) − prefix(j·I)``; ``prefix(0)`` is the whole row, 1.
    """
    kv_heads, num_rows, start = scores.shape
    ends = interval * torch.arange(1, blocks + 1, device=scores.device)  # j·I
    thresholds = torch.cat([ends - span, ends]).unique()  # sorted, positive except j·I − span = 0
    positive = thresholds[thresholds > 0]
    positions = torch.full((num_rows,), start - 1, dtype=torch.long, device=scores.device)
    mass, _ = row_sums(scores, positions, positive)  # (H_kv, T⁺, R): Σ_{i ≤ t−1−k} p_i
    if len(positive) < len(thresholds):  # k = 0 (d_afs = 1): the whole row
        mass = torch.cat([mass.new_ones(kv_heads, 1, num_rows), mass], dim=1)
    prefix = mass.transpose(1, 2)  # (H_kv, R, T)
    column = {int(k): c for c, k in enumerate(thresholds.tolist())}
    upper = prefix[..., [column[int(k)] for k in (ends - span).tolist()]]
    lower = prefix[..., [column[int(k)] for k in ends.tolist()]]
    return upper - lower


def span_afs(pfs: torch.Tensor, start: int, length: int, interval: int, ablation: str = "none") -> torch.Tensor:
    """AFS of one span from its PFS ``(B, J)``: Σ_j PFS_j·(j·I/L) · std(PFS) · (t/L) (LADM lines 557–565).

    Args:
        pfs (`torch.Tensor`, ``(B, J)``): PFS at distances ``I, 2I, …, J·I``.
        start (`int`): the span's start t.
        length (`int`): L.
        interval (`int`): I = ``span·d_afs``.
        ablation (`str`, defaults to `"none"`): ``"no_std"`` drops the std factor, ``"no_len_weight"``
            the distance and position weights.

    Example:

    >>> span_afs(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), start=1000, length=2000, interval=100)
    tensor([0.6455], dtype=torch.float64)
    """
    pfs = pfs.to(torch.float64)
    distances = interval * torch.arange(1, pfs.shape[-1] + 1, dtype=torch.float64, device=pfs.device)
    std = pfs.std(dim=-1)  # the sample (n − 1) std, as torch's default in the official code
    weighted = pfs if ablation == "no_len_weight" else pfs * (distances / length)
    afs = weighted.sum(-1)
    if ablation != "no_std":
        afs = afs * std
    if ablation != "no_len_weight":
        afs = afs * (start / length)
    return afs


def cds_from_sums(sums: SpanSums, ablation: str = "none") -> torch.Tensor:
    """CDS of one layer, float64 ``(B,)``: the mean over spans of :func:`span_afs` (LADM line 569).

    Example:

    >>> q, k = torch.randn(2, 4, 200, 8), torch.randn(2, 2, 200, 8)
    >>> cds_from_sums(span_sums(q, k, 8 ** -0.5, span=8, d_cds=2, d_afs=2)).shape
    torch.Size([2])
    """
    if not sums.starts:
        raise ValueError(f"no span in {sums.length} tokens: LADM needs {min_num_tokens(sums.span, sums.d_afs)}")
    interval = sums.span * sums.d_afs
    afs = [span_afs(pfs, start, sums.length, interval, ablation) for pfs, start in zip(sums.pfs, sums.starts)]
    return torch.stack(afs, dim=1).mean(dim=1)


def ladm_cds(query: torch.Tensor, key: torch.Tensor, scaling: float, *, span: int = SPAN, d_cds: int = D_CDS,
             d_afs: int = D_AFS, ablation: str = "none", **options) -> torch.Tensor:
    """CDS of one layer from its query/key states, float64 ``(B,)``: :func:`span_sums` then :func:`cds_from_sums`.

    Example:

    >>> q, k = torch.randn(1, 4, 200, 8), torch.randn(1, 2, 200, 8)
    >>> ladm_cds(q, k, 8 ** -0.5, span=8, d_cds=2, d_afs=2).shape
    torch.Size([1])
    """
    check_settings(span, d_cds, d_afs, ablation)
    return cds_from_sums(span_sums(query, key, scaling, span=span, d_cds=d_cds, d_afs=d_afs, **options), ablation)


def layer_statistic(query: torch.Tensor, key: torch.Tensor, _min_distances: Sequence[int], scaling: float,
                    **settings) -> SpanSums:
    """:func:`span_sums` with the signature `hf_longattn.attention_hook` calls (its thresholds unused)."""
    return span_sums(query, key, scaling, **settings)

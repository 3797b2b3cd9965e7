"""ProLong (arXiv 2405.17915, ``prolong_v1``): a window's long-dependency score LDS from segment perplexities, exact and fast.

Terms (official code: GitHub October2001/ProLong, ``prolong/run.py``; line numbers of commit 9cf2f20):

* a window's token ids are cut into N *segments* of ``chunk_size`` (C = 128) tokens; a shorter
  tail is dropped, and with more than ``window_size // C`` segments that many are drawn, in order
  (run.py:62-70). No BOS is added to a segment (run.py:211-214 turns ``add_bos_token`` off).
* ``PPL_i`` — perplexity of segment i alone over its tokens 1..C−1 (its first token is never
  predicted; run.py:92-104); ``PPL_i|j`` — the same C−1 tokens after segment j, i.e. on the
  sequence ``seg_j + seg_i`` with segment j and segment i's first token masked (run.py:119-121).
* pairs (i, j), j < i: all of them, or ``sample_size`` drawn at random (run.py:111-115).
* ΔPPL_ij = (PPL_i − PPL_i|j) / PPL_i; DE_i = 1 − H(softmax_j(PPL_i − PPL_i|j)) / log n_i over the
  n_i pairs of row i (1 when n_i = 1; the *raw* difference is the softmax's logit, run.py:128-161);
  gain_ij = clip((i − j) / (window_size // C − 1), 0, 1) (run.py:151, 167: the configured maximum,
  not the window's own N); LDS = Σ_{ΔPPL_ij > threshold} (ΔPPL_ij + gain_ij) · DE_i (run.py:163-168).

Fixed here, documented beside the official behaviour (`prolong_reference` ports run.py with the same fixes):

* run.py:113-114 returns an all-inf matrix when a window has fewer pairs than ``sample_size``, so
  every window under 33 segments (≈ 4.2 K tokens at C = 128) scores 0; here all its pairs are used.
* run.py:115 draws pairs from the process-wide ``random`` state, so a window's score depends on the
  windows before it; here each window's draws use ``random.Random(window_seed(ids, seed))``,
  seeded by the window's content hash (`hf_longattn.windows.window_hash`).
* run.py:82-88 computes the losses, their mean and its ``exp`` in the model's dtype (float16 in
  the script); here the losses, their mean and the ``exp`` are float64 whatever the model's dtype
  (the max-shifted exponentials of the log-sum-exp in float32 for a float32 or 16-bit model, summed
  in float64; the max and the target logit exact: ~1e-7 from a float64 log-softmax per token).
* run.py:170-171 turns a NaN LDS into 0; here a non-finite perplexity or LDS is reported
  (`ProLongScorer`: status ``non_finite``), never written as a score.

Fast: the forward of segment j alone gives PPL_j *and* the keys/values of the prefix of every pair
(i, j) (same tokens, same positions 0..C−1), so a pair costs one forward of segment i's first C−1
tokens through the KV cache (positions C..2C−2), against a 2C-token forward in run.py; the pairs
are batched (in even batches), and only the segments that occur in a pair are run. The output head
runs only on the positions whose loss is needed (C−1 of a segment's C), a block of tokens at a time
into one reused buffer, fused with the log-sum-exp: the ``(B, T, V)`` logits (800 MB at 4096 tokens
and a 49K vocabulary) are never materialised. The model work per window is N·C + P·(C−1) tokens
against run.py's N·C + P·2C, so an exact method on the same forward gains at most that ratio (< 2
unless P > N·C/2) plus run.py's own overheads (its float32 log-softmax over every position).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import random
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..windows import window_hash


@dataclass(frozen=True)
class ProLongSettings:
    """What ProLong computes; every field is a keyword of `ProLongScorer` with the same default.

    Args:
        chunk_size (`int`, defaults to `128`): tokens per segment (run.py ``--chunk_size``).
        sample_size (`int`, *optional*, defaults to `500`): pairs drawn per window; ``None``, or a
            window with at most this many pairs, uses all pairs (run.py ``--sample_size``).
        threshold (`float`, defaults to `0.1`): a pair counts when ΔPPL > threshold (``--dlt_ppl_threshold``).
        window_size (`int`, defaults to `32768`): run.py ``--window_size``; ``window_size // chunk_size``
            is the most segments a window keeps and sets the distance gain's scale.
        seed (`int`, defaults to `11`): mixed with each window's hash to seed its draws (run.py ``--seed``).
        max_batch_tokens (`int`, defaults to `4096`): tokens per forward (``max_batch_tokens // chunk_size``
            segments or pairs); also bounds the cached keys/values to that many segments.
    """

    chunk_size: int = 128
    sample_size: int | None = 500
    threshold: float = 0.1
    window_size: int = 32768
    seed: int = 11
    max_batch_tokens: int = 4096

    def __post_init__(self):
        if not isinstance(self.chunk_size, int) or self.chunk_size < 2:
            raise ValueError(f"chunk_size must be an int ≥ 2 (a segment's first token is never predicted), got {self.chunk_size!r}")
        if self.sample_size is not None and (not isinstance(self.sample_size, int) or self.sample_size < 1):
            raise ValueError(f"sample_size must be a positive int or None (all pairs), got {self.sample_size!r}")
        if self.window_size < 2 * self.chunk_size:
            raise ValueError(f"window_size must hold at least 2 segments of chunk_size={self.chunk_size}, got {self.window_size}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be positive, got {self.max_batch_tokens}")

    @property
    def max_segments(self) -> int:
        """run.py's ``chunk_num``: the most segments of a window, and the distance gain's N."""
        return self.window_size // self.chunk_size


@dataclass(frozen=True)
class WindowPlan:
    """A window's segments ``(N, C)`` and its pairs ``(P, 2)`` as rows (i, j), j < i, sorted by (i, j)."""

    segments: np.ndarray
    pairs: np.ndarray


@dataclass(frozen=True)
class ProLongResult:
    """One window's LDS, its parts, and the perplexities it came from.

    ``single_ppl`` is NaN for a segment in no pair (not computed); ``row_entropy`` is DE_i (0 for a
    row without pairs); ``delta_ppl`` is the mean ΔPPL of the kept pairs (None when none is kept);
    ``dependency_entropy`` the mean DE_i over the rows that have a pair.
    """

    lds: float
    delta_ppl: float | None
    dependency_entropy: float
    num_pairs: int
    num_kept_pairs: int
    num_segments: int
    single_ppl: np.ndarray
    pairs: np.ndarray
    pair_ppl: np.ndarray
    row_entropy: np.ndarray

    @property
    def finite(self) -> bool:
        """Whether every perplexity used and the LDS are finite."""
        used = np.unique(self.pairs)
        return bool(np.isfinite(self.lds) and np.isfinite(self.pair_ppl).all() and np.isfinite(self.single_ppl[used]).all())


def window_seed(token_ids: Sequence[int] | np.ndarray, seed: int = 11) -> int:
    """The seed of a window's random draws: its content hash mixed with ``seed`` (64 bits).

    Example:

    >>> window_seed([1, 2, 3]) == window_seed([1, 2, 3]) != window_seed([1, 2, 3], seed=12)
    True
    """
    digest = hashlib.blake2b(f"{seed}:{window_hash(token_ids)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def num_segments(num_tokens: int, settings: ProLongSettings) -> int:
    """Segments a window of ``num_tokens`` tokens keeps: full segments, at most ``settings.max_segments``."""
    return min(num_tokens // settings.chunk_size, settings.max_segments)


def plan_window(token_ids: Sequence[int] | np.ndarray, settings: ProLongSettings, seed: int) -> WindowPlan:
    """Cut a window into segments and choose its pairs, drawing with ``random.Random(seed)`` as run.py draws.

    The draws are run.py's, in its order: ``sample(range(N), window_size // C)`` (sorted) when
    there are too many segments (run.py:56-70), then ``sample(pairs, sample_size)`` over the pairs
    listed i-major (run.py:111-115) when there are more pairs than ``sample_size``. So with
    ``random.seed(seed)`` before each window, run.py's functions draw the same segments and pairs.

    Example:

    >>> plan = plan_window(list(range(1000)), ProLongSettings(chunk_size=128), seed=0)
    >>> plan.segments.shape, plan.pairs.shape  # 7 segments, all 21 pairs (fewer than sample_size)
    ((7, 128), (21, 2))
    """
    size = settings.chunk_size
    ids = np.asarray(token_ids, dtype=np.int64)
    count = len(ids) // size
    segments = ids[: count * size].reshape(count, size)  # (N, C): the tail shorter than C is dropped
    rng = random.Random(seed)
    if count > settings.max_segments:
        segments = segments[sorted(rng.sample(list(range(count)), settings.max_segments))]
        count = settings.max_segments
    pairs = [(i, j) for i in range(count) for j in range(i)]
    if settings.sample_size is not None and len(pairs) > settings.sample_size:
        pairs = rng.sample(pairs, settings.sample_size)
    return WindowPlan(segments, np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2))


def lds_from_perplexities(single_ppl: np.ndarray, pairs: np.ndarray, pair_ppl: np.ndarray, *,
                          threshold: float = 0.1, max_segments: int = 256) -> ProLongResult:
    """LDS and its parts from the perplexities (run.py:128-172), vectorised over pairs, in float64.

    Args:
        single_ppl (`np.ndarray`): ``(N,)`` PPL_i.
        pairs (`np.ndarray`): ``(P, 2)`` rows (i, j), j < i, sorted by (i, j).
        pair_ppl (`np.ndarray`): ``(P,)`` PPL_i|j of each pair.
        threshold (`float`, defaults to `0.1`): ΔPPL above which a pair counts.
        max_segments (`int`, defaults to `256`): ``window_size // chunk_size``, the gain's N.

    Example:

    >>> r = lds_from_perplexities(np.array([9.0, 10.0, 10.0]), np.array([[1, 0], [2, 0], [2, 1]]),
    ...                           np.array([8.0, 9.5, 7.0]), max_segments=3)
    >>> round(r.lds, 6), r.num_kept_pairs
    (1.190068, 2)
    """
    single_ppl = np.asarray(single_ppl, dtype=np.float64)
    pair_ppl = np.asarray(pair_ppl, dtype=np.float64)
    i, j = pairs[:, 0], pairs[:, 1]
    raw = single_ppl[i] - pair_ppl  # (P,) PPL_i − PPL_i|j: the entropy's logits (run.py:157)
    rows, starts, counts = np.unique(i, return_index=True, return_counts=True)
    row_entropy = np.zeros(len(single_ppl))
    row_entropy[rows] = _dependency_entropy(raw, starts, counts)
    delta = raw / single_ppl[i]  # (P,) ΔPPL_ij (run.py:165)
    kept = delta > threshold
    gain = np.clip((i - j) * (1 / (max_segments - 1)), 0, 1)  # run.py:151, 167
    lds = float(np.sum(((delta + gain) * row_entropy[i])[kept]))
    return ProLongResult(
        lds=lds, delta_ppl=float(delta[kept].mean()) if kept.any() else None,
        dependency_entropy=float(row_entropy[rows].mean()), num_pairs=len(pairs), num_kept_pairs=int(kept.sum()),
        num_segments=len(single_ppl), single_ppl=single_ppl, pairs=pairs, pair_ppl=pair_ppl, row_entropy=row_entropy,
    )


def _dependency_entropy(raw: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """DE of each row (run.py:128-146); a row is the slice ``raw[start : start + count]``."""
    expand = lambda per_row: np.repeat(per_row, counts)  # noqa: E731 - (R,) → (P,)
    exp = np.exp(raw - expand(np.maximum.reduceat(raw, starts)))
    prob = exp / expand(np.add.reduceat(exp, starts))  # (P,) softmax within each row
    underflow = expand(np.minimum.reduceat(prob, starts) == 0)  # run.py:135-137: smooth rows with a 0
    prob = np.where(underflow, prob + 1e-12, prob)
    prob = np.where(underflow, prob / expand(np.add.reduceat(prob, starts)), prob)
    entropy = -np.add.reduceat(prob * np.log(prob), starts)
    with np.errstate(divide="ignore", invalid="ignore"):  # log(1) = 0 for one-pair rows, set to 1 below
        strength = np.clip((np.log(counts) - entropy) / np.log(counts), 0, 1)
    return np.where(counts == 1, 1.0, strength)


# --- the model part: perplexities through the KV cache -------------------------------------------------
def segment_perplexities(model, plan: WindowPlan, max_batch_tokens: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """``(single_ppl (N,), pair_ppl (P,))`` in float64 for one window's plan, with each prefix computed once.

    Segments are run in blocks of ``max_batch_tokens // C``: one forward gives their PPL_j and
    their keys/values, then every pair (i, j) with j in the block runs segment i's first C−1 tokens
    on top of segment j's cache, batched by pairs. The batches depend only on the plan, so a
    window's numbers do not depend on the other windows scored with it.

    Example:

    >>> single, pair = segment_perplexities(model, plan_window(ids, ProLongSettings(), 0))  # doctest: +SKIP
    """
    device = next(model.parameters()).device
    segments = torch.as_tensor(plan.segments, device=device)  # (N, C)
    count, size = segments.shape
    pairs = plan.pairs
    per_forward = max(1, max_batch_tokens // size)
    single, pair = np.full(count, np.nan), np.full(len(pairs), np.nan)
    needed = np.unique(pairs)  # only segments in a pair are run
    by_prefix = np.lexsort((pairs[:, 0], pairs[:, 1]))  # pair indices sorted by (j, i)
    for block in _even_batches(needed, per_forward):
        single[block], cache = _perplexity_forward(model, segments[block], segments[block, 1:])  # logits 0..C−2
        prefixes = [(layer.keys, layer.values) for layer in cache.layers]  # per layer (b, kv_heads, C, d)
        slot = {int(s): k for k, s in enumerate(block)}
        todo = by_prefix[np.isin(pairs[by_prefix, 1], block)]
        for batch in _even_batches(todo, per_forward):
            index = torch.tensor([slot[int(j)] for j in pairs[batch, 1]], device=device)
            past = [(keys.index_select(0, index), values.index_select(0, index)) for keys, values in prefixes]
            rows = segments[torch.as_tensor(pairs[batch, 0], device=device)]  # (p, C)
            pair[batch], _ = _perplexity_forward(model, rows[:, :-1], rows[:, 1:], past)  # positions C..2C−2
        del cache, prefixes
    return single, pair


def _even_batches(items: np.ndarray, most: int) -> list[np.ndarray]:
    """``items`` in the fewest batches of at most ``most``, of even sizes (33 → 17 + 16, not 32 + 1)."""
    count = -(-len(items) // most)
    return np.array_split(items, count) if count else []


def _perplexity_forward(model, input_ids: torch.Tensor, targets: torch.Tensor,
                        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[np.ndarray, object]:
    """``(ppl (B,), cache)``: one forward, the PPL of ``targets`` ``(B, T')`` predicted at positions 0..T'−1.

    The model's own output head runs on the last position only (a pre-hook on
    ``get_output_embeddings()``): `_head_perplexity` applies it to the positions whose loss is
    needed, a block of tokens at a time, fused with the log-softmax, so the ``(B, T, V)`` logits
    are never materialised. Our last-position logits are checked against the model's, so a head
    with anything after the projection (logit scaling, soft-capping) falls back to the model's logits.
    """
    from transformers import DynamicCache

    def run(hook):
        cache = DynamicCache(past, config=model.config) if past is not None else DynamicCache(config=model.config)
        handle = head.register_forward_pre_hook(hook) if hook is not None else None
        try:
            out = model(input_ids=input_ids, use_cache=True, **{_cache_argument(type(model)): cache})
        finally:
            if handle is not None:
                handle.remove()
        return out.logits, cache

    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear) and model not in _PLAIN_LOGITS:
        captured = []

        def last_position(_module, args):
            hidden = args[0]
            if hidden.dim() == 3 and hidden.shape[:2] == input_ids.shape:
                captured.append(hidden)
                return (hidden[:, -1:],)
            return None

        logits, cache = run(last_position)
        if not captured:  # the head saw something else: the model's logits are whole
            return _perplexity(logits[:, : targets.shape[1]], targets), cache
        hidden = captured[0]
        if logits.shape[1] == 1 and torch.allclose(
                torch.nn.functional.linear(hidden[:, -1], head.weight, head.bias), logits[:, -1], rtol=1e-5, atol=1e-5,
                equal_nan=True):
            return _head_perplexity(hidden[:, : targets.shape[1]], head, targets), cache
        _PLAIN_LOGITS.add(model)  # post-processed logits: the model's head on every position from now on
    logits, cache = run(None)
    return _perplexity(logits[:, : targets.shape[1]], targets), cache


_PLAIN_LOGITS: weakref.WeakSet = weakref.WeakSet()
"""Models whose logits are not ``head(hidden)`` (checked at run time): scored from the model's own logits."""


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _head_perplexity(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor) -> np.ndarray:
    """``exp(mean loss)`` per row, ``(B,)`` float64, of the output head on ``hidden`` ``(B, T, H)``.

    The head runs on blocks of tokens into one reused buffer (no fresh ``(B, T, V)`` tensor, whose
    first touch costs as much as a tenth of the projection on the CPU), each block's losses taken
    right away by `_block_losses`.
    """
    rows, length, width = hidden.shape
    flat, goal = hidden.reshape(-1, width), targets.reshape(-1)
    vocab = head.weight.shape[0]
    cpu = hidden.device.type == "cpu"
    step = max(1, min(len(flat), ((128 << 20) if cpu else (1 << 30)) // (vocab * hidden.element_size())))
    buffer = torch.empty(step, vocab, dtype=hidden.dtype, device=hidden.device)
    losses = torch.empty(len(flat), dtype=torch.float64, device=hidden.device)
    for start in range(0, len(flat), step):
        logits = buffer[: min(step, len(flat) - start)]
        torch.mm(flat[start : start + step], head.weight.t(), out=logits)
        if head.bias is not None:
            logits.add_(head.bias)
        losses[start : start + len(logits)] = _block_losses(logits, goal[start : start + len(logits)], cpu)
    return losses.view(rows, length).mean(1).exp().cpu().numpy()


def _block_losses(logits: torch.Tensor, targets: torch.Tensor, cpu: bool) -> torch.Tensor:
    """Cross-entropy of each row of ``logits`` ``(t, V)``, float64: ``max + log Σ exp(x − max) − x_target``.

    The max and the target logit are exact, the exponentials in float32 (float64 for a float64
    model) and their sum accumulated in float64: each loss is within ~1e-7 absolute of the float64
    log-softmax of the same logits, well under the model's own float32 rounding. On the CPU a few
    rows at a time, so the passes over them stay in cache.
    """
    work = torch.promote_types(logits.dtype, torch.float32)
    rows = max(1, (2 << 20) // (logits.shape[1] * 4)) if cpu else len(logits)
    losses = torch.empty(len(logits), dtype=torch.float64, device=logits.device)
    for start in range(0, len(logits), rows):
        part = logits[start : start + rows].to(work)  # (t, V)
        top = part.amax(1, keepdim=True)
        total = (part - top).exp_().sum(1, dtype=torch.float64)
        target = part.gather(1, targets[start : start + rows, None])
        losses[start : start + len(part)] = (top.double() - target.double())[:, 0] + total.log()
    return losses


def _perplexity(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """``exp(mean loss)`` per row, ``(B,)`` float64, from float64 log-softmax of the logits ``(B, T, V)`` (the model's own logits).

    The upcast runs over a few tokens at a time: on the CPU 2 MB blocks stay in cache (5× faster
    than whole rows for a 49K vocabulary); on a GPU larger blocks mean fewer kernel launches.
    """
    rows, length, vocab = logits.shape
    block = (2 << 20) if logits.device.type == "cpu" else (256 << 20)
    step = max(1, block // (vocab * 8))  # tokens per block
    losses = torch.empty(rows, length, dtype=torch.float64, device=logits.device)
    for row in range(rows):
        for start in range(0, length, step):
            part = logits[row, start : start + step].double()  # (t, V) float64
            losses[row, start : start + step] = torch.nn.functional.cross_entropy(
                part, targets[row, start : start + step], reduction="none")
    return losses.mean(1).exp().cpu().numpy()


def prolong_scores(model, windows: Sequence[Sequence[int]], settings: ProLongSettings | None = None,
                   seeds: Sequence[int] | None = None) -> list[ProLongResult]:
    """ProLong's LDS of each window (token ids) with a loaded causal LM.

    Args:
        model: a causal LM whose forward returns ``logits`` and takes a ``DynamicCache``
            (any transformers ``*ForCausalLM``), in eval mode.
        windows (`list[list[int]]`): each window's token ids, at least ``2 * chunk_size`` of them.
        settings (`ProLongSettings`, *optional*): chunk size, sampling, threshold, …; the defaults
            are run.py's.
        seeds (`list[int]`, *optional*): one seed per window; defaults to `window_seed` of its
            token ids, so a window's pairs depend only on its content and ``settings.seed``.

    Returns one `ProLongResult` per window, in order.

    Example:

    >>> results = prolong_scores(model, [ids], ProLongSettings(sample_size=None))  # ids: 8192 tokens  # doctest: +SKIP
    >>> results[0].num_segments, results[0].num_pairs  # doctest: +SKIP
    (64, 2016)
    """
    settings = settings or ProLongSettings()
    if seeds is None:
        seeds = [window_seed(ids, settings.seed) for ids in windows]
    results = []
    with torch.inference_mode():
        for ids, seed in zip(windows, seeds, strict=True):
            plan = plan_window(ids, settings, seed)
            if len(plan.segments) < 2:
                raise ValueError(f"a window of {len(ids)} tokens has fewer than 2 segments of {settings.chunk_size}")
            single, pair = segment_perplexities(model, plan, settings.max_batch_tokens)
            results.append(lds_from_perplexities(single, plan.pairs, pair, threshold=settings.threshold,
                                                 max_segments=settings.max_segments))
    return results

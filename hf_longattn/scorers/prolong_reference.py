"""A float64 port of the official ProLong scorer (GitHub October2001/ProLong, prolong/run.py): slow, readable, for tests and benchmarks.

It follows ``run.py`` line by line (line numbers below are of that file at commit 9cf2f20) with the
three fixes `hf_longattn.scorers.prolong` makes, and nothing else changed:

* all pairs when a window has no more pairs than ``sample_size`` (run.py:113-114 returns an
  all-inf matrix instead, so the window scores 0);
* the pairs are given (drawn per window by `hf_longattn.scorers.prolong.plan_window`, seeded by
  the window's hash) instead of drawn from the process-wide ``random`` state (run.py:115);
* losses in float64 from float64 logits (run.py:72-89 takes the mean and ``exp`` in the model's
  dtype, float16 in the official script).

One forward per segment and one per pair, exactly as run.py builds them: segment j's tokens then
segment i's, labels ``[-100] * (len(j) + 1) + seg_i[1:]``, the mean over the last ``len(i) − 1``
losses. Run it on a float64 copy of the model for a float64 reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100  # run.py:15


def reference_ppl(model, inputs: list[int], labels: list[int], num: int) -> float:
    """``exp`` of the mean loss of the last ``num`` predicted tokens of one sequence (run.py:72-89), in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([inputs])).logits.to(torch.float64)  # (1, T, V)
    shift_logits = logits[0, :-1, :]  # (T-1, V): position t predicts token t+1
    shift_labels = torch.tensor(labels[1:])  # (T-1,)
    loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, reduction="none")  # 0 where ignored
    return float(torch.exp(loss[-num:].mean()))


def reference_single_ppl(model, segments: Sequence[list[int]]) -> list[float]:
    """PPL of each segment alone, its first token never predicted (run.py:92-104; labels = inputs)."""
    return [reference_ppl(model, list(s), list(s), len(s) - 1) for s in segments]


def reference_pair_ppl(model, segments: Sequence[list[int]], pairs: Sequence[tuple[int, int]]) -> list[list[float]]:
    """PPL of segment i after segment j for each (i, j) in ``pairs``; inf elsewhere (run.py:107-126)."""
    size = len(segments)
    pair_ppl = [[float("inf")] * size for _ in range(size)]
    for i, j in pairs:
        inputs = list(segments[j]) + list(segments[i])
        labels = [IGNORE_INDEX] * (len(segments[j]) + 1) + list(segments[i][1:])  # run.py:121
        pair_ppl[i][j] = reference_ppl(model, inputs, labels, len(segments[i]) - 1)
    return pair_ppl


def reference_dependency_entropy(logits: list[float]) -> float:
    """run.py:128-146: 1 − H(softmax(row))/log(n), clipped to [0, 1]; 1 for a single pair."""
    if len(logits) == 1:
        return 1
    x = np.asarray(logits, dtype=np.float64)
    e_x = np.exp(x - np.max(x))
    x = e_x / e_x.sum(axis=0)
    if 0 in x:  # an underflowed probability: smooth, renormalise (run.py:135-137)
        x += 1e-12
        x /= np.sum(x)
    entropy = -np.sum(x * np.log(x))
    max_entropy = np.log(len(logits))
    return float(np.clip((max_entropy - entropy) / max_entropy, 0, 1))


def reference_lds(single_ppl: list[float], pair_ppl: list[list[float]], *, threshold: float, max_segments: int) -> dict:
    """run.py:148-172 verbatim but for the NaN rule: LDS, the ΔPPL matrix and each row's dependency entropy.

    ``max_segments`` is run.py's ``chunk_num = window_size // chunk_size`` (run.py:199): the distance
    gain is ``(i − j) / (chunk_num − 1)`` (run.py:151, 167), the same for every window. run.py
    replaces a NaN LDS by 0 (run.py:170-171); this port leaves it NaN (`ProLongScorer` reports the
    row as ``non_finite``).
    """
    size = len(single_ppl)
    dlt_ppl = [[0.0] * size for _ in range(size)]
    dependency_entropy = [0.0] * size
    dis_scale = 1 / (max_segments - 1)
    lds = 0.0
    for i in range(size):
        row_logits = []
        for j in range(i):
            dlt_ppl[i][j] = single_ppl[i] - pair_ppl[i][j]  # raw ΔPPL: the entropy's logits
            if pair_ppl[i][j] != float("inf"):
                row_logits.append(dlt_ppl[i][j])
        if row_logits:
            dependency_entropy[i] = reference_dependency_entropy(row_logits)
    kept = []
    for i in range(size):
        for j in range(i):
            dlt_ppl[i][j] /= single_ppl[i]
            if dlt_ppl[i][j] > threshold:
                distance_gain = np.clip((i - j) * dis_scale, 0, 1)
                lds += (dlt_ppl[i][j] + distance_gain) * dependency_entropy[i]
                kept.append(dlt_ppl[i][j])
    return {"lds": float(lds), "dlt_ppl": dlt_ppl, "dependency_entropy": dependency_entropy, "kept": kept}


def reference_prolong(model, segments: Sequence[list[int]], pairs: Sequence[tuple[int, int]], *,
                      threshold: float = 0.1, max_segments: int = 256) -> dict:
    """The float64 reference for one window's segments and pairs: PPLs, LDS and its parts.

    Args:
        model: a causal LM (``model(input_ids=...).logits``); a float64 copy gives a float64 reference.
        segments (`list[list[int]]`): the window's segments (each ``chunk_size`` token ids).
        pairs (`list[tuple[int, int]]`): the (i, j) pairs scored, j < i.
        threshold (`float`, defaults to `0.1`): ΔPPL above which a pair counts (run.py:26).
        max_segments (`int`, defaults to `256`): run.py's ``chunk_num`` (32768 // 128).

    Returns a dict with ``single_ppl``, ``pair_ppl`` (N×N, inf where no pair), ``lds``, ``dlt_ppl``,
    ``dependency_entropy`` (per row), ``kept`` (the ΔPPL of the pairs above the threshold) and
    ``delta_ppl`` / ``mean_dependency_entropy`` (means over the kept pairs / the rows with a pair).

    Example:

    >>> out = reference_prolong(model.double(), segments, [(1, 0), (2, 0), (2, 1)])  # doctest: +SKIP
    >>> sorted(out)  # doctest: +SKIP
    ['delta_ppl', 'dependency_entropy', 'dlt_ppl', 'kept', 'lds', 'mean_dependency_entropy', 'pair_ppl', 'single_ppl']
    """
    return reference_scores(reference_single_ppl(model, segments), reference_pair_ppl(model, segments, pairs), pairs,
                            threshold=threshold, max_segments=max_segments)


def reference_scores(single_ppl: list[float], pair_ppl: list[list[float]], pairs: Sequence[tuple[int, int]], *,
                     threshold: float = 0.1, max_segments: int = 256) -> dict:
    """`reference_prolong`'s dict from perplexities; ``pair_ppl`` may hold more pairs than ``pairs``: the
    others are set to inf, as run.py leaves an unscored pair (a pair's PPL does not depend on the others)."""
    size = len(single_ppl)
    scored = [[float("inf")] * size for _ in range(size)]
    for i, j in pairs:
        scored[i][j] = pair_ppl[i][j]
    out = reference_lds(single_ppl, scored, threshold=threshold, max_segments=max_segments)
    rows = sorted({int(i) for i, _ in pairs})
    out.update(single_ppl=list(single_ppl), pair_ppl=scored,
               delta_ppl=float(np.mean(out["kept"])) if out["kept"] else None,
               mean_dependency_entropy=float(np.mean([out["dependency_entropy"][i] for i in rows])))
    return out

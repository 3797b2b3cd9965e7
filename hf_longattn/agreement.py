"""Agreement of two scorers on the same windows: Spearman and Kendall rank correlation, and the overlap (Jaccard) of their kept sets.

All three are exact (no sampling): Spearman's ρ is the Pearson correlation of average ranks;
Kendall's τ_b is counted with Knight's O(n log n) algorithm (ties in either score handled as in
`scipy.stats.kendalltau`); Jaccard is |A ∩ B| / |A ∪ B| of the kept ids. With a keep fraction f,
two independent random selections overlap by about f / (2 − f) (`random_jaccard`), the baseline
a real overlap is read against.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np


def average_ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank.

    Example:

    >>> average_ranks([10.0, 20.0, 20.0, 5.0]).tolist()
    [2.0, 3.5, 3.5, 1.0]
    """
    x = np.asarray(values, dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - (counts - 1) / 2.0)[inverse]).astype(np.float64)


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's ρ (NaN with fewer than 2 rows or a constant score).

    Example:

    >>> round(spearman([1, 2, 3, 4], [1, 3, 2, 4]), 3), spearman([1, 2, 3], [3, 2, 1])
    (0.8, -1.0)
    """
    if len(a) < 2:
        return math.nan
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator else math.nan


def kendall(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Kendall's τ_b in O(n log n) (Knight 1966); NaN with fewer than 2 rows or a constant score.

    Example:

    >>> round(kendall([1, 2, 3, 4], [1, 3, 2, 4]), 4), kendall([1, 2, 3], [3, 2, 1])
    (0.6667, -1.0)
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = x.size
    if n < 2:
        return math.nan
    order = np.lexsort((y, x))
    x, y = x[order], y[order]
    pairs = n * (n - 1) // 2
    tied_x = _tied_pairs(x)
    tied_xy = _tied_pairs_joint(x, y)
    swaps = _count_swaps(y.copy())
    tied_y = _tied_pairs(np.sort(y))
    concordant_minus_discordant = pairs - tied_x - tied_y + tied_xy - 2 * swaps
    denominator = math.sqrt(float(pairs - tied_x) * float(pairs - tied_y))
    return float(concordant_minus_discordant / denominator) if denominator else math.nan


def _tied_pairs(sorted_values: np.ndarray) -> int:
    _, counts = np.unique(sorted_values, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def _tied_pairs_joint(x: np.ndarray, y: np.ndarray) -> int:
    """Pairs tied in both x and y (``x, y`` sorted by (x, y))."""
    change = np.flatnonzero((np.diff(x) != 0) | (np.diff(y) != 0)) + 1
    counts = np.diff(np.concatenate(([0], change, [x.size])))
    return int((counts * (counts - 1) // 2).sum())


def _count_swaps(values: np.ndarray) -> int:
    """Inversions of ``values`` (pairs i < j with values[i] > values[j]) by a bottom-up merge sort, in place."""
    n, swaps, width = values.size, 0, 1
    buffer = np.empty_like(values)
    while width < n:
        for low in range(0, n, 2 * width):
            middle, high = min(low + width, n), min(low + 2 * width, n)
            left, right = values[low:middle], values[middle:high]
            if right.size == 0 or left[-1] <= right[0]:
                buffer[low:high] = values[low:high]
                continue
            # each right element jumps over the left elements greater than it
            positions = np.searchsorted(left, right, side="right")
            swaps += int((left.size - positions).sum())
            merged = np.concatenate((left, right))
            buffer[low:high] = merged[np.argsort(merged, kind="stable")]
        values, buffer = buffer, values
        width *= 2
    return swaps


def jaccard(kept_a: Iterable[str], kept_b: Iterable[str]) -> float:
    """|A ∩ B| / |A ∪ B| of two kept sets (NaN when both are empty).

    Example:

    >>> jaccard(["a", "b"], ["b", "c"])
    0.3333333333333333
    """
    a, b = set(kept_a), set(kept_b)
    return len(a & b) / len(a | b) if a | b else math.nan


def random_jaccard(keep_fraction: float) -> float:
    """The Jaccard overlap of two independent random selections of a fraction f, for large n: f / (2 − f).

    Example:

    >>> round(random_jaccard(0.125), 4)
    0.0667
    """
    return keep_fraction / (2.0 - keep_fraction) if keep_fraction < 2 else math.nan

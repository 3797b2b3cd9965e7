"""The probe's statistics: AUC (Mann–Whitney) with its standard error, the top-fraction share, rows per layer and the verdict."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from ..selection import lds_scores

SEPARATES = 0.6
"""LDS AUC at or above which a layer is said to separate real windows from controls."""
CHANCE_BAND = 0.1
"""``|AUC − 0.5| <`` this is "close to chance"."""
REAL = "real"
CONTROL = "control"
MEAN_OF_GROUPS = "mean of groups"
"""Group name of the per-layer rows averaged over groups."""


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def auc(real_scores: Sequence[float] | np.ndarray, control_scores: Sequence[float] | np.ndarray) -> float:
    """Probability that a real window's score beats a control's, ties counting 1/2 (Mann–Whitney U / (n·m)).

    Computed from average ranks of the pooled scores: ``U = Σ rank(real) − n(n+1)/2``.

    Args:
        real_scores (array-like of `float`): scores of the real windows (finite).
        control_scores (array-like of `float`): scores of the controls (finite).

    Returns:
        `float` in [0, 1]; NaN when either side is empty.

    Example:

    >>> auc([3.0, 2.0], [1.0, 2.0])  # pairs (3>1, 3>2, 2>1, 2=2) → 3.5 / 4
    0.875
    >>> auc([1.0, 1.0], [1.0])
    0.5
    """
    real = np.asarray(real_scores, dtype=np.float64).ravel()
    control = np.asarray(control_scores, dtype=np.float64).ravel()
    if real.size == 0 or control.size == 0:
        return math.nan
    if not (np.isfinite(real).all() and np.isfinite(control).all()):
        raise ValueError("auc needs finite scores; drop unscored windows first")
    pooled = np.concatenate([real, control])
    _, inverse, counts = np.unique(pooled, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct value: ranks first+1 … first+count share their mean.
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    average_rank = first + (counts + 1) / 2.0
    rank_sum = float(average_rank[inverse[: real.size]].sum())
    u_statistic = rank_sum - real.size * (real.size + 1) / 2.0
    return u_statistic / (real.size * control.size)


def auc_standard_error(value: float, n_real: int, n_control: int) -> float:
    """Hanley–McNeil (1982) standard error of an AUC from ``n_real`` and ``n_control`` scores.

    ``SE² = (A(1−A) + (n−1)(Q1 − A²) + (m−1)(Q2 − A²)) / (n·m)`` with ``Q1 = A/(2−A)``, ``Q2 = 2A²/(1+A)``.

    Example:

    >>> round(auc_standard_error(0.5, 16, 16), 3)
    0.104
    """
    if not n_real or not n_control or not math.isfinite(value):
        return math.nan
    a = float(value)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    variance = (a * (1 - a) + (n_real - 1) * (q1 - a * a) + (n_control - 1) * (q2 - a * a)) / (n_real * n_control)
    return math.sqrt(max(variance, 0.0))


def auc_label(value: float) -> str:
    """``"separates"`` (AUC ≥ 0.6), ``"close to chance"`` (|AUC − 0.5| < 0.1), ``"inverted"`` (≤ 0.4) or ``"n/a"``.

    Example:

    >>> [auc_label(a) for a in (0.75, 0.55, 0.3)]
    ['separates', 'close to chance', 'inverted']
    """
    if not math.isfinite(value):
        return "n/a"
    if value >= SEPARATES:
        return "separates"
    if value <= 0.5 - CHANCE_BAND:
        return "inverted"
    return "close to chance"


def top_fraction_share(
    scores: Sequence[float] | np.ndarray, is_real: Sequence[bool] | np.ndarray, keep_fraction: float = 0.5
) -> float:
    """Share of real windows among the top ``keep_fraction`` of a pooled mix, ranked by score.

    Keeps ``n_keep = ⌊keep_fraction · n⌋`` (``keep_fraction`` read as the decimal it prints, as in
    :class:`~hf_longattn.selection.LongAttnSelector`). Rows tied at the cut score share the remaining
    places in proportion, so the result is the expected share under random tie-breaking and does
    not depend on row order or ids.

    Args:
        scores (array-like of `float`): one score per window (higher is kept first).
        is_real (array-like of `bool`): whether each window is real (else a control).
        keep_fraction (`float`, defaults to `0.5`): fraction of the pool kept.

    Returns:
        `float` in [0, 1]; NaN when nothing is kept.

    Example:

    >>> round(top_fraction_share([3, 2, 2, 2, 1, 0], [1, 1, 0, 0, 1, 0], 0.5), 4)  # (1 + 2·1/3) / 3 = 5/9
    0.5556
    """
    values = np.asarray(scores, dtype=np.float64).ravel()
    real = np.asarray(is_real, dtype=bool).ravel()
    if values.shape != real.shape:
        raise ValueError(f"scores and is_real must have the same length, got {values.size} and {real.size}")
    if not 0 <= keep_fraction <= 1:
        raise ValueError(f"keep_fraction must lie in [0, 1], got {keep_fraction}")
    n_keep = math.floor(Fraction(repr(float(keep_fraction))) * values.size)
    if n_keep == 0:
        return math.nan
    cut = np.sort(values)[::-1][n_keep - 1]
    above = values > cut
    tied = values == cut
    places_left = n_keep - int(above.sum())
    real_kept = float(real[above].sum()) + places_left * float(real[tied].sum()) / float(tied.sum())
    return real_kept / n_keep


def layer_rows(
    scores: list[dict[str, Any]], layers: list[int], groups: list[str], alpha: float, keep_fraction: float
) -> list[dict[str, Any]]:
    """Rows per (group, layer) from the per-window scores, then per-layer means over groups."""
    rows = []
    for group in groups:
        members = [s for s in scores if s["group"] == group]
        for position, layer in enumerate(layers):
            ok = [s for s in members if s["ds_by_layer"][position] is not None and s["du_by_layer"][position] is not None]
            ds = np.array([s["ds_by_layer"][position] for s in ok], dtype=np.float64)
            du = np.array([s["du_by_layer"][position] for s in ok], dtype=np.float64)
            real = np.array([s["kind"] == REAL for s in ok], dtype=bool)
            lds = lds_scores(ds, du, alpha=alpha) if ok else np.zeros(0)
            n_real, n_control = int(real.sum()), int((~real).sum())
            auc_lds = auc(lds[real], lds[~real])
            rows.append({
                "group": group, "layer": layer, "n_real": n_real, "n_control": n_control,
                "ds_real": _mean(ds[real]), "ds_control": _mean(ds[~real]),
                "du_real": _mean(du[real]), "du_control": _mean(du[~real]),
                "auc_ds": auc(ds[real], ds[~real]), "auc_du": auc(du[real], du[~real]),
                "auc_lds": auc_lds, "auc_lds_se": auc_standard_error(auc_lds, n_real, n_control),
                "top_real_share": top_fraction_share(lds, real, keep_fraction) if ok else math.nan,
            })
    for layer in layers:
        per_group = [r for r in rows if r["layer"] == layer and r["n_real"] and r["n_control"]]
        rows.append({
            "group": MEAN_OF_GROUPS, "layer": layer,
            "n_real": sum(r["n_real"] for r in per_group), "n_control": sum(r["n_control"] for r in per_group),
            "ds_real": math.nan, "ds_control": math.nan, "du_real": math.nan, "du_control": math.nan,
            **{key: _mean([r[key] for r in per_group]) for key in ("auc_ds", "auc_du", "auc_lds", "top_real_share")},
            "auc_lds_se": math.nan,
        })
    return rows


def _mean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Row with the highest finite LDS AUC (ties: the shallower, cheaper layer)."""
    finite = [r for r in rows if _finite(r["auc_lds"])]
    return max(finite, key=lambda r: (r["auc_lds"], -r["layer"])) if finite else None


def verdict_of(rows: list[dict[str, Any]]) -> tuple[str, int | None]:
    """The plain-sentence verdict and the best layer (`None` when none separates) from report rows."""
    groups = sorted({r["group"] for r in rows if r["group"] != MEAN_OF_GROUPS})
    per_group = []
    for group in groups:
        best = _best([r for r in rows if r["group"] == group])
        if best is None:
            per_group.append(f"{group}: no windows")
        elif best["auc_lds"] >= SEPARATES:
            per_group.append(f"{group}: layer {best['layer']} ({best['auc_lds']:.2f})")
        else:
            per_group.append(f"{group}: none separates (best layer {best['layer']}, {best['auc_lds']:.2f})")
    mean_rows = [r for r in rows if r["group"] == MEAN_OF_GROUPS]
    best = _best(mean_rows)
    detail = "; ".join(per_group)
    if best is None:
        return "No window could be scored: no verdict. Check the counts (documents of at least window_size tokens?).", None
    layer0 = next((r for r in mean_rows if r["layer"] == 0), None)
    first = "" if layer0 is None or best["layer"] == 0 else f" Layer 0 (the paper's choice): {layer0['auc_lds']:.2f}."
    if best["auc_lds"] >= SEPARATES:
        sentence = (
            f"Layer {best['layer']} separates real windows from shuffled-chunk controls best: mean LDS AUC "
            f"{best['auc_lds']:.2f} over {len(groups)} group(s) (per group, best layer: {detail}).{first}"
        )
        return sentence, int(best["layer"])
    worst = min(r["auc_lds"] for r in mean_rows if _finite(r["auc_lds"]))
    inverted = (
        f" Some layers are inverted (mean LDS AUC down to {worst:.2f}): they rank shuffled text above coherent text."
        if worst <= 0.5 - CHANCE_BAND else ""
    )
    sentence = (
        f"None separates: the best mean LDS AUC over groups is {best['auc_lds']:.2f} (layer {best['layer']}), below "
        f"{SEPARATES} — on this data this scorer does not reliably tell coherent windows from shuffled chunks and is "
        f"too weak to select with (per group: {detail}).{inverted}"
    )
    return sentence, None

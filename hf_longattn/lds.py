"""LongAttn data score: LDS = N(DS_T) + α·N(DU_T) within a group (z-score or min-max), and the registered selection methods.

Over a group's valid rows (status ``ok``, finite scores):

* ``normalization="zscore"`` (paper): ``LDS = Z(DS) + α·Z(DU)``, ``Z(x) = (x − mean) / std``
  with the population std (ddof = 0); a constant column (max == min, so std = 0) gives Z = 0.
* ``normalization="minmax"`` (reference code): with ``V = −DU`` (the mean head variance),
  ``x' = (x − min) / (max − min)`` (a constant column gives 0.5), ``score = DS' − α·V'``.
  Since ``minmax(DU) = (max V − V) / (max V − min V) = 1 − V'``, this equals
  ``DS' + α·DU' − α``: the same ordering as the min-max analogue of the paper's formula; it is
  computed on V like the reference so that the numbers match it exactly.

A *selection method* ranks a group's valid rows; `LongAttnSelector` keeps the first
``⌊keep_fraction · n_valid⌋``. To add one, write a class with ``threshold_key``, ``descending``
and ``ranks(lds, ids, seed)`` and register it under a versioned name in :data:`SELECTION_METHODS`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .registry import Registry

NORMALIZATIONS = ("zscore", "minmax")
"""How LDS normalises DS_T and DU_T within a group; checked by the configuration and by the selector."""

SELECTION_METHODS = Registry("selection method")
"""Selection methods by versioned name; each ranks a group's valid rows (see `LdsMethod`)."""


class SelectionMethod:
    """How a group's valid rows are ranked: the first ``n_keep`` by ``ranks`` (then by id) are kept.

    Attributes:
        threshold_key (`str`): the key under which the last kept row's rank is stored.
        descending (`bool`): whether a higher rank is better.
    """

    threshold_key = "lds"
    descending = True

    @staticmethod
    def ranks(lds: np.ndarray, ids: Sequence[str], seed: int) -> np.ndarray:
        """One rank per row, from its LDS, id and the seed."""
        raise NotImplementedError


@SELECTION_METHODS.register("lds_v1", aliases=("lds",))
class LdsMethod(SelectionMethod):
    """Keep the rows with the highest LDS (ties: the smaller id). The paper's selection."""

    ranks = staticmethod(lambda lds, ids, seed: lds)


@SELECTION_METHODS.register("random_v1", aliases=("random",))
class RandomMethod(SelectionMethod):
    """The random baseline: rows ranked by 64 bits of BLAKE2b of ``(seed, id)`` (ties: the smaller id)."""

    threshold_key, descending = "key", False

    @staticmethod
    def ranks(lds: np.ndarray, ids: Sequence[str], seed: int) -> np.ndarray:
        return np.fromiter((_random_key(seed, i) for i in ids), dtype=np.uint64, count=len(ids))


METHODS = tuple(SELECTION_METHODS.accepted())


# -- LDS on one group -------------------------------------------------------------------------


def _normalization_stats(ds_values: np.ndarray, du_values: np.ndarray, normalization: str) -> dict[str, float | None]:
    """Statistics of one group's valid rows that :func:`_lds_from_stats` needs."""
    if ds_values.size == 0:
        keys = ("ds_mean", "ds_std", "du_mean", "du_std") if normalization == "zscore" else ("ds_min", "ds_max", "v_min", "v_max")
        return dict.fromkeys(keys)
    if normalization == "zscore":
        # Sorted first, so the floating-point sums (and every LDS) do not depend on row order.
        ds_values, du_values = np.sort(ds_values), np.sort(du_values)
        return {
            "ds_mean": float(ds_values.mean()),
            "ds_std": _population_std(ds_values),
            "du_mean": float(du_values.mean()),
            "du_std": _population_std(du_values),
        }
    variance = -du_values
    return {
        "ds_min": float(ds_values.min()),
        "ds_max": float(ds_values.max()),
        "v_min": float(variance.min()),
        "v_max": float(variance.max()),
    }


def _population_std(values: np.ndarray) -> float:
    # A constant column has std exactly 0 (np.std can return ~1e-17 from rounding in the mean).
    return 0.0 if values.max() == values.min() else float(values.std())


def _zscore(values: np.ndarray, mean: float, std: float) -> np.ndarray:
    return np.zeros_like(values) if std == 0.0 else (values - mean) / std


def _minmax(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.full_like(values, 0.5) if high == low else (values - low) / (high - low)


def _lds_from_stats(
    ds_values: np.ndarray, du_values: np.ndarray, stats: Mapping[str, float | None], alpha: float, normalization: str
) -> np.ndarray:
    """Elementwise LDS: the same float64 operations for a whole group (fit) or any subset (a shard)."""
    if ds_values.size == 0:
        return np.zeros(0, dtype=np.float64)
    if normalization == "zscore":
        score = _zscore(ds_values, stats["ds_mean"], stats["ds_std"]) + alpha * _zscore(
            du_values, stats["du_mean"], stats["du_std"]
        )
    else:
        score = _minmax(ds_values, stats["ds_min"], stats["ds_max"]) - alpha * _minmax(
            -du_values, stats["v_min"], stats["v_max"]
        )
    return score


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; valid values are {list(choices)}")


def lds_scores(
    ds_values: Sequence[float] | np.ndarray,
    du_values: Sequence[float] | np.ndarray,
    alpha: float = 0.5,
    normalization: str = "zscore",
) -> np.ndarray:
    """LongAttn data score of the windows of one group.

    * ``"zscore"`` (paper): ``LDS = Z(DS) + α·Z(DU)``, ``Z(x) = (x − mean(x)) / std(x)``,
      population std (ddof = 0); a constant input gives ``Z = 0`` for every row.
    * ``"minmax"`` (reference code): ``V = −DU``, ``x' = (x − min) / (max − min)`` (constant → 0.5),
      ``score = DS' − α·V'`` (= ``DS' + α·DU' − α``: same ordering, see the module docstring).

    Args:
        ds_values (array-like of `float`): DS_T of every window (finite).
        du_values (array-like of `float`): DU_T of every window (finite), same length.
        alpha (`float`, defaults to `0.5`): weight α of the uniformity term (paper: 0.5).
        normalization (`str`, defaults to `"zscore"`): ``"zscore"`` or ``"minmax"``.

    Returns:
        `np.ndarray` of float64, one score per window (higher is better).

    Example:

    >>> lds_scores([0.2, 0.4, 0.6], [-3.0, -1.0, -2.0]).round(4).tolist()
    [-1.8371, 0.6124, 1.2247]
    >>> lds_scores([0.2, 0.4, 0.6], [-3.0, -1.0, -2.0], normalization="minmax").round(4).tolist()
    [-0.5, 0.5, 0.75]
    """
    _check_choice("normalization", normalization, NORMALIZATIONS)
    ds_array = np.asarray(ds_values, dtype=np.float64)
    du_array = np.asarray(du_values, dtype=np.float64)
    if ds_array.ndim != 1 or ds_array.shape != du_array.shape:
        raise ValueError(f"ds_values and du_values must be 1-d of the same length, got {ds_array.shape} and {du_array.shape}")
    if not (np.isfinite(ds_array).all() and np.isfinite(du_array).all()):
        raise ValueError("ds_values and du_values must be finite; drop rows without scores first")
    stats = _normalization_stats(ds_array, du_array, normalization)
    return _lds_from_stats(ds_array, du_array, stats, float(alpha), normalization)


def _random_key(seed: int, row_id: str) -> int:
    """Rank of a row in the random baseline: 64 bits of BLAKE2b over ``(seed, id)`` (row-order free)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\x1f{row_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def check_alpha(alpha: Any) -> None:
    """Raise a `ValueError` unless ``alpha`` (the weight of DU_T in LDS_T) is a finite number.

    Example:

    >>> check_alpha(float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: alpha must be a finite number, got nan
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")


def check_keep_fraction(keep_fraction: Any) -> None:
    """Raise a `ValueError` unless ``keep_fraction`` is a number in [0, 1].

    Example:

    >>> check_keep_fraction(1.5)
    Traceback (most recent call last):
    ...
    ValueError: keep_fraction must be a number in [0, 1], got 1.5
    """
    if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, (int, float)) or not 0 <= keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be a number in [0, 1], got {keep_fraction!r}")

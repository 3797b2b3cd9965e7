"""What selection ranks windows by (``select_by``): a scorer's ranking, one score column, or the rank average of several; the columns selection reads and writes.

A *ranking* is a tuple of *items*; an item is a weighted sum of per-category normalised score
columns (``((column, weight), ...)``). With one item the selection score is that sum (LongAttn's
``LDS = Z(DS) + α·Z(DU)``, or ``Z(prolong_lds)``); with several, it is the mean over items of the
window's percentile rank within its category (``(#below + #below-or-equal) / 2n``), so scorers on
different scales weigh alike. Every scorer column selection reads is "higher is better".

`SelectionColumns` names what selection reads (the status columns that must be ``ok``, the score
columns) and writes (the selection score, the flag), with labels for the card and the plots;
`LONGATTN` is LongAttn's, the default everywhere. `selection_of` builds both from a `RunConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import vocabulary as V
from .lds import _minmax, _population_std, _zscore

Item = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class SelectionColumns:
    """The columns selection reads and writes, and their labels.

    Attributes:
        statuses (`tuple[str]`): status columns; a window is valid when every one is ``ok`` (and its scores finite).
        scores (`tuple[str]`): the score columns selection reads (their medians and quantiles go on the card).
        score (`str`): the selection score written per window (``longattn_lds``).
        selected (`str`): the selection flag (``longattn_selected``).
        label (`str`): the selection score in words (``LDS_T``).
        labels (`dict[str, str]`): a short label per score column (``longattn_ds`` → ``DS_T``).
        num_tokens (`str`): the column of tokens per window.
        scorers (`tuple[str]`): the scorers the columns come from (``longattn_v1``).
    """

    statuses: tuple[str, ...]
    scores: tuple[str, ...]
    score: str
    selected: str
    label: str
    labels: dict[str, str] = field(default_factory=dict)
    num_tokens: str = V.NUM_TOKENS
    scorers: tuple[str, ...] = ("longattn_v1",)

    @property
    def read(self) -> list[str]:
        """The columns a selection is fitted on (besides id and group)."""
        return [*self.scores, *self.statuses]

    def label_of(self, column: str) -> str:
        return self.labels.get(column, self.label if column == self.score else column)

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SelectionColumns:
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})


LONGATTN = SelectionColumns((V.STATUS,), (V.DS, V.DU), V.LDS, V.SELECTED, "LDS_T",
                            {V.DS: "DS_T", V.DU: "DU_T", V.LDS: "LDS_T"})
"""LongAttn's selection columns: DS_T and DU_T in, LDS_T and the flag out."""
GENERIC_SCORE, GENERIC_SELECTED = "selection_score", "selected"
"""The columns a selection by anything but one scorer's own ranking writes."""


def combined_status(statuses: Sequence[Sequence[Any]]) -> list[str]:
    """Per row, ``ok`` when every status is ``ok``, else the first other status (a null counts as ``null``).

    Example:

    >>> combined_status([["ok", "ok", None], ["ok", "too_short", "ok"]])
    ['ok', 'too_short', 'null']
    """
    result = []
    for values in zip(*statuses):
        other = next((V.NULL_STATUS if v is None else str(v) for v in values if v != V.OK), None)
        result.append(V.OK if other is None else other)
    return result


def table_status(table: Any, statuses: Sequence[str]) -> list[str]:
    """:func:`combined_status` of the ``statuses`` columns of a `pyarrow.Table`."""
    return combined_status([table.column(column).to_pylist() for column in statuses])


# -- the math of one group ---------------------------------------------------------------------------------


def fit_stats(values: Mapping[str, np.ndarray], ranking: Sequence[Item], normalization: str) -> dict[str, Any]:
    """Normalisation statistics of one group's valid rows for every term, and the sorted item sums for a rank average."""
    stats: dict[str, Any] = {}
    for item in ranking:
        for column, _ in item:
            stats.update(_column_stats(values[column], column, normalization))
    if len(ranking) > 1:
        stats["sorted"] = [np.sort(item_sum(values, item, stats, normalization)).tolist() for item in ranking]
    return stats


def _column_stats(values: np.ndarray, column: str, normalization: str) -> dict[str, float | None]:
    if values.size == 0:
        names = ("mean", "std") if normalization == "zscore" else ("min", "max")
        return {f"{column}:{name}": None for name in names}
    ordered = np.sort(values)  # sums over sorted values: the statistics do not depend on row order
    if normalization == "zscore":
        return {f"{column}:mean": float(ordered.mean()), f"{column}:std": _population_std(ordered)}
    return {f"{column}:min": float(ordered[0]), f"{column}:max": float(ordered[-1])}


def item_sum(values: Mapping[str, np.ndarray], item: Item, stats: Mapping[str, Any], normalization: str) -> np.ndarray:
    """``Σ weight · N(column)`` over the item's terms (``N``: z-score, or min-max; a constant column gives 0 / 0.5)."""
    total = None
    for column, weight in item:
        x = values[column]
        if normalization == "zscore":  # a group without valid rows has None statistics: Z = 0, min-max 0.5
            normalised = _zscore(x, stats[f"{column}:mean"], stats[f"{column}:std"] or 0.0)
        else:
            normalised = _minmax(x, stats[f"{column}:min"], stats[f"{column}:max"])
        term = normalised if weight == 1.0 else weight * normalised
        total = term if total is None else total + term
    return total if total is not None else np.zeros(0)


def selection_score(values: Mapping[str, np.ndarray], ranking: Sequence[Item], stats: Mapping[str, Any],
                    normalization: str) -> np.ndarray:
    """The selection score of rows of one group from the fitted ``stats``: the item's sum, or the mean percentile rank."""
    if len(ranking) == 1:
        return item_sum(values, ranking[0], stats, normalization)
    total = None
    for item, ordered in zip(ranking, stats["sorted"]):
        ordered = np.asarray(ordered, dtype=np.float64)
        x = item_sum(values, item, stats, normalization)
        rank = (np.searchsorted(ordered, x, "left") + np.searchsorted(ordered, x, "right")) / (2.0 * max(1, len(ordered)))
        total = rank if total is None else total + rank
    return total / len(ranking)


# -- from the configuration ----------------------------------------------------------------------------------


def selection_of(config: Any) -> tuple[SelectionColumns, tuple[Item, ...] | None]:
    """The columns and the ranking ``config`` selects by (`None`: LongAttn's LDS, computed as in `hf_longattn.lds`).

    ``select_by`` (default: the run's ``scorer``) lists scorer names (each ranks by its own
    ranking: ``longattn_v1`` by LDS_T with ``alpha``) and score columns of the run's scorers
    (``prolong_lds``); several are combined by rank average.
    """
    from .errors import did_you_mean
    from .registry import SCORERS

    scorers = {name: SCORERS.get(name) for name in config.scorer_names()}
    chosen = config.select_by if config.select_by is not None else [config.scorer]
    chosen = [chosen] if isinstance(chosen, str) else list(chosen)
    by_column = {c.name: name for name, cls in scorers.items() for c in cls.columns(cls.settings_of(config))
                 if c.dtype == "float64"}
    items, statuses, labels, rankings = [], [], {}, []
    for entry in chosen:
        name = _scorer_name(entry, scorers)
        if name is None and entry not in by_column:
            known = [*scorers, *by_column]
            raise ValueError(f"select_by: {entry!r} is neither a scorer of this run nor one of its score columns"
                             f"{did_you_mean(entry, known)}; choose from {known} (add a scorer to `scorers` to rank by it)")
        cls = scorers[name or by_column[entry]]
        ranking = cls.ranking(cls.settings_of(config))
        terms = ranking.terms if name is not None else ((entry, 1.0),)
        items.append(tuple((column, float(config.alpha if weight == "alpha" else weight)) for column, weight in terms))
        rankings.append(ranking if name is not None or terms == ranking.terms else None)
        statuses.append(cls.status_columns()[1])
        labels.update({column: LONGATTN.labels.get(column, column) for column, _ in terms})
    statuses = tuple(dict.fromkeys(statuses))
    scores = tuple(dict.fromkeys(column for item in items for column, _ in item))
    used = tuple(dict.fromkeys(scorers[_scorer_name(e, scorers) or by_column[e]].registered_name for e in chosen))
    if len(items) == 1 and rankings[0] is not None:
        ranking = rankings[0]
        if used == ("longattn_v1",):
            return LONGATTN, None
        return SelectionColumns(statuses, scores, ranking.score, ranking.selected, ranking.label, labels,
                                scorers[used[0]].status_columns()[0], used), tuple(items)
    label = chosen[0] if len(chosen) == 1 else "rank average of " + ", ".join(chosen)
    return SelectionColumns(statuses, scores, GENERIC_SCORE, GENERIC_SELECTED, label, labels,
                            scorers[used[0]].status_columns()[0], used), tuple(items)


def _scorer_name(entry: str, scorers: Mapping[str, Any]) -> str | None:
    from .registry import SCORERS

    try:
        name = SCORERS.resolve(entry)
    except ValueError:
        return None
    return name if name in scorers else None


def describe_selection(columns: SelectionColumns, ranking: Sequence[Item] | None, normalization: str, alpha: float) -> str:
    """The selection score in one sentence, for the dataset card.

    Example:

    >>> describe_selection(SelectionColumns(("a_status",), ("a",), "a_selection_score", "a_selected", "A"), [(("a", 1.0),)],
    ...                    "zscore", 0.5)
    'The selection score `a_selection_score` (A) is N(`a`), N the z-score within each category (higher is better).'
    """
    norm = "z-score" if normalization == "zscore" else "min-max normalisation"
    if ranking is None:
        return (f"The selection score `{V.LDS}` is LDS_T = N(DS_T) + α·N(DU_T), α = {alpha:g}, N the {norm} within "
                "each category.")

    def text(item: Item) -> str:
        return " + ".join(f"N(`{column}`)" if weight == 1.0 else f"{weight:g}·N(`{column}`)" for column, weight in item)

    if len(ranking) == 1:
        return (f"The selection score `{columns.score}` ({columns.label}) is {text(ranking[0])}, N the {norm} within each "
                "category (higher is better).")
    return (f"The selection score `{columns.score}` is the {columns.label}: the mean over {len(ranking)} rankings of a "
            f"window's percentile rank within its category, the rankings being {'; '.join(text(i) for i in ranking)} "
            f"(N the {norm}), so that scorers on different scales weigh alike.")


# -- score columns as float64 ------------------------------------------------------------------------------


def float_column(column: Any) -> np.ndarray:
    """A numeric Arrow column as float64 numpy, nulls as NaN."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type) or pa.types.is_null(column.type)):
        raise ValueError(f"Score column of type {column.type} is not numeric")
    as_float = pc.cast(column, pa.float64())
    return pc.fill_null(as_float, float("nan")).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def float_values(values: Sequence[Any]) -> np.ndarray:
    """A batch column as float64 numpy, None as NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

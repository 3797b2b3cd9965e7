"""Selection: per-group LongAttn data score (LDS) from the score columns, and a top-fraction cut.

Terms. The scorer writes, per window, ``longattn_ds`` (DS_T, dependency strength),
``longattn_du`` (DU_T, dependency uniformity, = −mean_h V_h) and ``longattn_status`` (``"ok"``
for a scored row). A row is *valid* if its status is ``"ok"`` and both scores are finite.
Within each group (``by``, default ``category``) the valid rows get an LDS (`hf_longattn.lds`:
z-score as in the paper, or min-max as in the reference code).

The cut keeps the first ``n_keep = ⌊keep_fraction · n_valid⌋`` valid rows of the group in the
order (−LDS, id) — highest score first, ties broken by ascending id (code-point order) — with
``keep_fraction`` read as the decimal it prints as (``0.29 · 100`` gives 29, not 28). The group
remembers the last kept row ``(lds, id)``; a row is selected iff it is valid and
``(−lds, id) ≤ (−lds_last, id_last)``. That makes selection a pure function of a row's scores,
id and group plus the fitted statistics: it works on any shard, in any process, in any row order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from . import vocabulary as V
from .lds import (  # noqa: F401 - re-exported: their home before hf_longattn 0.2
    METHODS,
    NORMALIZATIONS,
    SELECTION_METHODS,
    _check_choice,
    _lds_from_stats,
    _normalization_stats,
    _random_key,
    check_alpha,
    check_keep_fraction,
    lds_scores,
)
from .ranking import (LONGATTN, SelectionColumns, combined_status, fit_stats, float_column, float_values,
                      selection_score, table_status)

DS_COLUMN, DU_COLUMN, STATUS_COLUMN, LDS_COLUMN, SELECTED_COLUMN = V.DS, V.DU, V.STATUS, V.LDS, V.SELECTED
OK_STATUS, NULL_STATUS = V.OK, V.NULL_STATUS

_FORMAT = "hf_longattn.LongAttnSelector"

# -- fitted state -------------------------------------------------------------------------------


@dataclass
class GroupSelection:
    """Fitted selection state of one group.

    Attributes:
        group: the group value (`None` when ``by=None``).
        n_rows (`int`): rows of the group.
        n_valid (`int`): rows with status ``"ok"`` and finite scores.
        n_keep (`int`): ``⌊keep_fraction · n_valid⌋``, the rows selected.
        threshold (`dict`, *optional*): the last kept row, ``{"lds": float, "id": str}`` for
            ``method="lds"``, ``{"key": int, "id": str}`` for ``method="random"``; `None` if
            ``n_keep == 0``.
        stats (`dict`): normalisation statistics of the valid rows (``ds_mean``, ``ds_std``,
            ``du_mean``, ``du_std`` for z-score; ``ds_min``, ``ds_max``, ``v_min``, ``v_max`` with
            ``V = −DU`` for min-max); values are `None` for a group without valid rows.
        not_ok (`dict[str, int]`): rows per status other than ``"ok"`` (a null status counts as ``"null"``).
        invalid_scores (`int`): rows with status ``"ok"`` but a null or non-finite score.
    """

    group: Any
    n_rows: int
    n_valid: int
    n_keep: int
    threshold: dict[str, Any] | None
    stats: dict[str, float | None]
    not_ok: dict[str, int] = field(default_factory=dict)
    invalid_scores: int = 0


class LongAttnSelector:
    """Select the top ``keep_fraction`` of windows per group by LongAttn data score (LDS).

    Fit once on the whole scored dataset (reads only the score, status, id and group columns, never
    the texts), then apply anywhere: :meth:`add_scores` (for ``map``) writes ``longattn_lds``
    (float64, null for non-valid rows) and ``longattn_selected`` (bool); calling the selector
    (for ``filter``) returns the selection mask. Selection rule: see the module docstring.

    * ``method="lds"``: keep the ``n_keep`` best rows by (−LDS, id).
    * ``method="random"``: the baseline; keep the same ``n_keep`` valid rows per group, ranked by
      64 bits of BLAKE2b of ``(seed, id)`` (ties by id) — deterministic, independent of row order.

    A null group value is an error (the message names the row): fill it explicitly, e.g. with
    ``ds.map(lambda r: {"category": r["category"] or "unknown"})``, or use ``by=None``.
    Duplicate ids among valid rows are an error too: ids break ties and define the cut.

    The selector pickles (and hashes, for the `datasets` cache) as its configuration plus the
    fitted state, :meth:`to_dict`.

    Args:
        keep_fraction (`float`, defaults to `0.5`): fraction of valid rows kept per group, in
            [0, 1] (reference code: 1/2; LongABC-32K: 1/8).
        by (`str`, *optional*, defaults to `"category"`): group column; `None` for one group.
        alpha (`float`, defaults to `0.5`): weight α of the uniformity term.
        normalization (`str`, defaults to `"zscore"`): ``"zscore"`` (paper) or ``"minmax"``
            (reference code).
        method (`str`, defaults to `"lds"`): ``"lds"`` or ``"random"``.
        seed (`int`, defaults to `0`): seed of the random baseline.
        id_column (`str`, defaults to `"id"`): the unique row id.

    Example:

    >>> from datasets import Dataset
    >>> scored = Dataset.from_dict({
    ...     "id": ["a", "b", "c", "d"], "category": ["Book", "Book", "Code", "Code"],
    ...     "longattn_ds": [0.3, 0.5, 0.2, 0.1], "longattn_du": [-1.0, -2.0, -1.0, -1.0],
    ...     "longattn_status": ["ok"] * 4})
    >>> selector = LongAttnSelector(keep_fraction=0.5).fit(scored)
    >>> list(scored.filter(selector, batched=True)["id"])
    ['b', 'c']
    >>> [(g["group"], g["valid"], g["kept"]) for g in selector.summary()]
    [('Book', 2, 1), ('Code', 2, 1)]
    """

    def __init__(
        self,
        keep_fraction: float = 0.5,
        *,
        by: str | None = "category",
        alpha: float = 0.5,
        normalization: str = "zscore",
        method: str = "lds",
        seed: int = 0,
        id_column: str = "id",
        ranking: Sequence[Sequence[Sequence[Any]]] | None = None,
        columns: SelectionColumns | Mapping[str, Any] | None = None,
    ) -> None:
        check_keep_fraction(keep_fraction)
        check_alpha(alpha)
        _check_choice("normalization", normalization, NORMALIZATIONS)
        SELECTION_METHODS.resolve(method)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.keep_fraction = float(keep_fraction)
        self.by = by
        self.alpha = float(alpha)
        self.normalization = normalization
        self.method = method
        self.seed = seed
        self.id_column = id_column
        self.ranking = None if ranking is None else tuple(tuple((str(c), float(w)) for c, w in item) for item in ranking)
        if isinstance(columns, Mapping):
            columns = SelectionColumns.from_dict(columns)
        if (columns is None) != (ranking is None):
            raise ValueError("pass `ranking` and `columns` together (hf_longattn.ranking.selection_of builds both), or neither "
                             "for LongAttn's LDS")
        self.columns: SelectionColumns = columns or LONGATTN
        self.groups: dict[Any, GroupSelection] | None = None

    def __repr__(self) -> str:
        state = "unfitted" if self.groups is None else f"{len(self.groups)} groups"
        return (
            f"LongAttnSelector(keep_fraction={self.keep_fraction}, by={self.by!r}, alpha={self.alpha}, "
            f"normalization={self.normalization!r}, method={self.method!r}, seed={self.seed}, "
            f"id_column={self.id_column!r}) [{state}]"
        )

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments."""
        return {
            "keep_fraction": self.keep_fraction,
            "by": self.by,
            "alpha": self.alpha,
            "normalization": self.normalization,
            "method": self.method,
            "seed": self.seed,
            "id_column": self.id_column,
            **({} if self.ranking is None else {"ranking": [[list(t) for t in item] for item in self.ranking],
                                                  "columns": self.columns.to_dict()}),
        }

    @property
    def required_columns(self) -> list[str]:
        """Columns that :meth:`fit` and :meth:`add_scores` read."""
        columns = [self.id_column, *self.columns.read]
        return columns + ([self.by] if self.by is not None else [])

    def n_keep(self, n_valid: int) -> int:
        """``⌊keep_fraction · n_valid⌋``, with ``keep_fraction`` taken as the decimal it prints as."""
        return math.floor(Fraction(repr(self.keep_fraction)) * n_valid)

    # -- fit -----------------------------------------------------------------------------------

    def fit(self, ds: Any) -> LongAttnSelector:
        """Compute per-group normalisation statistics and the cut from the whole scored dataset.

        Reads only :attr:`required_columns` (as Arrow, honouring any indices mapping of a
        filtered or shuffled dataset), so it scales to millions of rows.

        Args:
            ds (`datasets.Dataset` or `pyarrow.Table`): the scored windows.

        Returns:
            `LongAttnSelector`: ``self``, fitted.
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        table = self._read_columns(ds)
        n_rows = table.num_rows
        ids = table.column(self.id_column)
        if not pa.types.is_string(ids.type) and not pa.types.is_large_string(ids.type):
            ids = pc.cast(ids, pa.string())
        _raise_on_null(ids, self.id_column, "id_column")
        values = {column: float_column(table.column(column)) for column in self.columns.scores}
        status = self._status(table)
        ok = pc.equal(status, OK_STATUS).to_numpy(zero_copy_only=False)
        valid = ok & np.logical_and.reduce([np.isfinite(v) for v in values.values()])

        if self.by is None:
            codes = np.zeros(n_rows, dtype=np.int64)
            group_values: list[Any] = [None]
        else:
            group_column = table.column(self.by)
            _raise_on_null(group_column, self.by, "group column `by`", hint=" (fill it, e.g. with 'unknown', or use by=None)")
            encoded = group_column.combine_chunks().dictionary_encode()
            codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            group_values = encoded.dictionary.to_pylist()

        valid_ids = ids.filter(pa.array(valid))
        if pc.count_distinct(valid_ids).as_py() != len(valid_ids):
            counts = pc.value_counts(valid_ids)
            example = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
            raise ValueError(f"Column '{self.id_column}' has duplicate ids among scored rows, e.g. {example!r}; ids must be unique")

        status_encoded = status.dictionary_encode()
        status_codes = status_encoded.indices.to_numpy(zero_copy_only=False)
        status_names = status_encoded.dictionary.to_pylist()

        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(group_values) + 1))
        groups: dict[Any, GroupSelection] = {}
        for code, group in enumerate(group_values):
            rows = order[bounds[code] : bounds[code + 1]]
            groups[group] = self._fit_group(group, rows, valid, ok, ids, values, status_codes, status_names)
        self.groups = dict(sorted(groups.items(), key=lambda item: str(item[0])))
        return self

    def _fit_group(
        self,
        group: Any,
        rows: np.ndarray,
        valid: np.ndarray,
        ok: np.ndarray,
        ids: Any,
        values: dict[str, np.ndarray],
        status_codes: np.ndarray,
        status_names: list[str],
    ) -> GroupSelection:
        import pyarrow as pa
        import pyarrow.compute as pc

        valid_rows = rows[valid[rows]]
        group_values = {column: v[valid_rows] for column, v in values.items()}
        if self.ranking is None:
            stats = _normalization_stats(group_values[DS_COLUMN], group_values[DU_COLUMN], self.normalization)
        else:
            stats = fit_stats(group_values, self.ranking, self.normalization)
        lds = self._score(group_values, stats)
        group_ids = ids.take(pa.array(valid_rows, type=pa.int64())).combine_chunks()
        n_keep = self.n_keep(len(valid_rows))

        threshold = None
        if n_keep > 0:
            method = SELECTION_METHODS.get(self.method)
            ranking = pa.table({"rank": method.ranks(lds, group_ids.to_pylist(), self.seed), "id": group_ids})
            order = "descending" if method.descending else "ascending"
            last = pc.sort_indices(ranking, sort_keys=[("rank", order), ("id", "ascending")])[n_keep - 1].as_py()
            threshold = {method.threshold_key: ranking.column("rank")[last].as_py(), "id": group_ids[last].as_py()}

        non_ok = rows[~ok[rows]]
        not_ok_counts = np.bincount(status_codes[non_ok], minlength=len(status_names))
        not_ok = {status_names[i]: int(c) for i, c in enumerate(not_ok_counts) if c}
        fitted = GroupSelection(
            group=group,
            n_rows=int(len(rows)),
            n_valid=int(len(valid_rows)),
            n_keep=n_keep,
            threshold=threshold,
            stats=stats,
            not_ok=dict(sorted(not_ok.items())),
            invalid_scores=int(ok[rows].sum() - len(valid_rows)),
        )
        # The selection rule applied row by row must reproduce the cut exactly.
        selected = self._select(fitted, lds, group_ids.to_pylist())
        if int(selected.sum()) != n_keep:
            raise RuntimeError(f"group {group!r}: the threshold selects {int(selected.sum())} rows instead of {n_keep}")
        return fitted

    def _score(self, values: Mapping[str, np.ndarray], stats: Mapping[str, Any]) -> np.ndarray:
        """The selection score of rows of one group: LongAttn's LDS, or the ranking's (`hf_longattn.ranking`)."""
        if self.ranking is None:
            return _lds_from_stats(values[DS_COLUMN], values[DU_COLUMN], stats, self.alpha, self.normalization)
        return selection_score(values, self.ranking, stats, self.normalization)

    def _status(self, table: Any) -> Any:
        """One status per row (Arrow strings): ``ok`` when every status column is, else the first other one."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if len(self.columns.statuses) == 1:
            return pc.fill_null(pc.cast(table.column(self.columns.statuses[0]), pa.string()), NULL_STATUS).combine_chunks()
        return pa.array(table_status(table, self.columns.statuses), pa.string())

    def fit_files(self, paths: Sequence[Any]) -> LongAttnSelector:
        """Fit from many parquet score files at once, reading only :attr:`required_columns` (`pyarrow.dataset`).

        Gives the same fit as :meth:`fit` on the files concatenated (group statistics come from
        sorted values, so they do not depend on how rows are split over files).

        Example:

        >>> selector = LongAttnSelector(keep_fraction=0.125).fit_files(sorted(Path("run/scores").glob("chunk-*.parquet")))  # doctest: +SKIP
        """
        import pyarrow.dataset as pads

        dataset = pads.dataset([str(path) for path in paths], format="parquet")
        missing = [column for column in self.required_columns if column not in dataset.schema.names]
        if missing:
            raise ValueError(f"Columns {missing} not in the score files. Current columns: {dataset.schema.names}")
        return self.fit(dataset.to_table(columns=self.required_columns))

    def _read_columns(self, ds: Any) -> Any:
        import pyarrow as pa

        columns = self.required_columns
        if isinstance(ds, pa.Table):
            present = ds.column_names
        elif hasattr(ds, "select_columns") and hasattr(ds, "column_names"):
            present = ds.column_names
        else:
            raise TypeError(f"fit expects a datasets.Dataset or a pyarrow.Table, got {type(ds).__name__}")
        missing = [column for column in columns if column not in present]
        if missing:
            raise ValueError(f"Columns {missing} not in the dataset. Current columns: {list(present)}")
        if isinstance(ds, pa.Table):
            return ds.select(columns)
        return ds.select_columns(columns).with_format("arrow")[:]

    # -- apply ---------------------------------------------------------------------------------

    def _select(self, fitted: GroupSelection, lds: np.ndarray, ids: list[str]) -> np.ndarray:
        """Selection rule for the valid rows of one group: ``(−lds, id) ≤ (−lds_last, id_last)``."""
        threshold = fitted.threshold
        if threshold is None or not ids:
            return np.zeros(len(ids), dtype=bool)
        method = SELECTION_METHODS.get(self.method)
        ranks = method.ranks(lds, ids, self.seed)
        last = np.asarray(threshold[method.threshold_key], dtype=ranks.dtype)
        better = ranks > last if method.descending else ranks < last
        return better | ((ranks == last) & (np.array(ids, dtype=object) <= threshold["id"]))

    def _check_fitted(self) -> dict[Any, GroupSelection]:
        if self.groups is None:
            raise RuntimeError("This LongAttnSelector is not fitted yet; call fit(ds) first")
        return self.groups

    def add_scores(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
        """Add ``longattn_lds`` and ``longattn_selected`` to a batch (for ``map(..., batched=True)``).

        Each row's values depend only on its own scores, status, id and group and on the fitted
        state, so any shard in any process gets the same answer. The two columns carry their
        declared types (:meth:`output_features`), so a batch without valid rows still types
        ``longattn_lds`` as float64: ``features=`` is not needed.

        Args:
            batch (`dict[str, list]`): a batch with :attr:`required_columns`.

        Returns:
            `dict[str, list]`: ``longattn_lds`` (`float` or `None` for non-valid rows) and
            ``longattn_selected`` (`bool`).
        """
        groups = self._check_fitted()
        missing = [column for column in self.required_columns if column not in batch]
        if missing:
            raise ValueError(f"Columns {missing} not in the batch. Current columns: {list(batch.keys())}")
        values = {column: float_values(batch[column]) for column in self.columns.scores}
        n = len(batch[self.id_column])
        status = combined_status([batch[c] for c in self.columns.statuses])
        valid = np.array([s == OK_STATUS for s in status], dtype=bool) & np.logical_and.reduce(
            [np.isfinite(v) for v in values.values()])
        ids = [None if i is None else str(i) for i in batch[self.id_column]]
        group_of = [None] * n if self.by is None else list(batch[self.by])

        rows_by_group: dict[Any, list[int]] = {}
        for row, group in enumerate(group_of):
            if self.by is not None and group is None:
                raise ValueError(f"Column '{self.by}' (group column `by`) is null at batch row {row}")
            if valid[row]:
                if ids[row] is None:
                    raise ValueError(f"Column '{self.id_column}' (id_column) is null at batch row {row}")
                rows_by_group.setdefault(group, []).append(row)
        lds = np.full(n, np.nan)
        selected = np.zeros(n, dtype=bool)
        for group, rows in rows_by_group.items():
            if group not in groups:
                raise ValueError(f"Group {group!r} was not seen by fit. Fitted groups: {list(groups)}")
            fitted = groups[group]
            index = np.array(rows, dtype=np.int64)
            lds[index] = self._score({column: v[index] for column, v in values.items()}, fitted.stats)
            selected[index] = self._select(fitted, lds[index], [ids[r] for r in rows])
        return V.typed_columns(self.output_features({}), {
            self.columns.score: [float(x) if ok else None for x, ok in zip(lds.tolist(), valid.tolist())],
            self.columns.selected: selected.tolist(),
        })

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> list[bool]:
        """Selection mask of a batch (for ``filter(selector, batched=True)``).

        Uses the batch's ``longattn_selected`` column if present (null counts as not selected),
        else computes it with :meth:`add_scores`.
        """
        if self.columns.selected in batch:
            return [bool(x) for x in batch[self.columns.selected]]
        return self.add_scores(batch)[self.columns.selected]

    def output_features(self, input_features: Mapping[str, Any]) -> Any:
        """`datasets.Features` of ``ds.map(selector.add_scores, batched=True)``'s output."""
        from datasets import Features, Value

        return Features({**input_features, self.columns.score: Value("float64"), self.columns.selected: Value("bool")})

    def transform(self, ds: Any, **map_kwargs: Any) -> Any:
        """``ds.map(self.add_scores, batched=True, features=...)``: the dataset with both columns added."""
        return ds.map(self.add_scores, batched=True, features=self.output_features(ds.features), **map_kwargs)

    # -- reporting and persistence -----------------------------------------------------------

    def summary(self) -> list[dict[str, Any]]:
        """One dict per group for the dataset card.

        Keys: ``group``, ``rows``, ``valid``, ``kept``, ``kept_fraction_of_valid``, ``threshold``
        (the last kept row, or `None`), ``not_ok`` (rows per status other than ``"ok"``) and
        ``invalid_scores`` (``"ok"`` rows with null or non-finite scores).
        """
        return [
            {
                "group": g.group,
                "rows": g.n_rows,
                "valid": g.n_valid,
                "kept": g.n_keep,
                "kept_fraction_of_valid": g.n_keep / g.n_valid if g.n_valid else 0.0,
                "threshold": None if g.threshold is None else dict(g.threshold),
                "not_ok": dict(g.not_ok),
                "invalid_scores": g.invalid_scores,
            }
            for g in self._check_fitted().values()
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable configuration and fitted state (floats round-trip exactly through JSON)."""
        from . import __version__

        return {
            "format": _FORMAT,
            "hf_longattn_version": __version__,
            "config": self.config,
            "groups": None if self.groups is None else [asdict(g) for g in self.groups.values()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LongAttnSelector:
        """Rebuild a selector saved with :meth:`to_dict`."""
        if data.get("format") != _FORMAT:
            raise ValueError(f"Not a saved LongAttnSelector (format {data.get('format')!r}, expected {_FORMAT!r})")
        selector = cls(**data["config"])
        if data.get("groups") is not None:
            groups = [{("not_ok" if k == "dropped" else k): v for k, v in g.items()} for g in data["groups"]]  # 0.1 name
            selector.groups = {g["group"]: GroupSelection(**g) for g in groups}
        return selector

    def __getstate__(self) -> dict[str, Any]:
        # Pickle (and the `datasets` fingerprint) = configuration + fitted state, nothing else.
        return self.to_dict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(type(self).from_dict(state).__dict__)


# -- column helpers -----------------------------------------------------------------------------


def _raise_on_null(column: Any, name: str, role: str, hint: str = "") -> None:
    import pyarrow.compute as pc

    if column.null_count:
        first = int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"Column '{name}' ({role}) is null at row {first}{hint}")

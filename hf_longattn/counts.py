"""Counts per category, computed once from the windows statistics and the selection, and rendered as text tables.

`category_counts` is the one place that counts: ``summary.json``, the CLI table, the dataset card
and the plots all read what it returns. The names are those of `hf_longattn.vocabulary.COUNTERS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import vocabulary as V
from .ranking import LONGATTN, SelectionColumns, table_status

LONGATTN_MEDIANS = {V.DS: "median_ds", V.DU: "median_du", V.LDS: "median_lds"}


def format_number(value: Any) -> str:
    """Format a table number: ints with thousands separators, floats with 4 significant digits.

    Example:

    >>> format_number(1200), format_number(0.123456), format_number(None)
    ('1,200', '0.1235', '—')
    """
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


def median_key(column: str) -> str:
    """The summary key of a score column's median: ``median_ds``, ``median_du``, ``median_lds`` for LongAttn's, else
    ``median_<column>``."""
    return LONGATTN_MEDIANS.get(column, f"median_{column}")


def median_keys(columns: SelectionColumns = LONGATTN) -> list[str]:
    return [median_key(column) for column in (*columns.scores, columns.score)]


def row_counts(table: Any, columns: SelectionColumns = LONGATTN) -> dict[str, Any]:
    """Counts, token sums and score medians of scored rows (a `pyarrow.Table` with the selection columns).

    Keys: ``windows``, ``scored_ok``, ``not_ok`` (rows per status other than ok, sorted), ``kept``,
    ``tokens_in``, ``tokens_out`` (from ``longattn_num_tokens``, else the length of ``input_ids``),
    and the medians of the score columns over ok rows (:func:`median_keys`: ``median_ds``,
    ``median_du``, ``median_lds`` for LongAttn; `None` without such a column). ``columns``
    (`hf_longattn.ranking.SelectionColumns`) names the status, score and flag columns.
    """
    import pyarrow.compute as pc

    status = np.array(table_status(table, columns.statuses), dtype=object)
    selected = pc.fill_null(table.column(columns.selected), False).to_numpy(zero_copy_only=False).astype(bool)
    tokens = np.nan_to_num(_token_counts(table, columns.num_tokens))
    ok = status == V.OK
    values, counts = np.unique(status[~ok], return_counts=True)

    def median(name: str) -> float | None:
        if name not in table.column_names:
            return None
        finite = _floats(table, name)[ok]
        finite = finite[np.isfinite(finite)]
        return float(np.median(finite)) if finite.size else None

    return {
        "windows": int(len(status)),
        "scored_ok": int(ok.sum()),
        "not_ok": {str(v): int(c) for v, c in zip(values, counts)},
        "kept": int(selected.sum()),
        "tokens_in": int(tokens.sum()),
        "tokens_out": int(tokens[selected].sum()),
        **{median_key(column): median(column) for column in (*columns.scores, columns.score)},
    }


def _token_counts(table: Any, column: str = V.NUM_TOKENS) -> np.ndarray:
    """Tokens per row: ``column`` (``longattn_num_tokens``), else the length of ``input_ids``, else 0."""
    import pyarrow.compute as pc

    if column in table.column_names:
        return _floats(table, column)
    if V.INPUT_IDS in table.column_names:
        lengths = pc.fill_null(pc.list_value_length(table.column(V.INPUT_IDS)), 0)
        return lengths.to_numpy(zero_copy_only=False).astype(np.float64)
    return np.zeros(table.num_rows)


def _floats(table: Any, name: str) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    column = pc.cast(table.column(name), pa.float64())
    return pc.fill_null(column, float("nan")).to_numpy(zero_copy_only=False).astype(np.float64)


def category_counts(selection: Any, windows_stats: Mapping[str, Any] | None = None,
                    thresholds: Mapping[str, Any] | None = None,
                    columns: SelectionColumns = LONGATTN) -> dict[str, dict[str, Any]]:
    """Per-category counters of a run: documents (from the windows step), rows (from ``selection``), thresholds.

    Args:
        selection (`pyarrow.Table`): ``selection.parquet`` (``category`` and the selection columns).
        windows_stats (`dict`, *optional*): the ``categories`` of ``windows/windows_stats.json``.
        thresholds (`dict`, *optional*): category → the last kept row ``{"lds": float, "id": str}``
            (`LongAttnSelector.summary`), for ``threshold`` and ``threshold_id``.
        columns (`SelectionColumns`, defaults to LongAttn's): the selection's columns (`LongAttnSelector.columns`).

    Returns:
        `dict`: category → counters in the order of ``summary.json``.
    """
    import pyarrow.compute as pc

    windows_stats = windows_stats or {}
    thresholds = thresholds or {}
    categories = sorted(set(windows_stats) | set(selection.column(V.CATEGORY).to_pylist()) | set(thresholds))
    result: dict[str, dict[str, Any]] = {}
    for category in categories:
        rows = row_counts(selection.filter(pc.equal(selection.column(V.CATEGORY), category)), columns)
        documents = windows_stats.get(category, {})
        threshold = thresholds.get(category) or {}
        result[category] = {
            "documents": documents.get("documents", 0),
            "documents_too_short": documents.get("documents_too_short", 0),
            "tokens_documents": documents.get("tokens_documents", 0),
            "windows": rows["windows"],
            "windows_left_out": documents.get("windows_left_out", 0),
            "scored_ok": rows["scored_ok"],
            "not_ok": rows["not_ok"],
            "kept": rows["kept"],
            "tokens_in": rows["tokens_in"],
            "tokens_out": rows["tokens_out"],
            **{key: rows[key] for key in median_keys(columns)},
            "threshold": threshold.get("lds"),
            "threshold_id": threshold.get("id"),
        }
    return result


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A plain-text table, numbers right-aligned.

    Example:

    >>> print(format_table(["category", "windows"], [["code", 1200]]))
    category  windows
    --------  -------
    code        1,200
    """
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) and bool(rows)
               for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True)).rstrip()

    out = ([title] if title else []) + [line([str(h) for h in header]), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _cell(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "—"
    return format_number(value)


SUMMARY_HEADER = ["category", "docs", "too short", "windows", "left out", "scored ok", "not ok", "kept",
                  "tokens in", "tokens out", "DS_T median", "DU_T median", "LDS_T median", "LDS_T threshold"]


def format_summary(summary: Mapping[str, Any]) -> str:
    """The per-category summary table and the step timings, as printed at the end of a run."""
    if not summary:
        return ""
    columns = SelectionColumns.from_dict(summary["selection"]) if summary.get("selection") else LONGATTN
    rows = [
        [c, s["documents"], s["documents_too_short"], s["windows"], s["windows_left_out"], s["scored_ok"],
         s["not_ok"] or None, s["kept"], s["tokens_in"], s["tokens_out"], *(s.get(key) for key in median_keys(columns)),
         s["threshold"]]
        for c, s in summary["categories"].items()
    ]
    header = SUMMARY_HEADER
    if columns != LONGATTN:
        header = [*SUMMARY_HEADER[:10], *(f"{columns.label_of(c)} median" for c in (*columns.scores, columns.score)),
                  f"{columns.label} threshold"]
    title = (
        f"LongAttn summary: model {summary['model']}, W = {summary['window_size']}, "
        f"k = {summary.get('min_distance_tokens', summary['min_distance'])}, "
        f"alpha = {summary['alpha']}, {summary['normalization']}, keep {summary['keep_fraction']} "
        f"({summary['selection_method']})"
    ) if columns == LONGATTN else (
        f"Selection summary: {columns.label} (scorers {', '.join(columns.scorers)}), model {summary['model']}, "
        f"W = {summary['window_size']}, {summary['normalization']}, keep {summary['keep_fraction']} "
        f"({summary['selection_method']})"
    )
    timings = summary.get("timings") or {}
    timing_line = "wall time: " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in timings.items())
    check = (summary.get("scorer_check") or {}).get("sentence")
    return (format_table(header, rows, title=title) + ("\n" + timing_line if timings else "")
            + (f"\nscorer check: {check}" if check else ""))

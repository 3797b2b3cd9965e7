"""Plots of LongAttn scores and selection per category (matplotlib Agg, imported lazily)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import vocabulary as V
from .ranking import LONGATTN, SelectionColumns

#: Column → (axis title, unit) for the three LongAttn statistics.
SCORE_AXES: dict[str, tuple[str, str]] = {
    V.DS: ("DS_T (dependency strength)", "mean far attention mass per query row, 0–1"),
    V.DU: ("DU_T (dependency uniformity)", "− variance of far attention map, probability²"),
    V.LDS: ("LDS_T (selection score)", "normalised units"),
}
_LDS_UNITS = {"zscore": "z-score units (σ)", "minmax": "min–max units, 0–1 scale"}

KEPT_COLOR = "#1b9e77"
DROPPED_COLOR = "#d95f02"
NOT_OK_COLOR = "#7f7f7f"
THRESHOLD_COLOR = "#222222"


def _require_matplotlib() -> tuple[Any, Any]:
    """Import matplotlib lazily and return ``(Figure, FigureCanvasAgg)``; never touches pyplot's global backend."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "Plotting LongAttn scores needs matplotlib: `pip install hf-longattn[plots]` "
            "(or `pip install matplotlib`)."
        ) from err
    return Figure, FigureCanvasAgg


def score_axes(columns: SelectionColumns = LONGATTN, normalization: str | None = None) -> dict[str, tuple[str, str]]:
    """Column → (axis title, unit) of the score panels: LongAttn's three, else each score column and the selection score."""
    if columns == LONGATTN:
        axes = dict(SCORE_AXES)
        axes[V.LDS] = (axes[V.LDS][0], _LDS_UNITS.get(normalization or "", SCORE_AXES[V.LDS][1]))
        return axes
    axes = {column: (columns.label_of(column), "score") for column in columns.scores}
    unit = "mean percentile rank, 0–1" if columns.score == "selection_score" and len(columns.scores) > 1 else \
        _LDS_UNITS.get(normalization or "", "normalised units")
    axes[columns.score] = (f"{columns.label} (selection score)", unit)
    return axes


def _plot_columns(columns: SelectionColumns) -> list[str]:
    return [*columns.statuses, columns.selected, *columns.scores, columns.score]


def _check_columns(dataset: Any, columns: SelectionColumns = LONGATTN) -> None:
    """Raise a `ValueError` listing the columns of one split if it lacks one the plots read."""
    missing = [name for name in _plot_columns(columns) if name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Cannot plot LongAttn scores: missing column(s) {missing}. "
            f"Current columns: {dataset.column_names}"
        )


def _window_table(dataset: Any, columns: SelectionColumns = LONGATTN) -> dict[str, list]:
    """Return the status, selection and score columns of one split as Python lists (row order kept)."""
    from .ranking import combined_status

    _check_columns(dataset, columns)
    table = dataset.select_columns(list(dict.fromkeys(_plot_columns(columns)))).with_format("arrow")[:]
    values = {name: table.column(name).to_pylist() for name in table.column_names}
    values["_status"] = combined_status([values[c] for c in columns.statuses])
    values["_selected"] = values[columns.selected]
    return values


def _split_rows(columns: Mapping[str, list], score: str) -> tuple[list[float], list[float]]:
    """Return the finite ``score`` values of ok rows, as (kept, dropped)."""
    kept: list[float] = []
    dropped: list[float] = []
    for status, selected, value in zip(columns["_status"], columns["_selected"], columns[score]):
        if status != V.OK or value is None or not math.isfinite(value):
            continue
        (kept if selected else dropped).append(float(value))
    return kept, dropped


def _save(fig: Any, canvas_cls: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG to ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas_cls(fig)
    # No "Software" stamp, so identical inputs give identical bytes across matplotlib versions.
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    return path


def plot_score_distributions(
    scored: Mapping[str, Any],
    thresholds: Mapping[str, float | None] | None,
    path: str | Path,
    *,
    normalization: str | None = None,
    bins: int = 30,
    columns: SelectionColumns = LONGATTN,
) -> Path:
    """Plot histograms of DS_T, DU_T and LDS_T, one row per category, kept vs dropped in two colours.

    Only rows with ``longattn_status == "ok"`` and a finite score are drawn; the selection
    threshold (the lowest kept LDS_T of the category) is a vertical line on the LDS_T panel.

    Args:
        scored (`Mapping[str, datasets.Dataset]`):
            One scored split per category (e.g. a `datasets.DatasetDict`), with the columns
            ``longattn_status``, ``longattn_selected``, ``longattn_ds``, ``longattn_du`` and
            ``longattn_lds``.
        thresholds (`Mapping[str, float | None]`, *optional*):
            LDS_T threshold per split name; missing or `None` draws no line.
        path (`str` or `Path`):
            Output PNG file.
        normalization (`str`, *optional*):
            ``"zscore"`` or ``"minmax"``; only used to label LDS_T's unit.
        bins (`int`, defaults to `30`):
            Histogram bins per panel (shared by kept and dropped).
        columns (`hf_longattn.ranking.SelectionColumns`, defaults to LongAttn's):
            the selection's status, score and flag columns (another scorer's, or a rank average).

    Returns:
        `Path`: the written PNG.

    Example:

    ```py
    >>> from datasets import Dataset, DatasetDict
    >>> rows = {"longattn_status": ["ok", "ok"], "longattn_selected": [True, False],
    ...         "longattn_ds": [0.4, 0.2], "longattn_du": [-1e-7, -3e-7], "longattn_lds": [1.0, -1.0]}
    >>> plot_score_distributions(DatasetDict({"code": Dataset.from_dict(rows)}), {"code": 1.0}, "scores.png")
    PosixPath('scores.png')
    ```
    """
    figure_cls, canvas_cls = _require_matplotlib()
    import numpy as np

    if not scored:
        raise ValueError("Cannot plot score distributions: `scored` has no splits.")
    thresholds = dict(thresholds or {})
    names = list(scored)
    panels = score_axes(columns, normalization)
    fig = figure_cls(figsize=(5 * len(panels), 3.4 * len(names) + 0.8), layout="constrained")
    axes = fig.subplots(len(names), len(panels), squeeze=False)
    for row, name in enumerate(names):
        table = _window_table(scored[name], columns)
        for col, (score, (title, unit)) in enumerate(panels.items()):
            ax = axes[row][col]
            kept, dropped = _split_rows(table, score)
            ax.set_title(f"{name} — {title}", fontsize=10)
            ax.set_xlabel(unit, fontsize=9)
            ax.set_ylabel("windows", fontsize=9)
            if not kept and not dropped:
                ax.text(0.5, 0.5, "no scored windows", ha="center", va="center", transform=ax.transAxes)
                continue
            values = np.asarray(kept + dropped, dtype=np.float64)
            low, high = float(values.min()), float(values.max())
            if low == high:  # one distinct value: give the bins a width
                pad = abs(low) * 0.05 or 0.5
                low, high = low - pad, high + pad
            edges = np.linspace(low, high, bins + 1)
            ax.hist(
                [kept, dropped],
                bins=edges,
                stacked=True,
                color=[KEPT_COLOR, DROPPED_COLOR],
                label=[f"kept ({len(kept)})", f"dropped ({len(dropped)})"],
            )
            threshold = thresholds.get(name)
            if score == columns.score and threshold is not None and math.isfinite(threshold):
                ax.axvline(threshold, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.5,
                           label=f"threshold = {threshold:.4g}")
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
            ax.legend(fontsize=8)
    fig.suptitle("LongAttn scores per category (status ok windows only)" if columns == LONGATTN else
                 f"Scores per category, selection by {columns.label} (status ok windows only)", fontsize=12)
    return _save(fig, canvas_cls, path)


def plot_kept_vs_dropped(scored: Mapping[str, Any], path: str | Path, columns: SelectionColumns = LONGATTN) -> Path:
    """Plot, per category, a stacked bar of windows kept, dropped and not scored (status not ok).

    Args:
        scored (`Mapping[str, datasets.Dataset]`):
            One scored split per category, with the columns ``longattn_status`` and
            ``longattn_selected``.
        path (`str` or `Path`):
            Output PNG file.

    Returns:
        `Path`: the written PNG.

    Example:

    ```py
    >>> from datasets import Dataset, DatasetDict
    >>> rows = {"longattn_status": ["ok", "ok", "too_short"], "longattn_selected": [True, False, False],
    ...         "longattn_ds": [0.4, 0.2, None], "longattn_du": [-1e-7, -3e-7, None],
    ...         "longattn_lds": [1.0, -1.0, None]}
    >>> plot_kept_vs_dropped(DatasetDict({"code": Dataset.from_dict(rows)}), "kept.png")
    PosixPath('kept.png')
    ```
    """
    figure_cls, canvas_cls = _require_matplotlib()
    import numpy as np

    if not scored:
        raise ValueError("Cannot plot kept vs dropped: `scored` has no splits.")
    from .counts import row_counts

    names = list(scored)
    counts = {"kept": [], "dropped": [], "not ok": []}
    for name in names:
        _check_columns(scored[name], columns)
        rows = row_counts(scored[name].select_columns([*columns.statuses, columns.selected]).with_format("arrow")[:], columns)
        counts["kept"].append(rows["kept"])
        counts["dropped"].append(rows["scored_ok"] - rows["kept"])
        counts["not ok"].append(rows["windows"] - rows["scored_ok"])

    fig = figure_cls(figsize=(max(6.0, 1.6 * len(names) + 3), 4.5), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    colors = {"kept": KEPT_COLOR, "dropped": DROPPED_COLOR, "not ok": NOT_OK_COLOR}
    labels = {"kept": "kept (selected)", "dropped": "dropped (ok, not selected)", "not ok": "not scored (status ≠ ok)"}
    for key in ("kept", "dropped", "not ok"):
        heights = np.asarray(counts[key], dtype=float)
        bars = ax.bar(x, heights, bottom=bottom, color=colors[key], label=labels[key], width=0.6)
        ax.bar_label(bars, labels=[str(int(h)) if h else "" for h in heights], label_type="center", fontsize=8)
        bottom += heights
    ax.set_xticks(x, names, rotation=20 if len(names) > 4 else 0)
    ax.set_xlabel("category (split)")
    ax.set_ylabel("windows (rows)")
    ax.set_title("LongAttn selection per category" if columns == LONGATTN else f"Selection by {columns.label} per category")
    ax.legend(fontsize=8)
    return _save(fig, canvas_cls, path)

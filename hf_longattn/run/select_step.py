"""Step 3, select: fit `LongAttnSelector` on the merged scores, write the selection, and summarise the run.

Main process only. Selection settings (``keep_fraction``, ``alpha``, ``normalization``,
``selection_method``, ``seed``) may change between launches: re-selecting reuses the scores.
"""

from __future__ import annotations

from typing import Any

from .. import vocabulary as V
from ..selection import LongAttnSelector
from .context import Run
from .score_step import merged_scores
from .storage import atomic_write, atomic_write_json, read_json
from .windows_step import prepare


def selector_of(run: Run) -> LongAttnSelector:
    """The unfitted selector the configuration asks for (groups: ``category``)."""
    config = run.config
    return LongAttnSelector(keep_fraction=config.keep_fraction, by=V.CATEGORY, alpha=config.alpha,
                            normalization=config.normalization, method=config.selection_method, seed=config.seed)


def select(run: Run) -> dict[str, Any]:
    """Fit the selector per category; write ``selection.parquet``, ``selector.json`` and ``summary.json``.

    Main process only (the others return ``{}`` at once). Returns the summary (see :func:`summary`).
    """
    prepare(run)
    if not run.is_main:
        return {}
    return run.timed("select", lambda: _select(run))


def _select(run: Run) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    scores = merged_scores(run)  # every chunk checked against the windows it must hold
    selector = selector_of(run).fit(scores)
    lds: list = []
    selected: list = []
    step = 65536
    for offset in range(0, scores.num_rows, step):
        added = selector.add_scores(scores.slice(offset, step).to_pydict())
        lds.extend(added[V.LDS])
        selected.extend(added[V.SELECTED])
    table = scores.append_column(V.LDS, pa.array(lds, pa.float64())).append_column(V.SELECTED, pa.array(selected, pa.bool_()))
    atomic_write(run.folder.selection, lambda tmp: pq.write_table(table, tmp))
    atomic_write_json(run.folder.selector, selector.to_dict())
    result = summary(run, table, selector)
    atomic_write_json(run.folder.summary, result)
    return result


def selection_is_current(run: Run) -> bool:
    """Whether ``selection.parquet`` was made with the configuration's selection settings."""
    folder = run.folder
    if not folder.selector.is_file() or not folder.selection.is_file():
        return False
    saved = read_json(folder.selector, what="the fitted selector", remedy="delete it and run the `select` step")
    return saved.get("config") == selector_of(run).config


def load_selector(run: Run, remedy: str = "delete it and run the `select` step") -> LongAttnSelector:
    """The fitted selector saved in ``selector.json`` (``remedy``: what the error says to do if it is missing or bad)."""
    data = read_json(run.folder.selector, what="the fitted selector", remedy=remedy)
    return LongAttnSelector.from_dict(data)


def summary(run: Run, selection: Any = None, selector: LongAttnSelector | None = None) -> dict[str, Any]:
    """The run's settings, its counts per category (`hf_longattn.counts.category_counts`) and step timings.

    Keys per category: ``documents``, ``documents_too_short``, ``tokens_documents``, ``windows``,
    ``windows_left_out``, ``scored_ok``, ``not_ok`` (rows per status), ``kept``, ``tokens_in`` /
    ``tokens_out`` (tokens of the scored / kept windows), ``median_ds``, ``median_du``,
    ``median_lds`` (ok rows), ``threshold`` (the lowest LDS_T kept) and ``threshold_id``.
    """
    import pyarrow.parquet as pq

    from ..counts import category_counts
    from ..config import min_distance_tokens

    if selection is None:
        selection = pq.read_table(run.folder.selection)
    if selector is None:
        selector = load_selector(run)
    thresholds = {row["group"]: row["threshold"] for row in selector.summary()}
    config = run.config
    return {
        "model": config.model,
        "window_size": config.window_size,
        "min_distance": config.min_distance,
        "min_distance_tokens": min_distance_tokens(config.min_distance, config.window_size),
        "alpha": config.alpha,
        "normalization": config.normalization,
        "keep_fraction": config.keep_fraction,
        "selection_method": config.selection_method,
        "categories": category_counts(selection, run.windows_stats()["categories"], thresholds),
        "scorer_check": scorer_check(run),
        "timings": run.all_timings(),
    }


NOT_PROBED = ("No probe was run for this model and layer: the ranking is only as good as the scoring layer's "
              "attention, so run `hf-longattn probe` (README: Choosing a scoring model and layer) before relying "
              "on this selection.")


def scorer_check(run: Run) -> dict[str, Any]:
    """What ``probe/report.json`` says about the scored layer (`hf_longattn.probe.ProbeReport.scorer_check`).

    A report of another model, window size or min distance, or none, gives the assessment
    ``not probed`` and a sentence that says to run the probe. The summary prints the sentence and
    the dataset card opens with it, so the two always say the same.
    """
    from ..config import min_distance_tokens

    path, config = run.folder.probe / "report.json", run.config
    if path.is_file():
        from ..model_loading import resolve_model
        from ..probe import ProbeReport

        report = ProbeReport.from_json(path)
        probed = report.config
        k = min_distance_tokens(config.min_distance, config.window_size)
        probed_k = min_distance_tokens(probed.get("min_distance", 0.25), int(probed.get("window_size") or 1))
        if (probed.get("model") == resolve_model(config.model) and probed.get("window_size") == config.window_size
                and probed_k == k):
            return report.scorer_check(config.layer)
    return {"layer": config.layer, "auc_lds": None, "best_layer": None, "assessment": "not probed",
            "sentence": NOT_PROBED}

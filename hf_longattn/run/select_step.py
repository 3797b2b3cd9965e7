"""Step 4, select (one task): fit `LongAttnSelector` on the merged scores, write the selection and its record; summarise.

``selection.parquet`` holds every window's scores (of every scorer of the run), the selection
score and flag (``longattn_lds`` and ``longattn_selected``; `hf_longattn.ranking` for others);
``selector.json`` the fitted selector; ``selection.json`` (`hf_longattn.run.records.SelectionRecord`)
what the selection was made from — the key of the scores and the selection settings
(``selection_method``, ``keep_fraction``, ``alpha``, ``normalization``, ``seed``) — so that a
later step knows whether it is current, and ``export``/``push`` publish exactly this selection.
"""

from __future__ import annotations

from typing import Any

from .. import vocabulary as V
from ..errors import LongAttnError
from ..ranking import LONGATTN
from ..selection import LongAttnSelector
from .context import Run
from .graph import scores_key, selection_settings, stale
from .records import SelectionRecord
from .score_step import merged_scores
from ..storage import atomic_write, atomic_write_json, read_json, sha256_file


def selector_of(run: Run) -> LongAttnSelector:
    """The unfitted selector the configuration asks for (groups: ``category``; ranking: ``select_by``)."""
    from ..ranking import selection_of

    config = run.config
    try:
        columns, ranking = selection_of(config)
    except ValueError as error:
        raise LongAttnError(str(error)) from None
    return LongAttnSelector(keep_fraction=config.keep_fraction, by=V.CATEGORY, alpha=config.alpha,
                            normalization=config.normalization, method=config.selection_method, seed=config.seed,
                            ranking=ranking, columns=None if ranking is None else columns)


def select_task(run: Run) -> dict[str, int]:
    """The select step (one task): reuse the selection when current, else fit and write it. Returns the totals."""
    if stale(run, "select") is None:
        run.print(f"[select] reusing {run.folder.selection} (the scores and the selection settings are unchanged)")
    else:
        _select(run)
    totals = dict.fromkeys(("windows", "scored_ok", "kept"), 0)
    for counts in summary(run)["categories"].values():
        for key in totals:
            totals[key] += counts[key]
    return totals


def _select(run: Run) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    scores = merged_scores(run)  # every chunk checked against the windows it must hold
    key = scores_key(run)
    if key is None:
        raise LongAttnError(f"some score chunks in {run.folder.scores} are not valid: run the `score` step")
    selector = selector_of(run).fit(scores)
    lds: list = []
    selected: list = []
    step = 65536
    columns = selector.columns
    for offset in range(0, scores.num_rows, step):
        added = selector.add_scores(scores.slice(offset, step).select(selector.required_columns).to_pydict())
        lds.extend(added[columns.score])
        selected.extend(added[columns.selected])
    table = scores.append_column(columns.score, pa.array(lds, pa.float64())).append_column(
        columns.selected, pa.array(selected, pa.bool_()))
    atomic_write(run.folder.selection, lambda tmp: pq.write_table(table, tmp), before_commit=run.fence)
    atomic_write_json(run.folder.selector, selector.to_dict(), before_commit=run.fence)
    settings = selection_settings(run.config)
    SelectionRecord(key=SelectionRecord.key_of(key, settings), scores=key, settings=settings,
                    sha256=sha256_file(run.folder.selection)).write(run.folder.selection_record, before_commit=run.fence)
    by = "" if columns == LONGATTN else f"by {columns.label}, "
    run.print(f"[select] {sum(selected)} of {len(selected)} windows selected ({by}{run.config.selection_method}, "
              f"keep_fraction {run.config.keep_fraction}) → {run.folder.selection}")


def read_selection(run: Run, columns: list[str] | None = None) -> Any:
    """``selection.parquet`` after checking it is the file its record describes (a one-line error otherwise)."""
    import pyarrow.parquet as pq

    record = SelectionRecord.read(run.folder.selection_record) if run.folder.selection_record.is_file() else None
    if record is None or not run.folder.selection.is_file() or sha256_file(run.folder.selection) != record.sha256:
        raise LongAttnError(f"{run.folder.selection} is missing or not the selection its record describes: run the "
                            "`select` step")
    return pq.read_table(run.folder.selection, columns=columns)


def load_selector(run: Run, remedy: str = "delete it and run the `select` step") -> LongAttnSelector:
    """The fitted selector saved in ``selector.json`` (``remedy``: what the error says to do if it is missing or bad)."""
    data = read_json(run.folder.selector, what="the fitted selector", remedy=remedy)
    return LongAttnSelector.from_dict(data)


def summary(run: Run, selection: Any = None, selector: LongAttnSelector | None = None) -> dict[str, Any]:
    """The run's settings, its counts per category (`hf_longattn.counts.category_counts`), scorer check and timings.

    Keys per category: ``documents``, ``documents_too_short``, ``tokens_documents``, ``windows``,
    ``windows_left_out``, ``scored_ok``, ``not_ok`` (rows per status), ``kept``, ``tokens_in`` /
    ``tokens_out`` (tokens of the scored / kept windows), ``median_ds``, ``median_du``,
    ``median_lds`` (ok rows), ``threshold`` (the lowest LDS_T kept) and ``threshold_id``.
    """
    from ..config import min_distance_tokens
    from ..counts import category_counts

    if selection is None:
        selection = read_selection(run)
    if selector is None:
        selector = load_selector(run)
    thresholds = {row["group"]: row["threshold"] for row in selector.summary()}
    config = run.config
    columns = selector.columns
    return {
        "model": config.model,
        "window_size": config.window_size,
        "min_distance": config.min_distance,
        "min_distance_tokens": min_distance_tokens(config.min_distance, config.window_size),
        "alpha": config.alpha,
        "normalization": config.normalization,
        "keep_fraction": config.keep_fraction,
        "selection_method": config.selection_method,
        "categories": category_counts(selection, run.windows_stats().categories, thresholds, columns),
        "scorer_check": scorer_check(run),
        "timings": run.all_timings(),
        **({} if columns == LONGATTN else {"selection": columns.to_dict()}),
    }


NOT_PROBED = ("No probe was run for this model and layer: the ranking is only as good as the scoring layer's "
              "attention, so run `hf-longattn probe` (README: Choosing a scoring model and layer) before relying "
              "on this selection.")


def scorer_check(run: Run) -> dict[str, Any]:
    """What ``probe/report.json`` says about the scored layer (`hf_longattn.probe.report.ProbeReport.scorer_check`).

    A report of another model, window size or min distance, or none, gives the assessment
    ``not probed`` and a sentence that says to run the probe. The summary prints the sentence and
    the dataset card opens with it, so the two always say the same.
    """
    from ..config import min_distance_tokens
    from ..ranking import selection_of

    path, config = run.folder.probe_report, run.config
    columns, ranking = selection_of(config)
    if ranking is not None:
        return compared_check(run, columns.scorers)
    if path.is_file():
        from ..model_loading import resolve_model
        from ..probe.report import ProbeReport

        report = ProbeReport.from_json(path)
        probed = report.config
        k = min_distance_tokens(config.min_distance, config.window_size)
        probed_k = min_distance_tokens(probed.get("min_distance", 0.25), int(probed.get("window_size") or 1))
        if (probed.get("model") == resolve_model(config.model) and probed.get("window_size") == config.window_size
                and probed_k == k):
            return report.scorer_check(config.layer)
    return {"layer": config.layer, "auc_lds": None, "best_layer": None, "assessment": "not probed",
            "sentence": NOT_PROBED}


NOT_COMPARED = ("No comparison was run on these windows: whether {scorers} tells real windows from shuffled "
                "controls of the same documents is unmeasured, so run `hf-longattn compare` (README: Other scorers) "
                "before relying on this selection.")


def compared_check(run: Run, scorers: tuple[str, ...]) -> dict[str, Any]:
    """For a selection by other scorers than LongAttn: their real-vs-control AUC per category from ``compare/compare.json``
    (made on the current windows), or a sentence saying to run the comparison."""
    from ..comparison import current_report

    report = current_report(run)
    aucs = (report or {}).get("auc") or {}
    if not all(name in aucs for name in scorers):
        return {"layer": None, "auc_lds": None, "best_layer": None, "assessment": "not compared",
                "sentence": NOT_COMPARED.format(scorers=" and ".join(scorers))}
    parts = [f"{name}: " + ", ".join(f"{category} {entry['auc']:.2f}" if entry.get("auc") is not None else f"{category} n/a"
                                     for category, entry in aucs[name].items()) for name in scorers]
    return {"layer": None, "auc_lds": None, "best_layer": None, "assessment": "compared",
            "sentence": ("AUC of real windows against shuffled-chunk controls of the same documents (`hf-longattn compare`; "
                         "0.5 is chance, 1 separates them fully): " + "; ".join(parts) + ".")}

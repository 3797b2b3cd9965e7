"""Step 5, export: every task claims windows shards and writes their parts of the Hub-ready folder (decoding is CPU work).

The export of a selection is assembled in ``.hub.building-<key>/`` (``key``: the export's key,
`hf_longattn.run.graph.export_key`, also the tag in its file names), so a relaunch resumes it. The
parts of windows shard ``i`` hold its windows inside the cap, each verified against its hash,
decoded, with its selection columns, one file per (config, split) with rows; a part record
(`hf_longattn.run.records.PartRecord`) lists the files and their sha256 and is committed only by
the shard's current owner. The finish step (`hf_longattn.run.finish_step`) numbers the parts per
split, adds the card and plots and swaps the folder in as ``hub/``.
"""

from __future__ import annotations

from typing import Any

from .. import vocabulary as V
from ..errors import LongAttnError
from .context import Run
from .graph import current_selection, export_key, stale
from .lock import claimed
from .records import PartRecord, SelectionRecord, WindowsStats
from ..storage import atomic_write, sha256_file
from .windows_step import read_shard_windows

CONFIGS = ("filtered", "scored")


def current_export(run: Run) -> tuple[SelectionRecord, WindowsStats, str]:
    """The current selection, the windows and the key of their export; a one-line error when the selection is stale."""
    selection, windows = current_selection(run), run.windows_stats()
    if selection is None:
        raise LongAttnError(f"{run.folder.selection} is not the selection of the current scores and settings: run the "
                            "`select` step (the `export` command does, when it runs the steps it needs)")
    return selection, windows, export_key(run, selection, windows)


def export_task(run: Run) -> dict[str, int]:
    """One task of the export step: claim windows shards and write the parts of those without a valid part record."""
    if stale(run, "export") is None:
        run.print(f"[export] reusing {run.folder.hub} (it holds the export of the current selection)")
        return {"windows_shards": 0}
    selection, windows, key = current_export(run)
    marks = run.folder.part_marker(key, 0).parent
    marks.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(len(windows.shards)) if valid_part(run, key, i) is None]
    executor, write, done = run.executor, None, 0
    for index, claim in claimed(todo, lambda i: run.folder.part_claim(key, i), run.launch, executor.rank,
                                executor.world_size, lambda i: valid_part(run, key, i) is not None):
        try:
            write = write or _part_writer(run, selection, windows, key)  # the selection is read once, if a shard is claimed
            record = write(index, lambda: (claim.check(), run.fence()))
            record.write(run.folder.part_marker(key, index), before_commit=lambda: (claim.check(), run.fence()))
            done += 1
        finally:
            claim.release()
    return {"windows_shards": done}


def valid_part(run: Run, key: str, index: int) -> PartRecord | None:
    """The part record of shard ``index`` when every file it lists is there with its sha256."""
    record = PartRecord.read_if_valid(run.folder.part_marker(key, index))
    if record is None or record.key != key or record.shard != index:
        return None
    building = run.folder.building(key)
    for entry in record.files:
        path = building / entry["path"]
        final = building / entry["final"] if entry.get("final") else None
        if not (path.is_file() and sha256_file(path) == entry["sha256"]) and not (
                final is not None and final.is_file() and sha256_file(final) == entry["sha256"]):
            return None
    return record


def part_path(split: str, config: str, shard: int, key: str) -> str:
    """Where shard ``shard``'s rows of (config, split) wait in the building folder until the finish numbers them."""
    return f"data/{config}/.{split}-shard{shard:05d}-{key}.parquet"


def _part_writer(run: Run, selection: SelectionRecord, windows: WindowsStats, key: str) -> Any:
    """A function ``(shard index, fence) -> PartRecord`` that writes the parts of one windows shard."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ..publication import split_names
    from .select_step import load_selector, read_selection

    table = read_selection(run)  # checked against its record's sha256
    flag = load_selector(run).columns.selected
    if table.num_rows != sum(windows.shard_windows(i) for i in range(len(windows.shards))):
        raise LongAttnError(f"{run.folder.selection} does not hold the windows of {run.folder.windows_stats}: run `select`")
    mapping = split_names(sorted(windows.categories))
    offsets = [0]
    for index in range(len(windows.shards)):
        offsets.append(offsets[-1] + windows.shard_windows(index))
    building = run.folder.building(key)

    def write(index: int, fence: Any) -> PartRecord:
        shard = read_shard_windows(run, windows, index, verify=True)  # every window's ids against its hash
        rows = table.slice(offsets[index], shard.num_rows)
        if not shard.column(V.ID).equals(rows.column(V.ID)):
            raise LongAttnError(f"{run.folder.selection} does not match the windows of shard {index}: run `select`")
        full = _with_text_and_scores(run, shard, rows.drop_columns([V.ID, V.CATEGORY]))
        files = []
        for category, split in mapping.items():
            mine = full.filter(pc.equal(full.column(V.CATEGORY), category))
            for config, part in (("scored", mine), ("filtered", mine.filter(pc.fill_null(mine.column(flag), False)))):
                if part.num_rows:
                    relative = part_path(split, config, index, key)
                    (building / relative).parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(building / relative, lambda tmp, p=part: pq.write_table(p, tmp), before_commit=fence)
                    files.append({"config": config, "split": split, "path": relative, "rows": part.num_rows,
                                  "sha256": sha256_file(building / relative)})
        return PartRecord(key=key, shard=index, files=files)

    return write


def _with_text_and_scores(run: Run, windows: Any, scores: Any) -> Any:
    """The windows with ``text`` (decoded now: only exported windows are ever decoded) and the selection columns."""
    import pyarrow as pa

    text = run.scorer.tokenizer.batch_decode(windows.column(V.INPUT_IDS).to_pylist(), skip_special_tokens=False,
                                             clean_up_tokenization_spaces=False)
    table = windows.add_column(windows.schema.get_field_index(V.WINDOW_HASH) + 1, V.TEXT, pa.array(text, pa.string()))
    for name in scores.column_names:
        table = table.append_column(name, scores.column(name))
    return table

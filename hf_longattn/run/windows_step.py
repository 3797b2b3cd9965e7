"""Step 1, windows: check the run folder, then documents → token ids → Algorithm 1 windows, saved with their counts.

The main process builds the windows while the others wait; a complete build (its stats file
present) is reused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any

import numpy as np

from .. import vocabulary as V
from ..errors import LongAttnError
from .context import Run
from .storage import atomic_write, atomic_write_json, fsync_dir, read_json


def check_push(run: Run) -> None:
    """Raise before any work when ``push_to_hub`` is set but cannot succeed (``HF_HUB_OFFLINE=1``, bad id)."""
    if run.config.push_to_hub:
        from ..publication import check_can_push

        try:
            check_can_push(run.config.push_to_hub)
        except RuntimeError as error:  # HF_HUB_OFFLINE=1
            raise LongAttnError(f"{error} Nothing was done.") from error


def prepare(run: Run) -> None:
    """Refuse a run folder that holds another configuration's windows or scores; record ours.

    Every process checks; the main process writes ``fingerprint.json`` and ``config.yaml``.
    """
    check_push(run)
    folder = run.folder
    folder.check_inside()
    ours = run.fingerprint
    if folder.fingerprint.is_file():
        stored = read_json(folder.fingerprint, what="the run's fingerprint",
                           remedy="delete it if the folder holds nothing else of value, or use another output_dir")
        if stored.get("fingerprint") != ours["fingerprint"]:
            old, new = stored.get("config", {}), ours["config"]
            changed = [f"{key}: {old.get(key)!r} → {new.get(key)!r}" for key in new if old.get(key) != new.get(key)]
            raise LongAttnError(
                f"{folder.root} holds windows/scores of a different configuration "
                f"(changed: {'; '.join(changed) or 'unknown'}). Mixing them would corrupt the result: "
                "use another output_dir (--output-dir), or delete this one to start over."
            )
    elif run.is_main:
        folder.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder.fingerprint, ours)
    if run.is_main:
        folder.root.mkdir(parents=True, exist_ok=True)
        atomic_write(folder.config, lambda tmp: tmp.write_text(run.config.to_yaml(), encoding="utf-8"))


def windows(run: Run) -> Any:
    """Build the windows once (main process; the others wait) or reuse them; return them as a `datasets.Dataset`."""
    from datasets import load_from_disk

    prepare(run)

    def build() -> None:
        if run.folder.windows_stats.is_file():
            run.print(f"[windows] reusing the windows in {run.folder.windows}")
        else:
            run.timed("windows", lambda: build_windows(run))

    run.executor.run_on_main(build)
    return load_from_disk(str(run.folder.windows))


def build_windows(run: Run) -> None:
    """Read, tokenise and cut every document; apply the per-category cap; save windows and stats atomically."""
    from ..sources import read_sources
    from ..tokenization import Tokenize
    from ..windows import SlidingWindows

    config = run.config
    run.print(f"[windows] reading {len(config.sources)} source(s): " + ", ".join(s.describe() for s in config.sources))
    documents = read_sources(config.sources)
    tokenizer = run.scorer.tokenizer
    tokenized = documents.map(
        Tokenize(tokenizer), batched=True, batch_size=16, num_proc=config.num_proc, remove_columns=[V.TEXT],
        desc="Tokenizing documents",
    )
    windowing = SlidingWindows(tokenizer, config.window_size, faithful=config.faithful, decode=True)
    windows = tokenized.map(
        windowing, batched=True, batch_size=16, num_proc=config.num_proc, remove_columns=tokenized.column_names,
        features=windowing.output_features(tokenized.features), desc=f"Cutting windows of {config.window_size} tokens",
    )
    lengths = tokenized.select_columns([V.CATEGORY, V.DOC_NUM_TOKENS]).with_format("arrow")[:]
    stats, kept = _cap_windows(run, windows, lengths)
    if len(kept) != len(windows):
        windows = windows.select(kept)
    if len(windows) == 0:
        raise LongAttnError(
            f"No window: all {len(documents)} document(s) are shorter than window_size={config.window_size} tokens "
            f"(longest: {max(lengths.column(V.DOC_NUM_TOKENS).to_pylist(), default=0)} tokens). "
            "Lower window_size or add longer documents."
        )
    totals = {key: sum(s[key] for s in stats.values()) for key in next(iter(stats.values()))}
    record = {"window_size": config.window_size, "faithful": config.faithful, "categories": stats, "total": totals}
    _save_windows(run, windows, record)
    from ..counts import format_table

    run.print(format_table(
        ["category", "documents", "too short", "windows", "left out (cap)", "tokens (documents)", "tokens (windows)"],
        [[c, s["documents"], s["documents_too_short"], s["windows"], s["windows_left_out"], s["tokens_documents"],
          s["tokens_in"]] for c, s in [*stats.items(), ("total", totals)]],
        title=f"[windows] W = {config.window_size} tokens → {run.folder.windows} (windows of a document overlap, "
              "so they can hold more tokens than the documents)",
    ))


def _window_key(window_id: str) -> int:
    """Sampling key of a window for ``max_windows_per_category``: 64 bits of BLAKE2b of its id."""
    return int.from_bytes(hashlib.blake2b(window_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def _cap_windows(run: Run, windows: Any, lengths: Any) -> tuple[dict[str, dict[str, int]], np.ndarray]:
    """Counts per category and the rows kept under ``max_windows_per_category`` (smallest id hashes, windows order)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..windows import count_windows

    config = run.config
    table = windows.select_columns([V.ID, V.CATEGORY]).with_format("arrow")[:]
    stats: dict[str, dict[str, int]] = {}
    keep_rows: list[np.ndarray] = []
    for category in sorted(set(lengths.column(V.CATEGORY).to_pylist())):
        doc_lengths = lengths.column(V.DOC_NUM_TOKENS).filter(pc.equal(lengths.column(V.CATEGORY), category)).to_numpy()
        counts = count_windows(doc_lengths, config.window_size, config.faithful)
        rows = np.flatnonzero(pc.equal(table.column(V.CATEGORY), category).to_numpy(zero_copy_only=False))
        if len(rows) != counts["windows"]:
            raise LongAttnError(f"category {category!r}: {len(rows)} windows written, {counts['windows']} expected")
        limit = config.max_windows_per_category
        if limit is not None and len(rows) > limit:
            ids = table.column(V.ID).take(pa.array(rows)).to_pylist()
            keys = np.fromiter((_window_key(i) for i in ids), dtype=np.uint64, count=len(ids))
            rows = np.sort(rows[np.argsort(keys, kind="stable")[:limit]])
        stats[category] = {
            "documents": counts["documents"],
            "documents_too_short": counts["documents_too_short"],
            "tokens_documents": counts["tokens_documents"],
            "windows": int(len(rows)),
            "windows_left_out": counts["windows"] - len(rows),
            "tokens_in": int(len(rows)) * config.window_size,
        }
        keep_rows.append(rows)
    kept = np.sort(np.concatenate(keep_rows)) if keep_rows else np.zeros(0, dtype=np.int64)
    return stats, kept


def _save_windows(run: Run, windows: Any, record: dict[str, Any]) -> None:
    """Save under a temporary name, then rename into ``windows/`` (an interrupted build leaves nothing behind)."""
    folder = run.folder
    temporary = folder.root / f".windows.tmp-{os.getpid()}"
    for stale in folder.root.glob(".windows.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if folder.windows.exists():  # an incomplete earlier build (no stats file)
        shutil.rmtree(folder.windows)
    windows.flatten_indices().save_to_disk(str(temporary))
    atomic_write_json(temporary / folder.windows_stats.name, record)
    os.replace(temporary, folder.windows)
    fsync_dir(folder.root)

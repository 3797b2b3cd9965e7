"""Step 1, windows: check the run folder and the model, then window every input shard (claimed by any process) and plan.

Every process claims input shards (`hf_longattn.shards`) and windows them into
``windows/shard-<id>.parquet`` — token ids only, no text — with a record
``windows/shard-<id>.json`` (its input's identity, counts, sha256). A shard is named after its
input's identity, so a relaunch reuses every shard whose input did not change (after checking its
sha256) and rebuilds the others. The main process then writes ``windows/windows_stats.json``:
the sources' manifest, the shards in order, counts per category and the per-category cap.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from .. import __version__
from .. import vocabulary as V
from ..errors import LongAttnError
from .context import Run
from .lock import claimed, release_claim
from .storage import atomic_write_json, json_sha256, read_json, remove_stale_temporaries, sha256_file

STATS_FORMAT = 2


def check_push(run: Run) -> None:
    """Raise before any work when ``push_to_hub`` is set but cannot succeed (``HF_HUB_OFFLINE=1``, bad id)."""
    if run.config.push_to_hub:
        from ..publication import check_can_push

        try:
            check_can_push(run.config.push_to_hub)
        except RuntimeError as error:  # HF_HUB_OFFLINE=1
            raise LongAttnError(f"{error} Nothing was done.") from error


def prepare(run: Run, *, sources: bool = False) -> None:
    """Check everything that can fail before any work, and refuse a folder holding another configuration's results.

    The model must exist and take windows of ``window_size`` tokens; with ``sources=True`` (the steps
    that read them) every source must resolve to its files; ``fingerprint.json`` (written once the
    windows exist) must match, unless the folder holds nothing computed yet. Nothing is written
    before these checks pass.
    """
    check_push(run)
    folder = run.folder
    folder.check_inside()
    run.check_model()
    if sources:
        from ..shards import plan_input_shards

        plan_input_shards(run.config.sources)  # a missing path or an unreachable Hub source: one line, nothing written
    ours = run.fingerprint
    if folder.fingerprint.is_file() and _holds_results(run):
        stored = read_json(folder.fingerprint, what="the run's fingerprint",
                           remedy="delete it if the folder holds nothing else of value, or use another output_dir")
        if stored.get("fingerprint") != ours["fingerprint"]:
            old, new = stored.get("config", {}), ours["config"]
            changed = [f"{key}: {old.get(key)!r} → {new.get(key)!r}" for key in dict.fromkeys([*new, *old])
                       if old.get(key) != new.get(key)]
            raise LongAttnError(
                f"{folder.root} holds windows/scores of a different configuration "
                f"(changed: {'; '.join(changed) or 'unknown'}). Mixing them would corrupt the result: "
                "use another output_dir (--output-dir), or delete this one to start over."
            )
    if run.is_main:
        folder.root.mkdir(parents=True, exist_ok=True)
        from .storage import atomic_write_text

        atomic_write_text(folder.config, run.config.to_yaml())


def _holds_results(run: Run) -> bool:
    return run.folder.windows_stats.is_file() or any(run.folder.scores.glob("chunk-*.done"))


def windows_identity(run: Run) -> str:
    """What defines the windows besides their input: the tokenizer (through the checkpoint), W, faithful, version."""
    config = run.config
    identity = {"checkpoint": run.scorer.identity(), "tokenizer": config.tokenizer, "window_size": config.window_size,
                "faithful": config.faithful, "hf_longattn_version": __version__}
    return json_sha256(identity)


def shard_name(input_identity: str, identity: str) -> str:
    """``shard-<16 hex>``: named after its input and the windows identity, so unchanged inputs keep their shard."""
    return "shard-" + hashlib.sha256(f"{input_identity}\n{identity}".encode()).hexdigest()[:16]


def windows(run: Run) -> Any:
    """Build (or reuse) the windows on every process, then return them as a `datasets.Dataset` (kept windows, in order)."""
    prepare(run, sources=True)
    build_windows(run)
    return load_windows(run)


def build_windows(run: Run) -> None:
    """Window every input shard that is not done yet (all processes share the work), then plan on the main process.

    A relaunch checks every existing shard against its recorded sha256 (the processes share that
    too) and rebuilds what changed or is damaged; unchanged shards are reused.
    """
    from ..shards import manifest_changes

    plan, names, identity = windows_plan(run)
    recorded = read_json(run.folder.windows_stats, what="windows statistics", remedy=f"delete {run.folder.windows} "
                         "and relaunch") if run.folder.windows_stats.is_file() else None
    same_plan = recorded is not None and recorded.get("identity") == identity \
        and [s["name"] for s in recorded.get("shards", [])] == names
    if recorded is not None and not same_plan:
        changes = manifest_changes(recorded.get("manifest", []), plan) or ["the tokenizer, W or faithful"]
        run.print(f"[windows] the sources changed since the windows were built ({'; '.join(changes[:5])}"
                  f"{'; …' if len(changes) > 5 else ''}): windowing what changed; scores of unchanged windows are reused")
    run.folder.windows.mkdir(parents=True, exist_ok=True)
    rank, world = run.executor.rank, run.executor.world_size
    damaged = [i for i in range(rank, len(plan), world) if not shard_is_valid(run, names[i], plan[i], identity)]
    for index in damaged:  # gone before anyone decides what to build
        (run.folder.windows / f"{names[index]}.json").unlink(missing_ok=True)
    if run.is_main:
        remove_stale_temporaries(run.folder.windows)  # before any process writes a new one
    run.executor.barrier()
    todo = [i for i, name in enumerate(names) if not (run.folder.windows / f"{name}.json").is_file()]
    if same_plan and not todo:
        run.print(f"[windows] reusing the windows in {run.folder.windows} (every shard checked against its sha256)")
        return
    run.timed("windows", lambda: _window_claimed_shards(run, plan, names, identity, todo))
    run.executor.barrier()
    run.executor.run_on_main(lambda: write_stats(run, plan, names, identity))


def windows_plan(run: Run) -> tuple[list, list[str], str]:
    """The input shards, the names of their windows shards, and the windows identity."""
    from ..shards import plan_input_shards

    plan = plan_input_shards(run.config.sources)
    identity = windows_identity(run)
    return plan, [shard_name(shard.identity, identity) for shard in plan], identity


def _window_claimed_shards(run: Run, plan: list, names: list[str], identity: str, todo: list[int]) -> None:
    """Claim input shards one after the other and window them: here, or in ``num_proc`` worker processes at once."""
    folder, executor = run.folder.windows, run.executor

    def done(index: int) -> bool:
        return (folder / f"{names[index]}.json").is_file()

    shards = claimed(todo, lambda i: folder / f"{names[i]}.claim", run.launch, executor.rank, executor.world_size, done)
    if not run.config.num_proc or run.config.num_proc == 1:
        for index in shards:
            window_one_shard(run, plan[index], names[index], identity)
            release_claim(folder / f"{names[index]}.claim")
        return
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # a forked worker deadlocks in torch's thread pool
    with concurrent.futures.ProcessPoolExecutor(run.config.num_proc, mp_context=context) as pool:
        running: dict[Any, int] = {}
        for index in shards:  # at most num_proc claimed shards in flight
            running[pool.submit(_window_in_worker, run.config.to_dict(), plan[index], names[index], identity)] = index
            while len(running) >= run.config.num_proc:
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    future.result()  # a worker's error stops the step, clearly, on this process
                    release_claim(folder / f"{names[running.pop(future)]}.claim")
        for future in concurrent.futures.as_completed(list(running)):
            future.result()
            release_claim(folder / f"{names[running.pop(future)]}.claim")


_WORKER_RUN: dict[str, Any] = {}
"""In a ``num_proc`` worker process: its `Run` and the configuration it was built from (one tokenizer load per worker)."""


def _window_in_worker(config: dict[str, Any], shard: Any, name: str, identity: str) -> dict[str, Any]:
    from ..config import RunConfig
    from .executor import TaskExecutor

    if _WORKER_RUN.get("config") != config:
        _WORKER_RUN.update(config=config, run=Run(RunConfig.from_dict(config), TaskExecutor(), progress=False))
    return window_one_shard(_WORKER_RUN["run"], shard, name, identity)


def window_one_shard(run: Run, shard: Any, name: str, identity: str) -> dict[str, Any]:
    """Window one input shard into ``windows/<name>.parquet`` and its record ``<name>.json`` (written last)."""
    from ..shards import read_shard
    from .units import window_shard

    folder = run.folder.windows
    folder.mkdir(parents=True, exist_ok=True)
    print(f"[windows] rank {run.executor.rank}: windowing {shard.name}", flush=True)
    record = window_shard(read_shard(run.config.sources, shard), run.scorer.tokenizer, folder / f"{name}.parquet",
                          window_size=run.config.window_size, faithful=run.config.faithful,
                          row_group_rows=run.config.chunk_size)
    record = {"input": shard.name, "input_identity": shard.identity, "identity": identity, **record}
    atomic_write_json(folder / f"{name}.json", record)
    return record


def shard_is_valid(run: Run, name: str, shard: Any, identity: str) -> bool:
    """A shard is reused when its record matches its input and the windows identity, and its file its sha256."""
    folder = run.folder.windows
    record_path, parquet = folder / f"{name}.json", folder / f"{name}.parquet"
    if not record_path.is_file() or not parquet.is_file():
        return False
    try:
        record = read_json(record_path)
    except LongAttnError:
        return False
    if record.get("input_identity") != shard.identity or record.get("identity") != identity:
        return False
    if sha256_file(parquet) != record.get("sha256"):
        print(f"[windows] {parquet} does not match its recorded sha256 (corrupt or edited): rebuilding it", flush=True)
        return False
    return True


def write_stats(run: Run, plan: list, names: list[str], identity: str) -> None:
    """Main process: gather the shard records, check ids and categories, cap, and write ``windows_stats.json``."""
    from ..shards import manifest

    folder = run.folder.windows
    missing = [shard.name for shard, name in zip(plan, names) if not (folder / f"{name}.json").is_file()]
    if missing:
        raise LongAttnError(f"{len(missing)} input shard(s) have no windows yet, e.g. {missing[:3]}: run the windows "
                            "stage (again) to finish them")
    records = [read_json(folder / f"{name}.json", what="a windows shard record",
                         remedy=f"delete {folder / name}.* and relaunch") for name in names]
    ids, categories, keys = _window_keys(run, names)
    _check_unique(ids)
    from ..publication import split_names

    try:
        split_names(sorted(set(categories)))
    except ValueError as error:
        raise LongAttnError(f"{error} (categories come from the sources; nothing was scored yet)") from error
    cap, kept = _cap(run, categories, keys, ids)
    stats = _category_stats(run, records, categories, kept)
    total = int(kept.sum())
    if total == 0:
        longest = max((c.get("tokens_documents", 0) for r in records for c in r["categories"].values()), default=0)
        raise LongAttnError(
            f"No window: all {sum(s['documents'] for s in stats.values())} document(s) are shorter than window_size="
            f"{run.config.window_size} tokens (all their tokens together: {longest}). Lower window_size or add longer documents.")
    shards, offset = [], 0
    for name, record in zip(names, records):
        rows = record["rows"]
        shards.append({"name": name, "input": record["input"], "rows": rows, "kept": int(kept[offset:offset + rows].sum()),
                       "sha256": record["sha256"]})
        offset += rows
    totals = {key: sum(s[key] for s in stats.values()) for key in next(iter(stats.values()))}
    digest = json_sha256([shards, cap])
    atomic_write_json(run.folder.windows_stats, {
        "format": STATS_FORMAT, "identity": identity, "window_size": run.config.window_size,
        "faithful": run.config.faithful, "digest": digest, "manifest": manifest(plan), "shards": shards, "cap": cap,
        "categories": stats, "total": totals})
    _remove_unlisted_shards(run, names)
    atomic_write_json(run.folder.fingerprint, run.fingerprint)  # the folder now holds results of this configuration
    _print_stats(run, stats, totals)


def _window_keys(run: Run, names: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Ids, categories and cap keys (64 bits of BLAKE2b of the id) of every window, in plan order."""
    import pyarrow.parquet as pq

    ids: list[str] = []
    categories: list[str] = []
    for name in names:
        table = pq.read_table(run.folder.windows / f"{name}.parquet", columns=[V.ID, V.CATEGORY])
        ids += table.column(V.ID).to_pylist()
        categories += table.column(V.CATEGORY).to_pylist()
    keys = np.fromiter((window_key(i) for i in ids), dtype=np.uint64, count=len(ids))
    return ids, np.array(categories, dtype=object), keys


def window_key(window_id: str) -> int:
    """Sampling key of a window for ``max_windows_per_category``: 64 bits of BLAKE2b of its id."""
    return int.from_bytes(hashlib.blake2b(window_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def _check_unique(ids: list[str]) -> None:
    if len(set(ids)) == len(ids):
        return
    seen: set[str] = set()
    duplicate = next(i for i in ids if i in seen or seen.add(i))
    raise LongAttnError(f"Duplicate window id {duplicate!r}: two documents share the id {duplicate.rsplit('/w', 1)[0]!r} "
                        "(ids must be unique across sources: set id_column, or do not list a source twice)")


def _cap(run: Run, categories: np.ndarray, keys: np.ndarray, ids: list[str]) -> tuple[dict, np.ndarray]:
    """The per-category cap ``{category: [key, id]}`` (the last window kept) and the kept mask, in plan order."""
    limit = run.config.max_windows_per_category
    kept = np.ones(len(ids), dtype=bool)
    cap: dict[str, list] = {}
    if limit is None:
        return cap, kept
    for category in sorted(set(categories.tolist())):
        rows = np.flatnonzero(categories == category)
        if len(rows) <= limit:
            continue
        order = sorted(rows.tolist(), key=lambda r: (int(keys[r]), ids[r]))
        last = order[limit - 1]
        cap[category] = [int(keys[last]), ids[last]]
        kept[np.array(order[limit:], dtype=np.int64)] = False
    return cap, kept


def kept_mask(ids: list[str], categories: list[str], cap: dict[str, list]) -> np.ndarray:
    """Which windows the cap keeps: those of an uncapped category, else ``(key, id) ≤`` the category's last kept."""
    if not cap:
        return np.ones(len(ids), dtype=bool)
    return np.array([category not in cap or (window_key(i), i) <= (cap[category][0], cap[category][1])
                     for i, category in zip(ids, categories)], dtype=bool)


def keep_within_cap(table: Any, cap: dict[str, list]) -> Any:
    """The rows of a `pyarrow.Table` of windows that the cap keeps (:func:`kept_mask`); ``table`` itself when no cap."""
    if not cap:
        return table
    import pyarrow as pa

    return table.filter(pa.array(kept_mask(table.column(V.ID).to_pylist(), table.column(V.CATEGORY).to_pylist(), cap)))


def _category_stats(run: Run, records: list[dict], categories: np.ndarray, kept: np.ndarray) -> dict[str, dict[str, int]]:
    stats: dict[str, dict[str, int]] = {}
    for record in records:
        for category, counts in record["categories"].items():
            entry = stats.setdefault(category, {"documents": 0, "documents_too_short": 0, "tokens_documents": 0})
            for key in entry:
                entry[key] += counts[key]
    for category, entry in stats.items():
        rows = categories == category
        entry["windows"] = int((rows & kept).sum())
        entry["windows_left_out"] = int((rows & ~kept).sum())
        entry["tokens_in"] = entry["windows"] * run.config.window_size
    return dict(sorted(stats.items()))


def _remove_unlisted_shards(run: Run, names: list[str]) -> None:
    listed = set(names)
    for path in run.folder.windows.glob("shard-*"):
        if path.name.split(".")[0] not in listed:
            path.unlink(missing_ok=True)


def _print_stats(run: Run, stats: dict[str, dict[str, int]], totals: dict[str, int]) -> None:
    from ..counts import format_table

    run.print(format_table(
        ["category", "documents", "too short", "windows", "left out (cap)", "tokens (documents)", "tokens (windows)"],
        [[c, s["documents"], s["documents_too_short"], s["windows"], s["windows_left_out"], s["tokens_documents"],
          s["tokens_in"]] for c, s in [*stats.items(), ("total", totals)]],
        title=f"[windows] W = {run.config.window_size} tokens → {run.folder.windows} (tokens (documents) counts the "
              "documents long enough to tokenise; windows of a document overlap, so they can hold more tokens)",
    ))


def load_windows(run: Run) -> Any:
    """The kept windows of a run, in plan order, as a `datasets.Dataset` (read into memory: for small runs and tests)."""
    from datasets import Dataset

    return Dataset(load_kept_windows(run))


def load_kept_windows(run: Run, columns: list[str] | None = None) -> Any:
    """Some columns (default: all) of every kept window, in plan order, as one `pyarrow.Table`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stats = run.windows_stats()
    wanted = None if columns is None else list(dict.fromkeys([V.ID, V.CATEGORY, *columns]))  # the cap reads both
    tables = []
    for shard in stats["shards"]:
        table = keep_within_cap(pq.read_table(run.folder.windows / f"{shard['name']}.parquet", columns=wanted),
                                stats["cap"])
        tables.append(table if columns is None else table.select(columns))
    return pa.concat_tables(tables)

"""Step 1, windows: every task claims input shards and windows each one whose shard is missing, stale or damaged.

An input shard (`hf_longattn.shards`) gives one windows shard, ``windows/shard-<id>.parquet`` —
token ids and window hashes, no text — with its record ``windows/shard-<id>.json`` (input
identity, counts, sha256), written last. A shard is named after its input's identity and the
windows identity (`hf_longattn.run.graph.shard_name`), so an unchanged input keeps its shard; a
shard whose file no longer has its recorded sha256 is rebuilt. The record is committed only by the
shard's current owner (its claim, and the launch's run lock).
"""

from __future__ import annotations

from typing import Any

from .. import vocabulary as V
from ..errors import LongAttnError
from .context import Run
from .graph import input_plan
from .lock import claimed
from .records import ShardRecord
from ..storage import remove_stale_temporaries, sha256_file


def check_push(run: Run) -> None:
    """Raise before any work when ``push_to_hub`` is set but cannot succeed (``HF_HUB_OFFLINE=1``, bad id)."""
    if run.config.push_to_hub:
        from ..publication import check_can_push

        try:
            check_can_push(run.config.push_to_hub)
        except RuntimeError as error:  # HF_HUB_OFFLINE=1
            raise LongAttnError(f"{error} Nothing was done.") from error


def windows_task(run: Run) -> dict[str, int]:
    """One task of the windows step: claim input shards one after the other and window those not valid.

    Returns:
        `dict[str, int]`: ``input_shards`` (claimed by this task), ``input_shards_built`` (the others
        were valid), and the sums over its shards' records of ``documents``, ``documents_too_short``,
        ``tokens_documents`` and ``windows_cut`` (windows before ``max_windows_per_category``).
    """
    plan, names, identity = input_plan(run)
    run.folder.windows.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run.folder.windows)
    counts = {"input_shards": 0, "input_shards_built": 0}

    def done(index: int) -> bool:  # built or checked by this launch already: not claimed again
        record = ShardRecord.read_if_valid(run.folder.shard_record(names[index]))
        return record is not None and record.verified == run.launch and record.input_identity == plan[index].identity

    units = claimed(range(len(plan)), lambda i: run.folder.shard_claim(names[i]), run.launch, run.executor.rank,
                    run.executor.world_size, done)
    if run.config.num_proc and run.config.num_proc > 1:
        records = _window_in_workers(run, plan, names, identity, units, counts)
    else:
        records = (_window_unit(run, plan[index], names[index], identity, claim, counts) for index, claim in units)
    for record in records:
        for category in record.categories.values():
            for key, value in category.items():
                key = "windows_cut" if key == "windows" else key
                counts[key] = counts.get(key, 0) + value
    return counts


def _window_unit(run: Run, shard: Any, name: str, identity: str, claim: Any, counts: dict[str, int]) -> ShardRecord:
    """The valid record of one claimed input shard: kept if its shard is intact, else built now; the claim released."""
    counts["input_shards"] += 1
    try:
        record = valid_shard(run, name, shard, identity)
        if record is None:
            record = window_one_shard(run, shard, name, identity)
            counts["input_shards_built"] += 1
        record.verified = run.launch
        record.write(run.folder.shard_record(name), before_commit=lambda: (claim.check(), run.fence()))
        return record
    finally:
        claim.release()


def _window_in_workers(run: Run, plan: list, names: list[str], identity: str, units: Any,
                       counts: dict[str, int]) -> list[ShardRecord]:
    """Window the claimed shards in ``num_proc`` spawned worker processes; this process commits their records."""
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # a forked worker deadlocks in torch's thread pool
    records: list[ShardRecord] = []
    with concurrent.futures.ProcessPoolExecutor(run.config.num_proc, mp_context=context) as pool:
        running: dict[Any, tuple[int, Any]] = {}

        def collect(future: Any) -> None:
            index, claim = running.pop(future)
            try:
                record = future.result()  # a worker's error stops the step, clearly, on this process
                record.verified = run.launch
                record.write(run.folder.shard_record(names[index]), before_commit=lambda: (claim.check(), run.fence()))
                counts["input_shards_built"] += 1
                records.append(record)
            finally:
                claim.release()

        for index, claim in units:  # at most num_proc claimed shards in flight
            counts["input_shards"] += 1
            record = valid_shard(run, names[index], plan[index], identity)
            if record is not None:
                record.verified = run.launch
                record.write(run.folder.shard_record(names[index]), before_commit=lambda: (claim.check(), run.fence()))
                records.append(record)
                claim.release()
                continue
            running[pool.submit(_window_in_worker, run.config.to_dict(), plan[index], names[index], identity)] = (index, claim)
            while len(running) >= run.config.num_proc:
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    collect(future)
        for future in concurrent.futures.as_completed(list(running)):
            collect(future)
    return records


_WORKER_RUN: dict[str, Any] = {}
"""In a ``num_proc`` worker process: its `Run` and the configuration it was built from (one tokenizer load per worker)."""


def _window_in_worker(config: dict[str, Any], shard: Any, name: str, identity: str) -> ShardRecord:
    from ..config import RunConfig
    from .executor import TaskExecutor

    if _WORKER_RUN.get("config") != config:
        _WORKER_RUN.update(config=config, run=Run(RunConfig.from_dict(config), TaskExecutor(), progress=False))
    return window_one_shard(_WORKER_RUN["run"], shard, name, identity)


def window_one_shard(run: Run, shard: Any, name: str, identity: str) -> ShardRecord:
    """Window one input shard into ``windows/<name>.parquet``; its record, for the caller to commit."""
    from ..shards import read_shard
    from .units import window_shard

    print(f"[windows] rank {run.executor.rank}: windowing {shard.name}", flush=True)
    result = window_shard(read_shard(run.config.sources, shard), run.scorer.tokenizer, run.folder.shard_parquet(name),
                          window_size=run.config.window_size, faithful=run.config.faithful,
                          row_group_rows=run.config.chunk_size)
    return ShardRecord(input=shard.name, input_identity=shard.identity, identity=identity, **result)


def valid_shard(run: Run, name: str, shard: Any, identity: str) -> ShardRecord | None:
    """The record of a shard that can be reused: it matches its input and the windows identity, and its file its sha256."""
    record = ShardRecord.read_if_valid(run.folder.shard_record(name))
    parquet = run.folder.shard_parquet(name)
    if record is None or record.input_identity != shard.identity or record.identity != identity or not parquet.is_file():
        return None
    if sha256_file(parquet) != record.sha256:
        print(f"[windows] {parquet} does not match its recorded sha256 (corrupt or edited): rebuilding it", flush=True)
        return None
    return record


# -- reading the windows: any step, any engine --------------------------------------------------------------


def window_key(window_id: str) -> int:
    """Sampling key of a window for ``max_windows_per_category``: 64 bits of BLAKE2b of its id."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(window_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def cap_mask(ids: list[str], categories: list[str], cap: dict[str, list]) -> Any:
    """Which windows the cap scores: those of an uncapped category, else ``(key, id) ≤`` the category's last one."""
    import numpy as np

    if not cap:
        return np.ones(len(ids), dtype=bool)
    return np.array([category not in cap or (window_key(i), i) <= (cap[category][0], cap[category][1])
                     for i, category in zip(ids, categories)], dtype=bool)


def within_cap(table: Any, cap: dict[str, list]) -> Any:
    """The rows of a `pyarrow.Table` of windows inside the cap (:func:`cap_mask`); ``table`` itself when no cap."""
    if not cap:
        return table
    import pyarrow as pa

    return table.filter(pa.array(cap_mask(table.column(V.ID).to_pylist(), table.column(V.CATEGORY).to_pylist(), cap)))


kept_mask, keep_within_cap = cap_mask, within_cap
"""The names these had before hf_longattn 0.3 ("kept" now means selected only)."""


def read_shard_windows(run: Run, stats: Any, index: int, columns: list[str] | None = None, *,
                       verify: bool = False) -> Any:
    """The windows of shard ``index`` inside the cap; with ``verify``, each window's token ids checked against its hash."""
    import pyarrow.parquet as pq

    from .units import check_window_hashes

    name = stats.shards[index]["name"]
    path = run.folder.shard_parquet(name)
    wanted = None if columns is None else list(dict.fromkeys([V.ID, V.CATEGORY, *columns]))  # the cap reads both
    try:
        table = within_cap(pq.read_table(path, columns=wanted), stats.cap)
    except OSError as error:
        raise LongAttnError(f"{path} is unreadable ({error}): run `hf-longattn windows` to rebuild it") from error
    if table.num_rows != stats.shard_windows(index):
        raise LongAttnError(f"{path} holds {table.num_rows} windows where windows_stats.json counts "
                            f"{stats.shard_windows(index)}: run `hf-longattn windows` to rebuild it")
    if verify:
        check_window_hashes(table, str(path))
    return table if columns is None else table.select(columns)


def load_capped_windows(run: Run, columns: list[str] | None = None) -> Any:
    """Some columns (default: all) of every window inside the cap, in plan order, as one `pyarrow.Table`."""
    import pyarrow as pa

    stats = run.windows_stats()
    return pa.concat_tables([read_shard_windows(run, stats, i, columns) for i in range(len(stats.shards))])


load_kept_windows = load_capped_windows


def load_windows(run: Run) -> Any:
    """The windows of a run inside the cap, in plan order, as a `datasets.Dataset` (in memory: for small runs and tests)."""
    from datasets import Dataset

    return Dataset(load_capped_windows(run))

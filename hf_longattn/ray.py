"""Ray Data for hf_longattn: windowing and scoring as ``map_batches`` callables, and the resumable LongABC job on Ray.

Callable classes for `ray.data.Dataset.map_batches` (actors that load what they need once),
built on the units every engine calls, so that every engine gives the same numbers:

- `LongAttnWindowsUDF`: documents (``id``, ``category``, ``text``, ``source``, ``license``) →
  windows (token ids, the columns of `hf_longattn.run.units.windows_schema`);
- `LongAttnScorerActor`: windows (``id``, ``input_ids``) → the same rows plus the score columns;
- `LongAttnChunkScorer`: ``{"chunk": j}`` rows of a run's chunk plan → each chunk scored and
  written with its ``.done`` marker, atomically; one report row per chunk.

`run_job` runs the job of ``hf-longattn run`` on the connected Ray cluster through the one driver
(`hf_longattn.run.driver`) with `RayEngine`: every stage of `hf_longattn.run.stages` as Ray tasks
that claim their units. Same run folder, file for file; a relaunch redoes only what is missing.
Every node must see ``output_dir``, the sources and the model at one path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

try:  # absolute import: this is the real Ray, not this module
    import ray
    import ray.data
except ImportError as _error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(f"hf_longattn.ray needs Ray Data ({_error}): pip install hf-longattn[ray]") from _error

from . import vocabulary as V
from .config import RunConfig
from .errors import LongAttnError
from .run import score_step, stages
from .run.chunks import check_chunk, score_chunk
from .run.driver import Engine
from .run.units import window_documents, windows_schema

__all__ = ["LongAttnChunkScorer", "LongAttnScorerActor", "LongAttnWindowsUDF", "RayEngine", "as_run_config",
           "cluster_defaults", "pending_chunks", "run_job", "to_arrow"]

logger = logging.getLogger(__name__)


as_run_config = stages.as_run_config
"""A `RunConfig` from itself, its dict (what travels to Ray tasks) or a YAML path: ``as_run_config("my.yaml")``."""


# -- batches of any format ------------------------------------------------------------------------

def to_arrow(batch: Any) -> Any:
    """A Ray Data batch (``pyarrow.Table``, ``pandas.DataFrame`` or dict of numpy arrays) as a `pyarrow.Table`.

    Ragged numpy columns (an object array of arrays, as Ray gives ``input_ids`` with
    ``batch_format="numpy"``) become Arrow lists like those of the windows shards.

    Example:

    >>> import numpy as np
    >>> to_arrow({"id": np.array(["a"], dtype=object), "input_ids": np.array([np.arange(3, dtype=np.int32)])}).schema
    id: string
    input_ids: list<item: int32>
      child 0, item: int32
    """
    import pandas as pd
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, Mapping):
        return pa.table({str(name): _numpy_column(values) for name, values in batch.items()})
    if isinstance(batch, pd.DataFrame):
        return pa.Table.from_pandas(batch, preserve_index=False)
    raise TypeError(f"expected a Ray Data batch (pyarrow.Table, pandas.DataFrame or dict of numpy arrays), "
                    f"got {type(batch).__name__}")


def _numpy_column(values: Any) -> Any:
    """One numpy column as an Arrow array; rows that are arrays give a list column of their dtype."""
    import numpy as np
    import pyarrow as pa

    values = np.asarray(values)
    if values.ndim > 1:
        values = list(values)
    elif values.dtype != object:
        return pa.array(values)
    first = next((v for v in values if v is not None), None)
    if isinstance(first, np.ndarray):
        return pa.array(list(values), pa.list_(pa.from_numpy_dtype(first.dtype)))
    return pa.array(list(values))


def _require(table: Any, columns: tuple[Any, ...], who: str, hint: str) -> None:
    """Raise naming the missing columns; an item that is a tuple of names needs one of them."""
    have = set(table.column_names)
    missing = [name for name in columns if not have & set(name if isinstance(name, tuple) else (name,))]
    if missing:
        raise ValueError(f"{who} needs the column(s) {missing} ({hint}); the batch has {table.column_names}")


# -- the map_batches callables ---------------------------------------------------------------------

class LongAttnWindowsUDF:
    """Documents → Algorithm 1 windows of ``window_size`` tokens, for ``ds.map_batches`` (one tokenizer per actor).

    Built on `hf_longattn.run.units.window_documents`, the one implementation of windowing: a
    document gives the same windows (ids, token ids, hashes) as in a run's windows shards; one
    shorter than W gives none. The ``max_windows_per_category`` cap (a sample over a whole run)
    is not applied.

    Args:
        config (`RunConfig`, `dict` or `str`): the run (its model's tokenizer, ``window_size``,
            ``faithful``), or its dict / YAML path.
        batch_documents (`int`, defaults to 16): documents tokenised together.

    Input batches (any ``batch_format``): `hf_longattn.vocabulary.DOCUMENT_COLUMNS` (``source``,
    ``license`` optional; ``input_ids``, where present, instead of ``text``). Output: a
    `pyarrow.Table` with `hf_longattn.run.units.windows_schema` (token ids, no text).

    Example:

    >>> windows = ray.data.read_json("docs.jsonl").map_batches(
    ...     LongAttnWindowsUDF, fn_constructor_kwargs={"config": "my.yaml"}, batch_size=16,
    ...     compute=ray.data.ActorPoolStrategy(size=4))  # doctest: +SKIP
    """

    def __init__(self, config: Any, batch_documents: int = 16) -> None:
        self.config = as_run_config(config)
        self.batch_documents = int(batch_documents)
        self.tokenizer = stages.task_run(self.config).scorer.tokenizer  # the tokenizer the windows step uses

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        table = to_arrow(batch)
        _require(table, (V.ID, V.CATEGORY, (V.TEXT, V.INPUT_IDS)), "LongAttnWindowsUDF",
                 "documents: id, category, text, source, license")
        tables = [windows for windows, _ in window_documents(
            table.to_pylist(), self.tokenizer, window_size=self.config.window_size, faithful=self.config.faithful,
            batch_documents=self.batch_documents)]
        return pa.concat_tables(tables) if tables else windows_schema().empty_table()


class LongAttnScorerActor:
    """Windows → the same rows plus the LongAttn score columns, for ``ds.map_batches`` (one model load per actor).

    Built on `hf_longattn.run.chunks.score_chunk` with the run's registered scorer
    (`LongAttnScorer.from_run_config`): the scores are bit-identical to those of
    `hf_longattn.LongAttnScorer` (and of ``hf-longattn run``) on the same windows and device.

    Args:
        config (`RunConfig`, `dict` or `str`): the run (model, ``window_size``, ``min_distance``,
            ``layer``, ``dtype``, ``scorer``), or its dict / YAML path.
        device (`str`, *optional*): default ``cuda:0`` (the GPU Ray gave the actor) or the CPU.
        batch_size (`int`, *optional*): windows per scorer call; default ``config.batch_size``.
        scorer (`str`, *optional*): one of the run's ``scorers`` (default: its ``scorer``); one actor pool per scorer
            scores the same windows with several.

    Input batches, in any ``batch_format`` (``"pyarrow"``, ``"numpy"``, ``"pandas"``): ``id`` and
    ``input_ids`` (token ids) at least. Returns a `pyarrow.Table`, whatever the input format, so
    that the score columns keep the types of `hf_longattn.vocabulary.score_features` (a DS_T that
    could not be computed stays null rather than NaN; ``longattn_min_distance`` stays int64).
    Score columns already in the batch are replaced.

    Example:

    >>> scored = ray.data.read_parquet("run/windows").map_batches(
    ...     LongAttnScorerActor, fn_constructor_kwargs={"config": config.to_dict()}, batch_size=16,
    ...     batch_format="pyarrow", num_gpus=1, compute=ray.data.ActorPoolStrategy(size=8))  # doctest: +SKIP
    """

    def __init__(self, config: Any, device: str | None = None, batch_size: int | None = None,
                 scorer: str | None = None) -> None:
        self.config = as_run_config(config)
        self.scorer = _scorer_view(stages.task_run(self.config, device=device), scorer).scorer
        self.batch_size = int(batch_size or self.config.batch_size)
        if callable(getattr(self.scorer, "load", None)):
            self.scorer.load()  # once per actor, before the first batch

    def __call__(self, batch: Any) -> Any:
        table = to_arrow(batch)
        _require(table, (V.ID, V.INPUT_IDS), "LongAttnScorerActor", "windows: window them with LongAttnWindowsUDF")
        scored = score_chunk(self.scorer, table.select([V.ID, V.INPUT_IDS]), batch_size=self.batch_size)
        names = [name for name in scored.column_names if name != V.ID]
        table = table.drop_columns([name for name in names if name in table.column_names])
        for name in names:
            table = table.append_column(scored.schema.field(name), scored.column(name))
        return table


class LongAttnChunkScorer:
    """Chunk indices of a run's plan → each chunk claimed, scored and written with its marker, for ``ds.map_batches``.

    Holds one task `Run` (`hf_longattn.run.stages.task_run`) per actor and scores a chunk the way
    the score step does: it claims it first (a chunk valid by the time it comes up, or held by
    another live task, is skipped), then writes ``scores/chunk-NNNNNN.parquet`` and its ``.done``
    marker atomically, fenced by the claim and by the launch's run lock.

    Args:
        config (`RunConfig`, `dict` or `str`): the run, whose plan stage has run.
        device (`str`, *optional*): as for `LongAttnScorerActor`.
        launch (`str`, *optional*): the launch id of the driver holding the run lock.
        scorer (`str`, *optional*): one of the run's ``scorers`` (default: its ``scorer``): its plan, ``scores/<scorer>/``.

    Input batches: a ``chunk`` column (indices into ``scores/plan.json``). Output: a
    `pyarrow.Table` with ``chunk``, ``windows``, ``scored`` (`False` when it was already done or
    held elsewhere) and ``seconds``, one row per chunk.

    Example:

    >>> ray.data.from_items([{"chunk": j} for j in pending_chunks(config)]).map_batches(
    ...     LongAttnChunkScorer, fn_constructor_kwargs={"config": config.to_dict()}, batch_size=1,
    ...     num_gpus=1, compute=ray.data.ActorPoolStrategy(size=8)).materialize()  # doctest: +SKIP
    """

    def __init__(self, config: Any, device: str | None = None, launch: str | None = None,
                 scorer: str | None = None) -> None:
        self.run = _scorer_view(stages.task_run(config, device=device, launch=launch), scorer)
        self.plan = score_step.read_plan(self.run)
        self.reuse: dict[str, Any] | None = None

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        from .run.lock import claim

        table = to_arrow(batch)
        _require(table, ("chunk",), "LongAttnChunkScorer", "indices into scores/plan.json")
        fingerprint, run = self.run.fingerprint["fingerprint"], self.run
        report: dict[str, list] = {"chunk": [], "windows": [], "scored": [], "seconds": []}
        for index in table.column("chunk").to_pylist():
            chunk, started, scored = self.plan.chunks[int(index)], time.perf_counter(), False
            if check_chunk(run.folder.scores, int(index), chunk.rows, fingerprint, chunk.digest) is not None:
                held = claim(run.folder.chunk_claim(int(index)), run.launch, 0)
                if held is not None:
                    try:
                        if self.reuse is None:  # scores of unchanged windows kept from an earlier plan, read once
                            self.reuse = score_step.reuse_index(run)
                        score_step.score_one_chunk(run, int(index), chunk, self.reuse, lambda n: None,
                                                   before_commit=lambda: (held.check(), run.fence()))
                        scored = True
                    finally:
                        held.release()
            for key, value in zip(report, (int(index), chunk.rows, scored, time.perf_counter() - started)):
                report[key].append(value)
        types = (pa.int64(), pa.int64(), pa.bool_(), pa.float64())
        return pa.table(report, schema=pa.schema(list(zip(report, types))))


def _scorer_view(run: Any, scorer: str | None) -> Any:
    """The task run as scorer ``scorer`` sees it (`hf_longattn.run.context.Run.for_scorer`); a name not among the run's
    scorers is refused in one line."""
    if scorer is None:
        return run
    from .registry import SCORERS

    name = SCORERS.resolve(scorer)
    if name not in run.config.scorer_names():
        raise LongAttnError(f"scorer {name!r} is not among this run's scorers {run.config.scorer_names()}: add it to `scorers`")
    return run.for_scorer(name)


# -- the job ---------------------------------------------------------------------------------------

def pending_chunks(config: Any) -> list[int]:
    """The chunk indices of ``scores/plan.json`` without a valid marker (`hf_longattn.run.stages.pending_chunks`).

    Example:

    >>> stages.plan_stage(config); pending_chunks(config)  # doctest: +SKIP
    [0, 1, 2, 5]
    """
    return stages.pending_chunks(config)


def cluster_defaults(tasks: int | None, concurrency: int | None,
                     num_gpus_per_actor: float | None) -> tuple[int, int, float]:
    """``(tasks, concurrency, num_gpus_per_actor)`` with what is unset taken from `ray.cluster_resources`.

    Defaults: one CPU task per CPU; one GPU per scoring task when the cluster has GPUs, then one
    scoring task per GPU, else one per CPU. Asking for GPUs on a cluster without any raises.

    Example:

    >>> ray.init(num_cpus=2); cluster_defaults(None, None, None)  # doctest: +SKIP
    (2, 2, 0.0)
    """
    resources = ray.cluster_resources()
    cpus, gpus = max(1, int(resources.get("CPU", 1))), float(resources.get("GPU", 0))
    per_actor = float(num_gpus_per_actor if num_gpus_per_actor is not None else (1 if gpus >= 1 else 0))
    if per_actor < 0 or (tasks is not None and tasks < 1) or (concurrency is not None and concurrency < 1):
        raise ValueError("tasks and concurrency must be at least 1 and num_gpus_per_actor at least 0")
    if per_actor > gpus:
        raise LongAttnError(f"each scorer actor asks for {per_actor:g} GPU(s) but the Ray cluster has {gpus:g}: pass "
                            "--num-gpus-per-actor 0 to score on CPUs, or start the GPU nodes first")
    actors = concurrency or (max(1, int(gpus // per_actor)) if per_actor else cpus)
    return int(tasks or cpus), int(actors), per_actor


class RayEngine(Engine):
    """Dispatches the driver's stages as Ray tasks on the connected cluster: ``tasks`` CPU tasks for the windows and
    export stages, ``concurrency`` scoring tasks with ``num_gpus`` GPUs each, one task for the others.

    Every task claims its units (`hf_longattn.run.stages.run_task`); the driver's process holds the run lock.
    """

    name = "ray"

    def __init__(self, tasks: int, concurrency: int, num_gpus: float = 0, device: str | None = None) -> None:
        self.tasks, self.concurrency, self.num_gpus, self.device = tasks, concurrency, num_gpus, device

    def run(self, config: Any, *, progress: bool = True) -> Any:
        from .run.context import Run
        from .run.executor import LocalExecutor

        return Run(config, LocalExecutor(), progress=progress)

    def run_stages(self, run: Any, stages_to_run: list[str]) -> dict[str, float]:
        payload, launch, timings = run.config.to_dict(), run.launch, {}
        for name in stages_to_run:
            started, stage = time.perf_counter(), stages.STAGES[name]
            gpus = self.num_gpus if name in ("score", "probe") else 0
            count = (self.concurrency if name == "score" else self.tasks) if stage.many else 1
            remote = ray.remote(num_cpus=1, num_gpus=gpus)(_task)
            _gather([remote.remote(payload, name, rank, count, launch, self.device if gpus or self.device else None)
                     for rank in range(count)])
            timings[name] = round(time.perf_counter() - started, 3)
        return timings


def _task(config: dict[str, Any], stage: str, rank: int, tasks: int, launch: str, device: str | None) -> dict[str, int]:
    return stages.run_task(config, stage, rank, tasks, launch=launch, device=device)


def _gather(refs: list[Any]) -> list[Any]:
    """Every task's result; the first error raises once all have ended (so Ray reports none as unhandled)."""
    results, errors = [], []
    for ref in refs:
        try:
            results.append(ray.get(ref))
        except Exception as error:  # noqa: BLE001 - re-raised below, once every task has finished
            errors.append(error)
    if errors:
        raise errors[0]
    return results


def run_job(config: Any, *, tasks: int | None = None, concurrency: int | None = None,
            num_gpus_per_actor: float | None = None, device: str | None = None, target: str = "run") -> dict[str, Any]:
    """Run the job (``target``: a command, default ``run``) on the connected Ray cluster through the one driver.

    The run folder of ``hf-longattn run`` (same files, same numbers); the same call again resumes,
    redoing only what is not current. The driver's process holds ``output_dir/.lock`` meanwhile.

    Args:
        config (`RunConfig`, `dict` or `str`): the run.
        tasks (`int`, *optional*): parallel CPU tasks of the windows and export stages.
        concurrency (`int`, *optional*), num_gpus_per_actor (`float`, *optional*): the scoring tasks
            and their GPUs (0: CPU; 0.5 shares a GPU). Defaults: `cluster_defaults`.
        device (`str`, *optional*): the scorers' device (default: the task's GPU, else the CPU).

    Example:

    >>> ray.init(address="auto")  # doctest: +SKIP
    >>> print(format_summary(run_job("recipes/configs/demo.yaml", concurrency=4)))  # doctest: +SKIP
    """
    from .run.driver import drive

    config = as_run_config(config)
    config = config.replace(output_dir=str(Path(config.output_dir).absolute()))  # tasks may run in other folders
    tasks, concurrency, gpus = cluster_defaults(tasks, concurrency, num_gpus_per_actor)
    _warn_relative_paths(config)
    return drive(config, target, engine=RayEngine(tasks, concurrency, gpus, device), progress=False)


def _warn_relative_paths(config: RunConfig) -> None:
    """On several nodes, relative source or model paths are read from each task's own folder: say so."""
    relative = [s.path for s in config.sources if getattr(s, "path", None) and not Path(s.path).is_absolute()]
    if Path(config.model).exists() and not Path(config.model).is_absolute():
        relative.append(config.model)
    if relative and sum(1 for node in ray.nodes() if node.get("Alive")) > 1:
        logger.warning("hf_longattn: relative paths %s are read by Ray tasks from their own working folder on each "
                       "node; give absolute paths on storage every node sees", relative)

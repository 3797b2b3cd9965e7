"""datatrove for the LongAttn job: a step per stage (tasks dispatched by datatrove's executors), the engine the driver uses, and readers of the selected windows.

Every stage of `hf_longattn.run.stages` is a `PipelineStep` whose ``run`` does one task of the
stage: the many-task stages (windows, score, export) claim their units, so any number of tasks
share the work and a relaunch does only what is missing; the others run in one task. The driver
(`hf_longattn.run.driver.drive`) decides which stages run, holds the run lock, and hands the
stages to `DatatroveEngine`, which chains one executor per stage (local, Slurm or Ray; see
``recipes/longabc_datatrove.py``). Tasks record their counts as datatrove stats.

============================  =========  =====================================================
step                          tasks      does
============================  =========  =====================================================
`LongAttnProbe`               1          the scorer self-check (when configured)
`LongAttnWindows`             N (CPU)    claims input shards, windows them
`LongAttnPlan`                1          windows statistics and the chunk plan
`LongAttnScore`               N (GPU)    claims chunks, scores them
`LongAttnFit`                 1          ``selection.parquet``, ``selector.json``, ``selection.json``
`LongAttnExport`              N          claims windows shards, writes their export parts
`LongAttnFinish`              1          card, plots, ``hub/``
`LongAttnPush`                1          the push, when configured
`LongAttnScoredWindows`       N          reader: one `Document` per scored window, scores in metadata
`LongAttnSelect`              N          filter: keeps a window iff the fitted selector selects it
============================  =========  =====================================================
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

try:
    from datatrove.data import Document, DocumentsPipeline
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.filters.base_filter import BaseFilter
except ImportError as error:  # the `datatrove` extra is not installed
    raise ImportError(f'hf_longattn.datatrove needs datatrove ({error}): pip install "hf-longattn[datatrove]"') from error

from . import vocabulary as V
from .errors import LongAttnError
from .run import stages
from .run.driver import Engine
from .run.executor import LocalExecutor
from .run.lease import release_launch, touch
from .run.lock import HEARTBEAT
from .run.select_step import load_selector, read_selection
from .run.windows_step import within_cap as keep_within_cap

SINGLE_TASK_STAGES = tuple(name for name, stage in stages.STAGES.items() if not stage.many) + ("fit",)
"""Stages whose executor must have exactly one task (``fit`` is the select stage's name in hf_longattn 0.2)."""


def config_dict(config: Any) -> dict[str, Any]:
    """A `RunConfig`, its dict or a YAML path, as the validated plain dict steps store (datatrove pickles steps).

    Raises a `TypeError` for anything else (`hf_longattn.run.stages.as_run_config`).
    """
    return stages.as_run_config(config).to_dict()


def task_local_rank(rank: int) -> int:
    """The local rank of a score task, which picks its GPU (``cuda:<local rank mod GPUs>``, else the CPU): under
    `LocalPipelineExecutor` the pool worker's number (``workers`` ≤ GPUs never share one); else ``rank`` (on Slurm
    and Ray a task sees only its own GPU, ``cuda:0``)."""
    import multiprocess

    identity = multiprocess.current_process()._identity  # (k,) in the k-th worker process of a pool
    return identity[-1] - 1 if identity else rank


@contextlib.contextmanager
def _heartbeat(folder: str, launch: str | None, detached: bool) -> Iterator[None]:
    """While a task of a detached launch (a Slurm job chain) runs, refresh the run lock it holds."""
    if not (detached and launch):
        yield
        return
    touch(folder, launch)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT):
            with contextlib.suppress(LongAttnError):
                touch(folder, launch)

    thread = threading.Thread(target=beat, name="hf_longattn-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


class _LongAttnStage(PipelineStep):
    """One stage of `hf_longattn.run.stages` as a step: one task of it per ``run``, its counts recorded as stats.

    Args:
        config (`RunConfig`, `dict` or `str`): the run (a YAML path is read now); stored as a dict.
        launch (`str`, *optional*): the launch id of the driver that holds the run lock; every
            commit checks the launch still holds it. `None`: a step used on its own (no driver).
        detached (`bool`, defaults to `False`): the driver has exited (a Slurm job chain): the task
            refreshes the lock while it runs.
        release (`bool`, defaults to `False`): the last stage of a detached launch: remove the lock after.
    """

    type = "🧲 - LONGATTN"
    stage = ""

    def __init__(self, config: Any, launch: str | None = None, *, detached: bool = False, release: bool = False) -> None:
        super().__init__()
        self.config = config_dict(config)
        self.launch, self.detached, self.release = launch, detached, release

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        folder = self.config["output_dir"]
        with _heartbeat(folder, self.launch, self.detached), self.track_time(unit="task"):
            counts = self.run_task(rank, world_size)
        if self.release and self.launch:
            release_launch(folder, self.launch)
        for name, value in counts.items():
            self.stat_update(name, value=int(value), unit="task")

    def run_task(self, rank: int, world_size: int) -> dict[str, int]:
        """Do this task's part of the stage; return the counts to record as stats."""
        return stages.run_task(self.config, self.stage, rank, world_size, launch=self.launch)


class LongAttnProbe(_LongAttnStage):
    """One task: the scorer self-check on the run's documents (``probe/``), when the configuration asks for it."""

    name = "🔬 LongAttn probe"
    stage = "probe"


class LongAttnWindows(_LongAttnStage):
    """Claim input shards and cut their documents into windows (CPU). Stats: ``input_shards``, ``input_shards_built``,
    ``documents``, ``documents_too_short``, ``tokens_documents``, ``windows_cut`` (before ``max_windows_per_category``).

    Example:

    >>> from datatrove.executor import LocalPipelineExecutor
    >>> LocalPipelineExecutor([LongAttnWindows("my.yaml")], tasks=8, workers=4).run()  # doctest: +SKIP
    """

    name = "🪟 LongAttn windows"
    stage = "windows"


class LongAttnPlan(_LongAttnStage):
    """One task, after every windows task: ``windows_stats.json`` and the chunk plan. Stats: ``windows``, ``chunks``."""

    name = "🗺️ LongAttn plan"
    stage = "plan"


class LongAttnScore(_LongAttnStage):
    """Claim chunks without a valid marker and score them on the task's device.

    Stats per task: ``chunks_pending``, ``chunks_scored``, ``windows_scored``, ``windows_reused``.

    Args:
        device (`str`, *optional*): where to score, e.g. ``"cuda:1"``; default: the task's own GPU
            (see :func:`task_local_rank`), else the CPU.

    Example:

    >>> SlurmPipelineExecutor([LongAttnScore(cfg, launch)], tasks=64, gpus_per_task=1, time="24:00:00",
    ...                       partition="gpu", depends=plan_executor).run()  # doctest: +SKIP
    """

    name = "🎯 LongAttn score"
    stage = "score"

    def __init__(self, config: Any, launch: str | None = None, *, device: str | None = None, **kwargs: Any) -> None:
        super().__init__(config, launch, **kwargs)
        self.device = device

    def run_task(self, rank: int, world_size: int) -> dict[str, int]:
        return stages.run_task(self.config, "score", rank, world_size, launch=self.launch, device=self.device,
                               local_rank=task_local_rank(rank))


class LongAttnFit(_LongAttnStage):
    """One task, after every score task: the select stage (``selection.parquet``, ``selector.json``, ``selection.json``).

    Stats: ``windows``, ``scored_ok``, ``kept``.
    """

    name = "⚖️ LongAttn fit"
    stage = "select"


class LongAttnExport(_LongAttnStage):
    """Claim windows shards and write their export parts. Stats: ``windows_shards``."""

    name = "📦 LongAttn export"
    stage = "export"


class LongAttnFinish(_LongAttnStage):
    """One task, after every export task: parts numbered, card, plots, ``hub/`` swapped in. Stats: ``hub_files``."""

    name = "🏁 LongAttn finish"
    stage = "finish"


class LongAttnPush(_LongAttnStage):
    """One task: upload ``hub/`` to ``push_to_hub``. Stats: ``pushed``."""

    name = "☁️ LongAttn push"
    stage = "push"


STEPS = {"probe": LongAttnProbe, "windows": LongAttnWindows, "plan": LongAttnPlan, "score": LongAttnScore,
         "select": LongAttnFit, "export": LongAttnExport, "finish": LongAttnFinish, "push": LongAttnPush}
"""The step of each stage."""


class DatatroveEngine(Engine):
    """Dispatches the driver's stages as datatrove pipelines: one executor per stage, each after the one before.

    Args:
        make_executor (`callable`): ``(stage, pipeline, tasks, logging_dir, depends)`` → a datatrove
            executor (local, Slurm or Ray; ``recipes/longabc_datatrove.py`` has one).
        tasks (`int`): tasks of each many-task stage.
        logging_root (`str`): datatrove's logs, stats and completion markers go to
            ``<logging_root>/<launch>/<stage>``: a new launch reruns every task it is given (each
            skips what is current), so markers of an earlier launch never hide a change.
        submit (`bool`, defaults to `False`): the executors only submit (Slurm): the launch's tasks
            keep the run lock, and the last one releases it.
        selected_folder (`str`, *optional*): also write the selected windows as JSONL there.
    """

    name = "datatrove"

    def __init__(self, make_executor: Callable[..., Any], tasks: int, logging_root: str, *, submit: bool = False,
                 selected_folder: str | None = None) -> None:
        self.make_executor, self.tasks, self.logging_root = make_executor, tasks, logging_root
        self.detached, self.selected_folder = submit, selected_folder
        self.executors: dict[str, Any] = {}

    def run(self, config: Any, *, progress: bool = True) -> Any:
        from .run.context import Run

        return Run(config, LocalExecutor(), progress=progress)

    def run_stages(self, run: Any, stages_to_run: list[str]) -> dict[str, float] | None:
        launch, config = run.launch, run.config.to_dict()
        pipelines = {name: [STEPS[name](config, launch, detached=self.detached,
                                        release=self.detached and i == len(stages_to_run) - 1)]
                     for i, name in enumerate(stages_to_run)}
        if self.selected_folder is not None:
            pipelines["selected"] = selected_pipeline(config, self.selected_folder)
        previous, root = None, f"{self.logging_root}/{launch}"
        for name, pipeline in pipelines.items():
            tasks = self.tasks if name == "selected" or stages.STAGES[name].many else 1
            previous = self.executors[name] = self.make_executor(name, pipeline, tasks, f"{root}/{name}", previous)
        if self.detached:
            if previous is not None:
                previous.run()  # submits the chain
            return None
        timings = {}
        for name, executor in self.executors.items():  # in order, so a failed stage stops the chain at once
            started = time.perf_counter()
            executor.run()
            timings[name] = round(time.perf_counter() - started, 3)
            incomplete = executor.get_incomplete_ranks(skip_completed=True)
            if incomplete:
                raise LongAttnError(f"tasks {incomplete} of the {name} stage did not finish (logs: "
                                    f"{executor.logging_dir.path}/logs): rerun the same command to resume")
        return timings


class LongAttnScoredWindows(PipelineStep):
    """Reader: one `Document` per scored window of the windows shards ``i ≡ rank (mod world_size)``, in windows order.

    ``text`` is the window decoded by the run's tokenizer (as in the export), ``id`` the window id;
    ``metadata`` holds the window columns (``doc_id``, ``window_index``, ``category``, ``source`` …)
    and those of ``selection.parquet`` (``longattn_ds``, ``longattn_du``, ``longattn_status``,
    ``longattn_lds``, ``longattn_selected`` …). Needs a finished fit stage. Stats: ``windows``.

    Args:
        config (`RunConfig`, `dict` or `str`): the run; stored as a dict.
        batch_size (`int`, defaults to `256`): windows read and decoded at a time.
        with_input_ids (`bool`, defaults to `False`): also put the token ids in ``metadata``.

    Example:

    >>> pipeline = [LongAttnScoredWindows(cfg), LongAttnSelect(cfg), JsonlWriter("out/selected")]
    >>> LocalPipelineExecutor(pipeline, tasks=4).run()  # doctest: +SKIP
    """

    type = "📖 - READER"
    name = "🪟 LongAttn scored windows"

    def __init__(self, config: Any, batch_size: int = 256, with_input_ids: bool = False) -> None:
        super().__init__()
        self.config = config_dict(config)
        self.batch_size = batch_size
        self.with_input_ids = with_input_ids

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:

        if data:
            yield from data
        run = stages.task_run(self.config, rank, world_size)
        stats = run.windows_stats()
        selection = read_selection(run)  # checked against its record
        windows = [stats.shard_windows(i) for i in range(len(stats.shards))]
        offsets = [0, *itertools.accumulate(windows)]
        for index in range(rank, len(stats.shards), world_size):  # a reader: datatrove's static split of its input
            rows = selection.slice(offsets[index], windows[index])
            yield from self._shard_documents(run, stats, index, rows)

    def _shard_documents(self, run: Any, stats: Any, index: int, selection: Any) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .run.units import check_window_hashes

        path, offset = run.folder.shard_parquet(stats.shards[index]["name"]), 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=self.batch_size):
            table = keep_within_cap(pa.Table.from_batches([batch]), stats.cap)
            check_window_hashes(table, str(path))  # every window's ids against its hash before it is decoded
            scores = selection.slice(offset, table.num_rows)
            offset += table.num_rows
            if not table.column(V.ID).equals(scores.column(V.ID)):
                raise LongAttnError(f"{run.folder.selection} does not match {path}: run the select stage again")
            ids = table.column(V.INPUT_IDS).to_pylist()
            texts = run.scorer.tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            columns = table.drop_columns([] if self.with_input_ids else [V.INPUT_IDS]).to_pylist()
            for text, window, score in zip(texts, columns, scores.drop_columns([V.ID]).to_pylist()):
                document = Document(text=text, id=window.pop(V.ID), metadata={**window, **score})
                self.stat_update("windows")
                self.update_doc_stats(document)
                yield document


class LongAttnSelect(BaseFilter):
    """Filter: keep a window iff the run's fitted selector (``selector.json``) selects it — as ``selection.parquet`` says.

    Reads ``doc.id`` and, from ``doc.metadata``, ``category`` and the columns the selector reads
    (``longattn_ds``, ``longattn_du``, ``longattn_status``; another scorer's with ``select_by``);
    writes the selection score and flag (``longattn_lds``, ``longattn_selected``) into the
    metadata. A dropped window's reason is its first status that is not ``ok`` (``dropped_oom`` …
    in the stats, a null status counts as ``null``), else ``not_selected``.

    Args:
        config (`RunConfig`, `dict` or `str`): the run (its ``output_dir`` holds ``selector.json``); stored as a dict.
        exclusion_writer (`DiskWriter`, *optional*): also write the dropped windows, with ``filter_reason``.
        batch_size (`int`, defaults to `256`): windows judged at a time.

    Example:

    >>> pipeline = [LongAttnScoredWindows(cfg), LongAttnSelect(cfg), JsonlWriter("out/selected")]
    >>> LocalPipelineExecutor(pipeline, tasks=4).run()  # doctest: +SKIP
    """

    name = "🎯 LongAttn select"

    def __init__(self, config: Any, exclusion_writer: Any = None, batch_size: int = 256) -> None:
        super().__init__(exclusion_writer, batch_size)
        self.config = config_dict(config)
        self._selector = None

    @property
    def selector(self) -> Any:
        """The fitted `LongAttnSelector` of ``selector.json`` (read once per process)."""
        if self._selector is None:
            self._selector = load_selector(stages.task_run(self.config), remedy="run the fit stage")
        return self._selector

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        from .ranking import combined_status

        selection = self.selector.columns
        columns = {V.ID: [doc.id for doc in batch]}
        for name in (V.CATEGORY, *selection.read):
            columns[name] = [doc.metadata.get(name) for doc in batch]
        added = self.selector.add_scores(columns)
        statuses = combined_status([columns[name] for name in selection.statuses])
        results: list[bool | tuple[bool, str]] = []
        for doc, score, selected, status in zip(batch, added[selection.score], added[selection.selected], statuses):
            doc.metadata[selection.score], doc.metadata[selection.selected] = score, selected
            results.append(True if selected else (False, "not_selected" if status == V.OK else status))
        return results

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_selector": None}  # workers read selector.json themselves


def selected_pipeline(config: Any, folder: str) -> list[PipelineStep]:
    """The selected windows as JSONL (``NNNNN.jsonl.gz`` in ``folder``): scored windows → `LongAttnSelect` → writer."""
    from datatrove.pipeline.writers import JsonlWriter

    return [LongAttnScoredWindows(config), LongAttnSelect(config),
            JsonlWriter(str(folder), output_filename="${rank}.jsonl.gz")]


def longattn_pipelines(config: Any, selected_folder: str | None = None, launch: str | None = None) -> dict[str, list[PipelineStep]]:
    """The pipeline of each stage, in order: windows, plan, score, fit, export, finish, push (and ``selected``).

    For running the stages by hand with an executor each (one task for :data:`SINGLE_TASK_STAGES`);
    the recipe runs them through the driver (`DatatroveEngine`) instead, which holds the run lock.

    Args:
        config (`RunConfig`, `dict` or `str`): the run.
        selected_folder (`str`, *optional*): also write the selected windows as JSONL there.
        launch (`str`, *optional*): the launch id of a driver holding the run lock.

    Example:

    >>> previous = None
    >>> for stage, pipeline in longattn_pipelines("my.yaml").items():  # doctest: +SKIP
    ...     tasks = 1 if stage in SINGLE_TASK_STAGES else 8
    ...     previous = LocalPipelineExecutor(pipeline, tasks=tasks, logging_dir=f"logs/{stage}", depends=previous)
    >>> previous.run()  # doctest: +SKIP
    """
    config = config_dict(config)
    names = ["windows", "plan", "score", "select", "export", "finish", *(["push"] if config.get("push_to_hub") else [])]
    pipelines = {("fit" if name == "select" else name): [STEPS[name](config, launch)] for name in names}
    if selected_folder is not None:
        pipelines["selected"] = selected_pipeline(config, selected_folder)
    return pipelines

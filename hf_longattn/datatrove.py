"""datatrove steps for the LongAttn job (windows, plan, score, fit, export, finish) and for its selected windows.

Each stage of `hf_longattn.run.stages` is a `PipelineStep`: give each stage its own executor, after the one
before (``depends=``; ``recipes/longabc_datatrove.py`` does it for the local, Slurm and Ray executors).
datatrove skips complete tasks; inside a task, valid windows shards and score chunks are skipped too, so a
relaunch redoes only unfinished work. Tasks record their counts as datatrove stats.

============================  =========  =====================================================
step                          tasks      does
============================  =========  =====================================================
`LongAttnWindows`             N (CPU)    windows of the input shards ``i ≡ rank (mod N)``
`LongAttnPlan`                1          windows statistics and the chunk plan
`LongAttnScore`               N (GPU)    scores the chunks ``j ≡ rank (mod N)``
`LongAttnFit`                 1          ``selection.parquet``, ``selector.json``, ``summary.json``
`LongAttnExport`              N          the export parts of the windows shards ``i ≡ rank``
`LongAttnFinish`              1          card, plots, ``hub/`` (and the push, when configured)
`LongAttnScoredWindows`       N          reader: one `Document` per scored window, scores in metadata
`LongAttnSelect`              N          filter: keeps a window iff the fitted selector selects it
============================  =========  =====================================================
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any

try:
    from datatrove.data import Document, DocumentsPipeline
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.filters.base_filter import BaseFilter
except ImportError as error:  # the `datatrove` extra is not installed
    raise ImportError(f"hf_longattn.datatrove needs datatrove ({error}): pip install hf-longattn[datatrove]") from error

from . import vocabulary as V
from .errors import LongAttnError
from .run import stages
from .run.select_step import load_selector
from .run.windows_step import keep_within_cap

SINGLE_TASK_STAGES = ("plan", "fit", "finish")
"""Stages whose executor must have exactly one task."""


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


class _LongAttnStage(PipelineStep):
    """One stage of `hf_longattn.run.stages` as a step: runs the task, then records its counts as stats.

    Every step takes the run's ``config`` (`RunConfig`, `dict` or path to a YAML file), stored as a dict.
    """

    type = "🧲 - LONGATTN"
    single_task = False

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config_dict(config)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if self.single_task and world_size != 1:
            raise ValueError(f"{type(self).__name__} is one task: give its executor tasks=1 (got {world_size})")
        if data:
            yield from data
        with self.track_time(unit="task"):
            counts = self.run_task(rank, world_size)
        for name, value in counts.items():
            self.stat_update(name, value=int(value), unit="task")

    def run_task(self, rank: int, world_size: int) -> dict[str, int]:
        """Do this task's part of the stage; return the counts to record as stats."""
        raise NotImplementedError


class LongAttnWindows(_LongAttnStage):
    """Cut the documents of the input shards ``i ≡ rank (mod world_size)`` into windows (CPU; resumable by shard).

    Stats per task: ``input_shards``, ``input_shards_built`` (the others were valid), ``documents``,
    ``documents_too_short``, ``tokens_documents``, ``windows_cut`` (before ``max_windows_per_category``).

    Args:
        config (`RunConfig`, `dict` or `str`): the run (a YAML path is read now); stored as a dict.

    Example:

    >>> from datatrove.executor import LocalPipelineExecutor
    >>> LocalPipelineExecutor([LongAttnWindows("my.yaml")], tasks=8, workers=4).run()  # doctest: +SKIP
    """

    name = "🪟 LongAttn windows"

    def run_task(self, rank: int, world_size: int) -> dict[str, int]:
        return stages.windows_stage(self.config, rank, world_size)


class LongAttnPlan(_LongAttnStage):
    """One task, after every windows task: write ``windows_stats.json`` and the chunk plan. Stats: ``windows``, ``chunks``.

    Args:
        config (`RunConfig`, `dict` or `str`): the run; stored as a dict.

    Example:

    >>> LocalPipelineExecutor([LongAttnPlan(cfg)], tasks=1, depends=windows_executor).run()  # doctest: +SKIP
    """

    name = "🗺️ LongAttn plan"
    single_task = True

    def run_task(self, rank: int, world_size: int) -> dict[str, int]:
        return stages.plan_stage(self.config)


class LongAttnScore(_LongAttnStage):
    """Score the chunks ``j ≡ rank (mod world_size)`` that have no valid marker, on the task's device.

    Resumable inside a task: a chunk with a valid completion marker is never scored again. Stats per task:
    ``chunks`` (its own), ``chunks_scored`` (now), ``chunks_skipped`` (valid already), ``windows`` (of its
    chunks), ``windows_scored`` (now), ``scored_ok`` and ``not_ok`` (statuses of its windows).

    Args:
        config (`RunConfig`, `dict` or `str`): the run; stored as a dict.
        device (`str`, *optional*): where to score, e.g. ``"cuda:1"``; default: the task's own GPU
            (see :func:`task_local_rank`), else the CPU.

    Example:

    >>> SlurmPipelineExecutor([LongAttnScore(cfg)], tasks=64, gpus_per_task=1, time="24:00:00",
    ...                       partition="gpu", depends=plan_executor).run()  # doctest: +SKIP
    """

    name = "🎯 LongAttn score"

    def __init__(self, config: Any, device: str | None = None) -> None:
        super().__init__(config)
        self.device = device

    def run_task(self, rank: int, world_size: int) -> dict[str, int]:
        return stages.score_stage(self.config, rank, world_size, self.device, task_local_rank(rank))


class LongAttnFit(_LongAttnStage):
    """One task, after every score task: merge the chunks, fit the selector, write the selection and ``summary.json``.

    Stats: the run's totals, named as in `hf_longattn.vocabulary.COUNTERS` (``not_ok``: all statuses).

    Example:

    >>> LocalPipelineExecutor([LongAttnFit(cfg)], tasks=1, depends=score_executor).run()  # doctest: +SKIP
    """

    name = "⚖️ LongAttn fit"
    single_task = True

    def run_task(self, rank: int, world_size: int) -> dict[str, int]:
        totals = dict.fromkeys(V.COUNTERS, 0)
        for counts in stages.fit_stage(self.config)["categories"].values():
            for key in totals:
                value = counts.get(key, 0)
                totals[key] += sum(value.values()) if isinstance(value, Mapping) else value
        return totals


class LongAttnExport(_LongAttnStage):
    """Write the export parts of the windows shards ``i ≡ rank (mod world_size)``. Stats: ``windows_shards``.

    Example:

    >>> LocalPipelineExecutor([LongAttnExport(cfg)], tasks=8, depends=fit_executor).run()  # doctest: +SKIP
    """

    name = "📦 LongAttn export"

    def run_task(self, rank: int, world_size: int) -> dict[str, int]:
        return stages.export_stage(self.config, rank, world_size)


class LongAttnFinish(_LongAttnStage):
    """One task, after every export task: card, plots, ``hub/`` swapped in, push if configured. Stats: ``hub_files``.

    Example:

    >>> LocalPipelineExecutor([LongAttnFinish(cfg)], tasks=1, depends=export_executor).run()  # doctest: +SKIP
    """

    name = "🏁 LongAttn finish"
    single_task = True

    def run_task(self, rank: int, world_size: int) -> dict[str, int]:
        folder = stages.finish_stage(self.config)
        return {"hub_files": sum(1 for path in folder.rglob("*") if path.is_file())}


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
        import pyarrow.parquet as pq

        if data:
            yield from data
        run = stages.task_run(self.config, rank, world_size)
        shards = run.windows_stats()["shards"]
        selection = pq.read_table(run.folder.selection)
        offsets = [0, *itertools.accumulate(shard["kept"] for shard in shards)]
        for index in range(rank, len(shards), world_size):
            rows = selection.slice(offsets[index], shards[index]["kept"])
            yield from self._shard_documents(run, shards[index]["name"], rows)

    def _shard_documents(self, run: Any, name: str, selection: Any) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        cap, path, offset = run.windows_stats()["cap"], run.folder.windows / f"{name}.parquet", 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=self.batch_size):
            table = keep_within_cap(pa.Table.from_batches([batch]), cap)
            scores = selection.slice(offset, table.num_rows)
            offset += table.num_rows
            if not table.column(V.ID).equals(scores.column(V.ID)):
                raise LongAttnError(f"{run.folder.selection} does not match {path}: run the fit stage again")
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

    Reads ``doc.id`` and, from ``doc.metadata``, ``category``, ``longattn_ds``, ``longattn_du`` and
    ``longattn_status``; writes ``longattn_lds`` and ``longattn_selected`` into the metadata. A
    dropped window's reason is its status when not ``ok`` (``dropped_oom`` … in the stats, a null
    status counts as ``null``), else ``not_selected``.

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
        columns = {V.ID: [doc.id for doc in batch]}
        for name in (V.CATEGORY, V.DS, V.DU, V.STATUS):
            columns[name] = [doc.metadata.get(name) for doc in batch]
        added = self.selector.add_scores(columns)
        results: list[bool | tuple[bool, str]] = []
        for doc, lds, selected in zip(batch, added[V.LDS], added[V.SELECTED]):
            doc.metadata[V.LDS], doc.metadata[V.SELECTED] = lds, selected
            status = doc.metadata.get(V.STATUS)
            results.append(True if selected else (False, "not_selected" if status == V.OK else status or V.NULL_STATUS))
        return results

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_selector": None}  # workers read selector.json themselves


def longattn_pipelines(config: Any, selected_folder: str | None = None) -> dict[str, list[PipelineStep]]:
    """The pipeline of each stage, in order: windows, plan, score, fit, export, finish (and ``selected``).

    Give each its own executor (one task for :data:`SINGLE_TASK_STAGES`), each depending on the one before.

    Args:
        config (`RunConfig`, `dict` or `str`): the run.
        selected_folder (`str`, *optional*): also write the selected windows as JSONL
            (``NNNNN.jsonl.gz``) there, with `LongAttnScoredWindows` → `LongAttnSelect` → `JsonlWriter`.

    Example:

    >>> previous = None
    >>> for stage, pipeline in longattn_pipelines("my.yaml").items():  # doctest: +SKIP
    ...     tasks = 1 if stage in SINGLE_TASK_STAGES else 8
    ...     previous = LocalPipelineExecutor(pipeline, tasks=tasks, logging_dir=f"logs/{stage}", depends=previous)
    >>> previous.run()  # doctest: +SKIP
    """
    config = config_dict(config)
    pipelines: dict[str, list[PipelineStep]] = {
        "windows": [LongAttnWindows(config)], "plan": [LongAttnPlan(config)], "score": [LongAttnScore(config)],
        "fit": [LongAttnFit(config)], "export": [LongAttnExport(config)], "finish": [LongAttnFinish(config)],
    }
    if selected_folder is not None:
        from datatrove.pipeline.writers import JsonlWriter

        pipelines["selected"] = [LongAttnScoredWindows(config), LongAttnSelect(config),
                                 JsonlWriter(str(selected_folder), output_filename="${rank}.jsonl.gz")]
    return pipelines

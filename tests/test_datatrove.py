"""Tests of hf_longattn.datatrove and recipes/longabc_datatrove.py: the job as datatrove pipelines gives the files of `hf-longattn run`."""

from __future__ import annotations

import gzip
import importlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("datatrove")

from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.utils.stats import MetricStats, PipelineStats

from hf_longattn import vocabulary as V
from hf_longattn.errors import LongAttnError
from hf_longattn.datatrove import (
    SINGLE_TASK_STAGES,
    DatatroveEngine,
    LongAttnScore,
    LongAttnSelect,
    LongAttnWindows,
    longattn_pipelines,
)
from hf_longattn.run.driver import drive

from .helpers import chunk_plan, tiny_config

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "longabc_datatrove.py"
PRELOAD = ["torch", "transformers", "datasets", "pyarrow.parquet", "hf_longattn.datatrove", "hf_longattn.scorer"]


@pytest.fixture(scope="module", autouse=True)
def fast_workers():
    """datatrove's pool workers fork from a forkserver that has imported torch once (as the recipe does)."""
    import multiprocess

    multiprocess.set_forkserver_preload(PRELOAD)


def local_executor(workers: int = 2):
    """What the recipe's ``--executor local`` builds for each stage."""
    def make(stage, pipeline, tasks, logging_dir, depends):
        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers if tasks > 1 else 1,
                                     logging_dir=logging_dir, depends=depends)

    return make


def run_engine(config, logs: Path, tasks: int = 4, workers: int = 2, selected: str | None = None,
               score_step_class=None) -> dict:
    """The job through the one driver with datatrove's local executor (what the recipe does); the summary."""
    engine = DatatroveEngine(local_executor(workers), tasks, str(logs), selected_folder=selected)
    if score_step_class is not None:
        from hf_longattn import datatrove

        original = datatrove.STEPS["score"]
        datatrove.STEPS["score"] = score_step_class
        try:
            return drive(config, "run", engine=engine, progress=False)
        finally:
            datatrove.STEPS["score"] = original
    return drive(config, "run", engine=engine, progress=False)


def stage_logs(logs: Path, stage: str) -> Path:
    """The logging folder of ``stage`` in the newest launch under ``logs``."""
    return max((p for p in logs.glob(f"*/{stage}")), key=lambda p: p.stat().st_mtime_ns)


def task_stats(logs: Path, stage: str, rank: int | None = None, step: int = 0) -> dict[str, float]:
    """Totals of one step's datatrove stats in the newest launch: of one task or merged (``stats.json``)."""
    folder = stage_logs(logs, stage)
    if rank is None:
        totals: dict[str, float] = {}
        for path in sorted((folder / "stats").glob("*.json")):
            stats = PipelineStats.from_json(json.loads(path.read_text())).stats[step].stats
            for name, metric in stats.items():
                totals[name] = totals.get(name, 0) + MetricStats.from_dict(metric).total
        return totals
    path = folder / f"stats/{rank:05d}.json"
    stats = PipelineStats.from_json(json.loads(path.read_text())).stats[step].stats
    return {name: MetricStats.from_dict(metric).total for name, metric in stats.items()}


def assert_same_results(ours: Path, theirs: Path) -> None:
    """Same windows, bit-identical scores, same selection.parquet and the same hub parquet files."""
    mine, reference = pq.read_table(ours / "selection.parquet"), pq.read_table(theirs / "selection.parquet")
    for column in (V.ID, V.DS, V.DU):
        assert mine.column(column).equals(reference.column(column)), column
    assert mine.equals(reference)
    names = sorted(p.relative_to(ours / "hub").as_posix() for p in (ours / "hub").rglob("*.parquet"))
    assert names == sorted(p.relative_to(theirs / "hub").as_posix() for p in (theirs / "hub").rglob("*.parquet"))
    for name in names:
        assert pq.read_table(ours / "hub" / name).equals(pq.read_table(theirs / "hub" / name)), name


@pytest.fixture(scope="module")
def datatrove_run(tiny_model, corpus, tmp_path_factory):
    """The chain of stages (and the selected-JSONL stage) with 4 tasks on 2 workers: ``(config, logs)``."""
    folder = tmp_path_factory.mktemp("datatrove")
    config = tiny_config(tiny_model, corpus, folder / "out")
    run_engine(config, folder / "logs", selected=str(folder / "out" / "selected"))
    return config, folder / "logs"


def test_the_chain_equals_the_one_node_run(finished_run, datatrove_run):
    (reference, summary), (config, logs) = finished_run, datatrove_run
    assert_same_results(Path(config.output_dir), Path(reference.output_dir))
    totals = {key: sum(c[key] for c in summary["categories"].values()) for key in ("windows", "scored_ok", "kept")}
    assert task_stats(logs, "windows")["windows_cut"] == totals["windows"]
    score = task_stats(logs, "score")  # the tasks claimed the chunks: every chunk scored once, by one of them
    assert score["chunks_scored"] == len(chunk_plan(config.output_dir))
    assert score["windows_scored"] == totals["windows"]
    assert task_stats(logs, "select")["kept"] == totals["kept"]
    assert not (Path(config.output_dir) / ".lock").exists()  # the driver held the run lock, and released it


def test_the_selected_windows_are_the_filtered_export(datatrove_run):
    config, logs = datatrove_run
    out = Path(config.output_dir)
    rows = [json.loads(line) for path in sorted((out / "selected").glob("*.jsonl.gz"))
            for line in gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()]
    filtered = pa.concat_tables(pq.read_table(p) for p in sorted((out / "hub" / "data" / "filtered").glob("*.parquet")))
    assert {row["id"]: row["text"] for row in rows} == dict(zip(filtered.column(V.ID).to_pylist(),
                                                                filtered.column(V.TEXT).to_pylist()))
    selection = {row[V.ID]: row for row in pq.read_table(out / "selection.parquet").to_pylist()}
    for row in rows:
        assert {key: row["metadata"][key] for key in selection[row["id"]] if key != V.ID} \
            == {key: value for key, value in selection[row["id"]].items() if key != V.ID}
    select = task_stats(logs, "selected", step=1)
    assert select["forwarded"] == len(rows)
    assert select["dropped"] == select["dropped_not_selected"] == len(selection) - len(rows)


def test_select_agrees_with_the_selection_row_for_row(datatrove_run):
    config, _ = datatrove_run
    table = pq.read_table(Path(config.output_dir) / "selection.parquet").to_pylist()
    broken = {table[0][V.ID]: "oom", table[1][V.ID]: None}  # statuses no scorer wrote here: dropped for their status
    documents = []
    for row in table:
        metadata = {key: row[key] for key in (V.CATEGORY, V.DS, V.DU, V.STATUS)}
        if row[V.ID] in broken:
            metadata.update({V.STATUS: broken[row[V.ID]], V.DS: None, V.DU: None})
        documents.append(Document(text="", id=row[V.ID], metadata=metadata))
    step = pickle.loads(pickle.dumps(LongAttnSelect(config, batch_size=16)))
    for row, document in zip(table, documents):
        expected = True if row[V.SELECTED] else (False, "not_selected")
        if row[V.ID] in broken:
            expected = (False, broken[row[V.ID]] or V.NULL_STATUS)
        assert step.filter(document) == expected, row[V.ID]
    kept = [doc.id for doc in step.run(iter(documents))]
    assert kept == [row[V.ID] for row in table if row[V.SELECTED] and row[V.ID] not in broken]
    stats = {name: metric.total for name, metric in step.stats.stats.items()}
    assert stats["forwarded"] == len(kept)
    assert stats["dropped_oom"] == stats["dropped_null"] == 1
    assert stats["dropped_not_selected"] == len(table) - len(kept) - 2


class DyingScore(LongAttnScore):
    """`LongAttnScore` whose task 0 (the first to start) scores one chunk, then dies (in datatrove's worker process)."""

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from hf_longattn.run import score_step

        original, scored = score_step.score_one_chunk, []

        def score_one(*args, **kwargs):
            if scored:
                raise RuntimeError(f"task {rank} killed after its first chunk")
            scored.append(original(*args, **kwargs))
            return scored[-1]

        if rank == 0:
            score_step.score_one_chunk = score_one
        try:
            yield from super().run(data, rank, world_size)
        finally:
            score_step.score_one_chunk = original


def test_a_killed_score_task_is_finished_by_the_relaunch_and_nothing_is_scored_twice(finished_run, tiny_model, corpus,
                                                                                    tmp_path):
    config, logs = tiny_config(tiny_model, corpus, tmp_path / "out"), tmp_path / "logs"
    with pytest.raises(RuntimeError, match=r"task 0 killed after its first chunk"):  # datatrove re-raises it
        run_engine(config, logs, score_step_class=DyingScore)
    scores, chunks = Path(config.output_dir), len(chunk_plan(config.output_dir))
    markers = {path.name: path.stat().st_mtime_ns for path in (scores / "scores").glob("chunk-*.done")}
    assert 0 < len(markers) <= chunks  # the other tasks took the chunks task 0 did not get to
    assert not (scores / ".lock").exists()  # the driver released the run lock; claims of killed workers are stale

    summary = run_engine(config, logs)  # the same command again: a new launch, which finishes only what is missing

    assert all((scores / "scores" / name).stat().st_mtime_ns == mtime for name, mtime in markers.items())
    assert len(list((scores / "scores").glob("chunk-*.done"))) == chunks
    assert task_stats(logs, "score")["chunks_scored"] == chunks - len(markers)
    assert summary["categories"]
    assert_same_results(Path(config.output_dir), Path(finished_run[0].output_dir))


def test_the_datatrove_path_holds_the_run_lock(tiny_model, corpus, tmp_path):
    """A live launch holds the folder: the datatrove driver refuses in one line before any work (issue 17, case 8)."""
    from hf_longattn.run.lock import RunLock

    config = tiny_config(tiny_model, corpus, tmp_path / "out")
    with RunLock(config.output_dir, "another-launch"):
        with pytest.raises(LongAttnError, match=r"another run \(pid \d+ on .*\) is using"):
            run_engine(config, tmp_path / "logs")
        assert not (Path(config.output_dir) / "windows").exists() and not (tmp_path / "logs").exists()


def test_steps_store_their_arguments_and_pickle(tiny_model, corpus, tmp_path, monkeypatch):
    config = tiny_config(tiny_model, corpus, tmp_path / "out")
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    for given in (config, config.to_dict(), str(path)):
        step = pickle.loads(pickle.dumps(LongAttnScore(given, device="cpu")))
        assert step.config == config.to_dict() and step.device == "cpu"
    with pytest.raises(ValueError, match="the plan stage is one task"):
        list(longattn_pipelines(config)["plan"][0].run(None, 0, 2))
    assert isinstance(LongAttnWindows(config).config, dict)
    for name in [name for name in sys.modules if name == "datatrove" or name.startswith("datatrove.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "hf_longattn.datatrove")
    with pytest.raises(ImportError, match=r'pip install "hf-longattn\[datatrove\]"'):
        importlib.import_module("hf_longattn.datatrove")


def run_recipe(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RECIPE), *args], check=False, capture_output=True, text=True,
                          timeout=300,
                          env={**os.environ, **(env or {})})


def test_the_recipe_help():
    result = run_recipe("--help")
    assert result.returncode == 0, result.stderr
    for text in ("--executor", "--tasks", "--workers", "--partition", "--gpus-per-task", "--address", "--keep-fraction",
                 "--logging-dir", "--write-selected", "sbatch"):
        assert text in result.stdout, text


def test_the_recipe_runs_end_to_end_and_resumes(finished_run, tiny_model, corpus, tmp_path):
    config = tiny_config(tiny_model, corpus, tmp_path / "out")
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    command = ("--config", str(path), "--executor", "local", "--tasks", "2", "--workers", "2", "--no-progress")
    result = run_recipe(*command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LongAttn summary" in result.stdout and "wall time: windows" in result.stdout
    assert_same_results(Path(config.output_dir), Path(finished_run[0].output_dir))
    markers = {p: p.stat().st_mtime_ns for p in (Path(config.output_dir) / "scores").glob("chunk-*.done")}
    again = run_recipe(*command)  # everything current: only checks run, nothing is redone; the summary again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "LongAttn summary" in again.stdout and "[plan] reusing" in again.stdout
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in markers.items())
    assert_same_results(Path(config.output_dir), Path(finished_run[0].output_dir))


def test_the_recipe_submits_the_chain_to_slurm(tiny_model, corpus, tmp_path):
    config = tiny_config(tiny_model, corpus, tmp_path / "out")
    path, calls, bin_dir = tmp_path / "config.yaml", tmp_path / "sbatch-calls", tmp_path / "bin"
    path.write_text(config.to_yaml())
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(  # records each submission, answers like Slurm
        f'#!/bin/bash\nmkdir -p {calls}\nn=$(( $(ls {calls} | wc -l) + 100 ))\n'
        f'printf "%s\\n" "$@" > {calls}/$n.args\ncat "${{@: -1}}" >> {calls}/$n.args\necho "Submitted batch job $n"\n')
    (bin_dir / "sbatch").chmod(0o755)
    result = run_recipe("--config", str(path), "--executor", "slurm", "--tasks", "3", "--workers", "2",
                        "--partition", "gpu", env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Submitted." in result.stdout
    jobs = {}
    for submission in sorted(calls.iterdir()):
        text = submission.read_text()
        if "launch_pickled_pipeline" in text:  # not the merge_stats job that follows each stage
            jobs[text.split("--job-name=longattn-")[1].split()[0]] = (submission.stem, text)
    assert list(jobs) == ["windows", "plan", "score", "select", "export", "finish"]
    lock = json.loads((Path(config.output_dir) / ".lock").read_text())  # the job chain keeps the run lock
    assert all(lock["launch"] in text for _, text in jobs.values())  # the chain is this launch: its tasks fence on it
    previous = None
    for stage, (job_id, text) in jobs.items():
        assert ("--array=0-2%2" if stage not in SINGLE_TASK_STAGES else "--array=0-0") in text, stage
        assert "#SBATCH --requeue" in text
        assert ("#SBATCH --gpus=1" in text) == (stage == "score")
        assert previous is None or f"--dependency=afterok:{previous}" in text
        previous = job_id
    assert "#SBATCH --signal=USR1@300" in jobs["score"][1]

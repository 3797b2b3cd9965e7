"""Build a LongABC-style dataset with LongAttn as datatrove pipelines: locally, on Slurm or on Ray.

Local (one machine; N tasks per stage, at most M processes at a time; here the offline demo):

    python recipes/longabc_datatrove.py --config recipes/configs/demo.yaml --executor local --tasks 2 --workers 2

Slurm (run it on the login node; no sbatch script to write: datatrove's SlurmPipelineExecutor
submits one job array per stage, each waiting for the one before with --dependency=afterok):

    python recipes/longabc_datatrove.py --config recipes/configs/longabc32k.yaml --executor slurm \
        --tasks 64 --workers 16 --partition gpu --time 24:00:00 --gpus-per-task 1 \
        --cpus-per-task 8 --mem-per-cpu-gb 8 --env-command "source .venv/bin/activate"

    takes the run lock, then submits the stages the run graph needs (sbatch, each with its own
    merge_stats job; on a fresh folder all of them):
      longattn-windows   array 0-63%16, CPU                          (each task claims input shards)
      longattn-plan      1 task                                      (windows_stats.json, scores/plan.json)
      longattn-score     array 0-63%16, --gpus=1 each, --requeue,    (each task claims chunks)
                         --signal=USR1@300: near its time limit (or on SIGUSR1) a task requeues itself
      longattn-select    1 task                                      (selection.parquet, selector.json, selection.json)
      longattn-export    array 0-63%16                               (each task claims windows shards: hub parts)
      longattn-finish    1 task                                      (hub/: parts numbered, card, plots)
      [longattn-push     1 task, with --push-to-hub]
      [longattn-selected array 0-63%16, with --write-selected        (output_dir/selected/NNNNN.jsonl.gz)]
    and returns; the chain's tasks keep the run lock and its last stage releases it. The sbatch
    scripts and logs are in LOGGING_DIR/<launch>/<stage>/. Rerun the same command when the jobs are
    done (or after a failure): only what is not current is submitted again, and the summary table
    is printed once everything is complete.

Ray (a running cluster, or none: a local one is started):

    ray start --head   # on the head node; `ray start --address HEAD:6379` on the others
    python recipes/longabc_datatrove.py --config recipes/configs/longabc32k.yaml --executor ray \
        --address auto --tasks 64 --workers 16 --gpus-per-task 1 --cpus-per-task 8 --mem-per-cpu-gb 8

What to expect. The job runs through the one driver (`hf_longattn.run.driver`), as ``hf-longattn
run`` does, with datatrove's executors dispatching each stage's tasks. The run folder is that of
``hf-longattn run`` (same file names, same numbers: windows/, scores/chunk-*.parquet + .done,
selection.parquet, selector.json, summary.json, hub/), plus LOGGING_DIR (default
OUTPUT_DIR/datatrove_logs/<launch>/<stage>/: a folder per launch) with
datatrove's logs, per-task stats (stats/NNNNN.json: chunks_scored, windows, scored_ok, kept, ...)
and completion markers, and with --write-selected OUTPUT_DIR/selected/NNNNN.jsonl.gz (the selected
windows as datatrove Documents). At the end it prints the summary table (the demo's is the one in
the README, number for number) and the wall time of each stage. The demo (79 windows of 8192
tokens, SmolLM2 on CPU) took 2 min 2 s with --tasks 2 --workers 2 on an idle 2-core CPU
(2026-11-30: windows 12.5 s, plan 7.0 s, score 94.6 s, export 4.1 s; two scoring processes share
the 2 cores, so ``hf-longattn run``, one process, takes 70 s there).
Kill it at any moment and rerun the same command: the run graph starts at the first step that is
not current, and each task claims only units without a valid result (shards, chunks, parts).
Nodes must see OUTPUT_DIR at the same path (it is made absolute here).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    from hf_longattn.arguments import add_config_arguments, config_from_args, no_progress_bars
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_longattn.arguments import add_config_arguments, config_from_args, no_progress_bars

PRELOAD = ["__main__", "torch", "transformers", "datasets", "pyarrow.parquet", "hf_longattn.datatrove",
           "hf_longattn.scorer"]
"""Imported once by the forkserver that LocalPipelineExecutor's worker processes fork from (no CUDA, no thread yet)."""


def build_parser() -> argparse.ArgumentParser:
    """The recipe's options: those of ``hf-longattn run``, the executor, and the Slurm / Ray resources."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    engine = parser.add_argument_group("datatrove")
    engine.add_argument("--executor", choices=("local", "slurm", "ray"), default="local", help="datatrove executor")
    engine.add_argument("--tasks", type=int, default=4, help="tasks of the windows, score, export (and selected) stages")
    engine.add_argument("--workers", type=int, default=-1, help="tasks running at a time (-1: all)")
    engine.add_argument("--logging-dir", help="datatrove logs, stats and completions (default: OUTPUT_DIR/datatrove_logs)")
    engine.add_argument("--write-selected", action="store_true",
                        help="also write the selected windows as JSONL to OUTPUT_DIR/selected (datatrove Documents)")
    cluster = parser.add_argument_group("Slurm and Ray")
    cluster.add_argument("--gpus-per-task", type=int, default=1, help="GPUs of each score task (0: score on CPUs)")
    cluster.add_argument("--cpus-per-task", type=int, default=1, help="CPUs of every task")
    cluster.add_argument("--mem-per-cpu-gb", type=float, default=2, help="memory per CPU, in GB")
    cluster.add_argument("--partition", help="Slurm partition (required with --executor slurm)")
    cluster.add_argument("--time", default="24:00:00", help="Slurm time limit of each task")
    cluster.add_argument("--qos", default="normal", help="Slurm QOS")
    cluster.add_argument("--env-command", help="Slurm: command that activates the Python environment on the nodes")
    cluster.add_argument("--requeue-grace", type=int, default=300,
                         help="Slurm: seconds before the time limit at which a score task requeues itself")
    cluster.add_argument("--address", help="Ray cluster address (e.g. auto); default: start a local Ray")
    return parser


def logging_root(args: argparse.Namespace, config: Any) -> str:
    """Where datatrove's logs, stats and completion markers go: ``LOGGING_DIR`` (default ``OUTPUT_DIR/datatrove_logs``),
    then ``<launch>/<stage>`` (`hf_longattn.datatrove.DatatroveEngine`)."""
    return args.logging_dir or str(Path(config.output_dir) / "datatrove_logs")


def make_executor(args: argparse.Namespace, stage: str, pipeline: list, tasks: int, logging_dir: str, depends: Any) -> Any:
    """The datatrove executor of one stage (``tasks`` tasks, after ``depends``)."""
    workers = args.workers if tasks > 1 else 1
    gpus = args.gpus_per_task if stage in ("score", "probe") else 0
    if args.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir, depends=depends)
    if args.executor == "ray":
        from datatrove.executor import RayPipelineExecutor

        return RayPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir, depends=depends,
                                   cpus_per_task=args.cpus_per_task, mem_per_cpu_gb=args.mem_per_cpu_gb,
                                   gpus_per_task=gpus)
    from datatrove.executor import SlurmPipelineExecutor

    return SlurmPipelineExecutor(
        pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir, depends=depends, job_name=f"longattn-{stage}",
        partition=args.partition, time=args.time, qos=args.qos, cpus_per_task=args.cpus_per_task,
        mem_per_cpu_gb=args.mem_per_cpu_gb, gpus_per_task=gpus, env_command=args.env_command,
        requeue=True, requeue_signals=("SIGUSR1",),  # preempted or near the time limit: back in the queue
        sbatch_args={"signal": f"USR1@{args.requeue_grace}"} if stage == "score" else None,
    )


def engine_of(args: argparse.Namespace, config: Any) -> Any:
    """The datatrove engine the driver hands the stages to (local and Ray executors run them, Slurm submits them)."""
    from hf_longattn.datatrove import DatatroveEngine

    if args.executor == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=args.address)
    elif args.executor == "local":
        import multiprocess

        multiprocess.set_forkserver_preload(PRELOAD)  # each worker starts in ~0.1 s instead of importing torch
    selected = str(Path(config.output_dir) / "selected") if args.write_selected else None
    return DatatroveEngine(lambda *a: make_executor(args, *a), args.tasks, logging_root(args, config),
                           submit=args.executor == "slurm", selected_folder=selected)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, then run the job through the one driver with datatrove's executors; print the summary; the exit status."""
    from hf_longattn.cli import one_line
    from hf_longattn.counts import format_summary
    from hf_longattn.errors import LongAttnError
    from hf_longattn.run.driver import drive

    args = build_parser().parse_args(argv)
    if args.no_progress:  # here and in the workers, which read the environment
        no_progress_bars()
    if args.tasks < 1:
        raise SystemExit("--tasks must be at least 1")
    if args.executor == "slurm" and not args.partition:
        raise SystemExit("--executor slurm needs --partition")
    config = None
    try:
        config = config_from_args(args)
        config = config.replace(output_dir=str(Path(config.output_dir).resolve()))  # tasks may run elsewhere
        engine = engine_of(args, config)
        summary = drive(config, "run", engine=engine, progress=not args.no_progress)
    except (LongAttnError, ValueError, OSError, RuntimeError, ImportError) as error:
        if args.traceback:
            raise
        print(f"longabc_datatrove: error: {one_line(error, config.output_dir if config else None)}",
              file=sys.stderr, flush=True)
        return 2
    if engine.detached:
        print(f"Submitted. When the jobs are done, rerun the same command to print the summary "
              f"(logs: {logging_root(args, config)}).", flush=True)
        return 0
    if summary:
        print(format_summary(summary), flush=True)
    print(f"outputs in {config.output_dir}; datatrove logs and stats in {logging_root(args, config)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

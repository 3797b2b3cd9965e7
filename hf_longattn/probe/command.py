"""``hf-longattn probe``: the scorer self-check from the command line, with the pipeline's flags (old probe flags as aliases)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ALIASES = {"--data": "--input", "--layers": "--layer", "--num-windows": "--probe-num-windows",
           "--chunk-size": "--probe-chunk-size", "--output": "the report folder (default: output_dir/probe)"}
"""The probe's flags before hf_longattn 0.2 and what they are now (all still accepted)."""


def _layers(text: str) -> list[int] | str:
    """``"0,4,8"`` → ``[0, 4, 8]``; ``"all"`` stays ``"all"``."""
    if text.strip().lower() == "all":
        return "all"
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--layer expects ints separated by commas or 'all', got {text!r}") from error


def add_probe_parser(subparsers: Any, short: str = "check that the scoring model/layer separates real windows",
                     description: str | None = None) -> argparse.ArgumentParser:
    """Register ``probe`` on an ``argparse`` sub-parser set; it dispatches to :func:`run_probe_command` via ``args.func``."""
    from ..arguments import add_config_arguments

    parser = subparsers.add_parser("probe", help=short, description=description or short)
    add_config_arguments(parser, skip=("layer", "chunk_size"))
    group = parser.add_argument_group("probe")
    group.add_argument("--layer", "--layers", dest="probe_layers", type=_layers, default=None, metavar="LAYERS",
                       help="decoder layers to compare: ints separated by commas, or 'all' (config: probe_layers)")
    group.add_argument("--probe-num-windows", "--num-windows", dest="probe_num_windows", type=int, default=None,
                       metavar="N", help="real windows (and as many controls) per category (config: probe_num_windows)")
    group.add_argument("--probe-chunk-size", "--chunk-size", dest="probe_chunk_size", type=int, default=None,
                       metavar="TOKENS", help="tokens per chunk of a control, at most W/2 (config: probe_chunk_size)")
    group.add_argument("--by", default="category", help="group column ('none' for one group; default: category)")
    group.add_argument("--text-column", default="text", help="text column of the documents (default: text)")
    group.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: a GPU if any)")
    group.add_argument("--output", default=None, metavar="FOLDER",
                       help="folder for report.json, report.md and probe.png (default: output_dir/probe)")
    parser.set_defaults(func=run_probe_command)
    return parser


def run_probe_command(args: argparse.Namespace, config: Any = None) -> int:
    """Run ``hf-longattn probe``: print counts and the table, write report.json / report.md / probe.png, print the verdict.

    Into the run folder (no ``--output``), the probe holds the run lock and, when it probed what the
    run's probe step would (groups by category, the ``text`` column), records its key there too, so
    that ``run`` with ``probe: true`` reuses it and ``export`` puts it into the card.
    """
    import contextlib

    from ..arguments import config_from_args
    from ..model_checks import check_model, check_window_fits
    from ..run.context import Run

    config = config if config is not None else config_from_args(args)
    check_probed_scorer(config)
    check_window_fits(config, check_model(config.model, config.revision))
    run = Run(config, progress=False)
    with contextlib.nullcontext() if args.output else run.locked():
        report = _probe(args, config)
        output = Path(args.output) if args.output else run.folder.probe
        written = _write(report, output, run.fence if not args.output else None)
        if not args.output and str(args.by).lower() == "category" and args.text_column == "text":
            from ..run.graph import probe_key
            from ..run.records import ProbeRecord
            from ..storage import sha256_file

            ProbeRecord(key=probe_key(run), report_sha256=sha256_file(run.folder.probe_report)).write(
                run.folder.probe_record, before_commit=run.fence)
    print(f"\nwrote {', '.join(map(str, written))}\n")
    print(report.verdict)
    print(f"\nFor the run's layer {config.layer}: {report.scorer_check(config.layer)['sentence']}")
    hub = Path(config.output_dir) / "hub"
    if args.output is None and (hub / "README.md").is_file():
        print(f"The dataset card in {hub} was written before this probe: run `hf-longattn export` with the same "
              "flags to put the probe into it (the scores and the selection are reused).")
    return 0


def check_probed_scorer(config: Any) -> None:
    """The probe compares LongAttn's layers; for a run scored by another scorer it points at `hf-longattn compare`."""
    from ..errors import LongAttnError
    from ..registry import SCORERS

    name = SCORERS.resolve(config.scorer)
    if name != "longattn_v1":
        raise LongAttnError(f"the probe compares the layers of LongAttn (longattn_v1), not {name}: run `hf-longattn compare "
                            f"--scorers {name} longattn_v1` for {name}'s AUC of real windows against the same controls")


def _probe(args: argparse.Namespace, config: Any) -> Any:
    """The probe of ``config`` with the command's own options; prints the counts and the table."""
    from ..shards import read_sources
    from ..sources import SourceConfig
    from .core import probe_run_config

    sources = config.sources
    if args.text_column != "text":
        sources = [SourceConfig.from_dict({**s.to_dict(), "text_column": args.text_column}) for s in sources]
    by = None if str(args.by).lower() == "none" else args.by
    report = probe_run_config(config, read_sources(sources), by=by, device=args.device)
    for group, counts in report.counts.items():
        fewer = (f" (fewer than the {counts['requested']} asked: the group's text allows no more)"
                 if counts.get("requested", 0) > counts["real"] else "")
        print(f"{group}: {counts['documents']} documents ({counts['window_documents']} of ≥ {config.window_size} tokens), "
              f"{counts['candidate_windows']} candidate windows, {counts['real']} real + {counts['control']} "
              f"control windows{fewer}, {counts['not_scored']} not scored")
    timings = report.timings
    print(f"scored {timings['windows_scored']} windows ({timings['tokens_scored']} tokens) × {len(report.layers)} layers "
          f"in {timings['score_s']:.1f} s (total {timings['total_s']:.1f} s)\n")
    print(report.to_markdown())
    return report


def _write(report: Any, output: Path, fence: Any) -> list[Path]:
    """``report.md``, ``report.json`` and ``probe.png`` (when matplotlib is there) in ``output``; the files written."""
    from ..storage import atomic_write_text

    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "report.md", report.to_markdown() + "\n\n" + report.to_markdown("wide") + "\n\n"
                      + report.verdict + "\n", before_commit=fence)
    report.to_json(output / "report.json")
    written = [output / "report.json", output / "report.md"]
    try:
        written.append(report.plot(output / "probe.png"))
    except ImportError as error:
        print(f"\n(no plot: {error})")
    return written

"""Benchmark: does the pipeline keep the scorer busy? End-to-end demo tokens/s vs the scorer's own.

Run (by hand, not in CI; ~3 min on a 2-core CPU):

    python benchmarks/bench_pipeline.py

In one process it
  1. runs the embedded offline demo (`hf-longattn run`: SmolLM2, W = 8192) into a fresh folder,
     timing every step, the model load included;
  2. scores the very same windows again with the scorer alone, with the model already loaded and
     the demo's batch size: the scorer's own tokens/s;
and reports tokens/s of the whole run, of its score step, and of the scorer alone, with the
ratios (the goal: whole run >= 80 % of the scorer alone). The table is added to RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_longattn import LongAttnPipeline, RunConfig  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS.md")))
    parser.add_argument("--model", default=None, help="score with this model instead of the demo's SmolLM2 GGUF")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        overrides = {"model": args.model} if args.model else {}
        config = RunConfig.demo(output_dir=str(Path(folder) / "demo"), **overrides)
        pipeline = LongAttnPipeline(config, progress=False)
        start = time.perf_counter()
        pipeline.run()
        whole_run = time.perf_counter() - start
        timings = dict(pipeline.timings)

        import json

        from hf_longattn.run.score_step import load_kept_windows

        markers = [json.loads(path.read_text()) for path in sorted(pipeline.scores_dir.glob("*.done"))]

        windows = load_kept_windows(pipeline.run_state, ["id", "input_ids"])
        tokens = sum(len(ids) for ids in windows.column("input_ids").to_pylist())
        scorer = pipeline.scorer  # loaded by the run: the model load is not timed again
        start = time.perf_counter()
        for low in range(0, windows.num_rows, config.batch_size):
            scorer(windows.slice(low, config.batch_size).to_pydict())
        scorer_alone = time.perf_counter() - start

    # Chunks after the first: the steady state, once the model is loaded (same windows, scorer alone).
    later = [m for m in markers if m["chunk"] > 0]
    later_windows = sum(m["rows"] for m in later)
    later_share = later_windows / windows.num_rows
    rows = [
        ("whole run (windows + model load + score + select + export)", whole_run, tokens),
        ("score step (model load + chunks written)", timings["score"], tokens),
        ("score step without its first chunk (steady state: scoring + chunk files)",
         sum(m["seconds"] for m in later), tokens * later_share),
        ("first chunk (model and config load, first forwards)", markers[0]["seconds"], tokens * markers[0]["rows"] / windows.num_rows),
        ("scorer alone (model loaded, same windows and batch size)", scorer_alone, tokens),
    ]
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, " \
              f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## {stamp} — pipeline: the embedded demo, model {config.model}, {machine}",
        "",
        f"torch {torch.__version__}; {windows.num_rows} windows of {config.window_size} tokens = {tokens:,} tokens; "
        f"step timings {timings}.",
        "",
        "| what | seconds | tokens/s | share of the scorer's own tokens/s |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {seconds:.1f} | {count / seconds:,.0f} | {100 * (count / seconds) / (tokens / scorer_alone):.0f} % |"
              for name, seconds, count in rows]
    print("\n".join(lines))
    output = Path(args.output)
    previous = output.read_text()
    head, _, rest = previous.partition("\n## ")
    output.write_text(head.rstrip() + "\n\n" + "\n".join(lines) + "\n" + ("\n## " + rest if rest else ""))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()

"""Benchmark: does the windows step scale? Tokens/s per core and peak RSS at 1×, 10×, 30× corpus size; 1 vs 2 tasks; relaunch balance.

Run (by hand, not in CI; about 10 min for 1× and 10× on a 2-core CPU, 30 min more with --sizes 1,10,30):

    python benchmarks/bench_scale.py                      # --sizes 1,10 --base-mb 79 --model smollm2 --window-size 8192
    python benchmarks/bench_scale.py --sizes 1,10,30      # the issue's 30× point (2.4 GB of text)

It generates a corpus of long documents (Python's own standard library, concatenated into
documents of 100–400 KB, one jsonl file per 8 MB) of ``--base-mb`` MB times each size, then
runs the windows stage (`hf_longattn.run.stages.windows_stage`: read, tokenise, window, write
token-id shards) in a fresh process per measurement, one core per task, sampling its RSS every 0.1 s. It also runs
the 1× corpus as 2 tasks at once, and simulates the relaunch after a node of 8 (of 64 processes)
dies after 10 % of its chunks: the old static contiguous ownership vs the claims of
`hf_longattn.run.lock` (GPU efficiency = remaining chunks / (processes × the most chunks one
process still has)). Results are printed and added to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FILE_MB = 8
CHILD = """
import json, sys, time
from hf_longattn.run import stages
config, rank, world = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
start = time.perf_counter()
stages.windows_stage(config, rank, world)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def stdlib_text() -> str:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.rglob("*.py"))[:3000])


def write_corpus(folder: Path, megabytes: float) -> int:
    """Jsonl files of long documents, ``megabytes`` of text in all; returns the number of documents."""
    import random

    text = stdlib_text()
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    target, written, documents, file_index = megabytes * 2**20, 0, 0, 0
    handle = None
    while written < target:
        if handle is None or handle.tell() > FILE_MB * 2**20:
            if handle:
                handle.close()
            handle = open(folder / f"part-{file_index:05d}.jsonl", "w", encoding="utf-8")
            file_index += 1
        size = rng.randint(100_000, 400_000)
        start = rng.randint(0, len(text) - size)
        handle.write(json.dumps({"id": f"doc{documents}", "category": "code", "text": text[start:start + size]}) + "\n")
        written += size
        documents += 1
    handle.close()
    return documents


def measure(config: dict, world: int) -> dict:
    """Run the windows stage as ``world`` processes at once; wall time and each one's peak RSS (sampled)."""
    import psutil

    import os

    # One core per task: the fast tokenizer would otherwise spread one batch over every core.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(config), str(rank), str(world)],
                                  stdout=subprocess.PIPE, text=True, env=env) for rank in range(world)]
    start, peaks = time.perf_counter(), [0] * world
    while any(p.poll() is None for p in processes):
        for i, process in enumerate(processes):
            try:
                peaks[i] = max(peaks[i], psutil.Process(process.pid).memory_info().rss)
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.1)
    wall = time.perf_counter() - start
    if any(p.returncode for p in processes):
        raise RuntimeError("a windows task failed")
    stats = json.loads((Path(config["output_dir"]) / "windows" / "windows_stats.json").read_text()) \
        if (Path(config["output_dir"]) / "windows" / "windows_stats.json").is_file() else None
    return {"wall": wall, "peak_gib": max(peaks) / 2**30, "stats": stats}


def tokens_of(output_dir: Path) -> tuple[int, float]:
    """Tokens windowed, and the seconds spent windowing them (the shards' own timings: no start-up, no model load)."""
    records = [json.loads(p.read_text()) for p in (output_dir / "windows").glob("shard-*.json")]
    return sum(c["tokens_documents"] for r in records for c in r["categories"].values()), sum(r["seconds"] for r in records)


def relaunch_efficiency(chunks: int = 4297, processes: int = 64, node: int = 8) -> tuple[float, float]:
    """GPU efficiency of the relaunch after the last node dies after 10 % of its chunks: static vs claims."""
    from hf_longattn.run.chunks import owned_chunks
    from hf_longattn.run.lock import claimed, release_claim

    owned = [list(owned_chunks(chunks, processes, rank)) for rank in range(processes)]
    left_per_rank = [mine[len(mine) // 10:] if rank >= processes - node else [] for rank, mine in enumerate(owned)]
    left = [j for mine in left_per_rank for j in mine]
    static = len(left) / (processes * max(len(mine) for mine in left_per_rank))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        walkers = {rank: claimed(left, lambda j: root / f"{j}.claim", "relaunch", rank, processes,
                                 lambda j: (root / f"{j}.done").exists()) for rank in range(processes)}
        taken = dict.fromkeys(range(processes), 0)
        while walkers:  # every process claims its next chunk in turn, as they would run side by side
            for rank in list(walkers):
                unit = next(walkers[rank], None)
                if unit is None:
                    del walkers[rank]
                    continue
                taken[rank] += 1
                (root / f"{unit}.done").touch()
                release_claim(root / f"{unit}.claim")
    return static, len(left) / (processes * max(taken.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,10", help="corpus sizes, multiples of --base-mb")
    parser.add_argument("--base-mb", type=float, default=79.0)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--window-size", type=int, default=8192)
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as base:
        for size in [float(s) for s in args.sizes.split(",")]:
            corpus = Path(base) / f"corpus-{size:g}x"
            documents = write_corpus(corpus, size * args.base_mb)
            config = {"model": args.model, "sources": [{"path": str(corpus)}], "window_size": args.window_size,
                      "output_dir": str(Path(base) / f"out-{size:g}x")}
            result = measure(config, 1)
            tokens, seconds = tokens_of(Path(config["output_dir"]))
            rows.append((f"{size:g}× ({size * args.base_mb:,.0f} MB, {documents:,} documents)", 1, result["wall"],
                         seconds, tokens, result["peak_gib"]))
            print(rows[-1], flush=True)
            if size == 1:
                two = measure({**config, "output_dir": str(Path(base) / "out-1x-2tasks")}, 2)
                rows.append(("1× as 2 tasks at once", 2, two["wall"], tokens_of(Path(base) / "out-1x-2tasks")[1],
                             tokens, two["peak_gib"]))
                print(rows[-1], flush=True)
            import shutil

            shutil.rmtree(corpus)
    static, dynamic = relaunch_efficiency()
    report(args, rows, static, dynamic)


def report(args: argparse.Namespace, rows: list, static: float, dynamic: float) -> None:
    import psutil
    import torch

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, " \
              f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, torch {torch.__version__}"
    lines = [f"## {stamp} — scale: the windows step ({args.model} tokenizer, W = {args.window_size}), {machine}", "",
             "Wall: the whole stage per launch, process start and tokenizer load included. Windowing: the seconds the "
             "tasks spent reading, tokenising, windowing and writing (summed over tasks), so tokens/s per core = "
             "tokens / windowing seconds.", "",
             "| corpus | tasks | wall s | windowing s (all tasks) | tokens | tokens/s per core | tokens/s of the launch "
             "(wall) | peak RSS per task (GiB) |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {tasks} | {wall:.1f} | {busy:.1f} | {tokens:,} | {tokens / busy:,.0f} | {tokens / wall:,.0f} | "
              f"{peak:.2f} |" for name, tasks, wall, busy, tokens, peak in rows]
    lines += ["", f"Relaunch after a node of 8 (of 64 processes) dies after 10 % of its chunks, 4,297 chunks: GPU "
                  f"efficiency {static:.1%} with static contiguous ownership (before), {dynamic:.1%} with claims (now)."]
    print("\n".join(lines))
    output = Path(args.output)
    head, _, rest = output.read_text().partition("\n## ")
    output.write_text(head.rstrip() + "\n\n" + "\n".join(lines) + "\n" + ("\n## " + rest if rest else ""))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()

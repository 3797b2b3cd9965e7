"""Benchmark: pushing a 1 GB export to the local Hub (tests/hub_server.py): MiB/s and peak RSS, a re-push, a resumed push.

Run (by hand, not in CI; about 5 min on a 2-core CPU, 3 GB of free disk)::

    python benchmarks/bench_push.py                 # --gigabytes 1 --part-mb 128
    python benchmarks/bench_push.py --gigabytes 0.2 # a quick look

It writes an export folder the shape of a LongABC-32K one (``data/scored`` and ``data/filtered``
parquet parts of 32,768-token windows: random token ids and text, ~``--part-mb`` MB per scored part
and 1/8 of it per filtered part, a card, a plot), starts the local Hub in its own process, and pushes the folder with
`hf_longattn.publication.push_to_hub` in a fresh process (``HF_ENDPOINT`` set, LFS transfer:
``HF_HUB_DISABLE_XET=1``), sampling the RSS of the push and of the server every 0.1 s. Then it
pushes the same folder again (nothing to send), and finally pushes a new export, killing the
push (SIGKILL) once half of its bytes have reached the server (stored or still arriving) and
running it again: the bytes sent the second time against what was missing (a file cut by the kill
is sent again whole). Results are printed and added to benchmarks/RESULTS.md.
Both ends run on the same machine, so the rate is that of the client and the server together.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKEN = "hf_benchmarkTOKENforTHElocalHUB000000000"
WINDOW = 32768
PUSH = """
import json, sys, time
from hf_longattn.publication import push_to_hub
start = time.perf_counter()
push_to_hub(sys.argv[1], sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - start}))
"""
CARD = """---
license: other
configs:
- config_name: filtered
  default: true
  data_files:
  - split: code
    path: data/filtered/code-*-{tag}.parquet
- config_name: scored
  data_files:
  - split: code
    path: data/scored/code-*-{tag}.parquet
---
# A LongABC-32K-shaped export for the push benchmark
"""


def write_export(folder: Path, gigabytes: float, part_mb: int, tag: str, seed: int) -> int:
    """Parquet parts of random 32K-token windows (ids and text), all in ``scored``, 1/8 also in ``filtered``; total bytes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows = max(1, part_mb * 2**20 // (WINDOW * 8))  # int32 ids + as many bytes of text per window
    written, index = 0, 0
    while written < gigabytes * 2**30:
        ids = rng.integers(0, 128256, size=(rows, WINDOW), dtype=np.int32)
        text = [bytes(rng.integers(32, 127, size=WINDOW * 4, dtype=np.uint8)).decode() for _ in range(rows)]
        table = pa.table({"id": [f"w{index}-{i}" for i in range(rows)], "input_ids": list(ids), "text": text,
                          "longattn_lds": rng.normal(size=rows), "longattn_selected": rng.random(rows) < 0.125})
        for config, part in (("scored", table), ("filtered", table.filter(table.column("longattn_selected")))):
            path = folder / "data" / config / f"code-{index:05d}-{tag}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(part, path, compression="none")
            written += path.stat().st_size
        index += 1
    (folder / "plots").mkdir(exist_ok=True)
    (folder / "plots" / "score_distributions.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200_000))
    (folder / "README.md").write_text(CARD.format(tag=tag))
    return written + 200_008  # the bytes that go to LFS (the card is a regular file, sent inside the commit)


def rss_mb(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return 0.0


def push(folder: Path, repo: str, env: dict, server: subprocess.Popen, kill_at: float | None = None,
         received=None) -> dict:
    """Push in a fresh process, sampling RSS; with ``kill_at``, SIGKILL it once that many bytes have arrived."""
    child = subprocess.Popen([sys.executable, "-c", PUSH, str(folder), repo], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    peak, server_peak, start, killed = 0.0, 0.0, time.perf_counter(), False
    while child.poll() is None:
        peak, server_peak = max(peak, rss_mb(child.pid)), max(server_peak, rss_mb(server.pid))
        if kill_at is not None and received() >= kill_at:
            child.kill()
            killed = True
        time.sleep(0.1)
    out, err = child.communicate()
    if child.returncode != 0 and not killed:
        raise SystemExit(f"push failed: {err[-2000:]}")
    return {"seconds": time.perf_counter() - start, "push_peak_rss_mb": peak, "server_peak_rss_mb": server_peak,
            "killed": killed}


def lfs_bytes(root: Path, repo: str) -> int:
    folder = root / "datasets" / repo / "lfs"
    return sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else 0


def incoming_bytes(root: Path, repo: str) -> int:
    folder = root / "datasets" / repo / "incoming"
    return lfs_bytes(root, repo) + (sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--part-mb", type=int, default=128)
    parser.add_argument("--port", type=int, default=18911)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-push-") as tmp:
        tmp = Path(tmp)
        size = write_export(tmp / "export", args.gigabytes, args.part_mb, "0123456789ab", seed=0)
        files = sum(1 for p in (tmp / "export").rglob("*") if p.is_file())
        server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hub_server.py"), "--port", str(args.port),
                                   "--root", str(tmp / "hub")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        server.stdout.readline()
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{args.port}", "HF_HUB_DISABLE_XET": "1",
               "HF_TOKEN": TOKEN, "HF_HOME": str(tmp / "hf-home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "PYTHONPATH": str(ROOT)}
        try:
            first = push(tmp / "export", "me/bench", env, server)
            again = push(tmp / "export", "me/bench", env, server)
            size2 = write_export(tmp / "export2", args.gigabytes, args.part_mb, "ba9876543210", seed=1)
            before = lfs_bytes(tmp / "hub", "me/bench")
            killed = push(tmp / "export2", "me/bench", env, server, kill_at=before + size2 / 2,
                          received=lambda: incoming_bytes(tmp / "hub", "me/bench"))
            time.sleep(1)  # the server drops the uploads cut by the kill
            arrived = lfs_bytes(tmp / "hub", "me/bench") - before
            resumed = push(tmp / "export2", "me/bench", env, server)
            resent = lfs_bytes(tmp / "hub", "me/bench") - before - arrived
        finally:
            server.terminate()
            server.wait()
    result = {"bytes": size, "files": files, "first": first, "again": again, "killed": killed,
              "arrived_before_kill": arrived, "sent_after_kill": resent, "missing_after_kill": size2 - arrived,
              "resumed": resumed,
              "mb_per_s": size / 2**20 / first["seconds"]}
    print(json.dumps(result, indent=1))
    record(result, args)


def record(result: dict, args: argparse.Namespace) -> None:
    """Insert the measurements, newest first, into benchmarks/RESULTS.md."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "") if Path("/proc/cpuinfo").is_file() else ""
    first, again, resumed = result["first"], result["again"], result["resumed"]
    lines = [f"## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC — push: a "
             f"{result['bytes'] / 2**30:.2f} GiB export to the local Hub (`benchmarks/bench_push.py --gigabytes "
             f"{args.gigabytes}`), {platform.machine()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}",
             "", f"Client and server on this machine, which other jobs share (load average {os.getloadavg()[0]:.1f} at "
             "the end); LFS transfer (`HF_HUB_DISABLE_XET=1`); RSS sampled every 0.1 s.", "",
             "| push | bytes | seconds | MiB/s | peak RSS of the push | peak RSS of the server |", "|---|---|---|---|---|---|",
             f"| first, {result['files']} files | {result['bytes'] / 2**20:,.0f} MiB | {first['seconds']:.1f} | "
             f"{result['mb_per_s']:.0f} | {first['push_peak_rss_mb']:.0f} MiB | {first['server_peak_rss_mb']:.0f} MiB |",
             f"| the same folder again | 0 sent | {again['seconds']:.1f} | — | {again['push_peak_rss_mb']:.0f} MiB | — |",
             f"| a new export, killed (SIGKILL) once half its bytes reached the server, then again | "
             f"{result['arrived_before_kill'] / 2**20:,.0f} MiB stored before the kill; after it "
             f"{result['sent_after_kill'] / 2**20:,.0f} MiB sent, {result['missing_after_kill'] / 2**20:,.0f} MiB were "
             f"missing | {resumed['seconds']:.1f} (after) | — | {resumed['push_peak_rss_mb']:.0f} MiB | "
             f"{resumed['server_peak_rss_mb']:.0f} MiB |"]
    output = ROOT / "benchmarks" / "RESULTS.md"
    head, _, rest = output.read_text().partition("\n## ")
    output.write_text(head.rstrip() + "\n\n" + "\n".join(lines) + "\n" + ("\n## " + rest if rest else ""))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()

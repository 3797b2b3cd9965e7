"""Tests of hf_longattn.run.lock: the run lock (stale or held), claims that spread a relaunch over every process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_longattn.errors import LongAttnError
from hf_longattn.run.lock import RunLock, claim, claimed, release_claim

ROOT = Path(__file__).resolve().parents[1]


def test_a_held_lock_refuses_a_second_launch_naming_the_holder(tmp_path):
    with RunLock(tmp_path, "first"):
        with pytest.raises(LongAttnError, match=rf"another run \(pid {os.getpid()} on {socket.gethostname()}, started .*\) "
                                                rf"is using {tmp_path}.*delete {tmp_path / '.lock'}"):
            RunLock(tmp_path, "second").acquire()
    assert not (tmp_path / ".lock").exists()
    with RunLock(tmp_path, "second"):  # released: free again
        pass


def test_stale_locks_are_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "launch": "x"}))
    with RunLock(tmp_path, "mine") as held:  # its process is gone
        assert json.loads(held.path.read_text())["launch"] == "mine"
    lock.write_text(json.dumps({"pid": 1, "host": "another-node", "launch": "y"}))
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with RunLock(tmp_path, "mine", stale_after=600):  # no heartbeat for an hour on another host
        pass
    lock.write_text(json.dumps({"pid": 1, "host": "another-node", "launch": "y"}))
    with pytest.raises(LongAttnError, match="another run \\(pid 1 on another-node"):
        RunLock(tmp_path, "mine", stale_after=600).acquire()  # fresh heartbeat: respected


def test_two_launches_into_one_folder_the_second_is_refused(tiny_model, corpus, tmp_path):
    from .helpers import tiny_config

    config = tiny_config(tiny_model, corpus, tmp_path / "out")
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    slow = ("import sys, time; from hf_longattn import scorer; original = scorer.LongAttnScorer.__call__\n"
            "scorer.LongAttnScorer.__call__ = lambda self, b, *e: (time.sleep(0.3), original(self, b, *e))[1]\n"
            "from hf_longattn.cli import main; sys.exit(main(sys.argv[1:]))")
    first = subprocess.Popen([sys.executable, "-c", slow, "run", "--config", str(path), "--no-progress"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "out" / ".lock").exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "hf_longattn.cli", "score", "--config", str(path), "--no-progress"],
                                env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"another run (pid {first.pid} on {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output[-3000:]


def test_claims_belong_to_one_process_of_a_launch_and_go_stale_with_it(tmp_path):
    path = tmp_path / "chunk-000001.claim"
    assert claim(path, "launch-a", 0) and not claim(path, "launch-a", 1)
    assert claim(path, "launch-b", 3)  # launch-a is over (the run lock says only one launch writes at a time)
    assert json.loads(path.read_text())["launch"] == "launch-b"
    release_claim(path)
    assert not path.exists()


def spread(units: list[int], folder: Path, launch: str, world: int, stop_rank: int | None = None,
           stop_after: int = 0) -> dict[int, list[int]]:
    """Run ``world`` claiming processes in lock step (one claim each per round); ``stop_rank`` dies after ``stop_after``."""
    walkers = {rank: claimed(units, lambda u: folder / f"{u}.claim", launch, rank, world,
                             lambda u: (folder / f"{u}.done").exists()) for rank in range(world)}
    taken: dict[int, list[int]] = {rank: [] for rank in range(world)}
    while walkers:
        for rank in list(walkers):
            if rank == stop_rank and len(taken[rank]) >= stop_after:
                del walkers[rank]  # killed: its current claim stays behind, unfinished
                continue
            unit = next(walkers[rank], None)
            if unit is None:
                del walkers[rank]
                continue
            taken[rank].append(unit)
            if rank != stop_rank or len(taken[rank]) < stop_after:
                (folder / f"{unit}.done").touch()
                release_claim(folder / f"{unit}.claim")
    return taken


def test_a_relaunch_after_a_lost_process_spreads_the_rest_over_every_process(tmp_path):
    units = list(range(400))
    first = spread(units, tmp_path, "launch-1", world=8, stop_rank=7, stop_after=5)
    assert sorted(u for rank in first.values() for u in rank) == units  # the others took over rank 7's share
    left = [u for u in units if not (tmp_path / f"{u}.done").exists()]
    assert left == [first[7][-1]]  # only the chunk it was scoring is lost

    # A whole launch dies part-way (its claims stay behind); the relaunch spreads what is left evenly.
    big = tmp_path / "big"
    big.mkdir()
    units = list(range(800))
    for unit in units[:80]:
        (big / f"{unit}.done").touch()
    for unit in units[80:88]:
        claim(big / f"{unit}.claim", "dead-launch", unit % 8)
    left = units[80:]
    second = spread(left, big, "launch-2", world=8)
    counts = [len(v) for v in second.values()]
    assert sorted(u for v in second.values() for u in v) == left  # stale claims taken over, nothing twice
    assert max(counts) - min(counts) <= 1 and len(left) / (max(counts) * 8) >= 0.9

"""Tests of hf_longattn.run.lock: the run lock (stale or held), claims that spread a relaunch over every process.

The races between processes are in ``test_run_lock_races.py``, the claims stress test in
``test_run_lock_stress.py``.
"""

from __future__ import annotations

import doctest
import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_longattn.errors import LongAttnError
from hf_longattn.run import lock as lock_module
from hf_longattn.run.lock import (TORN_AFTER, LostClaim, LostLock, RunLock, claim, claimed, fence,
                                  release_claim)
from hf_longattn.storage import atomic_write_json, atomic_write_text

from .test_run_lock_races import dead_pid, wait_for

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
    assert claim(path, "launch-a", 0) and claim(path, "launch-a", 1) is None
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
            unit, held = next(walkers[rank], (None, None))
            if held is None:
                del walkers[rank]
                continue
            taken[rank].append(unit)
            if rank != stop_rank or len(taken[rank]) < stop_after:
                held.check()  # fencing, as a step commits its result
                (folder / f"{unit}.done").touch()
                assert held.release()
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


def test_the_module_examples_run():
    assert doctest.testmod(lock_module).failed == 0


def test_a_claim_taken_over_fences_its_old_owner(tmp_path):
    path, result = tmp_path / "chunk-000001.claim", tmp_path / "chunk-000001.parquet"
    old = claim(path, "launch-a", 0)
    new = claim(path, "launch-b", 0)  # launch-a was paused past the stale time; launch-b took its unit over
    assert old is not None and new is not None and old.token != new.token
    with pytest.raises(LostClaim, match=rf"^{path}: this process \(launch launch-a\) lost the claim of this unit "
                                        rf"\(now held by pid {os.getpid()} on {socket.gethostname()}, started .*\).*relaunch$"):
        old.check()
    with pytest.raises(LostClaim):
        atomic_write_text(result, "old owner's result", before_commit=old.check)
    ticket = f".{path.name}.takeover-{old.token}"  # won by launch-b to take the stale claim over, kept while it holds it
    assert not result.exists() and sorted(p.name for p in tmp_path.iterdir()) == [ticket, path.name]  # no temporary
    assert not old.release() and json.loads(path.read_text())["token"] == new.token  # the new owner's claim stays
    atomic_write_text(result, "new owner's result", before_commit=new.check)
    assert new.release() and result.read_text() == "new owner's result"
    assert sorted(p.name for p in tmp_path.iterdir()) == [result.name]
    assert not new.release()  # already gone
    claim(path, "launch-c", 0)
    release_claim(path)  # the old, unconditional release
    assert not path.exists()


def test_a_lock_taken_over_is_lost_at_the_next_heartbeat_and_check(tmp_path):
    held = RunLock(tmp_path, "launch-a", heartbeat=0.02).acquire()
    held.check()
    fence(tmp_path, "launch-a")
    with pytest.raises(LostLock, match=r"this launch \(launch-b\) lost the run lock of .* to another launch \(pid "):
        fence(tmp_path, "launch-b")
    held.path.unlink()  # as if taken over while launch-a was paused
    other = RunLock(tmp_path, "launch-b").acquire()
    assert wait_for(lambda: held.lost, timeout=5)  # the heartbeat noticed, and stopped beating
    with pytest.raises(LostLock, match=rf"^this launch \(launch-a\) lost the run lock of {tmp_path} to another launch "
                                       rf"\(pid {os.getpid()} on {socket.gethostname()}, started .*\) while it was paused "
                                       "or cut off; it stopped before writing anything more. Let the other launch "
                                       "finish, or stop it and relaunch$"):
        held.check()
    with pytest.raises(LostLock):
        fence(tmp_path, "launch-a")
    mtime = other.path.stat().st_mtime
    held.release()  # removes nothing of launch-b's
    assert json.loads(other.path.read_text())["token"] == other.token and other.path.stat().st_mtime == mtime
    other.check()
    other.release()
    assert not other.path.exists()
    with pytest.raises(LostLock, match=r"to nobody \(its lock file was removed\)"):
        other.check()


def test_unreadable_files_are_left_alone_while_young_and_taken_over_when_old(tmp_path):
    path, lock_path = tmp_path / "unit.claim", tmp_path / ".lock"
    path.write_text('{"launch": "la')  # half-written (only the O_EXCL fallback can show one) or corrupt
    lock_path.write_text("")
    assert claim(path, "launch-b", 0) is None
    with pytest.raises(LongAttnError, match=r"another run \(pid \? on \?, started \?\) is using"):
        RunLock(tmp_path, "launch-b").acquire()
    old = time.time() - TORN_AFTER - 1
    os.utime(path, (old, old))
    os.utime(lock_path, (old, old))
    assert claim(path, "launch-b", 0) is not None
    with RunLock(tmp_path, "launch-b") as held:
        assert json.loads(lock_path.read_text())["token"] == held.token


def test_without_hard_links_files_are_created_exclusively(tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "unit.claim"
    held = claim(path, "launch-a", 0)
    assert held is not None and claim(path, "launch-a", 1) is None
    taken = claim(path, "launch-b", 0)  # a takeover
    assert taken is not None and json.loads(path.read_text())["token"] == taken.token
    assert not held.release() and taken.release() and not path.exists()
    with RunLock(tmp_path, "launch-a") as lock:
        with pytest.raises(LongAttnError, match="another run"):
            RunLock(tmp_path, "launch-b").acquire()
        lock.check()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failed_fencing_check_commits_nothing(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("before")

    def lost() -> None:
        raise LostLock("lost")

    with pytest.raises(LostLock):
        atomic_write_text(target, "after", before_commit=lost)
    with pytest.raises(LostLock):
        atomic_write_json(target, {"after": 1}, before_commit=lost)
    assert target.read_text() == "before" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    calls = []
    atomic_write_text(target, "after", before_commit=lambda: calls.append(target.read_text()))
    assert calls == ["before"] and target.read_text() == "after"  # called once, right before the rename


def test_a_full_disk_while_claiming_says_what_to_do_and_leaves_nothing(tmp_path, monkeypatch):
    def full(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        if "x" in mode:
            handle.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return handle

    monkeypatch.setattr(lock_module, "open", full, raising=False)
    with pytest.raises(LongAttnError, match=rf"^cannot write {tmp_path / 'unit.claim'}: No space left on device \(ENOSPC\)"):
        claim(tmp_path / "unit.claim", "launch-a", 0)
    with pytest.raises(LongAttnError, match=rf"^cannot write {tmp_path / '.lock'}: No space left on device \(ENOSPC\)"):
        RunLock(tmp_path, "launch-a").acquire()
    assert list(tmp_path.iterdir()) == []


def test_a_takeover_that_finds_a_fresh_record_in_place_puts_it_back(tmp_path):
    path = tmp_path / "unit.claim"
    path.write_text(json.dumps({"launch": "dead", "token": "deadtoken"}))
    judged = lock_module._look(path)  # judged stale; then, before the rename, the dead owner's claim goes...
    path.unlink()
    fresh = claim(path, "launch-2", 0)  # ... and a live process publishes its own
    assert lock_module._take_over(path, judged, lambda seen: True) is None
    assert json.loads(path.read_text())["token"] == fresh.token
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unit.claim"]  # no aside file, no ticket
    fresh.check()


def test_a_ticket_left_by_a_taker_that_died_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "TORN_AFTER", 0.2)
    dead = {"pid": dead_pid(), "host": socket.gethostname(), "started": "yesterday"}
    for name in ("unit.claim", ".lock"):
        (tmp_path / name).write_text(json.dumps({"launch": "dead", "token": "deadtoken", **dead}))
        (tmp_path / f".{name}.takeover-deadtoken").write_text(json.dumps({"launch": "takeover", "token": "t1", **dead}))
    held = claim(tmp_path / "unit.claim", "launch-1", 0)  # waits 0.2 s for the dead taker, then takes over
    assert held is not None and held.release()
    with RunLock(tmp_path, "launch-1") as lock:
        lock.check()
    assert list(tmp_path.iterdir()) == []

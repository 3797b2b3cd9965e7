"""Races of the run lock and claims between real processes: double claims, two takeovers of one dead lock, a paused owner.

Each test here failed on the lock of 2ff7e88 (claims read half-written, takeovers that removed a
fresh lock, no fencing), and uses only what that lock had, so that it can be run against it. The
child processes import only ``hf_longattn.run.lock`` and ``hf_longattn.storage`` (no torch):
they start quickly. Where a schedule must be forced, a child process wraps
``hf_longattn.run.lock._take_over`` (the step between judging a file stale and renaming it) to wait
there: it forces the interleaving and changes no behaviour.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def child(script: str, *args: object, stdin: int | None = None) -> subprocess.Popen:
    """Start ``python -S -c script args`` on this tree (text stdout and stderr piped)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([sys.executable, "-S", "-c", script, *map(str, args)], env=env, stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Lines:
    """The stdout lines of a child process as they come, for :meth:`expect`."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line.strip()) for line in process.stdout], daemon=True).start()

    def expect(self, text: str, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a line equal to ``text``; whether it came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            self.seen.append(line)
            if line == text:
                return True
        return False


def wait_for(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def dead_pid() -> int:
    """The pid of a process that has just exited."""
    done = subprocess.run([sys.executable, "-S", "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.fixture
def fast_folder(tmp_path) -> Iterator[Path]:
    """A folder on tmpfs (``/dev/shm``) where there is one, else ``tmp_path``: fsyncs cost nothing there."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="hf_longattn-lock-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


CLAIM_ALL = """
import sys, time
from pathlib import Path
from hf_longattn.run.lock import claim
folder, launch, rank, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
(folder / f"ready-{rank}").touch()
while not (folder / "go").exists():
    time.sleep(0.001)
owned = " ".join(str(unit) for unit in range(count) if claim(folder / f"{unit}.claim", launch, rank))
(folder / f"finished-{rank}").touch()  # stay alive until both are done: a gone owner's claims may be taken over
while not all((folder / f"finished-{r}").exists() for r in range(2)):
    time.sleep(0.001)
print(owned)
"""


def test_two_processes_of_one_launch_never_claim_the_same_unit(fast_folder):
    """Two live processes claim 3000 units in the same order, at once; none releases: every unit has exactly one owner."""
    count = 3000
    for trial in range(2):
        folder = fast_folder / f"trial-{trial}"
        folder.mkdir()
        processes = [child(CLAIM_ALL, folder, "launch-1", rank, count) for rank in range(2)]
        assert wait_for(lambda: all((folder / f"ready-{rank}").exists() for rank in range(2)))
        (folder / "go").touch()
        outputs = [process.communicate(timeout=120) for process in processes]
        assert all(process.returncode == 0 for process in processes), [error[-2000:] for _, error in outputs]
        owned = [set(map(int, out.split())) for out, _ in outputs]
        twice = owned[0] & owned[1]
        assert not twice, f"trial {trial}: {len(twice)} units claimed by both processes, e.g. {sorted(twice)[:5]}"
        assert owned[0] | owned[1] == set(range(count))


TAKE = """
import json, sys, time
from pathlib import Path
from hf_longattn.run import lock
folder, what, launch, rank, wait = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
target = folder / (".lock" if what == "lock" else "unit.claim")

def ready():  # "file:NAME": NAME exists; "fresh": the target holds a complete record, not the dead one
    if wait.startswith("file:"):
        return (folder / wait[5:]).exists()
    try:
        return json.loads(target.read_text()).get("launch") not in (None, "dead")
    except (OSError, ValueError):
        return False

original = lock._take_over
def held_back(*args, **kwargs):  # judged stale: wait here until the schedule says go
    (folder / f"judged-{rank}").touch()
    deadline = time.monotonic() + 20
    while wait != "none" and not ready() and time.monotonic() < deadline:
        time.sleep(0.002)
    return original(*args, **kwargs)
lock._take_over = held_back

if what == "claim":
    held = lock.claim(target, launch, rank)
    print("claimed" if held else "refused", flush=True)
    sys.stdin.read()
    if held:
        getattr(held, "release", lambda: lock.release_claim(target))()  # (2ff7e88's claim() returned True)
    sys.exit(0)
try:
    held = lock.RunLock(folder, launch).acquire()
except lock.LongAttnError as error:
    print("refused", flush=True)
    print(error, file=sys.stderr)
    sys.exit(3)
print("held", flush=True)
sys.stdin.read()
held.release()
"""

SCHEDULES = {
    # Rank 1 judges the dead file stale and waits; rank 0 takes it over; then rank 1 renames rank 0's fresh file.
    "one-after-the-other": ("none", "fresh"),
    # Both judge it stale, wait for each other, then rename at once.
    "together": ("file:judged-1", "file:judged-0"),
}


def race(folder: Path, what: str, launches: tuple[str, str], schedule: str) -> list[tuple[str, str, int]]:
    """Run the two contenders of ``schedule``; their (first line, stderr, pid), in rank order."""
    waits = SCHEDULES[schedule]
    processes = [None, None]
    try:
        processes[1] = child(TAKE, folder, what, launches[1], 1, waits[1], stdin=subprocess.PIPE)
        if schedule == "one-after-the-other":
            assert wait_for(lambda: (folder / "judged-1").exists())
        processes[0] = child(TAKE, folder, what, launches[0], 0, waits[0], stdin=subprocess.PIPE)
        firsts = [process.stdout.readline().strip() for process in processes]
        holder = json.loads((folder / (".lock" if what == "lock" else "unit.claim")).read_text())
        for process in processes:
            process.stdin.close()
        errors = [process.stderr.read() for process in processes]
        for process in processes:
            process.wait(timeout=60)
    finally:
        for process in processes:
            if process is not None and process.poll() is None:
                process.kill()
    return [(first, error, process.pid) for first, error, process in zip(firsts, errors, processes)] + [holder]


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_two_launches_taking_over_one_dead_lock_one_wins_the_other_is_refused(tmp_path, schedule):
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "launch": "dead",
                                                "token": "dead-token", "started": "yesterday"}))
    *contenders, holder = race(tmp_path, "lock", ("launch-a", "launch-b"), schedule)
    outcomes = sorted(first for first, _, _ in contenders)
    assert outcomes == ["held", "refused"], contenders
    (winner, _, pid), (_, refusal, _) = sorted(contenders)
    assert holder["launch"] == ("launch-a" if pid == contenders[0][2] else "launch-b") and holder["pid"] == pid
    assert f"another run (pid {pid} on {socket.gethostname()}, started " in refusal, refusal
    assert not (tmp_path / ".lock").exists()  # the winner released it
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing left aside


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_two_processes_taking_over_one_stale_claim_one_gets_it(tmp_path, schedule):
    (tmp_path / "unit.claim").write_text(json.dumps({"launch": "dead", "token": "dead-token", "rank": 7,
                                                     "pid": dead_pid(), "host": socket.gethostname()}))
    *contenders, holder = race(tmp_path, "claim", ("launch-2", "launch-2"), schedule)
    outcomes = [first for first, _, _ in contenders]
    assert sorted(outcomes) == ["claimed", "refused"], contenders
    assert holder["launch"] == "launch-2" and holder["rank"] == outcomes.index("claimed")
    assert not (tmp_path / "unit.claim").exists()  # the winner released it
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing left aside


OWNER = """
import sys, time
from pathlib import Path
from hf_longattn.run import lock
from hf_longattn.storage import atomic_write_text
folder, launch, role = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
lock.HEARTBEAT = 0.2
deadline = time.monotonic() + 60
while True:  # the second launch retries until the first one's lock is 2 s old
    try:
        held = lock.RunLock(folder, launch, stale_after=2).acquire()
        break
    except lock.LongAttnError:
        if role == "first" or time.monotonic() > deadline:
            raise
        time.sleep(0.1)
fence = getattr(held, "check", lambda: None)  # (2ff7e88's lock had no fencing check)
try:
    atomic_write_text(folder / "shared.txt", f"{launch} 0", before_commit=fence)
    print("committed", flush=True)
    if role == "second":
        (folder / "second.txt").write_text("the second launch's own file")
        sys.stdin.read()
    else:
        noticed = False
        while not (folder / "go").exists():
            if getattr(held, "lost", False) and not noticed:
                print("noticed", flush=True)
                noticed = True
            time.sleep(0.01)
        atomic_write_text(folder / "shared.txt", f"{launch} 1", before_commit=fence)
        print("committed again", flush=True)
except lock.LongAttnError as error:
    print(error, file=sys.stderr)
    sys.exit(3)
held.release()
"""


def test_a_paused_owner_learns_it_lost_the_lock_and_commits_nothing(tmp_path):
    """SIGSTOP launch A past the stale time (2 s), launch B takes over and writes; SIGCONT A: A stops, B's files stay."""
    first = child(OWNER, tmp_path, "launch-a", "first")
    second = None
    try:
        lines = Lines(first)
        assert lines.expect("committed", 60), first.stderr.read()
        os.kill(first.pid, signal.SIGSTOP)  # paused between commits (a frozen node, a suspended job)
        second = child(OWNER, tmp_path, "launch-b", "second", stdin=subprocess.PIPE)
        assert Lines(second).expect("committed", 60), second.stderr.read()
        taken = json.loads((tmp_path / ".lock").read_text())
        assert taken["launch"] == "launch-b" and (tmp_path / "shared.txt").read_text() == "launch-b 0"
        os.kill(first.pid, signal.SIGCONT)
        noticed = lines.expect("noticed", 3)  # at its next heartbeat (every 0.2 s)
        (tmp_path / "go").touch()  # now A tries to commit again
        first.wait(timeout=30)
        error = first.stderr.read()
        holder_after = json.loads((tmp_path / ".lock").read_text())
        second.stdin.close()  # B finishes: releases its lock
        second.wait(timeout=30)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
    assert first.returncode == 3 and lines.seen == ["committed", "noticed"], (first.returncode, lines.seen, error)
    assert noticed
    assert error.count("\n") == 1 and error.startswith(
        f"this launch (launch-a) lost the run lock of {tmp_path} to another launch (pid {second.pid} on "
        f"{socket.gethostname()}, started "), error
    assert (tmp_path / "shared.txt").read_text() == "launch-b 0"  # A committed nothing more
    assert holder_after == taken  # nor removed B's lock
    assert (tmp_path / "second.txt").read_text() == "the second launch's own file"
    assert second.returncode == 0 and not (tmp_path / ".lock").exists()


WRITER = """
import sys, time
from pathlib import Path
from hf_longattn.run import lock
folder, name, seconds = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
lock.HEARTBEAT = 0.01
while not (folder / "go").exists():
    time.sleep(0.001)
end, rounds = time.monotonic() + seconds, 0
while time.monotonic() < end:
    rounds += 1
    launch = f"{name}-{rounds}"
    lock.claim(folder / "unit.claim", launch, 0)  # a new launch each time: it takes the other writer's claim over
    if rounds % 3 == 0:
        lock.release_claim(folder / "unit.claim")
    try:  # stale at once: the two writers take the lock over from each other
        lock.RunLock(folder, launch, stale_after=0).acquire().release()
    except lock.LongAttnError:
        pass
print(rounds)
"""

READER = """
import json, os, sys, time
folder, seconds = sys.argv[1], float(sys.argv[2])
names = [os.path.join(folder, "unit.claim"), os.path.join(folder, ".lock")]
counts = {"complete": 0, "absent": 0, "torn": 0}
while not os.path.exists(os.path.join(folder, "go")):
    time.sleep(0.001)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for name in names:
        try:
            with open(name, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            counts["absent"] += 1
            continue
        try:
            counts["complete" if json.loads(data)["launch"] else "torn"] += 1
        except (ValueError, KeyError, TypeError):
            counts["torn"] += 1
print(json.dumps(counts))
"""


def test_no_reader_ever_sees_a_half_written_claim_or_lock(tmp_path):
    """Two writers create, take over and release a claim and the lock for 1.5 s while two readers hammer them."""
    processes = [child(WRITER, tmp_path, f"writer{n}", 1.5) for n in range(2)]
    processes += [child(READER, tmp_path, 1.7) for _ in range(2)]
    (tmp_path / "go").touch()
    outputs = [process.communicate(timeout=120) for process in processes]
    assert all(process.returncode == 0 for process in processes), [error[-2000:] for _, error in outputs]
    rounds = [int(out) for out, _ in outputs[:2]]
    counts = [json.loads(out) for out, _ in outputs[2:]]
    assert sum(c["torn"] for c in counts) == 0, counts
    assert min(rounds) > 20 and sum(c["complete"] for c in counts) > 100, (rounds, counts)

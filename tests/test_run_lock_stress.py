"""The claims under real concurrency: 4 processes × 3000 units × 5 trials, and a relaunch after processes were killed.

Every process walks all units with `claimed` and commits each unit it gets with
``atomic_write_text(..., before_commit=claim.check)``, then logs it and releases the claim. No
delay is injected. The logs must show every unit committed exactly once, by the process whose name
its result file holds. Processes walk either from their own offset (as in a run) or all in the
same order ("same": all four race for every unit at once, the schedule that made 2ff7e88's claims
commit 20 units twice in 5 trials). Each trial is cheap (tiny files on tmpfs where there is one;
the processes import no torch).
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

from .test_run_lock_races import child, fast_folder, wait_for  # noqa: F401 (fast_folder is a fixture)

WORKER = """
import os, signal, sys, time
from pathlib import Path
from hf_longattn.run.lock import LostClaim, claimed
from hf_longattn.storage import atomic_write_text
folder, launch, order, (rank, world, count, die_after) = Path(sys.argv[1]), sys.argv[2], sys.argv[3], map(int, sys.argv[4:8])
(folder / f"ready-{launch}-{rank}").touch()
while not (folder / f"go-{launch}").exists():
    time.sleep(0.001)
lost = kept = 0
with open(folder / f"log-{launch}-{rank}", "w") as log:
    offset = (rank, world) if order == "spread" else (0, 1)  # "same": every process walks from the first unit
    units = claimed(range(count), lambda unit: folder / f"{unit}.claim", launch, *offset,
                    lambda unit: (folder / f"{unit}.done").exists())
    for n, (unit, held) in enumerate(units):
        if n == die_after:  # killed while writing its unit: the claim and a temporary file stay behind
            (folder / f".{unit}.done.tmp-{os.getpid()}").write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            atomic_write_text(folder / f"{unit}.done", f"{launch} {rank}", before_commit=held.check)
        except LostClaim:
            lost += 1
            held.release()  # removes nothing of the new owner's
            continue
        log.write(f"{unit}\\n")
        log.flush()
        kept += not held.release()
print(lost, kept)
"""


def run_launch(folder: Path, launch: str, order: str, count: int, world: int = 4,
               die_after: dict[int, int] | None = None) -> None:
    """Run one launch of ``world`` processes over ``count`` units at once; rank r is SIGKILLed after ``die_after[r]`` units."""
    die_after = die_after or {}
    processes = [child(WORKER, folder, launch, order, rank, world, count, die_after.get(rank, -1)) for rank in range(world)]
    try:
        assert wait_for(lambda: all((folder / f"ready-{launch}-{rank}").exists() for rank in range(world)), 60)
        (folder / f"go-{launch}").touch()
        outputs = [process.communicate(timeout=300) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for rank, (process, (out, error)) in enumerate(zip(processes, outputs)):
        assert process.returncode == (-signal.SIGKILL if rank in die_after else 0), error[-3000:]
        assert rank in die_after or out.split() == ["0", "0"], (rank, out)  # no claim lost, every release removed it


def tally(folder: Path, count: int) -> tuple[int, int]:
    """Duplicates (commits beyond the first of a unit) and losses (units never committed), from the processes' logs."""
    committed_by: dict[int, list[str]] = {}
    for log in sorted(folder.glob("log-*")):
        committer = " ".join(log.name.split("-", 1)[1].rsplit("-", 1))  # log-<launch>-<rank> -> "<launch> <rank>"
        for line in log.read_text().split():
            committed_by.setdefault(int(line), []).append(committer)
    commits = Counter({unit: len(by) for unit, by in committed_by.items()})
    duplicates = sum(n - 1 for n in commits.values() if n > 1)
    losses = sum(1 for unit in range(count) if not commits[unit] or not (folder / f"{unit}.done").is_file())
    for unit, by in committed_by.items():  # the result file holds the name of the one process that committed it
        assert len(by) > 1 or (folder / f"{unit}.done").read_text() == by[0], (unit, by)
    return duplicates, losses


def leftovers(folder: Path) -> list[str]:
    """Claim files and the lock's temporary or aside files still there."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".claim") or ".claim." in p.name)


def test_four_processes_racing_for_every_unit_commit_each_exactly_once(fast_folder):
    count, trials = 3000, 5
    for trial in range(trials):
        folder = fast_folder / f"trial-{trial}"
        folder.mkdir()
        run_launch(folder, "launch", "same", count)
        assert tally(folder, count) == (0, 0), f"trial {trial}: (duplicates, losses)"
        assert leftovers(folder) == []


def test_a_relaunch_takes_over_the_claims_of_killed_processes_and_commits_every_unit_once(fast_folder):
    count, trials = 3000, 2
    for trial in range(trials):
        folder = fast_folder / f"trial-{trial}"
        folder.mkdir()
        # Rank 3 is killed mid-way (the others take its share over); later the whole launch is killed.
        run_launch(folder, "first", "spread", count, die_after={3: 150, 0: 450, 1: 500, 2: 550})
        stale = leftovers(folder)
        assert len(stale) == 4 and tally(folder, count)[0] == 0  # the four units they were writing, still claimed
        run_launch(folder, "second", "same", count)  # all four race to take over each stale claim
        assert tally(folder, count) == (0, 0), f"trial {trial}: (duplicates, losses)"
        assert leftovers(folder) == []
        assert all((folder / name.replace(".claim", ".done")).read_text().startswith("second ") for name in stale)

"""Random sequences of what users do to a run folder (issue 17): after each, ``hub/`` is what a fresh run gives.

Each sequence (seeded) mixes edits, additions and removals of source files, ``run``, ``score``,
``select`` with a random keep fraction, ``export``, a launch killed with SIGKILL at a random point,
relaunches with another number of tasks, and switches between engines (the CLI's processes,
datatrove's local executor, Ray in local mode). It ends with ``export``, as a user publishing would:
the folder ``hub/`` must then hold exactly the export of a fresh run on the final sources with the
last selection made, or the command must have refused in one line.

Run: ``python -m pytest -q tests/test_run_sequences.py`` (CPU, the tiny model; a few minutes on 2 cores).
``HF_LONGATTN_SEQUENCES=N`` runs N sequences (default 50).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hf_longattn.cli import main
from hf_longattn.config import RunConfig
from hf_longattn.run.driver import drive

ROOT = Path(__file__).resolve().parents[1]
SEQUENCES = int(os.environ.get("HF_LONGATTN_SEQUENCES", 50))
WORDS = ("the long range dependency of a window", "def score(window):\n    return window + 1", "a b c d e f g h")


def write_source(folder: Path, name: str, rng: random.Random) -> None:
    """One small jsonl source: one or two documents of 60 to 200 tokens of the tiny tokenizer's words."""
    rows = [{"id": f"{name}-{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40)))}
            for i in range(rng.randint(1, 2))]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def corpus_key(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(folder.glob("*.jsonl")))).hexdigest()


def published(out: Path) -> dict[str, list]:
    """What ``hub/`` publishes: each data file's rows (tag-free name), as plain values."""
    return {p.relative_to(out / "hub").as_posix().rsplit("-", 1)[0]: pq.read_table(p).to_pylist()
            for p in sorted((out / "hub" / "data").rglob("*.parquet"))}


class Sequence:
    """One user's session on one run folder: the operations, and what the folder must finally hold."""

    def __init__(self, seed: int, model: Path, base: Path, engines) -> None:
        self.rng, self.seed, self.engines = random.Random(seed), seed, engines
        self.corpus, self.out = base / "corpus", base / "out"
        self.corpus.mkdir(parents=True)
        for name in ("a", "b", "c"):
            write_source(self.corpus, name, self.rng)
        self.model, self.keep = model, 0.3  # the selection the last `select` or `run` made
        self.log: list[str] = []

    def config(self, keep: float | None = None) -> RunConfig:
        return RunConfig.from_dict({"model": str(self.model), "sources": [{"path": str(self.corpus)}], "window_size": 64,
                                    "keep_fraction": keep if keep is not None else 0.3, "chunk_size": 2,
                                    "batch_size": 2, "output_dir": str(self.out)})

    def cli(self, *argv: str) -> int:
        path = self.out.parent / "config.yaml"
        path.write_text(self.config().to_yaml())
        return main([*argv, "--config", str(path), "--no-progress"])

    # -- the operations ------------------------------------------------------------------------------
    def edit(self) -> None:
        write_source(self.corpus, self.rng.choice(sorted(p.stem for p in self.corpus.glob("*.jsonl"))), self.rng)

    def add(self) -> None:
        write_source(self.corpus, f"new{self.rng.randint(0, 99)}", self.rng)

    def remove(self) -> None:
        files = sorted(self.corpus.glob("*.jsonl"))
        if len(files) > 1:
            self.rng.choice(files).unlink()

    def command(self) -> None:
        name = self.rng.choice(("run", "score", "select", "export"))
        if name == "select":
            self.keep = self.rng.choice((0.2, 0.3, 0.5))
            assert self.cli("select", "--keep-fraction", str(self.keep)) == 0
        else:
            assert self.cli(name) == 0
            if name == "run":
                self.keep = 0.3

    def engine(self) -> None:
        """``run`` on another engine, with another number of tasks."""
        name = self.rng.choice(sorted(self.engines))
        self.log[-1] += f":{name}"
        drive(self.config(), "run", engine=self.engines[name](self.rng.randint(1, 3), self.out.parent / "logs"),
              progress=False)
        self.keep = 0.3

    def kill(self) -> None:
        """``hf-longattn run`` in its own process, killed with SIGKILL after a random time."""
        path = self.out.parent / "config.yaml"
        path.write_text(self.config().to_yaml())
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen([sys.executable, "-m", "hf_longattn.cli", "run", "--config", str(path), "--no-progress"],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(self.rng.uniform(1.0, 6.0))
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        record = self.out / "selection.json"  # the last selection made: by the killed `run`, if it got that far
        if record.is_file():
            self.keep = json.loads(record.read_text())["settings"]["keep_fraction"]

    def play(self, steps: int) -> None:
        operations = {"edit": self.edit, "add": self.add, "remove": self.remove, "command": self.command,
                      "engine": self.engine, "kill": self.kill}
        weights = {"edit": 3, "add": 1, "remove": 1, "command": 5, "engine": 2, "kill": 1}
        for _ in range(steps):
            name = self.rng.choices(list(weights), weights=list(weights.values()))[0]
            self.log.append(name)
            operations[name]()


def fresh_export(cache: dict, model: Path, corpus: Path, keep: float, base: Path) -> dict[str, list]:
    """What a fresh run on ``corpus`` with ``keep`` publishes (cached by the sources' content and ``keep``)."""
    key = (corpus_key(corpus), keep)
    if key not in cache:
        out = base / f"fresh-{len(cache)}"
        config = RunConfig.from_dict({"model": str(model), "sources": [{"path": str(corpus)}], "window_size": 64,
                                      "keep_fraction": keep, "chunk_size": 2, "batch_size": 2, "output_dir": str(out)})
        drive(config, "run", progress=False)
        cache[key] = published(out)
    return cache[key]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """The engines a sequence switches to: datatrove's local executor (in-process tasks) and Ray in local mode."""
    from datatrove.executor import LocalPipelineExecutor

    from hf_longattn.datatrove import DatatroveEngine

    def datatrove(tasks: int, logs: Path):
        def make(stage, pipeline, count, logging_dir, depends):
            return LocalPipelineExecutor(pipeline, tasks=count, workers=1, logging_dir=logging_dir, depends=depends)

        return DatatroveEngine(make, tasks, str(logs))

    found = {"datatrove": datatrove}
    try:
        import ray

        from hf_longattn.ray import RayEngine

        started = not ray.is_initialized()
        if started:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        found["ray"] = lambda tasks, logs: RayEngine(tasks, tasks, 0)
    except ImportError:
        started = False
    yield found
    if started:
        ray.shutdown()


def test_random_sequences_publish_what_a_fresh_run_does(tiny_model, engines, tmp_path, capsys):
    cache: dict = {}
    for seed in range(SEQUENCES):
        sequence = Sequence(seed, tiny_model, tmp_path / f"seq-{seed}", engines)
        sequence.play(steps=4)
        status = sequence.cli("export")
        if status != 0:  # a refusal is allowed, in one line
            error = capsys.readouterr().err.strip().splitlines()
            assert status == 2 and len(error) == 1, (seed, sequence.log, error)
            continue
        expected = fresh_export(cache, tiny_model, sequence.corpus, sequence.keep, tmp_path)
        assert published(sequence.out) == expected, (seed, sequence.log, sequence.keep)
        capsys.readouterr()

"""Tests of resumption: a 2-process gloo run SIGKILLed and relaunched equals a 1-process run; bad chunks are redone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from hf_longattn.config import RunConfig
from hf_longattn.run.chunks import check_chunk
from hf_longattn.run.job import LongAttnPipeline
from hf_longattn.run.layout import chunk_name

from .corpus import CATEGORIES, write_corpus
from .helpers import chunk_ids, chunk_plan, run_windows, tiny_model_with_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 300  # seconds for one torchrun launch; generous for a loaded 2-core machine
DELAY = 0.4  # seconds slept per scorer call in the launched processes, so that a kill lands mid-way

# Runs recipes/longabc.py unchanged, after making every scorer call a little slower.
LAUNCHER = """
import os, runpy, sys, time
from hf_longattn import scorer
delay = float(os.environ["HF_LONGATTN_TEST_DELAY"])
original = scorer.LongAttnScorer.__call__
def slow(self, batch, *extra):
    time.sleep(delay)
    return original(self, batch, *extra)
scorer.LongAttnScorer.__call__ = slow
sys.argv = [{recipe!r}, *sys.argv[1:]]
runpy.run_path({recipe!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    model = tiny_model_with_tokenizer(tiny_model_dir("llama"), base / "tiny-llama")
    corpus = write_corpus(base / "corpus", docs_per_category=2, chars=500)
    return base, model, corpus


def config_for(model: Path, corpus: Path, output_dir: Path) -> RunConfig:
    return RunConfig(
        model=str(model),
        sources=[{"path": str(corpus / f"{category}.jsonl")} for category in CATEGORIES],
        window_size=32,
        keep_fraction=0.25,
        chunk_size=2,
        batch_size=2,
        output_dir=str(output_dir),
    )


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process below it (torchrun starts its workers in their own sessions)."""
    import psutil

    try:
        parent = psutil.Process(process.pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=30)


def launch(base: Path, config_path: Path, log_name: str) -> subprocess.Popen:
    launcher = base / "launcher.py"
    launcher.write_text(LAUNCHER.format(recipe=str(ROOT / "recipes" / "longabc.py")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_LONGATTN_TEST_DELAY": str(DELAY),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(launcher), "--config", str(config_path), "--no-progress"]
    log = open(base / log_name, "wb")
    return subprocess.Popen(command, cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(process: subprocess.Popen, log: Path) -> None:
    try:
        process.wait(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT} s:\n{log.read_text()[-4000:]}")
    assert process.returncode == 0, log.read_text()[-6000:]


def test_killed_two_process_run_resumes_to_the_single_process_result(setup):
    base, model, corpus = setup
    out = base / "two-process"
    config = config_for(model, corpus, out)
    config_path = base / "config.yaml"
    config_path.write_text(config.to_yaml())
    scores = out / "scores"

    # 1. Two processes (gloo), SIGKILLed as soon as the first chunk is complete.
    process = launch(base, config_path, "first.log")
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not list(scores.glob("chunk-*.done")):
            if process.poll() is not None:
                pytest.fail(f"the run ended before any chunk was done:\n{(base / 'first.log').read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no chunk finished in {LAUNCH_TIMEOUT} s:\n{(base / 'first.log').read_text()[-4000:]}")
            time.sleep(0.02)
    finally:
        kill_tree(process)
    windows = run_windows(config)
    plan = chunk_plan(out)
    total = len(plan)
    done = sorted(int(p.stem.split("-")[1]) for p in scores.glob("chunk-*.done"))
    assert 1 <= len(done) < total - 3, f"the kill did not land mid-way: {len(done)} of {total} chunks done"
    assert not (out / "selection.parquet").exists()

    # 2. Damage left behind: a done chunk whose parquet no longer matches its marker (wrong scores, valid
    #    file), an unfinished chunk with a plausible parquet but no marker, and one truncated parquet.
    def bad_copy(index: int) -> pa.Table:
        ids = chunk_ids(out, plan[index])
        table = pq.read_table(scores / f"{chunk_name(done[0])}.parquet").slice(0, len(ids))
        table = table.set_column(0, "id", pa.array(list(ids)))
        return table.set_column(table.schema.get_field_index("longattn_ds"), "longattn_ds", pa.array([123.0] * len(ids)))

    undone = [j for j in range(total) if j not in done]
    tampered, plausible, truncated = done[0], undone[0], undone[1]
    pq.write_table(bad_copy(tampered), scores / f"{chunk_name(tampered)}.parquet")
    pq.write_table(bad_copy(plausible), scores / f"{chunk_name(plausible)}.parquet")
    good_bytes = (scores / f"{chunk_name(done[-1])}.parquet").read_bytes()
    (scores / f"{chunk_name(truncated)}.parquet").write_bytes(good_bytes[: len(good_bytes) // 2])
    (scores / f".{chunk_name(undone[2])}.parquet.tmp-99999").write_bytes(b"partial")

    # 3. The same command again finishes the job.
    process = launch(base, config_path, "second.log")
    wait_for(process, base / "second.log")
    log = (base / "second.log").read_text()
    assert "redoing" in log and "sha256 does not match" in log
    fingerprint = json.loads((out / "fingerprint.json").read_text())["fingerprint"]
    for index, chunk in enumerate(plan):
        assert check_chunk(scores, index, chunk["rows"], fingerprint, chunk["digest"]) is None
    assert not list(scores.glob(".*tmp-*"))
    assert len(list(scores.glob("chunk-*.parquet"))) == total

    # 4. An uninterrupted single-process run gives exactly the same rows and scores.
    # In its own process with OMP_NUM_THREADS=1, like the launched ones: CPU BLAS results may depend
    # on the thread count, and changing it in this process would leak into later tests.
    single = base / "single.yaml"
    single.write_text(config_path.read_text().replace(str(out), str(base / "one-process")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(ROOT / "recipes" / "longabc.py"), "--config", str(single), "--no-progress"],
                   cwd=base, env=env, check=True, timeout=LAUNCH_TIMEOUT, capture_output=True)
    resumed = pq.read_table(out / "selection.parquet")
    reference = pq.read_table(base / "one-process" / "selection.parquet")
    assert resumed.column("id").to_pylist() == list(windows["id"])  # every window once, in windows order
    assert pc.count_distinct(resumed.column("id")).as_py() == len(windows)
    assert resumed.equals(reference)  # ids, statuses, DS_T, DU_T bit for bit, LDS_T, selection
    assert 123.0 not in resumed.column("longattn_ds").to_pylist()
    assert (out / "hub" / "README.md").is_file()


def test_deleted_and_damaged_chunks_are_redone_in_process(setup):
    base, model, corpus = setup
    config = config_for(model, corpus, base / "in-process")
    first = LongAttnPipeline(config, progress=False).run()
    scores = base / "in-process" / "scores"
    reference = pq.read_table(base / "in-process" / "selection.parquet")
    mtimes = {p.name: p.stat().st_mtime_ns for p in scores.iterdir()}

    (scores / "chunk-000001.done").unlink()                         # crash between parquet and marker
    (scores / "chunk-000002.parquet").write_bytes(b"PAR1 garbage")  # corrupt file under a valid marker
    (scores / "chunk-000003.parquet").unlink()                      # lost file
    again = LongAttnPipeline(config, progress=False).run()

    changed = {p.name for p in scores.iterdir() if mtimes.get(p.name) != p.stat().st_mtime_ns}
    assert changed == {f"chunk-00000{i}.{suffix}" for i in (1, 2, 3) for suffix in ("parquet", "done")}
    assert pq.read_table(base / "in-process" / "selection.parquet").equals(reference)
    assert again["categories"] == first["categories"]


@pytest.mark.slow
def test_accelerate_on_cpu_gives_two_ranks_and_explains_cpu_flag(setup):
    """`accelerate launch --multi_gpu --num_processes 2` runs two gloo ranks on a CPU machine (the recipe's command);
    `accelerate launch --cpu` starts one process whatever --num_processes says, and the run says so."""
    base, model, corpus = setup
    config = config_for(model, corpus, base / "accelerate")
    path = base / "accelerate.yaml"
    path.write_text(config.to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    two = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "recipes" / "longabc.py"),
                          "--config", str(path), "--no-progress"], cwd=base, env=env, capture_output=True, text=True,
                         timeout=LAUNCH_TIMEOUT)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[score] rank 0/2" in two.stdout and "[score] rank 1/2" in two.stdout
    one = subprocess.run(["accelerate", "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "recipes" / "longabc.py"),
                          "--config", str(path), "--output-dir", str(base / "accelerate-cpu"), "--no-progress"],
                         cwd=base, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "[score] rank 0/1" in one.stdout
    assert "`accelerate launch --cpu` always starts one process" in one.stdout + one.stderr
    assert pq.read_table(base / "accelerate" / "selection.parquet").equals(
        pq.read_table(base / "accelerate-cpu" / "selection.parquet"))

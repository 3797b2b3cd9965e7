"""Tests of hf_longattn.run.stages: the job as stages of independent tasks gives the files of `hf-longattn run`."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hf_longattn.errors import LongAttnError
from hf_longattn.run import stages

from .helpers import chunk_plan, tiny_config


def test_stages_in_tasks_equal_the_one_node_run(finished_run, tiny_model, corpus, tmp_path):
    reference, _ = finished_run
    config = tiny_config(tiny_model, corpus, tmp_path / "out")
    for rank in range(2):
        stages.windows_stage(config, rank, 2)
    assert stages.plan_stage(config)["chunks"] == len(chunk_plan(reference.output_dir))
    for rank in range(3):
        stages.score_stage(config, rank, 3)
    plan = chunk_plan(config.output_dir)
    mine = range(1, len(plan), 3)
    windows = sum(plan[j]["rows"] for j in mine)
    assert stages.score_stage(config, 1, 3) == {  # relaunch: nothing left
        "chunks": len(mine), "chunks_scored": 0, "chunks_skipped": len(mine), "windows": windows, "windows_scored": 0,
        "scored_ok": windows, "not_ok": 0}
    stages.fit_stage(config)
    for rank in range(2):
        stages.export_stage(config, rank, 2)
    stages.finish_stage(config)
    ours, theirs = Path(config.output_dir), Path(reference.output_dir)
    assert pq.read_table(ours / "selection.parquet").equals(pq.read_table(theirs / "selection.parquet"))
    names = sorted(p.relative_to(ours / "hub").as_posix() for p in (ours / "hub").rglob("*.parquet"))
    assert names == sorted(p.relative_to(theirs / "hub").as_posix() for p in (theirs / "hub").rglob("*.parquet"))
    for name in names:
        assert pq.read_table(ours / "hub" / name).equals(pq.read_table(theirs / "hub" / name))


def test_the_plan_waits_for_every_windows_task(tiny_model, corpus, tmp_path):
    config = tiny_config(tiny_model, corpus, tmp_path / "out")
    stages.windows_stage(config, 0, 2)  # task 1 never ran
    with pytest.raises(LongAttnError, match=r"1 input shard\(s\) have no windows yet.*run the windows stage"):
        stages.plan_stage(config)

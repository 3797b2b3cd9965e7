"""Tests of hf_longattn.run.stages: tasks of any number, in any order, give the files of `hf-longattn run`."""

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
    first = stages.windows_stage(config, 0, 2)  # claims: the first task takes every shard it finds free
    assert first["input_shards"] == first["input_shards_built"] == 3
    assert stages.windows_stage(config, 1, 2)["input_shards_built"] == 0  # nothing left for the second
    assert stages.plan_stage(config)["chunks"] == len(chunk_plan(reference.output_dir))
    scored = [stages.score_stage(config, rank, 3) for rank in range(3)]
    assert sum(s["chunks_scored"] for s in scored) == len(chunk_plan(config.output_dir))
    assert stages.score_stage(config, 1, 3)["chunks_scored"] == 0  # relaunch: nothing left
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


def test_the_plan_needs_every_windows_shard(tiny_model, corpus, tmp_path):
    config = tiny_config(tiny_model, corpus, tmp_path / "out")
    with pytest.raises(LongAttnError, match=r"3 input shard\(s\) have no windows yet.*run the windows step"):
        stages.plan_stage(config)


def test_a_one_task_stage_refuses_several_tasks(tiny_model, corpus, tmp_path):
    config = tiny_config(tiny_model, corpus, tmp_path / "out")
    with pytest.raises(ValueError, match="the plan stage is one task"):
        stages.run_task(config, "plan", 0, 2)
    with pytest.raises(ValueError, match="unknown stage 'fit'; stages: "):
        stages.run_task(config, "fit")

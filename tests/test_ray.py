"""Tests of hf_longattn.ray and recipes/longabc_ray.py on a local Ray (CPU): the same windows, scores and run folder as one process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hf_longattn import vocabulary as V

from .helpers import chunk_plan, tiny_config

pytest.importorskip("ray.data")
import ray  # after the skip: the tests need Ray Data

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")  # Ray's own deprecations
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "longabc_ray.py"


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the whole file (starting one takes 10-20 s)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _recipe():
    spec = importlib.util.spec_from_file_location("longabc_ray", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _collect(dataset) -> pa.Table:
    """A Ray dataset as one Arrow table, sorted by id (Ray Data does not keep the order)."""
    table = pa.concat_tables(ray.get(dataset.to_arrow_refs()))
    return table.sort_by(V.ID)


def _run_windows(config) -> pa.Table:
    stats = (Path(config.output_dir) / "windows" / "windows_stats.json").read_text()
    import json

    names = [shard["name"] for shard in json.loads(stats)["shards"]]
    return pa.concat_tables([pq.read_table(Path(config.output_dir) / "windows" / f"{n}.parquet") for n in names])


def _same_run_folder(ours: Path, theirs: Path) -> None:
    assert pq.read_table(ours / "selection.parquet").equals(pq.read_table(theirs / "selection.parquet"))
    names = sorted(p.relative_to(ours / "hub").as_posix() for p in (ours / "hub").rglob("*.parquet"))
    assert names == sorted(p.relative_to(theirs / "hub").as_posix() for p in (theirs / "hub").rglob("*.parquet"))
    for name in names:
        assert pq.read_table(ours / "hub" / name).equals(pq.read_table(theirs / "hub" / name)), name


def test_the_module_imports_the_real_ray():
    import hf_longattn.ray as module

    assert module.ray is sys.modules["ray"] and module.ray.data is sys.modules["ray.data"]


def test_without_ray_the_import_error_says_what_to_install():
    code = "import sys; sys.modules['ray'] = None\ntry:\n import hf_longattn.ray\nexcept ImportError as e:\n print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install hf-longattn[ray]" in out


def test_recipe_help_runs():
    out = subprocess.run([sys.executable, str(RECIPE), "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--address", "--tasks", "--concurrency", "--num-gpus-per-actor", "--config", "--input",
                   "--window-size", "--keep-fraction", "--push-to-hub", "--set"):
        assert option in out


def test_recipe_on_ray_gives_the_one_node_run_and_resumes(ray_cluster, finished_run, tiny_model, corpus, tmp_path,
                                                          capsys):
    reference, _ = finished_run
    config = tiny_config(tiny_model, corpus, tmp_path / "out")
    (tmp_path / "run.yaml").write_text(config.to_yaml())
    argv = ["--config", str(tmp_path / "run.yaml"), "--tasks", "2", "--concurrency", "2", "--num-gpus-per-actor", "0",
            "--no-progress"]
    assert _recipe().main(argv) == 0
    out = capsys.readouterr().out
    assert "LongAttn summary" in out and "[run] to do: windows, plan, score, select, export, finish" in out
    ours = Path(config.output_dir)
    _same_run_folder(ours, Path(reference.output_dir))

    # a chunk lost (a crash before its marker): the relaunch scores that chunk only
    lost = len(chunk_plan(ours)) // 2
    (ours / "scores" / f"chunk-{lost:06d}.done").unlink()
    kept = {p: p.stat().st_mtime_ns for p in (ours / "scores").glob("chunk-*.parquet") if p.stem != f"chunk-{lost:06d}"}
    assert _recipe().main(argv) == 0
    assert "  score: 1 of 39 chunk(s) to score" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    _same_run_folder(ours, Path(reference.output_dir))

    # another W into the same folder: refused by a Ray task, reported in one line
    assert _recipe().main([*argv, "--window-size", "32"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("longabc_ray: error: ") and "holds windows/scores of a different configuration" in error


def test_scorer_actor_is_bit_identical_to_the_run(ray_cluster, finished_run):
    from hf_longattn.ray import LongAttnScorerActor

    config, _ = finished_run
    scores = Path(config.output_dir) / "scores"
    expected = pa.concat_tables([pq.read_table(p) for p in sorted(scores.glob("chunk-*.parquet"))]).sort_by(V.ID)
    windows = ray.data.read_parquet(str(Path(config.output_dir) / "windows"))  # a folder: see the note below

    def scored(batch_format: str) -> pa.Table:
        return _collect(windows.map_batches(
            LongAttnScorerActor, fn_constructor_kwargs={"config": config.to_dict()}, batch_size=5,
            batch_format=batch_format, compute=ray.data.ActorPoolStrategy(size=1)))

    for batch_format in ("pyarrow", "numpy"):
        table = scored(batch_format)
        assert table.column(V.ID).equals(expected.column(V.ID)), batch_format
        for name in V.SCORE_COLUMNS:
            assert table.schema.field(name).type == expected.schema.field(name).type, (batch_format, name)
            assert table.column(name).equals(expected.column(name)), (batch_format, name)
        assert table.schema.field(V.INPUT_IDS).type == _run_windows(config).schema.field(V.INPUT_IDS).type
        assert table.column(V.WINDOW_HASH).equals(expected.column(V.WINDOW_HASH))
# Note: ray.data.read_parquet on a list of files fails at random in this environment (no aiohttp: Ray's
# fsspec-HTTP probe raises ImportError in a thread instead of ModuleNotFoundError); the folder is one path.


def test_scorer_actor_takes_pandas_batches_and_refuses_text(finished_run):
    import pandas as pd

    from hf_longattn.ray import LongAttnScorerActor

    config, _ = finished_run
    windows = _run_windows(config).slice(0, 6)
    actor = LongAttnScorerActor(config, batch_size=4)
    from_arrow = actor(windows)
    from_pandas = actor(windows.to_pandas(types_mapper=pd.ArrowDtype))
    assert from_pandas.equals(from_arrow)
    assert from_arrow.column_names == [*windows.column_names, *V.SCORE_COLUMNS]
    with pytest.raises(ValueError, match=r"needs the column\(s\) \['input_ids'\]"):
        actor(pa.table({V.ID: ["a"], V.TEXT: ["some text"]}))


def test_windows_udf_gives_the_run_windows(ray_cluster, finished_run):
    from hf_longattn.ray import LongAttnWindowsUDF
    from hf_longattn.run.units import windows_schema
    from hf_longattn.shards import plan_input_shards, read_shard

    config, _ = finished_run
    documents = [doc for shard in plan_input_shards(config.sources) for doc in read_shard(config.sources, shard)]
    windows = _collect(ray.data.from_items(documents).map_batches(
        LongAttnWindowsUDF, fn_constructor_kwargs={"config": config.to_dict()}, batch_size=3,
        compute=ray.data.ActorPoolStrategy(size=1)))
    expected = _run_windows(config).sort_by(V.ID)
    assert windows.schema.equals(windows_schema())
    for name in (V.ID, V.INPUT_IDS, V.WINDOW_HASH, V.CATEGORY):
        assert windows.column(name).equals(expected.column(name)), name

"""Helpers shared by the tests: a tiny tokenizer next to a tiny model, a tiny run configuration, loading an export."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import datasets

from hf_longattn.config import RunConfig

from .corpus import CATEGORIES

W = 64


def save_tokenizer(folder: Path) -> None:
    """Train a small byte-level BPE tokenizer offline (< 320 ids, the tiny models' vocabulary) into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    backend.train_from_iterator(
        ["the long range dependency of a window " * 20, "def score(window):\n    return window + 1\n" * 20], trainer
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    assert len(tokenizer) <= 320
    tokenizer.save_pretrained(folder)


def tiny_model_with_tokenizer(source: Path, folder: Path) -> Path:
    """A copy of a tiny random model folder with a tokenizer next to its weights."""
    shutil.copytree(source, folder)
    save_tokenizer(folder)
    return folder


def load_export(folder: Path, config_name: str):
    """``load_dataset(folder, config_name)`` into a fresh cache folder (each call reads the files as they are now)."""
    cache = tempfile.mkdtemp(prefix=f"cache-{config_name}-", dir=Path(folder).parent)
    return datasets.load_dataset(str(folder), config_name, cache_dir=cache)


def tiny_config(model: Path, corpus: Path, output_dir: Path, **changes) -> RunConfig:
    """A run of the tiny model over the test corpus: W = 64, keep 0.3, chunks of 4 windows."""
    values = dict(
        model=str(model),
        sources=[{"path": str(corpus / f"{category}.jsonl")} for category in CATEGORIES],
        window_size=W,
        keep_fraction=0.3,
        chunk_size=4,
        batch_size=2,
        output_dir=str(output_dir),
    )
    values.update(changes)
    return RunConfig.from_dict(values)


def run_windows(config: RunConfig):
    """The kept windows of a finished windows step, in order, as a `datasets.Dataset`."""
    from hf_longattn.run.context import Run
    from hf_longattn.run.windows_step import load_windows

    return load_windows(Run(config, progress=False))


def chunk_plan(output_dir: Path) -> list[dict]:
    """The chunks of ``scores/plan.json``: shard, row range, rows and digest of each."""
    import json

    return json.loads((Path(output_dir) / "scores" / "plan.json").read_text())["chunks"]


def chunk_ids(output_dir: Path, chunk: dict) -> list[str]:
    """The window ids a chunk of the plan holds (its shard's rows ``[start, stop)``; no cap in these tests)."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(output_dir) / "windows" / f"{chunk['shard']}.parquet", columns=["id"])
    return table.column("id").to_pylist()[chunk["start"]:chunk["stop"]]

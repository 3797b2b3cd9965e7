"""The configuration flags every command and recipe shares (``--config``, ``--input``, options, ``--set``) and the config they give."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

# flag, config key, type, help
OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--output-dir", "output_dir", str, "folder of the run (windows, scores, selection, hub/)"),
    ("--model", "model", str, "scoring model: Hub id, model folder, .gguf file or 'smollm2'"),
    ("--scorer", "scorer", str, "the scorer selection ranks by: longattn_v1 (default), prolong_v1 or ladm_cds_v1"),
    ("--tokenizer", "tokenizer", str, "tokenizer name or path (default: the model's)"),
    ("--window-size", "window_size", int, "W, tokens per window"),
    ("--min-distance", "min_distance", "number", "k as a fraction of W (e.g. 0.25) or in tokens (e.g. 8192)"),
    ("--layer", "layer", int, "decoder layer scored (paper: 0)"),
    ("--dtype", "dtype", str, "float32, bfloat16 or float16 (default: float32 on CPU)"),
    ("--max-windows-per-category", "max_windows_per_category", int, "keep at most this many windows per category"),
    ("--chunk-size", "chunk_size", int, "windows per chunk (unit of resumption)"),
    ("--batch-size", "batch_size", int, "windows per scorer call"),
    ("--num-proc", "num_proc", int, "processes for tokenising and windowing"),
    ("--keep-fraction", "keep_fraction", float, "fraction of valid windows kept per category"),
    ("--alpha", "alpha", float, "weight of DU_T in LDS_T"),
    ("--normalization", "normalization", str, "zscore (paper) or minmax (reference code)"),
    ("--selection-method", "selection_method", str, "lds or random (baseline)"),
    ("--seed", "seed", int, "seed of the random baseline"),
]


def _number(text: str) -> int | float:
    """``"8192"`` → 8192 (tokens), ``"0.25"`` → 0.25 (a fraction)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _parse_set(values: Sequence[str]) -> dict[str, Any]:
    import yaml

    overrides = {}
    for item in values:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def add_config_arguments(parser: argparse.ArgumentParser, *, skip: Sequence[str] = ()) -> None:
    """Add the configuration flags every command shares (``--config``, ``--input``, options, ``--set``) to ``parser``."""
    group = parser.add_argument_group("configuration (later ones win: --config < --input < options < --set)")
    group.add_argument("--config", metavar="FILE", help="YAML config (default: the embedded offline demo)")
    group.add_argument("--input", "--data", dest="input", metavar="PATH", action="append", default=[],
                       help="documents to use instead of the config's sources: .jsonl(.gz), .parquet, a text file "
                            "or a folder (repeatable); category from a `category` column, else the file/folder name")
    for flag, key, kind, text in OPTIONS:
        if key not in skip:
            group.add_argument(flag, dest=key, type=_number if kind == "number" else kind, default=None,
                               metavar=key.upper(), help=text)
    if "scorers" not in skip:
        group.add_argument("--scorers", dest="scorers", nargs="+", default=None, metavar="SCORER",
                           help="every scorer the score step runs on the same windows (default: --scorer alone)")
    group.add_argument("--select-by", dest="select_by", nargs="+", default=None, metavar="NAME",
                       help="rank by a scorer or a score column (e.g. prolong_lds); several: their rank average")
    group.add_argument("--faithful", dest="faithful", action="store_true", default=None,
                       help="reference-code window boundaries (no window for a document of exactly W tokens)")
    group.add_argument("--push-to-hub", dest="push_to_hub", metavar="REPO_ID", default=None,
                       help="dataset repo to upload the export to (run, push)")
    group.add_argument("--private", dest="private", action="store_true", default=None,
                       help="create the Hub repo as private")
    group.add_argument("--set", dest="set_values", metavar="KEY=VALUE", action="append", default=[],
                       help="any config key, value parsed as YAML (repeatable), e.g. --set keep_fraction=0.25")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of errors")


def config_from_args(args: argparse.Namespace):
    """The `RunConfig` of parsed arguments: --config (or the demo), then --input, options, --set (validated once)."""
    from .config import RunConfig
    from .sources import SourceConfig

    overrides: dict[str, Any] = {}
    if args.input:
        overrides["sources"] = [SourceConfig(path=path).to_dict() for path in args.input]
        if args.config is None:
            overrides["output_dir"] = "longattn-output"
    for key in RunConfig.keys():  # every flag's dest is the config key it sets
        if key != "sources" and getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if isinstance(overrides.get("select_by"), list) and len(overrides["select_by"]) == 1:
        overrides["select_by"] = overrides["select_by"][0]
    overrides.update(_parse_set(args.set_values))
    return RunConfig.from_yaml(args.config, overrides)


def no_progress_bars() -> None:
    """Silence the progress bars of datasets and huggingface_hub (here, and in processes started from here).

    What ``--no-progress`` does besides the job's own bars; the recipes call it too.
    """
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import datasets
    import huggingface_hub.utils

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()

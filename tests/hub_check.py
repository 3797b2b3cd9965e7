"""Load a dataset from the (local) Hub as a user would, in a fresh process, and say which local export folder it equals.

Run by the push tests (``HF_ENDPOINT`` and ``HF_HOME`` set by them)::

    python -m tests.hub_check user/longabc --expect out/hub [--expect old/hub] [--revision SHA ...] [--streaming] [--card]

Prints one JSON object: per revision (default ``main``), the index of the ``--expect`` folder whose
configs ``filtered`` and ``scored`` it gives exactly (splits, features, rows in order), or the
one-line error `datasets` raised; with ``--streaming`` the same through ``streaming=True``; with
``--card``, whether the card parses, validates on the Hub and every ``data_files`` pattern matches files.
"""

from __future__ import annotations

import argparse
import json
import sys

CONFIGS = ("filtered", "scored")


def rows(dataset_dict) -> dict:
    """Split → (features, rows) of a `DatasetDict` or `IterableDatasetDict`."""
    return {split: (ds.features.to_dict() if ds.features else None, list(ds)) for split, ds in dataset_dict.items()}


def load(path: str, revision: str | None, streaming: bool) -> dict:
    import datasets

    return {config: rows(datasets.load_dataset(path, config, revision=revision, streaming=streaming))
            for config in CONFIGS}


def which(repo: str, revision: str | None, expected: list[dict], streaming: bool) -> dict:
    try:
        got = load(repo, revision, streaming)
    except Exception as error:  # noqa: BLE001 - reported to the test
        return {"matches": None, "error": f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"}
    matches = [i for i, want in enumerate(expected) if want == got]
    counts = {c: {s: len(r) for s, (_, r) in got[c].items()} for c in CONFIGS}
    return {"matches": matches[0] if matches else None, "rows": counts}


def card(repo: str) -> dict:
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, HfFileSystem

    loaded = DatasetCard.load(repo)
    loaded.validate(repo_type="dataset")  # the Hub's validate-yaml endpoint
    configs = MetadataConfigs.from_dataset_card_data(loaded.data)
    fs = HfFileSystem()
    unmatched = [entry["path"] for config in configs.values() for entry in config["data_files"]
                 if not fs.glob(f"datasets/{repo}/{entry['path']}")]
    return {"configs": sorted(configs), "default": [n for n, c in configs.items() if c.get("default")],
            "unmatched": unmatched, "data": loaded.data.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("repo")
    parser.add_argument("--expect", action="append", default=[])
    parser.add_argument("--revision", action="append", default=[])
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument("--card", action="store_true")
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    expected = [load(folder, None, False) for folder in args.expect]
    report: dict = {"revisions": {rev or "main": which(args.repo, rev, expected, False) for rev in args.revision or [None]}}
    if args.streaming:
        report["streaming"] = which(args.repo, None, expected, True)
    if args.card:
        report["card"] = card(args.repo)
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()

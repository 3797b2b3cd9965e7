"""Export scored LongAttn windows as a Hub-ready dataset folder (parquet configs, plots, dataset card) and push it."""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import vocabulary as V
from .card import QUANTILES, CardData, CategoryRow, score_quantiles
from .counts import format_number, row_counts  # noqa: F401 - format_number: its old home

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_ROWS = 2000
"""Default rows per parquet shard: a 32K-token window is ~0.25 MB (ids + text), so ~500 MB/shard."""
CONFIGS = ("filtered", "scored")
REQUIRED_COLUMNS = (V.ID, V.STATUS, V.SELECTED, V.DS, V.DU, V.LDS)
PLOT_FILES = {"scores": "score_distributions.png", "selection": "kept_vs_dropped.png", "probe": "probe.png"}
OWNED = ("README.md", "data/scored", "data/filtered", "plots")
"""What an export writes in its folder (and replaces with ``overwrite=True``); nothing else is touched."""
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


# -- names and paths ---------------------------------------------------------------------------------


def sanitize_split_name(name: str) -> str:
    """Turn a category or split name into a valid, path-safe split name matching ``[A-Za-z0-9_]+``.

    Runs of other characters become one ``_``; leading/trailing ``_`` are dropped; an empty
    result becomes ``"split"`` and ``"all"`` (reserved by `datasets`) becomes ``"all_"``.

    Example:

    >>> sanitize_split_name("../../evil"), sanitize_split_name("Stack Exchange"), sanitize_split_name("all")
    ('evil', 'Stack_Exchange', 'all_')
    """
    cleaned = re.sub(r"[^A-Za-z0-9_]+", "_", str(name)).strip("_") or "split"
    if cleaned.lower() == "all":
        cleaned += "_"
    return cleaned


def split_names(categories: Any) -> dict[str, str]:
    """Map every category to its split name; raise a `ValueError` if two collide after sanitising.

    Example:

    >>> split_names(["a/b", "c"])
    {'a/b': 'a_b', 'c': 'c'}
    """
    mapping = {original: sanitize_split_name(original) for original in categories}
    by_clean: dict[str, list[str]] = {}
    for original, clean in mapping.items():
        by_clean.setdefault(clean, []).append(original)
    collisions = {clean: originals for clean, originals in by_clean.items() if len(originals) > 1}
    if collisions:
        raise ValueError(
            f"Split names collide after sanitising to [A-Za-z0-9_]+: {collisions}. "
            "Rename the categories so that they stay distinct."
        )
    return mapping


def _inside(folder: Path, relative: str) -> Path:
    """Return ``folder / relative``, refusing any path that would resolve outside ``folder``."""
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ValueError(f"Refusing to write {relative!r}: it resolves outside {folder}.")
    return path


def _shard_name(split: str, index: int, num_shards: int) -> str:
    """``<split>-00000-of-00003.parquet`` (the Hub's shard naming)."""
    return f"{split}-{index:05d}-of-{num_shards:05d}.parquet"


def _validate(scored: Mapping[str, Any]) -> None:
    """Check that every split has the columns the export needs; list what exists otherwise."""
    if not scored:
        raise ValueError("Cannot export: `scored` has no splits.")
    for name, dataset in scored.items():
        columns = dataset.column_names
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if V.NUM_TOKENS not in columns and V.INPUT_IDS not in columns:
            missing.append(f"{V.NUM_TOKENS} (or {V.INPUT_IDS})")
        if missing:
            raise ValueError(f"Split {name!r} lacks column(s) {missing} needed for export. Current columns: {columns}")


# -- export ----------------------------------------------------------------------------------------------


def _write_shards(dataset: Any, directory: Path, split: str, max_shard_rows: int) -> list[str]:
    """Write ``dataset`` as ``<split>-0000i-of-0000N.parquet`` shards (at least one, even if empty)."""
    num_shards = max(1, math.ceil(len(dataset) / max_shard_rows))
    names = []
    for index in range(num_shards):
        shard = dataset.shard(num_shards=num_shards, index=index, contiguous=True) if num_shards > 1 else dataset
        name = _shard_name(split, index, num_shards)
        shard.to_parquet(str(_inside(directory, name)))
        names.append(name)
    return names


def _split_summary(dataset: Any) -> tuple[dict[str, Any], dict[str, list[float]], list[int], list[str]]:
    """Counts (`hf_longattn.counts.row_counts`), ok scores per column, selected rows and licenses of one split."""
    import pyarrow.compute as pc

    wanted = [c for c in (*REQUIRED_COLUMNS, V.NUM_TOKENS, V.INPUT_IDS, V.LICENSE) if c in dataset.column_names]
    table = dataset.select_columns(wanted).with_format("arrow")[:]
    counts = row_counts(table)
    ok = pc.equal(table.column(V.STATUS), V.OK)
    scores = {}
    for column in (V.DS, V.DU, V.LDS):
        values = table.column(column).filter(pc.fill_null(ok, False)).to_pylist()
        scores[column] = [float(v) for v in values if v is not None and math.isfinite(v)]
    selected = pc.fill_null(table.column(V.SELECTED), False).to_numpy(zero_copy_only=False)
    licenses = sorted({str(v) for v in table.column(V.LICENSE).to_pylist() if v}) if V.LICENSE in wanted else []
    return counts, scores, [i for i, s in enumerate(selected) if s], licenses


def export_dataset(
    scored: Mapping[str, Any],
    folder: str | Path,
    metadata: Mapping[str, Any],
    *,
    max_shard_rows: int = DEFAULT_MAX_SHARD_ROWS,
    repo_id: str | None = None,
    license: str | None = None,
    pretty_name: str | None = None,
    plots: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write scored LongAttn windows as a Hub-ready dataset folder with two configs and a dataset card.

    Layout written under ``folder``::

        README.md                                   dataset card (YAML configs + markdown)
        data/scored/<split>-00000-of-0000N.parquet  every window
        data/filtered/<split>-00000-of-0000N.parquet windows with longattn_selected == True
        plots/score_distributions.png               DS_T / DU_T / LDS_T histograms per category
        plots/kept_vs_dropped.png                   windows kept / dropped / not ok per category
        plots/probe.png                             only if ``metadata["probe"]`` has an image

    Split names are sanitised to ``[A-Za-z0-9_]+`` (see `sanitize_split_name`) so no category name
    can write outside ``folder``. A category that kept no rows still gets a (valid, empty) parquet
    file in ``data/filtered/`` but is left out of the ``filtered`` config, because `datasets`
    cannot load an empty split; if no category kept anything, the config lists them all.

    Args:
        scored (`datasets.DatasetDict` or `Mapping[str, datasets.Dataset]`):
            One scored split per category, with at least ``id``, ``longattn_status``,
            ``longattn_selected``, ``longattn_ds``, ``longattn_du``, ``longattn_lds`` and
            ``longattn_num_tokens`` (or ``input_ids``). Every column is exported.
        folder (`str` or `Path`): output folder (created).
        metadata (`Mapping[str, Any]`): the run description, keys named like the fields of
            `hf_longattn.card.CardData` (``model``, ``revision``, ``layer``, ``window_size``,
            ``min_distance``, ``alpha``, ``normalization``, ``keep_fraction``, ``selection_method``,
            ``dtype``, ``hf_longattn_version``, ``sources``, ``max_windows_per_category``, ``license``,
            ``probe`` (``{"title", "text", "table": markdown, "png": path}``)), plus ``categories``:
            category → run counters (``documents``, ``documents_too_short``, ``windows_left_out``,
            ``threshold``). Missing keys show as "—"; secret-looking keys are never written.
        max_shard_rows (`int`, defaults to `2000`): maximum rows per parquet file.
        repo_id (`str`, *optional*): Hub repository shown in the card's loading snippet.
        license (`str`, *optional*): card license; defaults to ``metadata["license"]``, else the
            one license of the rows' ``license`` column, else ``"other"``.
        pretty_name (`str`, *optional*): card title.
        plots (`bool`, defaults to `True`): draw the PNG plots (needs matplotlib).
        overwrite (`bool`, defaults to `False`): replace a previous export in ``folder`` (only
            :data:`OWNED` is replaced); otherwise an existing export raises `FileExistsError`.

    Returns:
        `Path`: ``folder``.

    Example:

    >>> folder = export_dataset(scored, "longabc-export", {"window_size": 32768, "min_distance": 8192})  # doctest: +SKIP
    >>> datasets.load_dataset(str(folder), "filtered")  # doctest: +SKIP
    DatasetDict({arxiv: Dataset(...), book: Dataset(...), code: Dataset(...)})
    """
    from .run.storage import atomic_folder

    if max_shard_rows < 1:
        raise ValueError(f"max_shard_rows must be >= 1, got {max_shard_rows}.")
    _validate(scored)
    mapping = split_names(scored)
    folder = Path(folder)
    existing = [name for name in OWNED if (folder / name).exists() or (folder / name).is_symlink()]
    if existing and not overwrite:
        raise FileExistsError(f"{folder} already holds an export ({', '.join(existing)}); pass overwrite=True to replace it.")
    for name in ("data", *OWNED):
        if (folder / name).is_symlink():
            raise ValueError(f"Refusing to write {name!r}: it is a symlink that resolves outside {folder}.")
    with atomic_folder(folder) as building:
        _keep_other_files(folder, building)
        card = _write_export(scored, building, metadata, mapping, max_shard_rows, plots)
        card.repo_id = repo_id or card.repo_id
        card.license = license or card.license
        card.pretty_name = pretty_name or card.pretty_name
        _inside(building, "README.md").write_text(card.render(), encoding="utf-8")
    return folder


def _keep_other_files(folder: Path, building: Path) -> None:
    """Copy what the export does not own from the old folder into the new one (e.g. a .gitattributes)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name in ("README.md", "plots") or entry.is_symlink():
            continue
        if entry.name == "data" and entry.is_dir():
            for sub in entry.iterdir():
                if sub.name not in ("scored", "filtered") and not sub.is_symlink():
                    (building / "data").mkdir(exist_ok=True)
                    _copy(sub, building / "data" / sub.name)
            continue
        _copy(entry, building / entry.name)


def _copy(source: Path, target: Path) -> None:
    shutil.copytree(source, target, symlinks=True) if source.is_dir() else shutil.copy2(source, target)


def _write_export(scored: Mapping[str, Any], folder: Path, metadata: Mapping[str, Any], mapping: dict[str, str],
                  max_shard_rows: int, plots: bool) -> CardData:
    """Write the parquet configs and plots into ``folder``; return the card's data (not yet rendered)."""
    rows, quantiles, data_files, empty = [], [], {config: [] for config in CONFIGS}, []
    for original, split in mapping.items():
        dataset = scored[original]
        counts, scores, selected, licenses = _split_summary(dataset)
        kept = dataset.select(selected)
        for config, subset in (("scored", dataset), ("filtered", kept)):
            directory = _inside(folder, f"data/{config}")
            directory.mkdir(parents=True, exist_ok=True)
            _write_shards(subset, directory, split, max_shard_rows)
            if config == "scored" or len(subset):
                data_files[config].append({"split": split, "path": f"data/{config}/{split}-*.parquet"})
        if not len(kept):
            empty.append(split)
        run = (metadata.get("categories") or {}).get(original, {})
        threshold = run.get("threshold")
        if threshold is None and selected:  # the lowest LDS_T kept
            threshold = min(v for v in kept.with_format("arrow")[V.LDS].to_pylist() if v is not None)
        rows.append(CategoryRow(original, split, counts["windows"], counts["scored_ok"], counts["kept"],
                                counts["tokens_in"], counts["tokens_out"], counts["not_ok"], threshold,
                                run.get("documents"), run.get("documents_too_short"), run.get("windows_left_out"),
                                licenses))
        for column, label in ((V.DS, "DS_T"), (V.DU, "DU_T"), (V.LDS, "LDS_T")):
            quantile = score_quantiles(scores[column])
            quantiles.append([original, label, len(scores[column]), *(quantile.get(name) for name, _ in QUANTILES)])
        logger.info("Exported split %r: %d rows scored, %d kept.", split, len(dataset), len(kept))
    if not data_files["filtered"]:
        logger.warning("No category kept any row: the `filtered` config lists empty splits only (load it with streaming=True).")
        data_files["filtered"] = [{"split": s, "path": f"data/filtered/{s}-*.parquet"} for s in mapping.values()]
    plot_names = _plots(scored, folder, mapping, rows, metadata) if plots else {}
    plot_names.update(_probe_plot(folder, metadata))
    columns = list(next(iter(scored.values())).column_names)
    return CardData.from_metadata(metadata, categories=rows, quantiles=quantiles, columns=columns,
                                  data_files=data_files, plots=plot_names, empty_filtered_splits=empty)


def _plots(scored: Mapping[str, Any], folder: Path, mapping: dict[str, str], rows: list[CategoryRow],
           metadata: Mapping[str, Any]) -> dict[str, str]:
    from .plots import plot_kept_vs_dropped, plot_score_distributions

    renamed = {split: scored[original] for original, split in mapping.items()}
    thresholds = {row.split: row.threshold for row in rows}
    plot_score_distributions(renamed, thresholds, _inside(folder, f"plots/{PLOT_FILES['scores']}"),
                             normalization=metadata.get("normalization"))
    plot_kept_vs_dropped(renamed, _inside(folder, f"plots/{PLOT_FILES['selection']}"))
    return {"scores": PLOT_FILES["scores"], "selection": PLOT_FILES["selection"]}


def _probe_plot(folder: Path, metadata: Mapping[str, Any]) -> dict[str, str]:
    probe = metadata.get("probe")
    source = probe.get("png") if isinstance(probe, Mapping) else None
    if not source:
        return {}
    if not Path(source).is_file():
        logger.warning("Probe image %s not found; the card shows the probe table only.", source)
        return {}
    target = _inside(folder, f"plots/{PLOT_FILES['probe']}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return {"probe": PLOT_FILES["probe"]}


# -- push ------------------------------------------------------------------------------------------------


def _offline() -> bool:
    """True when huggingface_hub's offline mode or the HF_HUB_OFFLINE env var is on."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE_VALUES


def check_can_push(repo_id: str) -> None:
    """Raise before any work if pushing ``repo_id`` cannot succeed offline-detectably (offline mode, bad id).

    Raises:
        `RuntimeError`: when ``HF_HUB_OFFLINE`` is set (in the environment or in ``huggingface_hub.constants``).
        `ValueError`: when ``repo_id`` is not a valid Hub repository id.

    Example:

    >>> check_can_push("me/longabc-32k")  # doctest: +SKIP
    """
    if _offline():
        raise RuntimeError(f"HF_HUB_OFFLINE=1 is set: cannot push to {repo_id}; unset it or export the folder only.")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"Invalid Hub repo id {repo_id!r}: {err}") from err


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload LongABC dataset with hf_longattn",
) -> str:
    """Create (if needed) a dataset repository and upload an exported folder to it.

    The token is never printed or logged; `None` lets `huggingface_hub` resolve it (``HF_TOKEN``,
    ``hf auth login``).

    Args:
        folder (`str` or `Path`): a folder written by `export_dataset` (must contain ``README.md``).
        repo_id (`str`): target dataset repository, ``"user/name"``.
        private (`bool`, defaults to `False`): create the repository as private (ignored if it exists).
        token (`str`, *optional*): Hub token; defaults to huggingface_hub's usual resolution.
        commit_message (`str`, defaults to `"Upload LongABC dataset with hf_longattn"`): the commit message.

    Returns:
        `str`: the URL of the dataset repository.

    Example:

    >>> push_to_hub("longabc-export", "me/longabc-32k", private=True)  # doctest: +SKIP
    'https://huggingface.co/datasets/me/longabc-32k'
    """
    check_can_push(repo_id)
    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder} has no README.md: export it first with hf_longattn.publication.export_dataset.")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    full_repo_id = getattr(repo_url, "repo_id", None) or repo_id  # namespace resolved by the Hub
    logger.info("Uploading %s to dataset repo %s (private=%s).", folder, full_repo_id, private)
    api.upload_folder(folder_path=str(folder), repo_id=full_repo_id, repo_type="dataset", commit_message=commit_message)
    url = str(repo_url)
    logger.info("Uploaded to %s", url)
    return url

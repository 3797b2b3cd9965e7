"""Export scored LongAttn windows as a Hub-ready dataset folder (parquet configs, plots, dataset card) and push it."""

from __future__ import annotations

import logging
import math
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import vocabulary as V
from .card import QUANTILES, SCORE_LABELS, CardData, CategoryRow, score_quantiles  # noqa: F401 - SCORE_LABELS: its old home
from .counts import format_number, row_counts  # noqa: F401 - format_number: its old home
from .hub import EXPORT_RECORD  # noqa: F401 - the run's record of an export in its folder; not carried over
from .ranking import LONGATTN, SelectionColumns

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_ROWS = 2000
"""Default rows per parquet shard: a 32K-token window is ~0.25 MB (ids + text), so ~500 MB/shard."""
CONFIGS = ("filtered", "scored")
REQUIRED_COLUMNS = (V.ID, V.STATUS, V.SELECTED, V.DS, V.DU, V.LDS)
PLOT_FILES = {"scores": "score_distributions.png", "selection": "kept_vs_dropped.png", "probe": "probe.png"}
OWNED = ("README.md", "data/scored", "data/filtered", "plots")
"""What an export writes in its folder (and replaces with ``overwrite=True``); nothing else is touched."""


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


def required_columns(columns: SelectionColumns = LONGATTN) -> tuple[str, ...]:
    """The columns an export reads: ``id``, the statuses, the flag, the score columns and the selection score."""
    return tuple(dict.fromkeys((V.ID, *columns.statuses, columns.selected, *columns.scores, columns.score)))


def _validate(scored: Mapping[str, Any], selection: SelectionColumns = LONGATTN) -> None:
    """Check that every split has the columns the export needs; list what exists otherwise."""
    if not scored:
        raise ValueError("Cannot export: `scored` has no splits.")
    for name, dataset in scored.items():
        columns = dataset.column_names
        missing = [c for c in required_columns(selection) if c not in columns]
        if selection.num_tokens not in columns and V.INPUT_IDS not in columns:
            missing.append(f"{selection.num_tokens} (or {V.INPUT_IDS})")
        if missing:
            raise ValueError(f"Split {name!r} lacks column(s) {missing} needed for export. Current columns: {columns}")


# -- export ----------------------------------------------------------------------------------------------


def part_name(split: str, part: int, parts: int, tag: str) -> str:
    """``<split>-00000-of-00003-<tag>.parquet``: the Hub's shard naming plus the export's tag.

    The tag changes with the content, so the card's ``data_files`` patterns change with it and
    `datasets` never serves a cached copy of an earlier export of the same folder.
    """
    return f"{split}-{part:05d}-of-{parts:05d}-{tag}.parquet"


class ExportWriter:
    """The parquet files of an export: one *part* per (config, split, part index), written into ``folder/data``."""

    def __init__(self, folder: Path, tag: str, parts: int) -> None:
        self.folder, self.tag, self.parts = folder, tag, parts
        self.rows: dict[tuple[str, str], int] = {}

    def write(self, config: str, split: str, part: int, table: Any) -> None:
        """Write one part atomically (nothing for an empty table: :meth:`finish` adds an empty file where needed)."""
        import pyarrow.parquet as pq

        from .storage import atomic_write

        key = (config, split)
        self.rows.setdefault(key, 0)
        if table.num_rows == 0:
            return
        directory = _inside(self.folder, f"data/{config}")
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(_inside(directory, part_name(split, part, self.parts, self.tag)),
                     lambda tmp: pq.write_table(table, tmp))
        self.rows[key] += table.num_rows

    def files(self, config: str = "scored") -> list[Path]:
        """The part files of one config written so far (by any task), sorted."""
        return sorted((self.folder / "data" / config).glob(f"*-{self.tag}.parquet"))

    def scan(self) -> ExportWriter:
        """Count the rows of the parts already in the folder (written by other tasks); returns ``self``."""
        import pyarrow.parquet as pq

        for config in CONFIGS:
            for path in self.files(config):
                split = path.name.rsplit("-", 4)[0]
                self.rows[(config, split)] = self.rows.get((config, split), 0) + pq.read_metadata(path).num_rows
        return self

    def schema(self) -> Any:
        """The Arrow schema of the parts (of the first scored one)."""
        import pyarrow.parquet as pq

        return pq.read_schema(self.files()[0])

    def licenses(self) -> dict[str, list[str]]:
        """Category → the distinct licenses of its exported rows (read from the scored parts)."""
        import pyarrow.parquet as pq

        found: dict[str, set[str]] = {}
        for path in self.files():
            table = pq.read_table(path, columns=[V.CATEGORY, V.LICENSE])
            for category, license_name in zip(table.column(V.CATEGORY).to_pylist(), table.column(V.LICENSE).to_pylist()):
                if license_name:
                    found.setdefault(category, set()).add(license_name)
        return {category: sorted(names) for category, names in found.items()}

    def finish(self, splits: list[str], schema: Any) -> tuple[dict[str, list[dict[str, str]]], list[str]]:
        """Give every split of every config at least one (possibly empty) file; return the card's data files and
        the splits that kept nothing (left out of the ``filtered`` config: `datasets` cannot load an empty split)."""
        import pyarrow.parquet as pq

        data_files: dict[str, list[dict[str, str]]] = {config: [] for config in CONFIGS}
        for config in CONFIGS:
            for split in splits:
                if not self.rows.get((config, split)):  # no row group at all: `datasets` reads it as empty
                    directory = _inside(self.folder, f"data/{config}")
                    directory.mkdir(parents=True, exist_ok=True)
                    pq.ParquetWriter(_inside(directory, part_name(split, 0, 1, self.tag)), schema).close()
                entry = {"split": split, "path": f"data/{config}/{split}-*-{self.tag}.parquet"}
                if config == "scored" or self.rows.get((config, split)):
                    data_files[config].append(entry)
        empty = [split for split in splits if not self.rows.get(("filtered", split))]
        if not data_files["filtered"]:
            logger.warning("No category kept any row: the `filtered` config lists empty splits only (load it with streaming=True).")
            data_files["filtered"] = [{"split": s, "path": f"data/filtered/{s}-*-{self.tag}.parquet"} for s in splits]
        return data_files, empty


def split_summary(table: Any, selection: SelectionColumns = LONGATTN) -> tuple[dict[str, Any], dict[str, list[float]], list[str]]:
    """Counts (`hf_longattn.counts.row_counts`), the ok rows' finite scores per score column, and the licenses of a split."""
    import pyarrow as pa

    from .ranking import table_status

    counts = row_counts(table, selection)
    ok = pa.array([s == V.OK for s in table_status(table, selection.statuses)], pa.bool_())
    scores = {}
    for column in dict.fromkeys((*selection.scores, selection.score)):
        values = table.column(column).filter(ok).to_pylist()
        scores[column] = [float(v) for v in values if v is not None and math.isfinite(v)]
    licenses = sorted({str(v) for v in table.column(V.LICENSE).to_pylist() if v}) if V.LICENSE in table.column_names else []
    return counts, scores, licenses


def category_row(category: str, split: str, table: Any, run_counts: Mapping[str, Any],
                 selection: SelectionColumns = LONGATTN) -> tuple[CategoryRow, list[list]]:
    """The card's row for one category, and its quantile rows, from its scored rows (and the run's own counters)."""
    counts, scores, licenses = split_summary(table, selection)
    threshold = run_counts.get("threshold")
    if threshold is None and counts["kept"]:  # the lowest selection score kept
        import pyarrow.compute as pc

        threshold = pc.min(table.column(selection.score).filter(pc.fill_null(table.column(selection.selected), False))).as_py()
    row = CategoryRow(category, split, counts["windows"], counts["scored_ok"], counts["kept"], counts["tokens_in"],
                      counts["tokens_out"], counts["not_ok"], threshold, run_counts.get("documents"),
                      run_counts.get("documents_too_short"), run_counts.get("windows_left_out"), licenses)
    quantiles = []
    for column in scores:
        label = selection.label_of(column)
        quantile = score_quantiles(scores[column])
        quantiles.append([category, label, len(scores[column]), *(quantile.get(name) for name, _ in QUANTILES)])
    return row, quantiles


def finish_export(folder: Path, metadata: Mapping[str, Any], scored: Mapping[str, Any], rows: list[CategoryRow],
                  quantiles: list[list], columns: list[str], data_files: dict, empty: list[str], *, plots: bool,
                  repo_id: str | None, license: str | None, pretty_name: str | None, tag: str,
                  probe_png: Path | None = None, selection: SelectionColumns = LONGATTN,
                  card_fields: Mapping[str, Any] | None = None) -> CardData:
    """Plots (from ``scored``: split → rows with the score columns), the probe image and the card ``README.md``."""
    probe = metadata.get("probe")
    if isinstance(probe, Mapping) and "png" in probe:  # a path on this machine: copied into plots/, never published
        probe_png = probe_png or Path(probe["png"])
        metadata = {**metadata, "probe": {key: value for key, value in probe.items() if key != "png"}}
    plot_names = _plots(scored, folder, rows, metadata, selection) if plots else {}
    plot_names.update(_probe_plot(folder, probe_png))
    card = CardData.from_metadata(metadata, categories=rows, quantiles=quantiles, columns=columns, data_files=data_files,
                                  plots=plot_names, empty_filtered_splits=empty, repo_id=repo_id or None,
                                  license=license or None, pretty_name=pretty_name or None, **(card_fields or {}))
    _inside(folder, "README.md").write_text(card.render(), encoding="utf-8")
    return card


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
    selection: SelectionColumns = LONGATTN,
) -> Path:
    """Write scored LongAttn windows as a Hub-ready dataset folder with two configs and a dataset card.

    Layout written under ``folder`` (``<tag>``: a short hash of the content, see :func:`part_name`)::

        README.md                                         dataset card (YAML configs + markdown)
        data/scored/<split>-00000-of-0000N-<tag>.parquet  every window
        data/filtered/<split>-00000-of-0000N-<tag>.parquet windows with longattn_selected == True
        plots/score_distributions.png                     DS_T / DU_T / LDS_T histograms per category
        plots/kept_vs_dropped.png                         windows kept / dropped / not ok per category
        plots/probe.png                                   only if ``metadata["probe"]`` has an image

    Split names are sanitised to ``[A-Za-z0-9_]+`` (see `sanitize_split_name`) so no category name
    can write outside ``folder``. A category that kept no rows still gets a (valid, empty) parquet
    file in ``data/filtered/`` but is left out of the ``filtered`` config, because `datasets`
    cannot load an empty split; if no category kept anything, the config lists them all. The
    folder is built under a temporary name and swapped in whole: an interrupted export leaves the
    previous one (or none), never a partial one.

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
            ``probe`` (``{"title", "text", "table": markdown, "png": path}``; the image is copied into
            ``plots/``, its path is not published)), plus ``categories``:
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
        selection (`hf_longattn.ranking.SelectionColumns`, defaults to LongAttn's): the status, score and flag
            columns of the selection (`LongAttnSelector.columns` of a selector of another scorer).

    Returns:
        `Path`: ``folder``.

    Example:

    >>> folder = export_dataset(scored, "longabc-export", {"window_size": 32768, "min_distance": 8192})  # doctest: +SKIP
    >>> datasets.load_dataset(str(folder), "filtered")  # doctest: +SKIP
    DatasetDict({arxiv: Dataset(...), book: Dataset(...), code: Dataset(...)})
    """
    from .storage import atomic_folder

    if max_shard_rows < 1:
        raise ValueError(f"max_shard_rows must be >= 1, got {max_shard_rows}.")
    _validate(scored, selection)
    mapping = split_names(scored)
    folder = Path(folder)
    check_export_folder(folder, overwrite)
    tag = content_tag([getattr(d, "_fingerprint", None) or repr(d) for d in scored.values()], metadata, max_shard_rows)
    with atomic_folder(folder) as building:
        _keep_other_files(folder, building)
        rows, quantiles = _write_splits(scored, building, mapping, metadata, max_shard_rows, tag, selection)
        writer = ExportWriter(building, tag, 1)
        writer.rows = {("scored", r.split): r.windows for r in rows} | {("filtered", r.split): r.kept for r in rows}
        schema = next(iter(scored.values())).features.arrow_schema
        data_files, empty = writer.finish(list(mapping.values()), schema)
        renamed = {split: scored[original] for original, split in mapping.items()}
        finish_export(building, metadata, renamed, rows, quantiles, list(next(iter(scored.values())).column_names),
                      data_files, empty, plots=plots, repo_id=repo_id, license=license, pretty_name=pretty_name, tag=tag,
                      selection=selection)
    return folder


def content_tag(parts: list[Any], *more: Any) -> str:
    """A 12-hex tag of an export's content (see :func:`part_name`)."""
    from .storage import json_sha256

    return json_sha256([parts, *more])[:12]


def check_export_folder(folder: Path, overwrite: bool) -> None:
    """Refuse an existing export without ``overwrite``, and any symlink where the export writes."""
    existing = [name for name in OWNED if (folder / name).exists() or (folder / name).is_symlink()]
    if existing and not overwrite:
        raise FileExistsError(f"{folder} already holds an export ({', '.join(existing)}); pass overwrite=True to replace it.")
    for name in ("data", *OWNED):
        if (folder / name).is_symlink():
            raise ValueError(f"Refusing to write {name!r}: it is a symlink that resolves outside {folder}.")


def _write_splits(scored: Mapping[str, Any], folder: Path, mapping: dict[str, str], metadata: Mapping[str, Any],
                  max_shard_rows: int, tag: str, selection: SelectionColumns = LONGATTN) -> tuple[list[CategoryRow], list[list]]:
    """Write every split's parts of both configs; return the card's category and quantile rows."""
    rows, quantiles = [], []
    for original, split in mapping.items():
        dataset = scored[original]
        wanted = [c for c in (*required_columns(selection), selection.num_tokens, V.INPUT_IDS, V.LICENSE)
                  if c in dataset.column_names]
        table = dataset.select_columns(wanted).with_format("arrow")[:]
        row, quantile = category_row(original, split, table, (metadata.get("categories") or {}).get(original, {}), selection)
        rows.append(row)
        quantiles += quantile
        selected = [i for i, s in enumerate(table.column(selection.selected).to_pylist()) if s]
        for config, subset in (("scored", dataset), ("filtered", dataset.select(selected))):
            parts = max(1, math.ceil(len(subset) / max_shard_rows))
            for index in range(parts):
                piece = subset.shard(num_shards=parts, index=index, contiguous=True) if parts > 1 else subset
                directory = _inside(folder, f"data/{config}")
                directory.mkdir(parents=True, exist_ok=True)
                if len(piece):
                    piece.to_parquet(str(_inside(directory, part_name(split, index, parts, tag))))
        logger.info("Exported split %r: %d rows scored, %d kept.", split, len(dataset), len(selected))
    return rows, quantiles


def _keep_other_files(folder: Path, building: Path) -> None:
    """Copy what the export does not own from the old folder into the new one (e.g. a .gitattributes)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name in ("README.md", "plots", EXPORT_RECORD) or entry.is_symlink():
            continue
        if entry.name == "data" and entry.is_dir():
            for sub in entry.iterdir():
                if sub.name not in ("scored", "filtered") and not sub.is_symlink():
                    (building / "data").mkdir(exist_ok=True)
                    _copy(sub, building / "data" / sub.name)
        elif not (building / entry.name).exists():
            _copy(entry, building / entry.name)


def _copy(source: Path, target: Path) -> None:
    shutil.copytree(source, target, symlinks=True) if source.is_dir() else shutil.copy2(source, target)


def _plots(scored: Mapping[str, Any], folder: Path, rows: list[CategoryRow], metadata: Mapping[str, Any],
           selection: SelectionColumns = LONGATTN) -> dict[str, str]:
    from .plots import plot_kept_vs_dropped, plot_score_distributions

    thresholds = {row.split: row.threshold for row in rows}
    plot_score_distributions(scored, thresholds, _inside(folder, f"plots/{PLOT_FILES['scores']}"),
                             normalization=metadata.get("normalization"), columns=selection)
    plot_kept_vs_dropped(scored, _inside(folder, f"plots/{PLOT_FILES['selection']}"), selection)
    return {"scores": PLOT_FILES["scores"], "selection": PLOT_FILES["selection"]}


def _probe_plot(folder: Path, source: Path | None) -> dict[str, str]:
    """Copy the probe's image into ``plots/`` (the card names it there, never by the path it came from)."""
    if not source:
        return {}
    if not Path(source).is_file():
        logger.warning("Probe image %s not found; the card shows the probe table only.", source)
        return {}
    target = _inside(folder, f"plots/{PLOT_FILES['probe']}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return {"probe": PLOT_FILES["probe"]}


# -- push: `hf_longattn.hub` (their home since 0.3) --------------------------------------------------------

from .hub import check_can_push, check_token, push_to_hub  # noqa: E402,F401

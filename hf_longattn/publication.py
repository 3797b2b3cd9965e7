"""Export scored LongAttn windows as a Hub-ready dataset folder (parquet, plots, dataset card) and push it."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Default rows per parquet shard: a 32K-token window is ~0.25 MB (ids + text), so ~500 MB/shard.
DEFAULT_MAX_SHARD_ROWS = 2000
CONFIGS = ("filtered", "scored")
SCORE_COLUMNS = {"longattn_ds": "DS_T", "longattn_du": "DU_T", "longattn_lds": "LDS_T"}
REQUIRED_COLUMNS = ("id", "longattn_status", "longattn_selected", *SCORE_COLUMNS)
QUANTILES = (("min", 0.0), ("5%", 0.05), ("25%", 0.25), ("50%", 0.5), ("75%", 0.75), ("95%", 0.95), ("max", 1.0))
PLOT_FILES = {
    "scores": "score_distributions.png",
    "selection": "kept_vs_dropped.png",
    "probe": "probe.png",
}
COLUMN_DOCS = {
    "id": "stable window id (source document id + window index)",
    "doc_id": "id of the source document",
    "window_index": "index of the window within its document",
    "window_start": "first token offset of the window in the document",
    "window_end": "end token offset (exclusive) of the window in the document",
    "input_ids": "token ids of the window (scored as is, no re-tokenisation)",
    "text": "decoded text of the window",
    "category": "source category (one split per category)",
    "longattn_ds": "DS_T, dependency strength (null when status is not ok)",
    "longattn_du": "DU_T, dependency uniformity (null when status is not ok)",
    "longattn_num_tokens": "number of tokens scored",
    "longattn_status": '"ok" or the reason the window was not scored',
    "longattn_lds": "LDS_T, the selection score within the category (null when status is not ok)",
    "longattn_selected": "true when the window is in the `filtered` config",
}
LONGATTN_BIBTEX = """@article{wu2025longattn,
  title   = {LongAttn: Selecting Long-context Training Data via Token-level Attention},
  author  = {Wu, Longyun and Zhu, Dawei and Zhao, Guangxiang and Yu, Zhuocheng and Ran, Junfeng and Wong, Xiangyu and Sun, Lin and Li, Sujian},
  journal = {arXiv preprint arXiv:2502.16860},
  year    = {2025},
  url     = {https://arxiv.org/abs/2502.16860}
}"""
_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key|apikey)$", re.IGNORECASE)
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


# --------------------------------------------------------------------------------------------
# names and paths
# --------------------------------------------------------------------------------------------


def sanitize_split_name(name: str) -> str:
    """Turn a category or split name into a valid, path-safe split name matching ``[A-Za-z0-9_]+``.

    Runs of other characters become one ``_``; leading/trailing ``_`` are dropped; an empty
    result becomes ``"split"`` and ``"all"`` (reserved by `datasets`) becomes ``"all_"``.

    Args:
        name (`str`): a category or split name, possibly unsafe (``"../../evil"``).

    Returns:
        `str`: the sanitised split name.

    Example:

    ```py
    >>> sanitize_split_name("../../evil"), sanitize_split_name("Stack Exchange"), sanitize_split_name("all")
    ('evil', 'Stack_Exchange', 'all_')
    ```
    """
    cleaned = re.sub(r"[^A-Za-z0-9_]+", "_", str(name)).strip("_") or "split"
    if cleaned.lower() == "all":
        cleaned += "_"
    return cleaned


def _split_names(scored: Mapping[str, Any]) -> dict[str, str]:
    """Map every original split name to its sanitised name; raise if two collide."""
    mapping = {original: sanitize_split_name(original) for original in scored}
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


# --------------------------------------------------------------------------------------------
# statistics for the card
# --------------------------------------------------------------------------------------------


def _validate(scored: Mapping[str, Any]) -> None:
    """Check that every split has the columns the export needs; list what exists otherwise."""
    if not scored:
        raise ValueError("Cannot export: `scored` has no splits.")
    for name, dataset in scored.items():
        columns = dataset.column_names
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if "longattn_num_tokens" not in columns and "input_ids" not in columns:
            missing.append("longattn_num_tokens (or input_ids)")
        if missing:
            raise ValueError(
                f"Split {name!r} lacks column(s) {missing} needed for export. Current columns: {columns}"
            )


def _split_stats(dataset: Any) -> dict[str, Any]:
    """Count rows, tokens, statuses and collect ok scores of one scored split."""
    import pyarrow.compute as pc

    names = ["longattn_status", "longattn_selected", *SCORE_COLUMNS]
    token_column = "longattn_num_tokens" if "longattn_num_tokens" in dataset.column_names else "input_ids"
    table = dataset.select_columns([*names, token_column]).with_format("arrow")[:]
    if token_column == "input_ids":
        tokens = pc.fill_null(pc.list_value_length(table.column("input_ids")), 0).to_pylist()
    else:
        tokens = [t or 0 for t in table.column(token_column).to_pylist()]
    status = table.column("longattn_status").to_pylist()
    selected = [bool(s) for s in table.column("longattn_selected").to_pylist()]
    scores = {
        column: [
            float(v)
            for st, v in zip(status, table.column(column).to_pylist())
            if st == "ok" and v is not None and math.isfinite(v)
        ]
        for column in SCORE_COLUMNS
    }
    return {
        "rows": len(status),
        "ok": sum(st == "ok" for st in status),
        "kept": sum(selected),
        "tokens_in": int(sum(tokens)),
        "tokens_out": int(sum(t for t, s in zip(tokens, selected) if s)),
        "status": Counter(st for st in status if st != "ok"),
        "selected_indices": [i for i, s in enumerate(selected) if s],
        "scores": scores,
        "min_kept_lds": min(
            (v for v, s, st in zip(table.column("longattn_lds").to_pylist(), selected, status)
             if s and st == "ok" and v is not None),
            default=None,
        ),
    }


def score_quantiles(values: list[float]) -> dict[str, float]:
    """Return the min, 5%, 25%, 50%, 75%, 95% and max of ``values`` (linear interpolation, as `numpy.quantile`).

    Args:
        values (`list[float]`): finite scores; an empty list gives an empty dict.

    Returns:
        `dict[str, float]`: quantile label → value.

    Example:

    ```py
    >>> score_quantiles([0.0, 1.0, 2.0, 3.0, 4.0])["50%"]
    2.0
    ```
    """
    if not values:
        return {}
    import numpy as np

    qs = np.quantile(np.asarray(values, dtype=np.float64), [q for _, q in QUANTILES])
    return {label: float(v) for (label, _), v in zip(QUANTILES, qs)}


def format_number(value: Any) -> str:
    """Format a card number: ints with thousands separators, floats with 4 significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _size_category(n: int) -> str:
    """The Hub's ``size_categories`` tag for ``n`` rows."""
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
                         (1_000_000_000, "100M<n<1B")):
        if n < limit:
            return label
    return "1B<n<10B"


# --------------------------------------------------------------------------------------------
# dataset card
# --------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    """A markdown table cell: numbers formatted, pipes and newlines escaped."""
    return format_number(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """Render a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _first(metadata: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    """The value of the first of ``keys`` present in ``metadata``."""
    for key in keys:
        if metadata.get(key) is not None:
            return metadata[key]
    return default


def _public_metadata(value: Any) -> Any:
    """A JSON-safe copy of ``value`` without secret-looking keys (``token``, ``hf_token``, ``api_key``...)."""
    if isinstance(value, Mapping):
        return {str(k): _public_metadata(v) for k, v in value.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [_public_metadata(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _summary_by_split(metadata: Mapping[str, Any], mapping: Mapping[str, str]) -> dict[str, dict]:
    """The metadata's per-category summary rows, keyed by sanitised split name."""
    rows = _first(metadata, "summary", "categories", "per_category", default=[]) or []
    if isinstance(rows, Mapping):
        rows = [{"group": k, **v} for k, v in rows.items()]
    by_split: dict[str, dict] = {}
    for row in rows:
        if isinstance(row, Mapping) and row.get("group") is not None:
            group = str(row["group"])
            by_split[mapping.get(group, sanitize_split_name(group))] = dict(row)
    return by_split


def _counters_section(metadata: Mapping[str, Any]) -> str:
    """Render the documents/windows counters of the run, if any."""
    parts = []
    for key in ("documents", "windows"):
        value = metadata.get(key)
        if value is None:
            continue
        if isinstance(value, Mapping):
            parts.append(f"**{key.capitalize()}**\n\n" + _table(["counter", "value"], [[k, v] for k, v in value.items()]))
        else:
            parts.append(f"**{key.capitalize()}**: {format_number(value)}")
    return "\n\n".join(parts)


def _probe_section(probe: Any, plot_name: str | None) -> str:
    """Render the optional probe section (a markdown table and an image)."""
    if isinstance(probe, str):
        probe = {"table": probe}
    title = probe.get("title", "Probe")
    parts = [f"## {title}"]
    for key in ("description", "text"):
        if probe.get(key):
            parts.append(str(probe[key]))
    table = _first(probe, "table", "markdown")
    if table:
        parts.append(str(table).strip())
    if plot_name:
        parts.append(f"![{title}](plots/{plot_name})")
    return "\n\n".join(parts)


def _card_body(
    *,
    metadata: Mapping[str, Any],
    mapping: Mapping[str, str],
    stats: Mapping[str, dict],
    plots: Mapping[str, str],
    filtered_splits: list[str],
    repo_id: str | None,
    pretty_name: str,
) -> str:
    """Build the markdown body of the dataset card."""
    m = metadata
    window_size = _first(m, "window_size", "W")
    min_distance = _first(m, "min_distance", "k")
    alpha = _first(m, "alpha")
    normalization = _first(m, "normalization")
    keep_fraction = _first(m, "keep_fraction")
    selection = _first(m, "selection_method", "selection")
    summary = _summary_by_split(m, mapping)
    repo = repo_id or _first(m, "repo_id", default="<user>/<dataset>")
    lines: list[str] = [f"# {pretty_name}", ""]
    lines += [
        "Long-context training windows scored and selected with **LongAttn** "
        "([Wu et al., 2025, arXiv 2502.16860](https://arxiv.org/abs/2502.16860)), "
        "in the style of the paper's LongABC-32K, produced by "
        f"`hf_longattn` {_first(m, 'hf_longattn_version', 'version', default='')}".rstrip() + ".",
        "",
        "- `filtered` (default config): the selected windows only (`longattn_selected == true`).",
        "- `scored`: every window with its LongAttn scores, kept or not.",
        "",
        "One split per source category; categories are scored and selected separately.",
        "",
        "## Method",
        "",
        f"Method: **{_first(m, 'method', default='LongAttn (arXiv 2502.16860)')}**. Every document of at least "
        "W tokens is cut into windows of W tokens (paper Algorithm 1). Each window is run through the "
        "**first decoder layer** of the scoring model; for each attention head h the causal softmax attention "
        "map M_h (L×L, row n = query, column i = key, rows sum to 1) is restricted to the far region "
        "F = {(n, i) : n − i ≥ k} (keys at least k tokens back):",
        "",
        "$$P_h = \\frac{1}{L}\\sum_{(n,i)\\in F} M_h[n,i], \\qquad "
        "V_h = \\operatorname{Var}_{\\text{all } L^2 \\text{ entries}}\\big(M_h \\odot \\mathbb{1}_F\\big)$$",
        "",
        "- **DS_T** (dependency strength, `longattn_ds`) = mean_h P_h: the mean attention mass a query row "
        "puts on keys at least k tokens back (0–1). Higher = stronger long-range dependency.",
        "- **DU_T** (dependency uniformity, `longattn_du`) = −mean_h V_h, V_h the unbiased variance over all "
        "L² entries of M_h·1_F (entries outside F count as zeros). Closer to 0 = more uniform long-range attention.",
        "- **LDS_T** (`longattn_lds`), the selection score, computed within each category: "
        + (
            "LDS_T = Z(DS_T) + α·Z(DU_T), Z the z-score over the category's scored windows."
            if normalization == "zscore"
            else "LDS_T = N(DS_T) + α·N(DU_T), N the min-max normalisation to [0, 1] over the category's "
            "scored windows (all equal → 0.5)."
            if normalization == "minmax"
            else f"LDS_T = N(DS_T) + α·N(DU_T), N the normalisation `{format_number(normalization)}`."
        ),
        "",
        (
            "Selection method `random`: a baseline that keeps the keep fraction of each category's "
            "windows uniformly at random (scores are still reported)."
            if selection == "random"
            else "Windows are ranked by LDS_T within each category and the top keep fraction is kept "
            f"(selection method `{format_number(selection)}`)."
        )
        + " hf_longattn always uses the causal attention map and accumulates the sums in float32 or better.",
        "",
        "## Run configuration",
        "",
        _table(
            ["setting", "value"],
            [
                ["scoring model", _first(m, "model", "model_name_or_path")],
                ["model revision", _first(m, "revision")],
                ["layer scored", _first(m, "layer")],
                ["window size W (tokens)", window_size],
                ["min distance k (tokens)", min_distance],
                ["alpha (α, weight of DU_T)", alpha],
                ["normalization", normalization],
                ["keep fraction", keep_fraction],
                ["selection method", selection],
                ["dtype", _first(m, "dtype", "torch_dtype")],
                ["hf_longattn version", _first(m, "hf_longattn_version", "version")],
            ],
        ),
        "",
        "## Rows and tokens per category",
        "",
        "Tokens are the sum of `longattn_num_tokens` (or of `len(input_ids)`). *In* = the `scored` config, "
        "*out* = the `filtered` config; the threshold is the lowest LDS_T kept.",
        "",
    ]
    table_rows = []
    totals = Counter()
    for original, split in mapping.items():
        s = stats[split]
        threshold = summary.get(split, {}).get("threshold", s["min_kept_lds"])
        share = s["tokens_out"] / s["tokens_in"] if s["tokens_in"] else None
        table_rows.append([original, f"`{split}`", s["rows"], s["ok"], s["kept"], s["tokens_in"],
                           s["tokens_out"], f"{share:.1%}" if share is not None else None, threshold])
        totals.update({k: s[k] for k in ("rows", "ok", "kept", "tokens_in", "tokens_out")})
    share = totals["tokens_out"] / totals["tokens_in"] if totals["tokens_in"] else None
    table_rows.append(["**total**", "", totals["rows"], totals["ok"], totals["kept"], totals["tokens_in"],
                       totals["tokens_out"], f"{share:.1%}" if share is not None else None, None])
    lines += [
        _table(["category", "split", "rows in", "rows ok", "rows out", "tokens in", "tokens out",
                "tokens kept", "LDS_T threshold"], table_rows),
        "",
    ]
    empty = [split for split in mapping.values() if split not in filtered_splits]
    if empty:
        lines += [
            f"Split(s) {', '.join(f'`{s}`' for s in empty)} kept no rows: their empty parquet file is in "
            "`data/filtered/` but they are left out of the `filtered` config, since `datasets` cannot "
            "load an empty split (load them with `streaming=True` or pyarrow).",
            "",
        ]
    lines += [
        "## Score quantiles",
        "",
        "Over windows with status `ok`, per category (DS_T: attention mass, 0–1; DU_T: −variance, "
        "probability²; LDS_T: normalised units).",
        "",
    ]
    quantile_rows = []
    for original, split in mapping.items():
        for column, label in SCORE_COLUMNS.items():
            values = stats[split]["scores"][column]
            q = score_quantiles(values)
            quantile_rows.append([original, label, len(values), *(q.get(name) for name, _ in QUANTILES)])
    lines += [_table(["category", "score", "n", *(name for name, _ in QUANTILES)], quantile_rows), ""]

    lines += ["## Windows not scored", ""]
    status_totals: Counter = Counter()
    for s in stats.values():
        status_totals.update(s["status"])
    if status_totals:
        statuses = sorted(status_totals)
        lines += [
            "Rows whose `longattn_status` is not `ok` have null scores and are never selected.",
            "",
            _table(["category", *(f"`{st}`" for st in statuses), "total"],
                   [[orig, *(stats[split]["status"].get(st, 0) for st in statuses),
                     sum(stats[split]["status"].values())] for orig, split in mapping.items()]),
            "",
        ]
    else:
        lines += ["Every window was scored (`longattn_status == \"ok\"` for all rows).", ""]
    dropped_rows = [[row.get("group"), k, v] for split, row in summary.items()
                    for k, v in (row.get("dropped") or {}).items()]
    if dropped_rows:
        lines += ["Reported by the selection step (dropped before or during scoring):", "",
                  _table(["category", "reason", "count"], dropped_rows), ""]
    counters = _counters_section(m)
    if counters:
        lines += ["## Run counters", "", counters, ""]

    if plots.get("scores") or plots.get("selection"):
        lines += ["## Plots", ""]
        if plots.get("scores"):
            lines += [f"![LongAttn score distributions per category](plots/{plots['scores']})", ""]
        if plots.get("selection"):
            lines += [f"![Windows kept, dropped and not scored per category](plots/{plots['selection']})", ""]
    if m.get("probe"):
        lines += [_probe_section(m["probe"], plots.get("probe")), ""]

    lines += [
        "## Columns",
        "",
        _table(["column", "description"],
               [[f"`{c}`", COLUMN_DOCS.get(c, "")] for c in next(iter(stats.values()))["columns"]]),
        "",
        "## How to load",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'filtered = load_dataset("{repo}", "filtered")  # selected windows, one split per category',
        f'scored = load_dataset("{repo}", "scored")      # every window with its scores',
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        LONGATTN_BIBTEX,
        "```",
        "",
        "<details><summary>Full run metadata</summary>",
        "",
        "```json",
        json.dumps(_public_metadata(m), indent=2, sort_keys=True, ensure_ascii=False),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


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
            One scored split per category, with at least the columns ``id``, ``longattn_status``,
            ``longattn_selected``, ``longattn_ds``, ``longattn_du``, ``longattn_lds`` and
            ``longattn_num_tokens`` (or ``input_ids``). Every column is exported.
        folder (`str` or `Path`):
            Output folder (created).
        metadata (`Mapping[str, Any]`):
            The run description: ``method``, ``model``, ``revision``, ``layer``, ``window_size``,
            ``min_distance``, ``alpha``, ``normalization``, ``keep_fraction``, ``selection_method``
            (or ``selection``), ``dtype``, ``hf_longattn_version``, ``summary`` (list of dicts with
            ``group``, ``rows``, ``valid``, ``kept``, ``threshold``, ``dropped``), ``documents``,
            ``windows`` and optionally ``probe`` (``{"title", "table": markdown, "png": path}``) and
            ``license``. Missing keys show as "—"; secret-looking keys (``token``...) are never written.
        max_shard_rows (`int`, defaults to `2000`):
            Maximum rows per parquet file.
        repo_id (`str`, *optional*):
            Hub repository shown in the card's loading snippet.
        license (`str`, *optional*):
            Card license; defaults to ``metadata["license"]`` or ``"other"`` (the sources' licenses apply).
        pretty_name (`str`, *optional*):
            Card title; defaults to ``"LongABC-style LongAttn selection"``.
        plots (`bool`, defaults to `True`):
            Draw the PNG plots (needs matplotlib: `pip install hf-longattn[plots]`).
        overwrite (`bool`, defaults to `False`):
            Replace a previous export in ``folder`` (only ``README.md``, ``data/scored``,
            ``data/filtered`` and ``plots`` are removed); otherwise an existing export raises.

    Returns:
        `Path`: ``folder``.

    Example:

    ```py
    >>> from hf_longattn.publication import export_dataset
    >>> folder = export_dataset(scored, "longabc-export", {"window_size": 32768, "min_distance": 8192, "alpha": 0.5})
    >>> from datasets import load_dataset
    >>> load_dataset(str(folder), "filtered")
    DatasetDict({arxiv: Dataset(...), book: Dataset(...), code: Dataset(...)})
    ```
    """
    if max_shard_rows < 1:
        raise ValueError(f"max_shard_rows must be >= 1, got {max_shard_rows}.")
    _validate(scored)
    mapping = _split_names(scored)
    folder = Path(folder)
    owned = ["README.md", "data/scored", "data/filtered", "plots"]
    existing = [name for name in owned if (folder / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{folder} already holds an export ({', '.join(existing)}); pass overwrite=True to replace it."
        )
    for name in existing:
        path = _inside(folder, name)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    folder.mkdir(parents=True, exist_ok=True)

    stats: dict[str, dict] = {}
    data_files: dict[str, list[dict[str, str]]] = {config: [] for config in CONFIGS}
    filtered_splits: list[str] = []
    for original, split in mapping.items():
        dataset = scored[original]
        split_stats = _split_stats(dataset)
        split_stats["columns"] = list(dataset.column_names)
        stats[split] = split_stats
        kept = dataset.select(split_stats["selected_indices"])
        for config, subset in (("scored", dataset), ("filtered", kept)):
            directory = _inside(folder, f"data/{config}")
            directory.mkdir(parents=True, exist_ok=True)
            _write_shards(subset, directory, split, max_shard_rows)
            entry = {"split": split, "path": f"data/{config}/{split}-*.parquet"}
            if config == "scored" or len(subset):
                data_files[config].append(entry)
        if len(kept):
            filtered_splits.append(split)
        logger.info("Exported split %r: %d rows scored, %d kept.", split, len(dataset), len(kept))
    if not data_files["filtered"]:
        logger.warning("No category kept any row: the `filtered` config lists empty splits only "
                       "(load it with streaming=True).")
        data_files["filtered"] = [
            {"split": split, "path": f"data/filtered/{split}-*.parquet"} for split in mapping.values()
        ]

    plot_names: dict[str, str] = {}
    if plots:
        from .plots import plot_kept_vs_dropped, plot_score_distributions

        renamed = {split: scored[original] for original, split in mapping.items()}
        summary = _summary_by_split(metadata, mapping)
        thresholds = {split: summary.get(split, {}).get("threshold", stats[split]["min_kept_lds"])
                      for split in renamed}
        plot_score_distributions(renamed, thresholds, _inside(folder, f"plots/{PLOT_FILES['scores']}"),
                                 normalization=_first(metadata, "normalization"))
        plot_kept_vs_dropped(renamed, _inside(folder, f"plots/{PLOT_FILES['selection']}"))
        plot_names["scores"] = PLOT_FILES["scores"]
        plot_names["selection"] = PLOT_FILES["selection"]
    probe = metadata.get("probe")
    if isinstance(probe, Mapping):
        source = _first(probe, "png", "plot", "image", "path")
        if source and Path(source).is_file():
            target = _inside(folder, f"plots/{PLOT_FILES['probe']}")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            plot_names["probe"] = PLOT_FILES["probe"]
        elif source:
            logger.warning("Probe image %s not found; the card shows the probe table only.", source)

    _write_card(
        folder,
        metadata=metadata,
        mapping=mapping,
        stats=stats,
        plots=plot_names,
        data_files=data_files,
        filtered_splits=filtered_splits,
        repo_id=repo_id,
        license=license or _first(metadata, "license", default="other"),
        pretty_name=pretty_name or "LongABC-style LongAttn selection",
    )
    return folder


def _write_card(
    folder: Path,
    *,
    metadata: Mapping[str, Any],
    mapping: Mapping[str, str],
    stats: Mapping[str, dict],
    plots: Mapping[str, str],
    data_files: Mapping[str, list[dict[str, str]]],
    filtered_splits: list[str],
    repo_id: str | None,
    license: str,
    pretty_name: str,
) -> Path:
    """Write ``README.md``: `DatasetCardData` YAML (configs, license, tags, sizes) + the markdown body."""
    from huggingface_hub import DatasetCard, DatasetCardData

    total_rows = sum(s["rows"] for s in stats.values())
    card_data = DatasetCardData(
        license=license,
        pretty_name=pretty_name,
        task_categories=["text-generation"],
        size_categories=[_size_category(total_rows)],
        language=_first(metadata, "language"),
        source_datasets=_first(metadata, "source_datasets"),
        tags=["long-context", "data-selection", "longattn", "pretraining", "hf-longattn"],
        configs=[
            {"config_name": "filtered", "default": True, "data_files": data_files["filtered"]},
            {"config_name": "scored", "data_files": data_files["scored"]},
        ],
    )
    body = _card_body(metadata=metadata, mapping=mapping, stats=stats, plots=plots,
                      filtered_splits=filtered_splits, repo_id=repo_id, pretty_name=pretty_name)
    card = DatasetCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
    path = _inside(folder, "README.md")
    card.save(path)
    return path


# --------------------------------------------------------------------------------------------
# push
# --------------------------------------------------------------------------------------------


def _offline() -> bool:
    """True when huggingface_hub's offline mode or the HF_HUB_OFFLINE env var is on."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE_VALUES


def check_can_push(repo_id: str) -> None:
    """Raise before any work if pushing ``repo_id`` cannot succeed offline-detectably (offline mode, bad id).

    Args:
        repo_id (`str`): the target dataset repository, ``"user/name"``.

    Raises:
        `RuntimeError`: when ``HF_HUB_OFFLINE`` is set (in the environment or in
        ``huggingface_hub.constants``).
        `ValueError`: when ``repo_id`` is not a valid Hub repository id.

    Example:

    ```py
    >>> check_can_push("me/longabc-32k")  # returns None, or raises RuntimeError under HF_HUB_OFFLINE=1
    ```
    """
    if _offline():
        raise RuntimeError(
            f"HF_HUB_OFFLINE=1 is set: cannot push to {repo_id}; unset it or export the folder only."
        )
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
        folder (`str` or `Path`):
            A folder written by `export_dataset` (must contain ``README.md``).
        repo_id (`str`):
            Target dataset repository, ``"user/name"``.
        private (`bool`, defaults to `False`):
            Create the repository as private (ignored if it already exists).
        token (`str`, *optional*):
            Hub token; defaults to huggingface_hub's usual resolution.
        commit_message (`str`, defaults to `"Upload LongABC dataset with hf_longattn"`):
            Message of the upload commit.

    Returns:
        `str`: the URL of the dataset repository.

    Raises:
        `RuntimeError`: under ``HF_HUB_OFFLINE=1``, before any API call.

    Example:

    ```py
    >>> push_to_hub("longabc-export", "me/longabc-32k", private=True)
    'https://huggingface.co/datasets/me/longabc-32k'
    ```
    """
    check_can_push(repo_id)
    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(
            f"{folder} has no README.md: export it first with hf_longattn.publication.export_dataset."
        )
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    full_repo_id = getattr(repo_url, "repo_id", None) or repo_id  # namespace resolved by the Hub
    logger.info("Uploading %s to dataset repo %s (private=%s).", folder, full_repo_id, private)
    api.upload_folder(
        folder_path=str(folder),
        repo_id=full_repo_id,
        repo_type="dataset",
        commit_message=commit_message,
    )
    url = str(repo_url)
    logger.info("Uploaded to %s", url)
    return url

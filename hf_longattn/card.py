"""The dataset card: a typed `CardData` rendered through ``templates/dataset_card.md`` with huggingface_hub's `DatasetCard.from_template`.

To add a field to the card: add it to `CardData` (with its default), fill it in
`CardData.from_metadata` (or where the run builds it), and use it in the template.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import vocabulary as V
from .counts import format_number

TEMPLATE = Path(__file__).with_name("templates") / "dataset_card.md"
QUANTILES = (("min", 0.0), ("5%", 0.05), ("25%", 0.25), ("50%", 0.5), ("75%", 0.75), ("95%", 0.95), ("max", 1.0))
SCORE_LABELS = {V.DS: "DS_T", V.DU: "DU_T", V.LDS: "LDS_T"}
TAGS = ["long-context", "data-selection", "longattn", "pretraining", "hf-longattn"]
LONGATTN_BIBTEX = """@article{wu2025longattn,
  title   = {LongAttn: Selecting Long-context Training Data via Token-level Attention},
  author  = {Wu, Longyun and Zhu, Dawei and Zhao, Guangxiang and Yu, Zhuocheng and Ran, Junfeng and Wong, Xiangyu and Sun, Lin and Li, Sujian},
  journal = {arXiv preprint arXiv:2502.16860},
  year    = {2025},
  url     = {https://arxiv.org/abs/2502.16860}
}"""
HUB_LICENSES = {
    "apache-2.0", "mit", "cc0-1.0", "cc-by-4.0", "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0",
    "gpl-3.0", "lgpl-3.0", "bsd-3-clause", "odc-by", "odbl", "pddl", "unlicense", "mpl-2.0", "other", "unknown",
}
"""License ids the Hub knows (a subset); anything else is published as ``other`` with its own name and link."""
LICENSE_LINKS = {"psf-2.0": "https://docs.python.org/3/license.html"}
_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key|apikey)$", re.IGNORECASE)


@dataclass
class CategoryRow:
    """One category of the export: its split name and the counters of `hf_longattn.counts` (— when unknown)."""

    category: str
    split: str
    windows: int
    scored_ok: int
    kept: int
    tokens_in: int
    tokens_out: int
    not_ok: dict[str, int] = field(default_factory=dict)
    threshold: float | None = None
    documents: int | None = None
    documents_too_short: int | None = None
    windows_left_out: int | None = None
    licenses: list[str] = field(default_factory=list)

    @property
    def tokens_kept(self) -> str | None:
        return f"{self.tokens_out / self.tokens_in:.1%}" if self.tokens_in else None


@dataclass
class CardData:
    """Everything the dataset card shows; `render` turns it into ``README.md`` text (YAML header + markdown)."""

    pretty_name: str = "LongABC-style LongAttn selection"
    repo_id: str | None = None
    license: str | None = None
    method: str = "LongAttn (arXiv 2502.16860)"
    model: str | None = None
    revision: str | None = None
    checkpoint: str | None = None
    tokenizer: str | None = None
    scorer_check: dict[str, Any] | None = None
    layer: int | None = None
    window_size: int | None = None
    min_distance: int | None = None
    alpha: float | None = None
    normalization: str | None = None
    keep_fraction: float | None = None
    selection_method: str | None = None
    dtype: str | None = None
    hf_longattn_version: str | None = None
    max_windows_per_category: int | None = None
    sources: list[dict[str, Any]] = field(default_factory=list)
    source_datasets: list[str] | None = None
    language: list[str] | None = None
    categories: list[CategoryRow] = field(default_factory=list)
    quantiles: list[list[Any]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    data_files: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    empty_filtered_splits: list[str] = field(default_factory=list)
    probe: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None
    scorers: list[dict[str, Any]] = field(default_factory=list)
    column_descriptions: dict[str, str] = field(default_factory=dict)
    citations: list[str] = field(default_factory=list)
    comparison: str | None = None
    run_metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], **fields: Any) -> CardData:
        """Card data from a run description (keys named like the fields), plus ``fields`` computed by the export.

        Unknown keys are kept for the card's "full run metadata" block only; secret-looking keys
        (``token``, ``hf_token``, ``api_key``, …) are dropped everywhere.
        """
        public = public_metadata(metadata)
        known = {name for name in cls.__dataclass_fields__ if name not in ("categories", "run_metadata")}
        values = {key: value for key, value in public.items() if key in known and value is not None}
        values.update({key: value for key, value in fields.items() if value is not None})
        return cls(**values, run_metadata=public)

    # -- the rows of the card's tables ----------------------------------------------------------

    @property
    def config_rows(self) -> list[list[Any]]:
        """The run configuration table: the settings that are known (an unset one is left out, not shown as —)."""
        rows = [["scorers", ", ".join(f"`{s['name']}`" for s in self.scorers) or None],
                ["selection score", f"`{self.selection['score']}` ({self.selection['label']})" if self.selection else None],
                ["scoring model", self.model], ["model revision", self.revision], ["model checksum", self.checkpoint],
                ["tokenizer", self.tokenizer], ["layer scored", self.layer], ["window size W (tokens)", self.window_size],
                ["min distance k (tokens)", self.min_distance], ["alpha (α, weight of DU_T)", self.alpha],
                ["normalization", self.normalization], ["keep fraction", self.keep_fraction],
                ["selection method", self.selection_method],
                ["max windows per category", self.max_windows_per_category], ["dtype", self.dtype],
                ["hf_longattn version", self.hf_longattn_version]]
        return [row for row in rows if row[1] is not None]

    @property
    def sources_rows(self) -> list[list[Any]]:
        return [[s.get("source"), s.get("category"), s.get("license")] for s in self.sources]

    @property
    def category_rows(self) -> list[list[Any]]:
        rows = [[r.category, f"`{r.split}`" if r.split else "— (no window)", r.documents, r.documents_too_short, r.windows_left_out, r.windows,
                 r.scored_ok, r.kept, r.tokens_in, r.tokens_out, r.tokens_kept, r.threshold] for r in self.categories]
        total = CategoryRow("**total**", "", *(sum(getattr(r, name) for r in self.categories)
                                              for name in ("windows", "scored_ok", "kept", "tokens_in", "tokens_out")))
        known = [name for name in ("documents", "documents_too_short", "windows_left_out")
                 if all(getattr(r, name) is not None for r in self.categories)]
        sums = {name: sum(getattr(r, name) for r in self.categories) if name in known else None
                for name in ("documents", "documents_too_short", "windows_left_out")}
        return rows + [["**total**", "", sums["documents"], sums["documents_too_short"], sums["windows_left_out"],
                        total.windows, total.scored_ok, total.kept, total.tokens_in, total.tokens_out,
                        total.tokens_kept, None]]

    @property
    def status_columns(self) -> list[str]:
        return sorted({status for row in self.categories for status in row.not_ok})

    @property
    def status_columns_header(self) -> list[str]:
        return [f"`{status}`" for status in self.status_columns]

    @property
    def status_rows(self) -> list[list[Any]]:
        return [[row.category, *(row.not_ok.get(s, 0) for s in self.status_columns), sum(row.not_ok.values())]
                for row in self.categories]

    @property
    def column_rows(self) -> list[list[Any]]:
        descriptions = {**V.COLUMN_DESCRIPTIONS, **self.column_descriptions}
        return [[f"`{name}`", descriptions.get(name, "(a column of the source documents, carried over)")]
                for name in self.columns]

    @property
    def license_rows(self) -> list[list[Any]]:
        return [[row.category, ", ".join(row.licenses)] for row in self.categories if row.licenses]

    def licenses(self) -> tuple[str, str | None, str | None]:
        """``(license, license_name, license_link)`` for the YAML header (see :func:`hub_license`)."""
        found = sorted({name for row in self.categories for name in row.licenses})
        return hub_license(self.license, found)

    def card_yaml(self) -> Any:
        """The `huggingface_hub.DatasetCardData` of the YAML header: configs, license, tags, size."""
        from huggingface_hub import DatasetCardData

        license_id, license_name, license_link = self.licenses()
        extra = {"license_name": license_name, "license_link": license_link} if license_name else {}
        total = sum(row.windows for row in self.categories)
        return DatasetCardData(
            license=license_id, pretty_name=self.pretty_name, task_categories=["text-generation"],
            size_categories=[size_category(total)], language=self.language, source_datasets=self.source_datasets,
            tags=TAGS, configs=[
                {"config_name": "filtered", "default": True, "data_files": self.data_files.get("filtered", [])},
                {"config_name": "scored", "data_files": self.data_files.get("scored", [])},
            ], **extra,
        )

    def render(self) -> str:
        """The card's text: YAML header and the markdown body of ``templates/dataset_card.md``."""
        from huggingface_hub import DatasetCard

        card = DatasetCard.from_template(
            self.card_yaml(), template_path=str(TEMPLATE), card=self, num=format_number, table=markdown_table,
            statuses=V.STATUSES, quantile_names=[name for name, _ in QUANTILES],
            bibtex=LONGATTN_BIBTEX, metadata_json=json.dumps(self.run_metadata, indent=2, sort_keys=True,
                                                             ensure_ascii=False, default=str),
        )
        return str(card)


def hub_license(configured: str | None, found: list[str]) -> tuple[str, str | None, str | None]:
    """The card's license: the configured one, else the sources' one license, else ``other``.

    A license the Hub does not list becomes ``other`` with ``license_name`` (and a known link).

    Example:

    >>> hub_license(None, ["PSF-2.0"])
    ('other', 'psf-2.0', 'https://docs.python.org/3/license.html')
    >>> hub_license(None, ["cc-by-4.0", "PSF-2.0"]), hub_license("apache-2.0", ["PSF-2.0"])
    (('other', None, None), ('apache-2.0', None, None))
    """
    chosen = configured or (found[0] if len(found) == 1 else "other")
    name = chosen.strip().lower().replace(" ", "-")
    if name in HUB_LICENSES:
        return name, None, None
    return "other", name, LICENSE_LINKS.get(name)


def public_metadata(value: Any) -> Any:
    """A JSON-safe copy of ``value`` without secret-looking keys (``token``, ``hf_token``, ``api_key``...) nor null values."""
    if isinstance(value, Mapping):  # nulls say nothing: left out
        return {str(k): public_metadata(v) for k, v in value.items() if not _SECRET_KEY.search(str(k)) and v is not None}
    if isinstance(value, (list, tuple)):
        return [public_metadata(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table: numbers formatted, pipes and newlines in cells escaped."""
    def cell(value: Any) -> str:
        return format_number(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def score_quantiles(values: list[float]) -> dict[str, float]:
    """The min, 5%, 25%, 50%, 75%, 95% and max of ``values`` (linear interpolation, as `numpy.quantile`).

    Example:

    >>> score_quantiles([0.0, 1.0, 2.0, 3.0, 4.0])["50%"]
    2.0
    """
    if not values:
        return {}
    import numpy as np

    qs = np.quantile(np.asarray(values, dtype=np.float64), [q for _, q in QUANTILES])
    return {label: float(v) for (label, _), v in zip(QUANTILES, qs)}


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` tag for ``n`` rows."""
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
                         (1_000_000_000, "100M<n<1B")):
        if n < limit:
            return label
    return "1B<n<10B"

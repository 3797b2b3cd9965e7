"""Scorer self-check: does this model and layer tell coherent windows from shuffled-chunk controls on *my* data?

Terms. Per group (``by``, default ``category``) the probe takes ``N`` *real windows* — token-exact
``W``-token spans of the group's documents (paper Algorithm 1 spans, :func:`~hf_longattn.windows.window_spans`,
drawn without replacement under the seed) — and ``N`` *controls* of exactly ``W`` tokens, each
the concatenation of ``chunk_size``-token chunks cut from the same group's documents (the last
chunk is shorter when ``chunk_size`` does not divide ``W``). A control keeps local text and
vocabulary and destroys long-range structure. Rules of a control (see :func:`probe_samples`):

* its chunks come from the group's *source documents*: all its documents of at least
  ``chunk_size`` tokens (shorter documents of the group, too short for a real window, count);
* consecutive chunks come from different documents (when the group has two or more sources with
  room left; otherwise the fallback is counted in ``same_document_joins``);
* no chunk shares a token with any sampled real window of the group, nor with any other chunk of
  any control of the group (token positions are disjoint, per document);
* admissible starts tile each free gap ``[a, b)`` from its start, ``a, a + c, a + 2c, …`` for a
  chunk of ``c`` tokens (so placed chunks never leave unusable slivers); a chunk's document is
  drawn with probability proportional to its admissible starts, the start uniformly among them,
  from ``numpy.random.default_rng([seed, group hash])`` — the same seed gives the same windows,
  whatever the order of the groups.

Both kinds are scored in one pass with :class:`~hf_longattn.scorer.LongAttnScorer` (all
``layers`` in one forward). Per layer and group the report gives the mean DS_T and DU_T of real
and control windows, the AUC — the probability that a real window outscores a control (Mann–Whitney
U / (n·m), ties count 1/2) — for DS_T, DU_T and LDS (``selection.lds_scores`` z-score on the pooled
real + control windows of the group, weight ``alpha``), and the share of real windows among the top
``keep_fraction`` of the pooled mix by LDS (ties at the cut shared in proportion: the expected
share under random tie-breaking; 0.5 = no better than random).

Verdict: an AUC ≥ :data:`SEPARATES` (0.6) *separates*; ``|AUC − 0.5| <`` :data:`CHANCE_BAND`
(0.1) is *close to chance*; AUC ≤ 0.4 is *inverted* (the scorer prefers the shuffled controls).
The best layer is the one with the highest LDS AUC — per group, and overall by the mean over
groups; when that maximum is below 0.6, no layer separates and the scorer is too weak to select
with. With ``N`` windows per kind the AUC's standard error is about ``0.41/sqrt(N)`` near 0.5
(Hanley–McNeil; the tables print it under each table, and ``auc_lds_se`` holds it at the measured
AUC — where it is 0 for an AUC of 0 or 1, which understates the uncertainty of a small N): read
small-N tables with that in mind.

Run it: ``hf-longattn probe --model M --data D --window-size 4096 --layers 0,4,8 --num-windows 16``
(or ``python -m hf_longattn.probe ...``) prints the table, writes ``report.json`` and ``probe.png``
to ``--output`` and ends with the verdict.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .selection import lds_scores
from .windows import window_spans

logger = logging.getLogger(__name__)

__all__ = [
    "CHANCE_BAND",
    "SEPARATES",
    "ProbeReport",
    "ProbeSample",
    "add_probe_parser",
    "auc",
    "auc_label",
    "auc_standard_error",
    "load_documents",
    "probe",
    "probe_samples",
    "run_probe_command",
    "top_fraction_share",
    "verdict_of",
]

SEPARATES = 0.6
"""LDS AUC at or above which a layer is said to separate real windows from controls."""
CHANCE_BAND = 0.1
"""``|AUC − 0.5| <`` this is "close to chance"."""

REAL = "real"
CONTROL = "control"
ALL_GROUPS = "all"
"""Group name used when ``by=None``."""
MEAN_OF_GROUPS = "mean of groups"
"""Group name of the per-layer rows averaged over groups."""

_DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".parquet": "parquet"}


# -- statistics ---------------------------------------------------------------------------------


def auc(real_scores: Sequence[float] | np.ndarray, control_scores: Sequence[float] | np.ndarray) -> float:
    """Probability that a real window's score beats a control's, ties counting 1/2 (Mann–Whitney U / (n·m)).

    Computed from average ranks of the pooled scores: ``U = Σ rank(real) − n(n+1)/2``.

    Args:
        real_scores (array-like of `float`): scores of the real windows (finite).
        control_scores (array-like of `float`): scores of the controls (finite).

    Returns:
        `float` in [0, 1]; NaN when either side is empty.

    Example:

    >>> auc([3.0, 2.0], [1.0, 2.0])  # pairs (3>1, 3>2, 2>1, 2=2) → 3.5 / 4
    0.875
    >>> auc([1.0, 1.0], [1.0])
    0.5
    """
    real = np.asarray(real_scores, dtype=np.float64).ravel()
    control = np.asarray(control_scores, dtype=np.float64).ravel()
    if real.size == 0 or control.size == 0:
        return math.nan
    if not (np.isfinite(real).all() and np.isfinite(control).all()):
        raise ValueError("auc needs finite scores; drop unscored windows first")
    pooled = np.concatenate([real, control])
    _, inverse, counts = np.unique(pooled, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct value: ranks first+1 … first+count share their mean.
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    average_rank = first + (counts + 1) / 2.0
    rank_sum = float(average_rank[inverse[: real.size]].sum())
    u_statistic = rank_sum - real.size * (real.size + 1) / 2.0
    return u_statistic / (real.size * control.size)


def auc_standard_error(value: float, n_real: int, n_control: int) -> float:
    """Hanley–McNeil (1982) standard error of an AUC from ``n_real`` and ``n_control`` scores.

    ``SE² = (A(1−A) + (n−1)(Q1 − A²) + (m−1)(Q2 − A²)) / (n·m)`` with ``Q1 = A/(2−A)``, ``Q2 = 2A²/(1+A)``.

    Example:

    >>> round(auc_standard_error(0.5, 16, 16), 3)
    0.104
    """
    if not n_real or not n_control or not math.isfinite(value):
        return math.nan
    a = float(value)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    variance = (a * (1 - a) + (n_real - 1) * (q1 - a * a) + (n_control - 1) * (q2 - a * a)) / (n_real * n_control)
    return math.sqrt(max(variance, 0.0))


def auc_label(value: float) -> str:
    """``"separates"`` (AUC ≥ 0.6), ``"close to chance"`` (|AUC − 0.5| < 0.1), ``"inverted"`` (≤ 0.4) or ``"n/a"``.

    Example:

    >>> [auc_label(a) for a in (0.75, 0.55, 0.3)]
    ['separates', 'close to chance', 'inverted']
    """
    if not math.isfinite(value):
        return "n/a"
    if value >= SEPARATES:
        return "separates"
    if value <= 0.5 - CHANCE_BAND:
        return "inverted"
    return "close to chance"


def top_fraction_share(
    scores: Sequence[float] | np.ndarray, is_real: Sequence[bool] | np.ndarray, keep_fraction: float = 0.5
) -> float:
    """Share of real windows among the top ``keep_fraction`` of a pooled mix, ranked by score.

    Keeps ``n_keep = ⌊keep_fraction · n⌋`` (``keep_fraction`` read as the decimal it prints, as in
    :class:`~hf_longattn.selection.LongAttnSelector`). Rows tied at the cut score share the remaining
    places in proportion, so the result is the expected share under random tie-breaking and does
    not depend on row order or ids.

    Args:
        scores (array-like of `float`): one score per window (higher is kept first).
        is_real (array-like of `bool`): whether each window is real (else a control).
        keep_fraction (`float`, defaults to `0.5`): fraction of the pool kept.

    Returns:
        `float` in [0, 1]; NaN when nothing is kept.

    Example:

    >>> round(top_fraction_share([3, 2, 2, 2, 1, 0], [1, 1, 0, 0, 1, 0], 0.5), 4)  # (1 + 2·1/3) / 3 = 5/9
    0.5556
    """
    values = np.asarray(scores, dtype=np.float64).ravel()
    real = np.asarray(is_real, dtype=bool).ravel()
    if values.shape != real.shape:
        raise ValueError(f"scores and is_real must have the same length, got {values.size} and {real.size}")
    if not 0 <= keep_fraction <= 1:
        raise ValueError(f"keep_fraction must lie in [0, 1], got {keep_fraction}")
    n_keep = math.floor(Fraction(repr(float(keep_fraction))) * values.size)
    if n_keep == 0:
        return math.nan
    cut = np.sort(values)[::-1][n_keep - 1]
    above = values > cut
    tied = values == cut
    places_left = n_keep - int(above.sum())
    real_kept = float(real[above].sum()) + places_left * float(real[tied].sum()) / float(tied.sum())
    return real_kept / n_keep


# -- sampling real windows and controls ------------------------------------------------------------


@dataclass(frozen=True)
class ProbeSample:
    """One probe window: a real span or a shuffled-chunk control.

    Attributes:
        id (`str`): ``"{doc_id}/w{index:05d}"`` (Algorithm 1 window index) or ``"control/{group}/{j:05d}"``.
        group (`str`): its group.
        kind (`str`): ``"real"`` or ``"control"``.
        sources (`tuple[tuple[int, int, int], ...]`): ``(document, start, end)`` token spans, in
            order; their concatenation is the window. One span for a real window.
    """

    id: str
    group: str
    kind: str
    sources: tuple[tuple[int, int, int], ...]

    @property
    def num_tokens(self) -> int:
        return sum(end - start for _, start, end in self.sources)

    def token_ids(self, documents: Sequence[Sequence[int]]) -> list[int]:
        """The window's token ids, cut from ``documents`` (all documents, indexed as in ``sources``)."""
        out: list[int] = []
        for doc, start, end in self.sources:
            out.extend(int(t) for t in documents[doc][start:end])
        return out


def _group_seed(seed: int, group: str) -> list[int]:
    """Seed sequence of one group: the user seed and 64 bits of BLAKE2b of the group name (order-free)."""
    digest = hashlib.blake2b(str(group).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return [int(seed), int.from_bytes(digest, "big")]


class _FreeSpace:
    """Free token positions of one document, as sorted disjoint half-open gaps ``[a, b)``."""

    def __init__(self, length: int, blocked: Sequence[tuple[int, int]]):
        gaps, position = [], 0
        for start, end in sorted(blocked):
            if start > position:
                gaps.append((position, start))
            position = max(position, end)
        if position < length:
            gaps.append((position, length))
        self.gaps = gaps

    def count(self, size: int) -> int:
        """Number of admissible starts: ``a + j·size`` with ``[s, s + size)`` inside its gap ``[a, b)``."""
        return sum((b - a) // size for a, b in self.gaps)

    def start(self, size: int, k: int) -> int:
        """The ``k``-th admissible start (0-based) for a chunk of ``size`` tokens."""
        for a, b in self.gaps:
            slots = (b - a) // size
            if k < slots:
                return a + k * size
            k -= slots
        raise IndexError(k)

    def remove(self, start: int, end: int) -> None:
        """Mark ``[start, end)`` (inside one gap) as used."""
        for index, (a, b) in enumerate(self.gaps):
            if a <= start and end <= b:
                pieces = [(x, y) for x, y in ((a, start), (end, b)) if y > x]
                self.gaps[index : index + 1] = pieces
                return
        raise ValueError(f"[{start}, {end}) is not free")


def _group_samples(
    lengths: Mapping[int, int],
    doc_ids: Sequence[str],
    group: str,
    *,
    window_size: int,
    num_windows: int,
    chunk_size: int,
    seed: int,
    counts: dict[str, Any],
) -> list[ProbeSample]:
    """Real windows and controls of one group; ``lengths`` maps document index → token count."""
    rng = np.random.default_rng(_group_seed(seed, group))
    docs = sorted(lengths)
    window_docs = [d for d in docs if lengths[d] >= window_size]
    candidates = [(d, index, span) for d in window_docs for index, span in enumerate(window_spans(lengths[d], window_size))]
    n_real = min(num_windows, len(candidates))
    picked = sorted(rng.choice(len(candidates), size=n_real, replace=False).tolist()) if n_real else []
    reals = [candidates[i] for i in picked]
    counts.update(documents=len(docs), window_documents=len(window_docs), candidate_windows=len(candidates), real=n_real)
    samples = [
        ProbeSample(f"{doc_ids[d]}/w{index:05d}", group, REAL, ((d, start, end),)) for d, index, (start, end) in reals
    ]

    # Controls: as many as real windows, from the source documents, outside every real span.
    sources = [d for d in docs if lengths[d] >= chunk_size]
    blocked: dict[int, list[tuple[int, int]]] = {d: [] for d in sources}
    for d, _, span in reals:
        if d in blocked:
            blocked[d].append(span)
    free = [_FreeSpace(lengths[d], blocked[d]) for d in sources]
    sizes = [chunk_size] * (window_size // chunk_size) + ([window_size % chunk_size] if window_size % chunk_size else [])
    # Admissible starts per source document and chunk size, updated as chunks are placed.
    room = {size: np.array([space.count(size) for space in free], dtype=np.float64) for size in set(sizes)}
    same_document_joins = 0
    for j in range(n_real):
        chunks: list[tuple[int, int, int]] = []
        previous = None  # position in `sources` of the previous chunk's document
        for size in sizes:
            weights = room[size].copy()
            if previous is not None:
                weights[previous] = 0.0
                if weights.sum() == 0 and room[size][previous] > 0:
                    # Only the previous chunk's document has room: take a non-adjacent chunk from it.
                    weights = room[size].copy()
                    same_document_joins += 1
            if weights.sum() == 0:
                raise ValueError(
                    f"group {group!r}: not enough text outside the {n_real} real windows to build control {j} "
                    f"({window_size} tokens in chunks of {chunk_size}); lower num_windows or chunk_size, or add documents"
                )
            position = int(rng.choice(len(sources), p=weights / weights.sum()))
            space = free[position]
            for _ in range(1000):
                start = space.start(size, int(rng.integers(int(room[size][position]))))
                if position != previous or start != chunks[-1][2]:
                    break
            else:  # pragma: no cover - a single gap exactly continuing the previous chunk
                raise ValueError(f"group {group!r}: cannot place a non-adjacent chunk in document {doc_ids[sources[position]]!r}")
            space.remove(start, start + size)
            for other, counts_of_size in room.items():
                counts_of_size[position] = space.count(other)
            chunks.append((sources[position], start, start + size))
            previous = position
        samples.append(ProbeSample(f"control/{group}/{j:05d}", group, CONTROL, tuple(chunks)))
    counts.update(control=n_real, control_source_documents=len(sources), same_document_joins=same_document_joins)
    return samples


def probe_samples(
    lengths: Sequence[int],
    groups: Sequence[Any],
    *,
    window_size: int,
    num_windows: int = 32,
    chunk_size: int = 256,
    seed: int = 0,
    doc_ids: Sequence[str] | None = None,
) -> tuple[list[ProbeSample], dict[str, dict[str, Any]]]:
    """Draw the real windows and shuffled-chunk controls of every group (rules: module docstring).

    Args:
        lengths (sequence of `int`): token count of every document.
        groups (sequence): group of every document (converted with ``str``).
        window_size (`int`): W, tokens per window.
        num_windows (`int`, defaults to `32`): N, real windows per group (fewer when the group has
            fewer candidate windows); the group gets as many controls as real windows.
        chunk_size (`int`, defaults to `256`): tokens per control chunk; at most ``W // 2``.
        seed (`int`, defaults to `0`): sampling seed.
        doc_ids (sequence of `str`, *optional*): document ids, for the real windows' ids; default
            ``"doc{index}"``.

    Returns:
        `(list[ProbeSample], dict)`: the samples (per group, sorted by group: real then control) and
        counts per group (``documents``, ``window_documents``, ``candidate_windows``, ``real``,
        ``control``, ``control_source_documents``, ``same_document_joins``).

    Example:

    >>> samples, counts = probe_samples([40, 40, 40], ["a", "a", "a"], window_size=16, num_windows=2, chunk_size=4)
    >>> [(s.kind, s.num_tokens, len(s.sources)) for s in samples]
    [('real', 16, 1), ('real', 16, 1), ('control', 16, 4), ('control', 16, 4)]
    """
    if len(lengths) != len(groups):
        raise ValueError(f"lengths and groups must have the same length, got {len(lengths)} and {len(groups)}")
    for name, value in (("window_size", window_size), ("num_windows", num_windows), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if 2 * chunk_size > window_size:
        raise ValueError(f"chunk_size ({chunk_size}) must be at most window_size // 2 ({window_size // 2}): a control needs two chunks")
    doc_ids = [f"doc{i}" for i in range(len(lengths))] if doc_ids is None else [str(d) for d in doc_ids]
    by_group: dict[str, dict[int, int]] = {}
    for index, (length, group) in enumerate(zip(lengths, groups)):
        by_group.setdefault(str(group), {})[index] = int(length)
    samples: list[ProbeSample] = []
    counts: dict[str, dict[str, Any]] = {}
    for group in sorted(by_group):
        counts[group] = {}
        samples += _group_samples(
            by_group[group], doc_ids, group, window_size=window_size, num_windows=num_windows,
            chunk_size=chunk_size, seed=seed, counts=counts[group],
        )
    return samples, counts


# -- the report -----------------------------------------------------------------------------------


@dataclass
class ProbeReport:
    """What the probe measured, per layer and group, and its verdict.

    Attributes:
        rows (`list[dict]`): one per (group, layer), groups sorted, then one per layer for
            ``"mean of groups"``. Keys: ``group``, ``layer``, ``n_real``, ``n_control``,
            ``ds_real``, ``ds_control``, ``du_real``, ``du_control`` (means), ``auc_ds``,
            ``auc_du``, ``auc_lds``, ``auc_lds_se``, ``top_real_share`` (the mean-of-groups rows
            average the per-group values and leave the counts summed, means and SE null).
        verdict (`str`): a plain sentence (see the module docstring for the thresholds).
        best_layer (`int`, *optional*): the layer with the highest mean LDS AUC if it separates,
            else `None`.
        config (`dict`): the probe's arguments (model, window_size, layers, …).
        counts (`dict`): per group, documents / candidate windows / samples / unscored windows.
        timings (`dict`): seconds spent tokenising, sampling and scoring, and windows scored.
        samples (`list[dict]`): every window's id, group, kind, sources and per-layer DS_T / DU_T.
    """

    rows: list[dict[str, Any]]
    verdict: str
    best_layer: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        return sorted({row["layer"] for row in self.rows})

    @property
    def groups(self) -> list[str]:
        return sorted({row["group"] for row in self.rows if row["group"] != MEAN_OF_GROUPS})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path) -> Path:
        """Write the whole report (NaN as null) to ``path``; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_json_safe(self.to_dict()), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> ProbeReport:
        """Read a report written by :meth:`to_json` (nulls in AUC columns come back as NaN)."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        rows = [{k: (math.nan if v is None and k.startswith(("auc", "top", "ds_", "du_")) else v) for k, v in r.items()} for r in data["rows"]]
        return cls(rows, data["verdict"], data.get("best_layer"), data.get("config", {}), data.get("counts", {}),
                   data.get("timings", {}), data.get("samples", []))

    def to_markdown(self, style: str = "long") -> str:
        """The table as GitHub markdown.

        ``style="long"``: one line per group and layer with means, AUCs and the top-fraction share.
        ``style="wide"``: one line per layer, LDS AUC (and DS_T AUC) per group and their mean.
        """
        if style == "wide":
            groups = self.groups
            head = ["layer", *[f"{g} AUC LDS (DS)" for g in groups], "mean AUC LDS (DS)", "mean top-share"]
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            by_key = {(r["group"], r["layer"]): r for r in self.rows}
            for layer in self.layers:
                cells = [str(layer)]
                for g in [*groups, MEAN_OF_GROUPS]:
                    row = by_key.get((g, layer))
                    cells.append("–" if row is None else f"{_f(row['auc_lds'])} ({_f(row['auc_ds'])})")
                cells.append(_f(by_key[(MEAN_OF_GROUPS, layer)]["top_real_share"]) if (MEAN_OF_GROUPS, layer) in by_key else "–")
                lines.append("| " + " | ".join(cells) + " |")
            return "\n".join(lines + self._noise_note())
        if style != "long":
            raise ValueError(f"style must be 'long' or 'wide', got {style!r}")
        share = self.config.get("keep_fraction", 0.5)
        head = ["group", "layer", "n real/ctrl", "DS_T real", "DS_T ctrl", "DU_T real", "DU_T ctrl",
                "AUC DS_T", "AUC DU_T", "AUC LDS", f"real share of top {share:g}"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            lines.append("| " + " | ".join([
                str(row["group"]), str(row["layer"]), f"{row['n_real']}/{row['n_control']}",
                _f(row["ds_real"], 4), _f(row["ds_control"], 4), _e(row["du_real"]), _e(row["du_control"]),
                _f(row["auc_ds"]), _f(row["auc_du"]),
                _f(row["auc_lds"]),
                _f(row["top_real_share"]),
            ]) + " |")
        return "\n".join(lines + self._noise_note())

    def _noise_note(self) -> list[str]:
        """A line giving the standard error of an AUC near 0.5 for the counts in the table (empty if none)."""
        pairs = sorted({(r["n_real"], r["n_control"]) for r in self.rows if r["group"] != MEAN_OF_GROUPS and r["n_real"] and r["n_control"]})
        if not pairs:
            return []
        errors = ", ".join(f"±{auc_standard_error(0.5, n, m):.2f} for {n} real vs {m} control windows" for n, m in pairs)
        return ["", f"Standard error of a per-group AUC near 0.5 (Hanley–McNeil): {errors}."]

    def plot(self, path: str | Path) -> Path:
        """PNG: AUC per layer for DS_T and for LDS, one line per group (mean dashed), 0.5 reference."""
        from .plots import _require_matplotlib, _save

        figure_cls, canvas_cls = _require_matplotlib()
        from matplotlib.ticker import MaxNLocator

        fig = figure_cls(figsize=(11, 4.2), layout="constrained")
        axes = fig.subplots(1, 2, sharey=True)
        for ax, key, title in ((axes[0], "auc_ds", "DS_T (dependency strength)"), (axes[1], "auc_lds", f"LDS (z-score, α = {self.config.get('alpha', 0.5):g})")):
            ax.axhspan(0.5 - CHANCE_BAND, 0.5 + CHANCE_BAND, color="#dddddd", alpha=0.6, label="close to chance")
            ax.axhline(0.5, color="#444444", linewidth=1, linestyle=":")
            for group in [*self.groups, MEAN_OF_GROUPS]:
                rows = sorted((r for r in self.rows if r["group"] == group), key=lambda r: r["layer"])
                if not rows:
                    continue
                mean = group == MEAN_OF_GROUPS
                ax.plot([r["layer"] for r in rows], [r[key] for r in rows], marker="o", markersize=3,
                        linestyle="--" if mean else "-", color="black" if mean else None,
                        linewidth=2 if mean else 1.3, label=group)
            ax.set_title(f"AUC of {title}", fontsize=10)
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("P(real window scores above control)")
        axes[1].legend(fontsize=8, loc="best")
        counts = sorted({r["n_real"] for r in self.rows if r["group"] != MEAN_OF_GROUPS})
        fig.suptitle(
            f"{Path(str(self.config.get('model', ''))).name} — W = {self.config.get('window_size')}, "
            f"N = {'/'.join(map(str, counts))} real + control per group", fontsize=11,
        )
        return _save(fig, canvas_cls, path)

    def __str__(self) -> str:
        return self.to_markdown() + "\n\n" + self.verdict


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _f(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "–"


def _e(value: Any) -> str:
    return f"{value:.2e}" if _finite(value) else "–"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def _layer_rows(
    scores: list[dict[str, Any]], layers: list[int], groups: list[str], alpha: float, keep_fraction: float
) -> list[dict[str, Any]]:
    """Rows per (group, layer) from the per-window scores, then per-layer means over groups."""
    rows = []
    for group in groups:
        members = [s for s in scores if s["group"] == group]
        for position, layer in enumerate(layers):
            ok = [s for s in members if s["ds_by_layer"][position] is not None and s["du_by_layer"][position] is not None]
            ds = np.array([s["ds_by_layer"][position] for s in ok], dtype=np.float64)
            du = np.array([s["du_by_layer"][position] for s in ok], dtype=np.float64)
            real = np.array([s["kind"] == REAL for s in ok], dtype=bool)
            lds = lds_scores(ds, du, alpha=alpha) if ok else np.zeros(0)
            n_real, n_control = int(real.sum()), int((~real).sum())
            auc_lds = auc(lds[real], lds[~real])
            rows.append({
                "group": group, "layer": layer, "n_real": n_real, "n_control": n_control,
                "ds_real": _mean(ds[real]), "ds_control": _mean(ds[~real]),
                "du_real": _mean(du[real]), "du_control": _mean(du[~real]),
                "auc_ds": auc(ds[real], ds[~real]), "auc_du": auc(du[real], du[~real]),
                "auc_lds": auc_lds, "auc_lds_se": auc_standard_error(auc_lds, n_real, n_control),
                "top_real_share": top_fraction_share(lds, real, keep_fraction) if ok else math.nan,
            })
    for layer in layers:
        per_group = [r for r in rows if r["layer"] == layer and r["n_real"] and r["n_control"]]
        rows.append({
            "group": MEAN_OF_GROUPS, "layer": layer,
            "n_real": sum(r["n_real"] for r in per_group), "n_control": sum(r["n_control"] for r in per_group),
            "ds_real": math.nan, "ds_control": math.nan, "du_real": math.nan, "du_control": math.nan,
            **{key: _mean([r[key] for r in per_group]) for key in ("auc_ds", "auc_du", "auc_lds", "top_real_share")},
            "auc_lds_se": math.nan,
        })
    return rows


def _mean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Row with the highest finite LDS AUC (ties: the shallower, cheaper layer)."""
    finite = [r for r in rows if _finite(r["auc_lds"])]
    return max(finite, key=lambda r: (r["auc_lds"], -r["layer"])) if finite else None


def verdict_of(rows: list[dict[str, Any]]) -> tuple[str, int | None]:
    """The plain-sentence verdict and the best layer (`None` when none separates) from report rows."""
    groups = sorted({r["group"] for r in rows if r["group"] != MEAN_OF_GROUPS})
    per_group = []
    for group in groups:
        best = _best([r for r in rows if r["group"] == group])
        if best is None:
            per_group.append(f"{group}: no windows")
        elif best["auc_lds"] >= SEPARATES:
            per_group.append(f"{group}: layer {best['layer']} ({best['auc_lds']:.2f})")
        else:
            per_group.append(f"{group}: none separates (best layer {best['layer']}, {best['auc_lds']:.2f})")
    mean_rows = [r for r in rows if r["group"] == MEAN_OF_GROUPS]
    best = _best(mean_rows)
    detail = "; ".join(per_group)
    if best is None:
        return "No window could be scored: no verdict. Check the counts (documents of at least window_size tokens?).", None
    layer0 = next((r for r in mean_rows if r["layer"] == 0), None)
    first = "" if layer0 is None or best["layer"] == 0 else f" Layer 0 (the paper's choice): {layer0['auc_lds']:.2f}."
    if best["auc_lds"] >= SEPARATES:
        sentence = (
            f"Layer {best['layer']} separates real windows from shuffled-chunk controls best: mean LDS AUC "
            f"{best['auc_lds']:.2f} over {len(groups)} group(s) (per group, best layer: {detail}).{first}"
        )
        return sentence, int(best["layer"])
    worst = min(r["auc_lds"] for r in mean_rows if _finite(r["auc_lds"]))
    inverted = (
        f" Some layers are inverted (mean LDS AUC down to {worst:.2f}): they rank shuffled text above coherent text."
        if worst <= 0.5 - CHANCE_BAND else ""
    )
    sentence = (
        f"None separates: the best mean LDS AUC over groups is {best['auc_lds']:.2f} (layer {best['layer']}), below "
        f"{SEPARATES} — on this data this scorer does not reliably tell coherent windows from shuffled chunks and is "
        f"too weak to select with (per group: {detail}).{inverted}"
    )
    return sentence, None


# -- the probe ------------------------------------------------------------------------------------


def _data_files(path: Path) -> tuple[str, list[str]]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _suffix(p) in _DATA_SUFFIXES)
        if not files:
            raise ValueError(f"no data files in {path}: expected {sorted(_DATA_SUFFIXES)}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"data not found: {path}")
    kinds = {_DATA_SUFFIXES.get(_suffix(p)) for p in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"data files must all be one of {sorted(_DATA_SUFFIXES)}, got {[p.name for p in files]}")
    return kinds.pop(), [str(p) for p in files]


def _suffix(path: Path) -> str:
    suffixes = path.suffixes[-2:]
    joined = "".join(suffixes)
    return joined if joined in _DATA_SUFFIXES else path.suffix


def load_documents(data: Any) -> Any:
    """A `datasets.Dataset` from a Dataset, a file or folder (jsonl, jsonl.gz, json, parquet), or a list of them."""
    from datasets import Dataset, concatenate_datasets, load_dataset

    if isinstance(data, Dataset):
        return data
    if isinstance(data, (list, tuple)):
        return concatenate_datasets([load_documents(item) for item in data])
    if isinstance(data, (str, Path)):
        builder, files = _data_files(Path(data))
        return load_dataset(builder, data_files=files, split="train")
    raise TypeError(f"data must be a datasets.Dataset, a path or a list of paths, got {type(data).__name__}")


def _parse_layers(layers: Any, num_layers: int) -> list[int]:
    if isinstance(layers, str):
        if layers.strip().lower() == "all":
            return list(range(num_layers))
        layers = [int(x) for x in layers.replace(" ", "").split(",") if x]
    elif isinstance(layers, int):
        layers = [layers]
    layers = [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < num_layers]
    if not layers or bad or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct ints in [0, {num_layers - 1}] (the model has {num_layers} layers) or 'all', got {layers}")
    return sorted(layers)


def probe(
    model: str,
    data: Any,
    *,
    window_size: int,
    layers: int | Sequence[int] | str,
    by: str | None = "category",
    num_windows: int = 32,
    chunk_size: int = 256,
    seed: int = 0,
    keep_fraction: float = 0.5,
    alpha: float = 0.5,
    text_column: str = "text",
    tokenizer: Any = None,
    id_column: str = "id",
    batch_size: int = 4,
    **scorer_kwargs: Any,
) -> ProbeReport:
    """Check whether a scoring model's layers tell real windows from shuffled-chunk controls on your data.

    Draws ``num_windows`` real windows and as many controls per group (:func:`probe_samples`),
    scores all of them with one :class:`~hf_longattn.scorer.LongAttnScorer` over every layer in
    ``layers`` (one forward per batch of windows), and reports per layer and group mean DS_T / DU_T,
    AUCs and the top-fraction share, with a verdict (thresholds: module docstring).

    Args:
        model (`str`): Hub id, local folder or ``.gguf`` file, as for ``LongAttnScorer``.
        data (`datasets.Dataset`, `str` or `Path`): documents, or a jsonl / jsonl.gz / parquet file
            or a folder of them. Needs ``text_column`` or a pre-tokenised ``input_ids`` column.
        window_size (`int`): W, tokens per window (at most the model's ``max_position_embeddings``).
        layers (`int`, list of `int`, or ``"all"``): decoder layers to score (``"0,4,8"`` works too).
        by (`str`, *optional*, defaults to `"category"`): group column; `None` for one group.
        num_windows (`int`, defaults to `32`): N, real windows (and controls) per group.
        chunk_size (`int`, defaults to `256`): tokens per control chunk.
        seed (`int`, defaults to `0`): sampling seed.
        keep_fraction (`float`, defaults to `0.5`): the top fraction for ``top_real_share``.
        alpha (`float`, defaults to `0.5`): weight of DU_T in LDS.
        text_column (`str`, defaults to `"text"`): the text column.
        tokenizer (*optional*): a tokenizer object or name; defaults to the model's. Texts are
            tokenised without special tokens, like :class:`~hf_longattn.windows.SlidingWindows`.
        id_column (`str`, defaults to `"id"`): document ids for the real windows' ids, if present.
        batch_size (`int`, defaults to `4`): windows per ``map`` batch (progress granularity).
        **scorer_kwargs: passed to ``LongAttnScorer`` (``min_distance``, ``dtype``, ``device``, …).

    Returns:
        `ProbeReport`.

    Example:

    >>> report = probe("SmolLM2-135M-Instruct.Q4_1.gguf", "data/", window_size=4096, layers="0,9,18,29",
    ...                num_windows=16)  # doctest: +SKIP
    >>> print(report.to_markdown("wide")); report.plot("probe.png"); print(report.verdict)  # doctest: +SKIP
    """
    from datasets import Dataset

    from .model_loading import load_config, resolve_source
    from .scorer import LongAttnScorer

    started = time.perf_counter()
    for name in ("layer", "text_column", "input_ids_column"):
        if name in scorer_kwargs:
            raise TypeError(f"probe() sets {name!r} itself; got it in scorer_kwargs")
    documents = load_documents(data)
    columns = documents.column_names
    if by is not None and by not in columns:
        raise ValueError(f"group column by={by!r} not in the data; current columns: {columns} (or pass by=None)")
    if "input_ids" not in columns and text_column not in columns:
        raise ValueError(f"the data needs a {text_column!r} (text) or 'input_ids' column; current columns: {columns}")

    source = resolve_source(model, scorer_kwargs.get("revision"))
    num_layers = int(load_config(source, trust_remote_code=scorer_kwargs.get("trust_remote_code", False)).num_hidden_layers)
    layer_list = _parse_layers(layers, num_layers)
    scorer = LongAttnScorer(model, layer=layer_list, **scorer_kwargs)
    if window_size > scorer.max_length:
        raise ValueError(f"window_size {window_size} exceeds the scorer's max_length {scorer.max_length}")

    # Token ids of every document (no special tokens), groups and ids.
    if by is None:
        groups = [ALL_GROUPS] * len(documents)
    else:
        groups = list(documents[by])
        if any(g is None for g in groups):
            raise ValueError(f"column {by!r} has null values; fill them (e.g. with 'unknown') or pass by=None")
        groups = [str(g) for g in groups]
    doc_ids = [str(i) for i in documents[id_column]] if id_column in columns else [f"doc{i}" for i in range(len(documents))]
    if "input_ids" in columns:
        token_lists = [np.asarray(ids, dtype=np.int64) for ids in documents["input_ids"]]
    else:
        if tokenizer is None:
            tokenizer = scorer.tokenizer
        elif isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        texts = documents[text_column]
        token_lists = []
        for start in range(0, len(texts), 16):
            encoded = tokenizer(
                list(texts[start : start + 16]), add_special_tokens=False, return_attention_mask=False, verbose=False
            )["input_ids"]
            token_lists += [np.asarray(ids, dtype=np.int64) for ids in encoded]
    tokenized = time.perf_counter()

    samples, counts = probe_samples(
        [len(t) for t in token_lists], groups, window_size=window_size, num_windows=num_windows,
        chunk_size=chunk_size, seed=seed, doc_ids=doc_ids,
    )
    for group, group_counts in counts.items():
        logger.info("hf_longattn.probe: %s: %s", group, group_counts)
    windows = Dataset.from_dict({
        "id": [s.id for s in samples],
        "group": [s.group for s in samples],
        "kind": [s.kind for s in samples],
        "input_ids": [s.token_ids(token_lists) for s in samples],
    })
    sampled = time.perf_counter()

    scored = windows.map(
        scorer, batched=True, batch_size=batch_size, keep_in_memory=True,
        features=scorer.features(windows.features), desc=f"probe: scoring {len(windows)} windows × {len(layer_list)} layers",
    )
    finished = time.perf_counter()
    table = scored.remove_columns("input_ids").to_dict()
    if len(layer_list) > 1:
        ds_by_layer, du_by_layer = table["longattn_ds_by_layer"], table["longattn_du_by_layer"]
    else:
        ds_by_layer = [[v] for v in table["longattn_ds"]]
        du_by_layer = [[v] for v in table["longattn_du"]]
    scores = []
    for i, sample in enumerate(samples):
        ok = table["longattn_status"][i] == "ok"
        scores.append({
            "id": sample.id, "group": sample.group, "kind": sample.kind,
            "sources": [[doc_ids[d], start, end] for d, start, end in sample.sources],
            "status": table["longattn_status"][i],
            "ds_by_layer": list(ds_by_layer[i]) if ok else [None] * len(layer_list),
            "du_by_layer": list(du_by_layer[i]) if ok else [None] * len(layer_list),
        })
    for group in counts:
        counts[group]["not_scored"] = sum(1 for s in scores if s["group"] == group and s["status"] != "ok")

    rows = _layer_rows(scores, layer_list, sorted(counts), alpha, keep_fraction)
    verdict, best_layer = verdict_of(rows)
    config = {
        "model": str(model), "window_size": window_size, "layers": layer_list, "by": by, "num_windows": num_windows,
        "chunk_size": chunk_size, "seed": seed, "keep_fraction": keep_fraction, "alpha": alpha,
        "min_distance": scorer.config["min_distance"][0], "scorer": {k: v for k, v in scorer.config.items() if k != "checkpoint"},
    }
    timings = {
        "tokenize_s": round(tokenized - started, 3), "sample_s": round(sampled - tokenized, 3),
        "score_s": round(finished - sampled, 3), "total_s": round(time.perf_counter() - started, 3),
        "windows_scored": len(samples), "tokens_scored": int(sum(s.num_tokens for s in samples)),
    }
    return ProbeReport(rows, verdict, best_layer, config, counts, timings, scores)


# -- command line -----------------------------------------------------------------------------------


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hub id, local model folder or .gguf file of the scoring model")
    parser.add_argument("--data", required=True, nargs="+",
                        help="documents: jsonl / jsonl.gz / parquet file(s) or a folder of them")
    parser.add_argument("--window-size", type=int, required=True, help="W, tokens per window")
    parser.add_argument("--layers", default="0", help="comma-separated decoder layers, or 'all' (default: 0)")
    parser.add_argument("--by", default="category", help="group column ('none' for one group; default: category)")
    parser.add_argument("--num-windows", type=int, default=32, help="N real windows (and N controls) per group (default: 32)")
    parser.add_argument("--chunk-size", type=int, default=256, help="tokens per control chunk (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--keep-fraction", type=float, default=0.5, help="top fraction for the real share (default: 0.5)")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of DU_T in LDS (default: 0.5)")
    parser.add_argument("--text-column", default="text", help="text column (default: text)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or path (default: the model's)")
    parser.add_argument("--min-distance", type=float, default=0.25, help="k as a fraction of W (default: 0.25)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model dtype")
    parser.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: a GPU if any)")
    parser.add_argument("--output", default="probe", help="folder for report.json, report.md and probe.png (default: ./probe)")


def add_probe_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``probe`` on an ``argparse`` sub-parser set; it dispatches to :func:`run_probe_command` via ``args.func``."""
    parser = subparsers.add_parser(
        "probe",
        help="check whether a scoring model/layer separates real windows from shuffled-chunk controls",
        description=(__doc__ or "").split("\n\n")[0],
    )
    _add_arguments(parser)
    parser.set_defaults(func=run_probe_command)
    return parser


def run_probe_command(args: argparse.Namespace) -> int:
    """Run ``hf-longattn probe``: print counts and the table, write report.json / report.md / probe.png, print the verdict."""
    data = args.data[0] if len(args.data) == 1 else list(args.data)
    by = None if str(args.by).lower() == "none" else args.by
    report = probe(
        args.model, data, window_size=args.window_size, layers=args.layers, by=by, num_windows=args.num_windows,
        chunk_size=args.chunk_size, seed=args.seed, keep_fraction=args.keep_fraction, alpha=args.alpha,
        text_column=args.text_column, tokenizer=args.tokenizer, min_distance=args.min_distance,
        dtype=args.dtype, device=args.device,
    )
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for group, group_counts in report.counts.items():
        print(f"{group}: {group_counts['documents']} documents ({group_counts['window_documents']} of ≥ {args.window_size} tokens), "
              f"{group_counts['candidate_windows']} candidate windows, {group_counts['real']} real + {group_counts['control']} "
              f"control windows, {group_counts['not_scored']} not scored")
    timings = report.timings
    print(f"scored {timings['windows_scored']} windows ({timings['tokens_scored']} tokens) × {len(report.layers)} layers "
          f"in {timings['score_s']:.1f} s (total {timings['total_s']:.1f} s)\n")
    print(report.to_markdown())
    (output / "report.md").write_text(report.to_markdown() + "\n\n" + report.to_markdown("wide") + "\n\n" + report.verdict + "\n", encoding="utf-8")
    report.to_json(output / "report.json")
    written = [output / "report.json", output / "report.md"]
    try:
        written.append(report.plot(output / "probe.png"))
    except ImportError as error:
        print(f"\n(no plot: {error})")
    print(f"\nwrote {', '.join(map(str, written))}\n")
    print(report.verdict)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hf_longattn.probe ...``: the probe subcommand on its own."""
    parser = argparse.ArgumentParser(prog="python -m hf_longattn.probe", description=(__doc__ or "").split("\n\n")[0])
    _add_arguments(parser)
    return run_probe_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

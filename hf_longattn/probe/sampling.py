"""The probe's samples: real Algorithm 1 windows and shuffled-chunk controls of exactly W tokens per group, seeded."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..windows import window_spans
from .statistics import CONTROL, REAL


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


class NotEnoughText(ValueError):
    """A group's documents hold too little text outside its real windows for as many controls."""


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
    """Real windows and controls of one group; ``lengths`` maps document index → token count.

    N is at most ``num_windows``, the group's candidate windows, and what its text allows: when the
    text outside N real windows cannot make N controls, N goes down until it can (``counts`` says so).
    """
    docs = sorted(lengths)
    window_docs = [d for d in docs if lengths[d] >= window_size]
    candidates = [(d, index, span) for d in window_docs for index, span in enumerate(window_spans(lengths[d], window_size))]
    counts.update(documents=len(docs), window_documents=len(window_docs), candidate_windows=len(candidates),
                  requested=num_windows)
    for n_real in range(min(num_windows, len(candidates)), 0, -1):
        try:
            return _draw(lengths, doc_ids, group, candidates, n_real, window_size, chunk_size, seed, counts)
        except NotEnoughText:
            continue
    if candidates:
        raise NotEnoughText(
            f"group {group!r}: not enough text for one real window and one control of {window_size} tokens in chunks of "
            f"{chunk_size} from other text: add documents to this group, or lower --probe-chunk-size (probe_chunk_size)")
    counts.update(real=0, control=0, control_source_documents=0, same_document_joins=0)
    return []


def _draw(lengths: Mapping[int, int], doc_ids: Sequence[str], group: str, candidates: list, n_real: int,
          window_size: int, chunk_size: int, seed: int, counts: dict[str, Any]) -> list[ProbeSample]:
    """``n_real`` real windows among ``candidates`` and as many controls (raises `NotEnoughText` when they do not fit)."""
    rng = np.random.default_rng(_group_seed(seed, group))  # the same draw for the same n_real, whatever came before
    picked = sorted(rng.choice(len(candidates), size=n_real, replace=False).tolist())
    reals = [candidates[i] for i in picked]
    samples = [
        ProbeSample(f"{doc_ids[d]}/w{index:05d}", group, REAL, ((d, start, end),)) for d, index, (start, end) in reals
    ]
    # Controls: as many as real windows, from the source documents, outside every real span.
    sources = [d for d in sorted(lengths) if lengths[d] >= chunk_size]
    blocked: dict[int, list[tuple[int, int]]] = {d: [] for d in sources}
    for d, _, span in reals:
        if d in blocked:
            blocked[d].append(span)
    free = [_FreeSpace(lengths[d], blocked[d]) for d in sources]
    controls, same_document_joins = _controls(rng, group, sources, free, n_real, window_size, chunk_size, doc_ids)
    counts.update(real=n_real, control=n_real, control_source_documents=len(sources),
                  same_document_joins=same_document_joins)
    return samples + controls


def _controls(rng: np.random.Generator, group: str, sources: list[int], free: list[_FreeSpace], n_real: int,
              window_size: int, chunk_size: int, doc_ids: Sequence[str]) -> tuple[list[ProbeSample], int]:
    """``n_real`` controls of chunks from ``sources`` (rules: `hf_longattn.probe`), and how often two chunks in a row share a document."""
    samples = []
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
                raise NotEnoughText(
                    f"group {group!r}: not enough text outside the {n_real} real windows to build control {j} "
                    f"({window_size} tokens in chunks of {chunk_size})"
                )
            position = int(rng.choice(len(sources), p=weights / weights.sum()))
            space = free[position]
            for _ in range(1000):
                start = space.start(size, int(rng.integers(int(room[size][position]))))
                if position != previous or start != chunks[-1][2]:
                    break
            else:  # only a gap exactly continuing the previous chunk is left: too little room, as above
                raise NotEnoughText(f"group {group!r}: cannot place a non-adjacent chunk in document "
                                    f"{doc_ids[sources[position]]!r}")
            space.remove(start, start + size)
            for other, counts_of_size in room.items():
                counts_of_size[position] = space.count(other)
            chunks.append((sources[position], start, start + size))
            previous = position
        samples.append(ProbeSample(f"control/{group}/{j:05d}", group, CONTROL, tuple(chunks)))
    return samples, same_document_joins


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
        num_windows (`int`, defaults to `32`): N, real windows per group at most (fewer when the group
            has fewer candidate windows, or too little text outside N real windows for N controls);
            the group gets as many controls as real windows.
        chunk_size (`int`, defaults to `256`): tokens per control chunk; at most ``W // 2``.
        seed (`int`, defaults to `0`): sampling seed.
        doc_ids (sequence of `str`, *optional*): document ids, for the real windows' ids; default
            ``"doc{index}"``.

    Returns:
        `(list[ProbeSample], dict)`: the samples (per group, sorted by group: real then control) and
        counts per group (``documents``, ``window_documents``, ``candidate_windows``, ``requested``
        (``num_windows``), ``real``, ``control``, ``control_source_documents``, ``same_document_joins``).

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

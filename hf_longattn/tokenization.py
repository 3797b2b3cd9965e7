"""Documents → token ids: the one tokenisation path of hf_longattn (no special tokens; pre-tokenised documents kept as they are).

Long texts are tokenised in pieces, with the same ids as tokenising the whole text at once. A fast
tokenizer keeps, per token, an ``Encoding`` entry (token string, offsets, word ids, ...) and, per
character, its normalisation alignments: a whole 50 MB document costs several GB. So a text longer
than ``segment_chars`` is cut into pieces of about ``segment_chars`` characters, the pieces are
tokenised a few at a time (at most ``batch_chars`` characters per call, ids converted to numpy at
once) and their ids are concatenated.

How a piece is tokenised. Every piece but the first is tokenised together with the
``context_chars`` characters before it, ``ids(context + piece)``, and the ids of the context
alone, ``ids(context)``, are stripped from its front; they must be a prefix, or the cut is
rejected (see below). So the piece's first tokens see their left context, and whatever a tokenizer
does at the start of every call (the ``▁`` of SentencePiece-style ``Metaspace``/``Prepend``, the
prefix space of ``ByteLevel(add_prefix_space=True)``) falls on the stripped context, not on the
piece. The prefix test proves, on the very call, that the text after the cut does not change the
tokens before it (no merge or added token across the cut); the tokens after the cut are assumed
to depend on at most ``context_chars`` characters to their left, which holds for pre-tokenizers
(their regexes match within runs of one character class) and BPE within a pre-token. The context
is widened to 4× the longest added token, so an added token across a cut is always seen whole.

Where a text is cut. *Candidates* lie just after a line break (``\\n`` or ``\\r\\n``) or just before a
single space, with non-whitespace on both sides. Past every ``segment_chars`` characters the first
*clean* candidate is taken: one that passes the same prefix test on a neighbourhood
(``ids(text[c-m:c+m])`` starts with ``ids(text[c-m:c])``, m = context) and whose following tokens
stay the same with half the left context (evidence that ``m`` characters are enough). After
``MAX_TRIES`` failures the piece grows by another segment, so a text without clean cuts (megabytes
without whitespace) is tokenised whole. Should the prefix test fail on the real call, that cut is
dropped and the document tokenised again.
:func:`verify_tokenize` compares both ways on a given text.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice, pairwise
from typing import Any

import numpy as np

from . import vocabulary as V

logger = logging.getLogger(__name__)

SEGMENT_CHARS = 256 * 1024
"""Texts longer than this many characters are tokenised in pieces of about this size."""

CONTEXT_CHARS = 256
"""Characters of left context a piece is tokenised with (stripped again), and around a checked cut."""

BATCH_CHARS = 1024 * 1024
"""At most about this many characters per tokenizer call (pieces and short texts together; one at least)."""

MAX_TRIES = 16
"""Candidate cuts checked past a segment's end before the piece grows by another segment."""

TRIES_PER_CALL = 4
"""Candidate cuts checked in one tokenizer call (the first one is almost always clean)."""

_CANDIDATE = re.compile(r"(?<=\S)(?:\r?\n(?=\S)|(?= \S))")  # the match's end is the cut

Piece = tuple[int, int, int]  # (document, start, end) in characters


def tokenize(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    segment_chars: int = SEGMENT_CHARS,
    context_chars: int = CONTEXT_CHARS,
    batch_chars: int = BATCH_CHARS,
) -> list[np.ndarray]:
    """Token ids of ``texts`` as LongAttn uses them: no special tokens, int64 arrays (the one tokenisation path).

    A text longer than ``segment_chars`` is tokenised in pieces (see the module docstring and
    :func:`segment_bounds`), with the same ids as the whole text in one call and with memory
    bounded by ``batch_chars`` rather than by the length of the text.

    Args:
        tokenizer: a `transformers` tokenizer (called as ``tokenizer(list_of_str, add_special_tokens=False)``).
        texts (`Sequence[str]`): the documents.
        segment_chars (`int`, defaults to `SEGMENT_CHARS`): texts longer than this are cut into pieces
            of at least this many characters.
        context_chars (`int`, defaults to `CONTEXT_CHARS`): characters of left context a piece is
            tokenised with, and around a checked cut; less than ``segment_chars / 2``.
        batch_chars (`int`, defaults to `BATCH_CHARS`): about this many characters at most per
            tokenizer call (always one piece or text at least).

    Returns:
        `list[np.ndarray]`: one int64 array of token ids per text.

    Example:

    >>> ids = tokenize(tokenizer, ["one two three"])  # doctest: +SKIP
    >>> ids = tokenize(tokenizer, [open("book.txt").read()], segment_chars=65536)  # doctest: +SKIP
    """
    texts = list(texts)
    _check_sizes(segment_chars, context_chars, batch_chars)
    context = _context_chars(tokenizer, context_chars)
    bounds = [_bounds(tokenizer, text, segment_chars, context) for text in texts]
    ids: list[np.ndarray | None] = [None] * len(texts)
    todo = list(range(len(texts)))
    while todo:  # a second round only where a cut failed its test on the real call (then it is dropped)
        parts, failed = _encode_pieces(tokenizer, texts, bounds, todo, context, batch_chars)
        for doc, found in parts.items():
            ids[doc] = np.concatenate(found, dtype=np.int64)
        for doc, cuts in failed.items():
            logger.warning("document %d: cuts %s not clean on the whole piece; tokenising larger pieces", doc, cuts)
            bounds[doc] = [bound for bound in bounds[doc] if bound not in cuts]
        todo = sorted(failed)
    return ids


def segment_bounds(
    tokenizer: Any, text: str, segment_chars: int = SEGMENT_CHARS, context_chars: int = CONTEXT_CHARS
) -> list[int]:
    """Character offsets where :func:`tokenize` cuts ``text`` into pieces: ``[0, cut_1, ..., len(text)]``.

    Past every ``segment_chars`` characters the first clean cut among the next ``MAX_TRIES``
    candidates (after a line break or before a single space, non-whitespace on both sides) is
    taken; a cut ``c`` is clean when ``ids(text[c-m:c+m])`` starts with ``ids(text[c-m:c])``
    (``m = context_chars``, widened for long added tokens) and the ids after that prefix are the
    same with ``m // 2`` characters before ``c``. When none is clean the piece grows by another
    ``segment_chars``. A text of at most ``segment_chars`` characters is one piece.

    Args:
        tokenizer: the tokenizer :func:`tokenize` uses.
        text (`str`): one document.
        segment_chars (`int`, defaults to `SEGMENT_CHARS`): the least length of a piece but the last.
        context_chars (`int`, defaults to `CONTEXT_CHARS`): characters on each side of a checked cut.

    Returns:
        `list[int]`: increasing offsets, first ``0``, last ``len(text)``.

    Example:

    >>> segment_bounds(tokenizer, "short text")  # doctest: +SKIP
    [0, 10]
    """
    _check_sizes(segment_chars, context_chars, 1)
    return _bounds(tokenizer, text, segment_chars, _context_chars(tokenizer, context_chars))


def verify_tokenize(tokenizer: Any, text: str, **sizes: int) -> dict[str, int]:
    """Check that :func:`tokenize` gives the ids of the whole text in one call (which costs that call's memory).

    Args:
        tokenizer: a `transformers` tokenizer.
        text (`str`): one document.
        **sizes: ``segment_chars``, ``context_chars``, ``batch_chars`` as in :func:`tokenize`.

    Returns:
        `dict[str, int]`: ``num_tokens`` and ``num_pieces`` (the pieces of :func:`segment_bounds`).

    Raises:
        `ValueError`: the ids differ; the message names the first differing token and its piece.

    Example:

    >>> verify_tokenize(tokenizer, open("book.txt").read(), segment_chars=65536)  # doctest: +SKIP
    {'num_tokens': 412873, 'num_pieces': 24}
    """
    whole = _encode(tokenizer, [text])[0]
    pieces = tokenize(tokenizer, [text], **sizes)[0]
    bounds = segment_bounds(tokenizer, text, sizes.get("segment_chars", SEGMENT_CHARS),
                            sizes.get("context_chars", CONTEXT_CHARS))
    if len(whole) == len(pieces) and np.array_equal(whole, pieces):
        return {"num_tokens": len(whole), "num_pieces": len(bounds) - 1}
    size = min(len(whole), len(pieces))
    differ = np.flatnonzero(whole[:size] != pieces[:size])
    first = int(differ[0]) if differ.size else size
    context = _context_chars(tokenizer, sizes.get("context_chars", CONTEXT_CHARS))
    parts = _encode_pieces(tokenizer, [text], [bounds], [0], context, sizes.get("batch_chars", BATCH_CHARS))[0]
    ends = np.cumsum([len(part) for part in parts.get(0, [pieces])])
    piece = min(int(np.searchsorted(ends, first, side="right")), len(bounds) - 2)
    raise ValueError(
        f"tokenising in pieces differs from the whole text at token {first} ({len(pieces)} vs {len(whole)} tokens): "
        f"piece {piece} of {len(bounds) - 1}, characters [{bounds[piece]}, {bounds[piece + 1]})"
    )


def document_token_ids(
    tokenizer: Any, batch: Mapping[str, Sequence[Any]], text_column: str = V.TEXT, *, segment_chars: int = SEGMENT_CHARS
) -> list[np.ndarray]:
    """Token ids of a batch of documents: their pre-tokenised ``input_ids`` where given, else :func:`tokenize` of the text.

    Args:
        tokenizer: a `transformers` tokenizer.
        batch (`Mapping[str, Sequence]`): columns of a batch of documents.
        text_column (`str`, defaults to ``"text"``): the column of the texts.
        segment_chars (`int`, defaults to `SEGMENT_CHARS`): see :func:`tokenize`.

    Returns:
        `list[np.ndarray]`: one int64 array per document.

    Example:

    >>> document_token_ids(tokenizer, {"text": ["a b"], "input_ids": [None]})  # doctest: +SKIP
    """
    given = batch.get(V.INPUT_IDS) or [None] * len(batch[text_column])
    todo = [i for i, ids in enumerate(given) if ids is None]
    texts = [batch[text_column][i] for i in todo]
    encoded = dict(zip(todo, tokenize(tokenizer, texts, segment_chars=segment_chars))) if todo else {}
    return [encoded[i] if ids is None else np.asarray(ids, dtype=np.int64) for i, ids in enumerate(given)]


class Tokenize:
    """Picklable ``datasets.map`` function: documents → ``input_ids`` and ``doc_num_tokens`` (:func:`document_token_ids`).

    Args:
        tokenizer: a `transformers` tokenizer.
        text_column (`str`, defaults to ``"text"``): the column of the texts.
        segment_chars (`int`, defaults to `SEGMENT_CHARS`): see :func:`tokenize`.

    Example:

    >>> ds = ds.map(Tokenize(tokenizer), batched=True, remove_columns=["text"])  # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any, text_column: str = V.TEXT, *, segment_chars: int = SEGMENT_CHARS) -> None:
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.segment_chars = segment_chars

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        ids = document_token_ids(self.tokenizer, batch, self.text_column, segment_chars=self.segment_chars)
        return {V.INPUT_IDS: ids, V.DOC_NUM_TOKENS: [len(i) for i in ids]}


def _encode(tokenizer: Any, texts: list[str], dtype: type = np.int64) -> list[np.ndarray]:
    """The one tokenizer call: ids only (no offsets, masks or special tokens), each converted to numpy at once."""
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                        return_offsets_mapping=False, return_special_tokens_mask=False, verbose=False)["input_ids"]
    return [np.asarray(ids, dtype=dtype) for ids in encoded]


def _encode_pieces(
    tokenizer: Any, texts: list[str], bounds: list[list[int]], docs: list[int], context: int, batch_chars: int
) -> tuple[dict[int, list[np.ndarray]], dict[int, set[int]]]:
    """Ids of the pieces of ``docs``, each but a first one tokenised after its left context, which is stripped.

    Returns the pieces' ids of the documents whose every cut passed the prefix test, and for the
    others the cuts that failed it.
    """
    pieces = [(doc, start, end) for doc in docs for start, end in pairwise(bounds[doc])]
    parts: dict[int, list[np.ndarray]] = {doc: [] for doc in docs}
    failed: dict[int, set[int]] = {}
    for group in _groups(pieces, batch_chars):
        calls = []
        for doc, start, end in group:
            left = max(0, start - context)
            calls += [texts[doc][start:end]] if start == 0 else [texts[doc][left:end], texts[doc][left:start]]
        encoded = iter(_encode(tokenizer, calls, np.uint32))  # tokenizers' own id type: half the memory
        for doc, start, _ in group:
            ids = next(encoded)
            if start:
                prefix = next(encoded)
                if not _starts_with(ids, prefix):
                    failed.setdefault(doc, set()).add(start)
                ids = ids[len(prefix):]
            parts[doc].append(ids)
    return {doc: found for doc, found in parts.items() if doc not in failed}, failed


def _bounds(tokenizer: Any, text: str, segment_chars: int, context: int) -> list[int]:
    """:func:`segment_bounds` with the context already widened."""
    bounds, target = [0], segment_chars
    while target < len(text):
        cut = _next_clean_cut(tokenizer, text, target, min(target + segment_chars, len(text)), context)
        if cut is None:
            target += segment_chars
        else:
            bounds.append(cut)
            target = cut + segment_chars
    bounds.append(len(text))
    return bounds


def _next_clean_cut(tokenizer: Any, text: str, start: int, end: int, context: int) -> int | None:
    """The first clean cut among the first ``MAX_TRIES`` candidates in ``text[start:end]``, or None.

    A cut ``c`` is clean when, for both ``m = context`` and ``m = context // 2``, ``ids(text[c-m:c+context])``
    starts with ``ids(text[c-m:c])``, and what follows that prefix is the same for both ``m``.
    """
    tried = list(islice((match.end() for match in _CANDIDATE.finditer(text, start, end)), MAX_TRIES))
    for first in range(0, len(tried), TRIES_PER_CALL):
        cuts = tried[first:first + TRIES_PER_CALL]
        calls = []
        for cut in cuts:
            for left in (max(0, cut - context), cut - context // 2):
                calls += [text[left:cut + context], text[left:cut]]
        ids = _encode(tokenizer, calls)
        for i, cut in enumerate(cuts):
            wide, wide_left, narrow, narrow_left = ids[4 * i:4 * i + 4]
            if (_starts_with(wide, wide_left) and _starts_with(narrow, narrow_left)
                    and np.array_equal(wide[len(wide_left):], narrow[len(narrow_left):])):
                return cut
    return None


def _starts_with(ids: np.ndarray, prefix: np.ndarray) -> bool:
    return len(prefix) <= len(ids) and np.array_equal(ids[:len(prefix)], prefix)


def _context_chars(tokenizer: Any, context_chars: int) -> int:
    """``context_chars``, widened to 4× the longest added token (so one across a cut is seen whole)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    longest = max((len(str(getattr(token, "content", token))) for token in added.values()), default=0)
    return max(context_chars, 4 * longest)


def _groups(pieces: list[Piece], batch_chars: int) -> Iterator[list[Piece]]:
    """Consecutive pieces, at most ``batch_chars`` characters per group (one piece at least)."""
    group: list[Piece] = []
    size = 0
    for piece in pieces:
        length = piece[2] - piece[1]
        if group and size + length > batch_chars:
            yield group
            group, size = [], 0
        group.append(piece)
        size += length
    if group:
        yield group


def _check_sizes(segment_chars: int, context_chars: int, batch_chars: int) -> None:
    if context_chars < 1 or segment_chars <= 2 * context_chars or batch_chars < 1:
        raise ValueError(
            f"need context_chars >= 1, segment_chars > 2 * context_chars and batch_chars >= 1, got "
            f"segment_chars={segment_chars}, context_chars={context_chars}, batch_chars={batch_chars}"
        )

"""Paper Algorithm 1: cut tokenised documents into fixed-size windows of ``window_size`` tokens (a `datasets` map step).

Terms. A *document* of ``n`` tokens is cut into *windows* of exactly ``W = window_size`` tokens
(32768 in the paper). Algorithm 1 of LongAttn (arXiv 2502.16860), with half-open token spans:

* ``n < W``: no window (too short to carry long-range dependencies).
* ``l = 0, r = n``; while ``r − l > 3W``: emit ``[l, l+W)``, ``l += W``; emit ``[r−W, r)``, ``r −= W``.
* ``Δ = r − l``. ``W < Δ ≤ 2W``: emit ``[l, l+W)`` and ``[r−W, r)`` (they overlap unless Δ = 2W).
  ``2W < Δ ≤ 3W``: emit ``[l, l+W)``, ``[m, m+W)`` with ``m = l + ⌊(Δ − W)/2⌋``, and ``[r−W, r)``.
* ``Δ == W`` happens **only for n == W**: the loop runs only while Δ > 3W and each pass removes
  2W, so after at least one pass W < Δ ≤ 3W; without a pass Δ = n. The reference code emits
  nothing for n == W (neither branch holds); ``faithful=True`` reproduces that, the default keeps
  the single window ``[0, W)``.

The windows cover every token of the document; the count is
``2k + (2 if Δ ≤ 2W else 3)`` with ``k = max(0, ⌈(n − 3W) / 2W⌉)`` loop passes and ``Δ = n − 2kW``
(see :func:`num_windows`). Windows are kept as token ids (the reference code decodes them to
text and re-tokenises them for scoring, which can change the token count).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import vocabulary as V
from .tokenization import tokenize

OUTPUT_COLUMNS = V.WINDOW_COLUMNS
"""Columns written by :class:`SlidingWindows` (``text`` only when ``decode=True``), in this order."""

TOKEN_ALIGNED_COLUMNS = ("attention_mask", "token_type_ids", "special_tokens_mask", "offset_mapping")
"""Per-token input columns that do not describe a window; :class:`SlidingWindows` drops them."""

DOC_ID_HASH_CHARS = 16
"""Hex characters of the SHA-1 content hash used as ``doc_id`` when the input has no id column."""

_MAX_TOKEN_ID = 2**31 - 1  # windows store token ids as int32


def window_hash(token_ids: Sequence[int] | np.ndarray) -> str:
    """A window's content identity: hex BLAKE2b-128 of its token ids as int32 little-endian bytes.

    Example:

    >>> window_hash([1, 2, 3])
    'b30a3c159d7e8193559a42a84f1fcae1'
    """
    data = np.ascontiguousarray(np.asarray(token_ids, dtype="<i4")).tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def window_spans(num_tokens: int, window_size: int, faithful: bool = False) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` of the windows of one document (paper Algorithm 1), in document order.

    Every span has exactly ``window_size`` tokens; together they cover all ``num_tokens`` tokens.
    A document shorter than ``window_size`` has no window. A document of exactly ``window_size``
    tokens has one window ``[0, W)`` by default and none with ``faithful=True`` (the reference
    code). That is the only case where the two modes differ: after the loop of Algorithm 1,
    ``Δ = r − l`` equals ``W`` only when ``num_tokens == W``.

    Args:
        num_tokens (`int`): n, the number of tokens of the document.
        window_size (`int`): W, the number of tokens of every window (paper: 32768).
        faithful (`bool`, defaults to `False`): reproduce the reference code, which emits no
            window when ``num_tokens == window_size``.

    Returns:
        `list[tuple[int, int]]`: ``(start, end)`` token offsets, sorted by ``start``.

    Example:

    >>> window_spans(10, 4)
    [(0, 4), (3, 7), (6, 10)]
    >>> window_spans(16, 4)
    [(0, 4), (4, 8), (8, 12), (12, 16)]
    >>> window_spans(4, 4), window_spans(4, 4, faithful=True), window_spans(3, 4)
    ([(0, 4)], [], [])
    """
    _check_lengths(num_tokens, window_size)
    n, w = int(num_tokens), int(window_size)
    if n < w:
        return []
    spans: list[tuple[int, int]] = []
    left, right = 0, n
    while right - left > 3 * w:
        spans.append((left, left + w))
        left += w
        spans.append((right - w, right))
        right -= w
    delta = right - left
    if delta == w:  # only reachable for n == W (see the module docstring)
        if not faithful:
            spans.append((left, left + w))
    elif delta <= 2 * w:
        spans.extend([(left, left + w), (right - w, right)])
    else:  # 2W < Δ ≤ 3W
        middle = left + (delta - w) // 2
        spans.extend([(left, left + w), (middle, middle + w), (right - w, right)])
    spans.sort()
    return spans


def num_windows(num_tokens: int | Sequence[int] | np.ndarray, window_size: int, faithful: bool = False) -> np.ndarray:
    """Number of windows :func:`window_spans` emits, vectorised over document lengths (closed form).

    ``0`` if ``n < W``; ``n == W``: ``1`` (``0`` with ``faithful=True``); otherwise
    ``2k + (2 if Δ ≤ 2W else 3)`` with ``k = max(0, ⌈(n − 3W) / 2W⌉)`` and ``Δ = n − 2kW``.

    Args:
        num_tokens (`int` or array-like of `int`): document lengths n in tokens.
        window_size (`int`): W in tokens.
        faithful (`bool`, defaults to `False`): see :func:`window_spans`.

    Returns:
        `np.ndarray` of int64 with the shape of ``num_tokens``.

    Example:

    >>> num_windows([3, 4, 5, 12, 13, 16, 47], 4).tolist()
    [0, 1, 2, 3, 4, 4, 12]
    """
    n = np.asarray(num_tokens, dtype=np.int64)
    if n.size and n.min() < 0:
        raise ValueError(f"num_tokens must be >= 0, got {int(n.min())}")
    _check_lengths(0, window_size)
    w = int(window_size)
    passes = np.maximum(0, -((3 * w - n) // (2 * w)))  # k = max(0, ceil((n - 3W) / 2W))
    delta = n - 2 * w * passes
    count = 2 * passes + np.where(delta <= 2 * w, 2, 3)
    count = np.where(n == w, 0 if faithful else 1, count)
    return np.where(n < w, 0, count).astype(np.int64)


def count_windows(num_tokens_list: Iterable[int] | np.ndarray, window_size: int, faithful: bool = False) -> dict[str, int]:
    """Counters for a corpus cut into windows, from its token lengths alone (no tokenizer needed).

    :class:`SlidingWindows` runs inside ``map`` worker processes, so its own counters do not reach
    the caller; call this on a token-length column to report what was kept and dropped.

    Args:
        num_tokens_list (iterable of `int`): the token count of every document.
        window_size (`int`): W in tokens.
        faithful (`bool`, defaults to `False`): see :func:`window_spans`.

    Returns:
        `dict[str, int]` with
        ``documents`` (all documents), ``documents_too_short`` (documents that give no window:
        ``n < W``, and ``n == W`` when faithful), ``windows``, ``tokens_documents`` (Σ n) and
        ``tokens_in`` (``windows · W``; windows overlap, so this can exceed ``tokens_documents``).

    Example:

    >>> count_windows([3, 4, 10], 4)
    {'documents': 3, 'documents_too_short': 1, 'windows': 4, 'tokens_documents': 17, 'tokens_in': 16}
    """
    if isinstance(num_tokens_list, np.ndarray):
        lengths = num_tokens_list.astype(np.int64).ravel()
    else:
        lengths = np.fromiter((int(x) for x in num_tokens_list), dtype=np.int64)
    counts = num_windows(lengths, window_size, faithful)
    n_windows = int(counts.sum())
    return {
        "documents": int(lengths.size),
        "documents_too_short": int((counts == 0).sum()),
        "windows": n_windows,
        "tokens_documents": int(lengths.sum()),
        "tokens_in": n_windows * int(window_size),
    }


def _check_lengths(num_tokens: int, window_size: int) -> None:
    if isinstance(window_size, bool) or not isinstance(window_size, (int, np.integer)) or window_size < 1:
        raise ValueError(f"window_size must be a positive int, got {window_size!r}")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")


def _zero_stats() -> dict[str, int]:
    return {"documents": 0, "documents_too_short": 0, "windows": 0, "tokens_documents": 0, "tokens_in": 0}


def _vocab_digest(tokenizer: Any) -> str:
    """SHA-1 of the sorted ``(token, id)`` vocabulary: stable, unlike the pickled tokenizer state."""
    if tokenizer is None:
        return ""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    digest = hashlib.sha1()
    for token, index in vocab:
        digest.update(f"{index}\x1f{token}\x1e".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


class SlidingWindows:
    """Cut documents into LongAttn windows; a picklable batched function for `datasets.Dataset.map`.

    Each input row (a document) becomes one output row per window of :func:`window_spans`;
    documents shorter than ``window_size`` give no row. Token ids come from an existing
    ``input_ids`` column when the input has one, else from tokenising ``text_column`` with
    ``add_special_tokens=False`` (batched; a fast tokenizer is much quicker). Output columns:

    * ``id`` (`string`): ``f"{doc_id}/w{window_index:05d}"`` — a function of the document id and
      the window's position only, so it does not depend on batching, sharding or row order.
    * ``doc_id`` (`string`): ``str`` of the input's ``id_column``; if the input has no such column,
      the first 16 hex characters of the SHA-1 of the UTF-8 text (of the int64 little-endian
      token ids when there is no text column). Content hashes give identical documents the same id.
    * ``window_index`` (`int64`): 0-based position of the window in its document.
    * ``window_start``, ``window_end`` (`int64`): token offsets ``[start, end)`` in the document.
    * ``input_ids`` (`list<int32>`): exactly the document's ``tokens[start:end]``, ``W`` of them.
    * ``window_hash`` (`string`): :func:`window_hash` of ``input_ids``, the window's content identity.
    * ``text`` (`string`, only if ``decode=True``): ``tokenizer.decode(input_ids)`` without
      cleanup; ``input_ids`` is the source of truth (a window may cut a character in two).
    * every other input column (e.g. ``category``, ``source``), copied onto each of the
      document's windows. Consumed and not copied: ``text_column``, ``id_column``, ``input_ids``
      and the per-token columns in :data:`TOKEN_ALIGNED_COLUMNS`; with ``decode=False`` the
      document text is therefore dropped (copying it onto every window would multiply storage).

    ``self.stats`` counts what this instance processed in this process (``documents``,
    ``documents_too_short``, ``windows``, ``tokens_documents``, ``tokens_in``); with
    ``num_proc > 1`` or a cache hit it stays at zero, so use :func:`count_windows` on a length
    column for reporting.

    Fingerprint: `datasets` hashes this object through :meth:`fingerprint_config` only
    (tokenizer ``name_or_path``, vocabulary size and digest, ``window_size``, columns, ``faithful``,
    ``decode`` and ``hf_longattn.__version__``), never through the tokenizer's mutable internals,
    so two separately built instances with the same configuration share the ``map`` cache.
    Ordinary pickling (used by ``num_proc > 1``) carries the tokenizer itself.

    Args:
        tokenizer (`transformers.PreTrainedTokenizerBase`, *optional*): used to tokenise
            ``text_column`` and to decode windows. May be `None` only if the input has an
            ``input_ids`` column and ``decode=False``.
        window_size (`int`): W, tokens per window (paper: 32768).
        text_column (`str`, defaults to `"text"`): the document text.
        id_column (`str`, defaults to `"id"`): the document id; hashed text when absent.
        faithful (`bool`, defaults to `False`): emit no window for ``n == W`` like the reference code.
        decode (`bool`, defaults to `True`): write the decoded ``text`` of every window.

    Example:

    >>> from datasets import Dataset
    >>> from transformers import AutoTokenizer
    >>> tokenizer = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M")  # doctest: +SKIP
    >>> docs = Dataset.from_dict({"id": ["a"], "text": ["one two " * 20000], "category": ["Book"]})  # doctest: +SKIP
    >>> windowing = SlidingWindows(tokenizer, window_size=32768)  # doctest: +SKIP
    >>> windows = docs.map(windowing, batched=True, remove_columns=docs.column_names,
    ...                    features=windowing.output_features(docs.features))  # doctest: +SKIP
    >>> windows.column_names  # doctest: +SKIP
    ['id', 'doc_id', 'window_index', 'window_start', 'window_end', 'input_ids', 'text', 'category']
    >>> windows["id"]  # doctest: +SKIP
    ['a/w00000', 'a/w00001']
    """

    def __init__(
        self,
        tokenizer: Any,
        window_size: int,
        *,
        text_column: str = "text",
        id_column: str = "id",
        faithful: bool = False,
        decode: bool = True,
    ) -> None:
        _check_lengths(0, window_size)
        if decode and tokenizer is None:
            raise ValueError("decode=True needs a tokenizer; pass one or set decode=False")
        self.tokenizer = tokenizer
        self.window_size = int(window_size)
        self.text_column = text_column
        self.id_column = id_column
        self.faithful = bool(faithful)
        self.decode = bool(decode)
        self._vocab_digest = _vocab_digest(tokenizer)
        self.stats = _zero_stats()

    def __repr__(self) -> str:
        name = getattr(self.tokenizer, "name_or_path", None) if self.tokenizer is not None else None
        return (
            f"SlidingWindows(tokenizer={name!r}, window_size={self.window_size}, text_column={self.text_column!r}, "
            f"id_column={self.id_column!r}, faithful={self.faithful}, decode={self.decode})"
        )

    # -- configuration, pickling and fingerprint ------------------------------------------------

    def fingerprint_config(self) -> dict[str, Any]:
        """The configuration that defines the output; `datasets` fingerprints hash only this."""
        from . import __version__

        tokenizer = self.tokenizer
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "hf_longattn_version": __version__,
            "tokenizer_name_or_path": "" if tokenizer is None else str(getattr(tokenizer, "name_or_path", "")),
            "tokenizer_vocab_size": 0 if tokenizer is None else len(tokenizer),
            "tokenizer_vocab_digest": self._vocab_digest,
            "window_size": self.window_size,
            "text_column": self.text_column,
            "id_column": self.id_column,
            "faithful": self.faithful,
            "decode": self.decode,
        }

    def __getstate__(self) -> dict[str, Any]:
        # Counters are per process and not part of the configuration.
        return {key: value for key, value in self.__dict__.items() if key != "stats"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.stats = _zero_stats()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register_fingerprint(cls)

    # -- schema -------------------------------------------------------------------------------

    def output_features(self, input_features: Mapping[str, Any]) -> Any:
        """`datasets.Features` of the output rows, to pass as ``features=`` to ``map``.

        Args:
            input_features (`datasets.Features`): the features of the document dataset.

        Returns:
            `datasets.Features`: :data:`OUTPUT_COLUMNS` (``text`` only with ``decode=True``),
            then the carried input columns with their input types.
        """
        carried = self._carried_columns(list(input_features))
        return V.window_features({column: input_features[column] for column in carried}, text=self.decode)

    def _output_columns(self) -> list[str]:
        return [column for column in OUTPUT_COLUMNS if self.decode or column != "text"]

    def _carried_columns(self, columns: list[str]) -> list[str]:
        consumed = {self.text_column, self.id_column, "input_ids", *TOKEN_ALIGNED_COLUMNS}
        carried = [column for column in columns if column not in consumed]
        clashes = [column for column in carried if column in OUTPUT_COLUMNS]
        if clashes:
            raise ValueError(
                f"Input columns {clashes} would be overwritten by the window columns {list(OUTPUT_COLUMNS)}; "
                f"rename or remove them first. Current columns: {columns}"
            )
        return carried

    # -- the map function ---------------------------------------------------------------------

    def __call__(self, batch: Mapping[str, Sequence[Any]], indices: Sequence[int] | None = None) -> dict[str, list[Any]]:
        """Cut a batch of documents into windows (use with ``map(..., batched=True)``).

        Args:
            batch (`dict[str, list]`): columns of a batch of documents.
            indices (`list[int]`, *optional*): dataset row indices (``with_indices=True``), used
                only in error messages; otherwise rows are numbered within the batch.

        Returns:
            `dict[str, list]`: one entry per window, columns as in the class docstring, each with its
            declared type (`hf_longattn.vocabulary.TypedColumn`; carried columns keep their input types).
        """
        columns = list(batch.keys())
        has_token_ids = "input_ids" in batch
        if not has_token_ids and self.text_column not in batch:
            raise ValueError(
                f"Column '{self.text_column}' (text_column) not in the dataset and no 'input_ids' column either. "
                f"Current columns: {columns}"
            )
        carried = self._carried_columns(columns)
        n_docs = len(batch[columns[0]]) if columns else 0
        row_numbers = list(indices) if indices is not None else list(range(n_docs))
        where = "row" if indices is not None else "batch row"

        texts = self._texts(batch, row_numbers, where) if self.text_column in batch else None
        if has_token_ids:
            token_lists = [self._token_ids(value, row_numbers[i], where) for i, value in enumerate(batch["input_ids"])]
        else:
            if self.tokenizer is None:
                raise ValueError(f"Column '{self.text_column}' needs a tokenizer, but tokenizer is None")
            token_lists = tokenize(self.tokenizer, texts)
        doc_ids = self._doc_ids(batch, texts, token_lists, row_numbers, where)

        out: dict[str, list[Any]] = {column: [] for column in [*self._output_columns(), *carried]}
        for doc, tokens in enumerate(token_lists):
            spans = window_spans(len(tokens), self.window_size, self.faithful)
            self.stats["documents"] += 1
            self.stats["tokens_documents"] += len(tokens)
            self.stats["documents_too_short"] += not spans
            self.stats["windows"] += len(spans)
            self.stats["tokens_in"] += len(spans) * self.window_size
            for index, (start, end) in enumerate(spans):
                out["id"].append(f"{doc_ids[doc]}/w{index:05d}")
                out["doc_id"].append(doc_ids[doc])
                out["window_index"].append(index)
                out["window_start"].append(start)
                out["window_end"].append(end)
                out["input_ids"].append(tokens[start:end].astype(np.int32))
                out[V.WINDOW_HASH].append(window_hash(out["input_ids"][-1]))
                for column in carried:
                    out[column].append(batch[column][doc])
        if self.decode:
            out["text"] = self.tokenizer.batch_decode(
                [ids.tolist() for ids in out["input_ids"]], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        return V.typed_columns(self.output_features(_batch_features(batch)), out)

    def _texts(self, batch: Mapping[str, Sequence[Any]], rows: list[int], where: str) -> list[str]:
        texts = list(batch[self.text_column])
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(
                    f"Column '{self.text_column}' must hold strings, but {where} {rows[i]} holds "
                    f"{type(text).__name__} ({text!r:.80})"
                )
        return texts

    @staticmethod
    def _token_ids(value: Any, row: int, where: str) -> np.ndarray:
        if value is None or isinstance(value, (str, bytes)):
            raise ValueError(f"Column 'input_ids' must hold lists of token ids, but {where} {row} holds {value!r:.80}")
        tokens = np.asarray(value)
        if tokens.size == 0:
            return np.zeros(0, dtype=np.int64)
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(
                f"Column 'input_ids' must hold 1-d lists of ints, but {where} {row} holds an array of "
                f"dtype {tokens.dtype} and shape {tokens.shape}"
            )
        if tokens.min() < 0 or tokens.max() > _MAX_TOKEN_ID:
            raise ValueError(f"Column 'input_ids' at {where} {row} holds token ids outside [0, 2**31 - 1]")
        return tokens.astype(np.int64, copy=False)

    def _doc_ids(
        self,
        batch: Mapping[str, Sequence[Any]],
        texts: list[str] | None,
        token_lists: list[np.ndarray],
        rows: list[int],
        where: str,
    ) -> list[str]:
        if self.id_column in batch:
            doc_ids = []
            for i, value in enumerate(batch[self.id_column]):
                if value is None:
                    raise ValueError(f"Column '{self.id_column}' (id_column) is null at {where} {rows[i]}")
                doc_ids.append(str(value))
            return doc_ids
        if texts is not None:
            contents = [text.encode("utf-8", "surrogatepass") for text in texts]
        else:
            contents = [tokens.astype("<i8").tobytes() for tokens in token_lists]
        return [hashlib.sha1(content).hexdigest()[:DOC_ID_HASH_CHARS] for content in contents]


def _fingerprint_placeholder(config: dict[str, Any]) -> None:
    """Stand-in constructor that `datasets` fingerprints record instead of a :class:`SlidingWindows`."""
    raise TypeError("this pickle only fingerprints a SlidingWindows configuration and cannot be loaded")


def _register_fingerprint(cls: type) -> None:
    """Make `datasets.fingerprint.Hasher` hash ``cls`` instances by :meth:`fingerprint_config` only.

    `datasets` hashes ``map`` functions with its own pickler (``datasets.utils._dill``), separate
    from the one that ships functions to worker processes; registering a reducer there changes the
    fingerprint and nothing else.
    """
    try:
        from datasets.utils._dill import pklregister
    except ImportError:  # datasets missing or reorganised: hashing falls back to plain pickling
        return

    def save(pickler: Any, obj: SlidingWindows) -> None:
        pickler.save_reduce(_fingerprint_placeholder, (obj.fingerprint_config(),), obj=obj)

    pklregister(cls)(save)


_register_fingerprint(SlidingWindows)


def _batch_features(batch: Mapping[str, Sequence[Any]]) -> Any:
    """The `datasets.Features` of a batch ``datasets.map`` hands over (it holds its Arrow table), else none."""
    from datasets import Features

    table = getattr(batch, "pa_table", None)
    return Features.from_arrow_schema(table.schema) if table is not None else Features()

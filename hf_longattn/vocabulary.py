"""The one vocabulary: every column, status and counter name hf_longattn writes, with its meaning and type.

Nothing else in the package spells a ``longattn_*`` column, a status or a counter name: they
import it from here. Three tables describe the data as it flows:

* documents (:data:`DOCUMENT_COLUMNS`): ``id``, ``category``, ``text``, ``source``, ``license``;
* windows (:func:`window_features`): a document's span of exactly W tokens, as token ids;
* scores (:func:`score_features`) and the selection (:data:`SELECTION_COLUMNS`).

A window's *status* is one of the closed set :data:`STATUSES`; the free-text reason of a status
other than ``ok`` is in ``longattn_status_detail``, so statuses can be counted and tabulated.

Counters (:data:`COUNTERS`) have one meaning each: ``tokens_documents`` are the tokens of the
documents read, ``tokens_in`` the tokens of the windows scored (windows overlap, so it can exceed
``tokens_documents``), ``tokens_out`` those of the windows kept.
"""

from __future__ import annotations

from typing import Any

# -- documents ---------------------------------------------------------------------------------
ID = "id"
CATEGORY = "category"
TEXT = "text"
SOURCE = "source"
LICENSE = "license"
DOCUMENT_COLUMNS = (ID, CATEGORY, TEXT, SOURCE, LICENSE)
"""Columns of every document table, in this order."""

# -- windows -------------------------------------------------------------------------------------
DOC_ID = "doc_id"
WINDOW_INDEX = "window_index"
WINDOW_START = "window_start"
WINDOW_END = "window_end"
INPUT_IDS = "input_ids"
DOC_NUM_TOKENS = "doc_num_tokens"
WINDOW_HASH = "window_hash"
WINDOW_COLUMNS = (ID, DOC_ID, WINDOW_INDEX, WINDOW_START, WINDOW_END, INPUT_IDS, WINDOW_HASH, TEXT)
"""Columns `SlidingWindows` writes (``text`` only when it decodes), in this order."""

# -- scores --------------------------------------------------------------------------------------
DS = "longattn_ds"
DU = "longattn_du"
NUM_TOKENS = "longattn_num_tokens"
MIN_DISTANCE = "longattn_min_distance"
STATUS = "longattn_status"
STATUS_DETAIL = "longattn_status_detail"
DS_BY_DISTANCE = "longattn_ds_by_distance"
DU_BY_DISTANCE = "longattn_du_by_distance"
DS_BY_LAYER = "longattn_ds_by_layer"
DU_BY_LAYER = "longattn_du_by_layer"
DS_PER_HEAD = "longattn_ds_per_head"
DU_PER_HEAD = "longattn_du_per_head"
SCORE_COLUMNS = (DS, DU, NUM_TOKENS, MIN_DISTANCE, STATUS, STATUS_DETAIL)
"""The score columns every scorer writes, in this order."""

# -- selection -----------------------------------------------------------------------------------
LDS = "longattn_lds"
SELECTED = "longattn_selected"
SELECTION_COLUMNS = (ID, CATEGORY, *SCORE_COLUMNS, LDS, SELECTED)
"""Columns of ``selection.parquet``, in this order."""

# -- statuses: a closed set ------------------------------------------------------------------------
OK = "ok"
EMPTY = "empty"
MISSING = "missing"
TOO_SHORT = "too_short"
BAD_TOKEN = "bad_token"
OOM = "oom"
NON_FINITE = "non_finite"
ERROR = "error"
STATUSES = {
    OK: "scored",
    EMPTY: "no token (empty text or an empty token list)",
    MISSING: "no value (null text or token ids)",
    TOO_SHORT: "L ≤ k: no pair of tokens is far enough apart",
    BAD_TOKEN: "a token id outside the model's vocabulary, or a null id",
    OOM: "out of memory even as a single window with the smallest blocks",
    NON_FINITE: "the attention statistics overflowed (non-finite)",
    ERROR: "another error while scoring this window (see longattn_status_detail)",
}
"""Every value ``longattn_status`` can take, with its meaning."""
NULL_STATUS = "null"
"""Key under which rows with a null status are counted (never written as a status)."""

# -- counters --------------------------------------------------------------------------------------
COUNTERS = {
    "documents": "documents read",
    "documents_too_short": "documents shorter than W tokens: they give no window",
    "tokens_documents": "tokens of the documents read",
    "windows": "windows scored (after the max_windows_per_category cap)",
    "windows_left_out": "windows cut but left out by the max_windows_per_category cap",
    "tokens_in": "tokens of the windows scored (W each; windows of a document overlap)",
    "scored_ok": "windows with status ok",
    "not_ok": "windows per status other than ok",
    "kept": "windows selected",
    "tokens_out": "tokens of the windows selected",
}
"""Every counter name, with its one meaning."""

# -- descriptions of the exported columns ------------------------------------------------------------
COLUMN_DESCRIPTIONS = {
    ID: "stable window id: `{doc_id}/w{window_index:05d}`",
    DOC_ID: "id of the source document",
    WINDOW_INDEX: "index of the window within its document (Algorithm 1 order)",
    WINDOW_START: "first token offset of the window in the document",
    WINDOW_END: "end token offset (exclusive) of the window in the document",
    INPUT_IDS: "token ids of the window (scored as is, no re-tokenisation)",
    TEXT: "decoded text of the window (`input_ids` is the source of truth)",
    CATEGORY: "source category (one split per category)",
    SOURCE: "where the document came from (file, dataset or corpus)",
    LICENSE: "license of the source document, as given by its source",
    DOC_NUM_TOKENS: "number of tokens of the whole source document",
    WINDOW_HASH: "BLAKE2b-128 of the window's token ids (int32, little-endian): its content identity",
    DS: "DS_T, dependency strength (null when the status is not ok)",
    DU: "DU_T, dependency uniformity (null when the status is not ok)",
    NUM_TOKENS: "number of tokens scored (L)",
    MIN_DISTANCE: "k in tokens: a key is far when it is at least k tokens back",
    STATUS: "`ok`, or why the window was not scored: " + ", ".join(f"`{s}`" for s in STATUSES if s != OK),
    STATUS_DETAIL: "the reason of a status other than `ok` in words (null when ok)",
    DS_BY_DISTANCE: "DS_T for each configured min_distance",
    DU_BY_DISTANCE: "DU_T for each configured min_distance",
    DS_BY_LAYER: "DS_T for each scored layer",
    DU_BY_LAYER: "DU_T for each scored layer",
    DS_PER_HEAD: "per-head dependency strength of the first scored layer",
    DU_PER_HEAD: "per-head dependency uniformity of the first scored layer",
    LDS: "LDS_T, the selection score within the category (null when the status is not ok)",
    SELECTED: "true when the window is in the `filtered` config",
}
"""One line per column that can appear in an export, for the dataset card."""


COLUMN_TYPES = {ID: "string", DOC_ID: "string", WINDOW_HASH: "string", DOC_NUM_TOKENS: "int64", WINDOW_INDEX: "int64", WINDOW_START: "int64", WINDOW_END: "int64",
                TEXT: "string", CATEGORY: "string", DS: "float64", DU: "float64", NUM_TOKENS: "int64",
                MIN_DISTANCE: "int64", STATUS: "string", STATUS_DETAIL: "string", LDS: "float64", SELECTED: "bool"}
"""Arrow type of every scalar column (``input_ids`` is a list of int32)."""


def score_features(*, distances: int = 1, layers: int = 1, per_head: bool = False) -> Any:
    """`datasets.Features` of the score columns a scorer writes.

    Args:
        distances (`int`, defaults to `1`): thresholds scored; more than one adds the
            ``*_by_distance`` list columns.
        layers (`int`, defaults to `1`): layers scored; more than one adds ``*_by_layer``.
        per_head (`bool`, defaults to `False`): add ``*_per_head``.

    Example:

    >>> list(score_features())
    ['longattn_ds', 'longattn_du', 'longattn_num_tokens', 'longattn_min_distance', 'longattn_status', 'longattn_status_detail']
    """
    from datasets import Features, List, Value

    columns: dict[str, Any] = {name: Value(COLUMN_TYPES[name]) for name in SCORE_COLUMNS}
    extra = ((distances > 1, (DS_BY_DISTANCE, DU_BY_DISTANCE)), (layers > 1, (DS_BY_LAYER, DU_BY_LAYER)),
             (per_head, (DS_PER_HEAD, DU_PER_HEAD)))
    for wanted, names in extra:
        if wanted:
            columns.update({name: List(Value("float64")) for name in names})
    return Features(columns)


class TypedColumn(list):
    """A column of a map function's output that carries its declared Arrow type.

    A plain list is typed by `datasets` from its values, so a batch whose values are all null
    types the column as null and a later batch with a value fails to write. pyarrow converts a
    `TypedColumn` with its own type (the ``__arrow_array__`` protocol), so ``ds.map(fn, batched=True)``
    gives the declared type in every batch and every process, without ``features=``. It is a
    `list` in every other respect.

    Example:

    >>> import pyarrow as pa
    >>> pa.array(TypedColumn([None, None], pa.float64())).type
    DataType(double)
    """

    def __init__(self, values: Any = (), arrow_type: Any = None) -> None:
        super().__init__(values)
        self.arrow_type = arrow_type

    def __arrow_array__(self, type: Any = None) -> Any:  # noqa: A002 - pyarrow's protocol names it so
        import pyarrow as pa

        return pa.array(list(self), type=type or self.arrow_type)

    def __reduce__(self) -> tuple:
        return TypedColumn, (list(self), self.arrow_type)


def typed_columns(features: Any, columns: dict[str, list]) -> dict[str, TypedColumn]:
    """``columns`` as `TypedColumn` lists with the Arrow types of ``features`` (columns not in it keep no type).

    Example:

    >>> from datasets import Features, Value
    >>> typed_columns(Features({"x": Value("float64")}), {"x": [None]})["x"].arrow_type
    DataType(double)
    """
    schema = features.arrow_schema
    types = {name: schema.field(name).type for name in schema.names}
    return {name: TypedColumn(values, types.get(name)) for name, values in columns.items()}


def window_features(carried: dict[str, Any] | None = None, *, text: bool = False) -> Any:
    """`datasets.Features` of windows: :data:`WINDOW_COLUMNS` (``text`` if asked), then the carried columns.

    Example:

    >>> list(window_features())
    ['id', 'doc_id', 'window_index', 'window_start', 'window_end', 'input_ids', 'window_hash']
    """
    from datasets import Features, List, Value

    features: dict[str, Any] = {name: Value(COLUMN_TYPES[name]) for name in WINDOW_COLUMNS[:5]}
    features[INPUT_IDS] = List(Value("int32"))
    features[WINDOW_HASH] = Value(COLUMN_TYPES[WINDOW_HASH])
    if text:
        features[TEXT] = Value("string")
    features.update(carried or {})
    return Features(features)


def selection_features() -> Any:
    """`datasets.Features` of ``selection.parquet``: id, category, the score columns, LDS and the selection flag."""
    from datasets import Features, Value

    return Features({ID: Value(COLUMN_TYPES[ID]), CATEGORY: Value(COLUMN_TYPES[CATEGORY]), **score_features(),
                     LDS: Value(COLUMN_TYPES[LDS]), SELECTED: Value(COLUMN_TYPES[SELECTED])})

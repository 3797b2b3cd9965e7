"""Documents → token ids: the one tokenisation path of hf_longattn (no special tokens; pre-tokenised documents kept as they are)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import vocabulary as V


def tokenize(tokenizer: Any, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of ``texts`` as LongAttn uses them: no special tokens, int64 arrays (the one tokenisation path).

    Example:

    >>> ids = tokenize(tokenizer, ["one two three"])  # doctest: +SKIP
    """
    encoded = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)["input_ids"]
    return [np.asarray(ids, dtype=np.int64) for ids in encoded]


def document_token_ids(tokenizer: Any, batch: Mapping[str, Sequence[Any]], text_column: str = V.TEXT) -> list[np.ndarray]:
    """Token ids of a batch of documents: their pre-tokenised ``input_ids`` where given, else :func:`tokenize` of the text."""
    given = batch.get(V.INPUT_IDS) or [None] * len(batch[text_column])
    todo = [i for i, ids in enumerate(given) if ids is None]
    encoded = dict(zip(todo, tokenize(tokenizer, [batch[text_column][i] for i in todo]))) if todo else {}
    return [encoded[i] if ids is None else np.asarray(ids, dtype=np.int64) for i, ids in enumerate(given)]


class Tokenize:
    """Picklable ``datasets.map`` function: documents → ``input_ids`` and ``doc_num_tokens`` (:func:`document_token_ids`)."""

    def __init__(self, tokenizer: Any, text_column: str = V.TEXT) -> None:
        self.tokenizer = tokenizer
        self.text_column = text_column

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        ids = document_token_ids(self.tokenizer, batch, self.text_column)
        return {V.INPUT_IDS: ids, V.DOC_NUM_TOKENS: [len(i) for i in ids]}

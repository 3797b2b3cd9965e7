"""Tests for hf_longattn.tokenization: long texts tokenised in pieces give exactly the ids of the whole text.

Every tokenizer here is built offline: a byte-level BPE (GPT-2's regex), a Llama-3-style regex
pre-tokenizer with NFC and added tokens, a SentencePiece-like ``Metaspace(prepend_scheme="always")``
and a Llama-2-style one without pre-tokenizer (``Prepend("▁")`` on every call), plus the real
SmolLM2 tokenizer from its GGUF file (``-m smollm2``). The texts are Python's own files, several
hundred thousand to a few million characters, in the shapes that stress the cuts: CRLF, tabs and
runs of blank lines, megabytes on one line, no whitespace at all, CJK and decomposed accents.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from functools import cache
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hf_longattn import tokenization as T
from hf_longattn.tokenization import Tokenize, document_token_ids, segment_bounds, tokenize, verify_tokenize

from .corpus import _stdlib
from .helpers import save_tokenizer

SEGMENT = 4096  # small pieces, so texts of 300,000 characters are cut ~70 times
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKENIZERS = ("byte_level", "llama3_regex", "metaspace_always", "llama2_prepend")


# -- real long texts ---------------------------------------------------------------------------

@cache
def stdlib_code(chars: int) -> str:
    """The standard library's modules (sorted, ``test`` excluded) joined with ``# file:`` headers, cut to ``chars``."""
    lib, parts, size = _stdlib(), [], 0
    for path in sorted(p for p in lib.rglob("*.py") if not {"site-packages", "test", "tests"} & set(p.parts)):
        parts.append(f"# file: {path.relative_to(lib)}\n{path.read_text(encoding='utf-8', errors='replace')}")
        size += len(parts[-1])
        if size > chars:
            break
    return "\n".join(parts)[:chars]


@cache
def non_ascii_lines() -> tuple[str, ...]:
    """CJK, Korean and Japanese prose bundled with CPython's tests, plus its lines with accents, decomposed (NFD)."""
    lib = _stdlib()
    lines = [line for path in sorted((lib / "test" / "cjkencodings").glob("*-utf8.txt"))
             for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    topics = (lib / "pydoc_data" / "topics.py").read_text(encoding="utf-8").splitlines()
    accented = [unicodedata.normalize("NFD", line) for line in topics if any(ord(c) > 127 for c in line)]
    assert len(lines) > 20 and accented
    return tuple(lines + accented)


def shaped(kind: str, chars: int = 300_000) -> str:
    """A real text of about ``chars`` characters in one of the shapes that stress the cuts."""
    code = stdlib_code(chars)
    if kind == "code":
        return code
    if kind == "crlf":
        return code.replace("\n", "\r\n")
    if kind == "tabs_blank_runs":  # indents as tabs, every blank line a run of five, trailing tabs
        text = re.sub(r"(?m)^((?:    )+)", lambda m: "\t" * (len(m.group(1)) // 4), code)
        return text.replace("\n\n", "\n\n\n\n\n\n").replace(":\n", ":\t\n")
    if kind == "one_line":  # megabytes without a line break
        return " ".join(code.split())
    if kind == "no_whitespace":
        return "".join(code.split())
    if kind == "non_ascii":  # every fifth line a CJK / decomposed-accent line
        extra = non_ascii_lines()
        lines = code.splitlines()
        return "\n".join(f"{line}\n{extra[i % len(extra)]}" if i % 5 == 0 else line for i, line in enumerate(lines))
    if kind == "docs":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[name] for name in sorted(topics))[:chars]
    raise ValueError(kind)


SHAPES = ("code", "crlf", "tabs_blank_runs", "one_line", "no_whitespace", "non_ascii", "docs")


# -- tokenizers built offline --------------------------------------------------------------------

def _training_texts() -> list[str]:
    return [stdlib_code(300_000), "\n".join(non_ascii_lines()), shaped("docs")[:100_000]]


def _fast(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def build_tokenizer(name: str, folder) -> PreTrainedTokenizerFast:
    if name == "byte_level":  # the tests' own (tests/helpers.py): ByteLevel with GPT-2's regex
        save_tokenizer(folder)
        return AutoTokenizer.from_pretrained(folder)
    if name == "llama3_regex":
        backend = Tokenizer(models.BPE())
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=["<|endoftext|>"], show_progress=False)
        backend.train_from_iterator(_training_texts(), trainer)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
        tokenizer.add_tokens(["\nimport ", "\nclass ", ")\nif"])  # added tokens across candidate cuts
        return tokenizer
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.train_from_iterator(_training_texts(), trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>"],
                                                                       show_progress=False))
    if name == "metaspace_always":
        return _fast(backend)
    if name == "llama2_prepend":  # SentencePiece converted the Llama-2 way: one BPE word per call
        backend.pre_tokenizer = None
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        return _fast(backend)
    raise ValueError(name)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {name: build_tokenizer(name, tmp_path_factory.mktemp(name)) for name in TOKENIZERS}


def naive_pieces(tokenizer, text: str, bounds: list[int]) -> np.ndarray:
    """Each piece tokenised alone, without left context: what the prefix test and the context guard against."""
    return np.concatenate(T._encode(tokenizer, [text[a:b] for a, b in pairwise(bounds)]))


# -- equality with the whole text ----------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_pieces_equal_whole_text(tokenizers, shape):
    text = shaped(shape)
    for name, tokenizer in tokenizers.items():
        result = verify_tokenize(tokenizer, text, segment_chars=SEGMENT)  # raises on any difference
        expected_min = 1 if shape == "no_whitespace" else len(text) // (2 * SEGMENT)
        assert result["num_pieces"] >= expected_min, (name, result)
        if shape == "no_whitespace":
            assert result["num_pieces"] == 1, (name, result)  # no candidate cut at all: tokenised whole


def test_a_few_megabytes_with_default_sizes(tokenizers):
    text = stdlib_code(2_000_000)
    tokenizer = tokenizers["llama3_regex"]
    assert verify_tokenize(tokenizer, text)["num_pieces"] == len(segment_bounds(tokenizer, text)) - 1 >= 7


@pytest.mark.parametrize("name", ["llama3_regex", "metaspace_always"])
def test_megabytes_on_one_line(tokenizers, name):
    """No line break in 1.5 M characters: cut before single spaces; no whitespace at all: tokenised whole."""
    assert verify_tokenize(tokenizers[name], shaped("one_line", 2_000_000), segment_chars=65536)["num_pieces"] >= 15
    assert verify_tokenize(tokenizers[name], shaped("no_whitespace", 1_000_000), segment_chars=65536)["num_pieces"] == 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.sampled_from(SHAPES), name=st.sampled_from(TOKENIZERS), start=st.integers(0, 290_000),
       length=st.integers(0, 60_000), segment=st.integers(200, 5000), context=st.integers(1, 99))
def test_random_slices_and_sizes(tokenizers, shape, name, start, length, segment, context):
    text = shaped(shape)[start:start + length]
    sizes = {"segment_chars": max(segment, 2 * context + 1), "context_chars": context, "batch_chars": segment * 3}
    verify_tokenize(tokenizers[name], text, **sizes)


def test_the_checks_are_needed(tokenizers, monkeypatch):
    """Cut after the first candidate line break past every segment, unchecked: tokenising the pieces alone
    differs from the whole text for the SentencePiece-like tokenizers; with the left context and the prefix
    test it does not."""
    text = shaped("docs", 200_000)
    line_break = re.compile(r"(?<=\S)\n(?=\S)")  # a candidate cut of the line-break kind
    found = (line_break.search(text, at) for at in range(SEGMENT, len(text), SEGMENT))
    cuts = sorted({match.end() for match in found if match})
    assert len(cuts) > 20
    bounds = [0, *cuts, len(text)]
    monkeypatch.setattr(T, "_bounds", lambda tok, t, segment, context: list(bounds))
    for name, tokenizer in tokenizers.items():
        whole = T._encode(tokenizer, [text])[0]
        naive = naive_pieces(tokenizer, text, bounds)
        same = len(naive) == len(whole) and np.array_equal(naive, whole)
        assert same == (name in ("byte_level", "llama3_regex")), name
        assert np.array_equal(tokenize(tokenizer, [text], segment_chars=SEGMENT)[0], whole), name


def test_a_cut_inside_a_token_is_caught_on_the_real_call(tokenizers, monkeypatch, caplog):
    """Cuts in the middle of `` return`` (one token) or of the added token ``"\\nimport "`` fail the prefix test on
    the real call; they are dropped."""
    tokenizer = tokenizers["llama3_regex"]
    assert len(T._encode(tokenizer, [" return"])[0]) == 1
    text = shaped("code", 200_000)
    cuts = sorted([m.start() + 4 for m in re.finditer(" return", text)][::40]
                  + [m.start() + 1 for m in re.finditer("\nimport ", text)][::5])
    assert not np.array_equal(naive_pieces(tokenizer, text, [0, *cuts, len(text)]), T._encode(tokenizer, [text])[0])
    monkeypatch.setattr(T, "_bounds", lambda tok, t, segment, context: [0, *cuts, len(t)])
    with caplog.at_level(logging.WARNING, logger=T.__name__):
        ids = tokenize(tokenizer, [text], segment_chars=SEGMENT)[0]
    assert np.array_equal(ids, T._encode(tokenizer, [text])[0])
    assert len(cuts) > 10 and "not clean on the whole piece" in caplog.text


def test_long_added_tokens_widen_the_context(monkeypatch):
    """Added tokens longer than the context, across the very cuts taken without them, are still seen whole."""
    tokenizer = build_tokenizer("llama3_regex", None)
    text = shaped("code", 200_000)
    cuts = segment_bounds(tokenizer, text, 2048, 64)[1:-1]
    tokenizer.add_tokens([text[cut - 150:cut + 150] for cut in cuts[::3]])
    assert T._context_chars(tokenizer, 64) >= 4 * 300
    assert verify_tokenize(tokenizer, text, segment_chars=2048, context_chars=64)["num_pieces"] > 50
    monkeypatch.setattr(T, "_context_chars", lambda tok, context_chars: context_chars)  # without the widening
    with pytest.raises(ValueError, match="differs from the whole text"):
        verify_tokenize(tokenizer, text, segment_chars=2048, context_chars=64)


def test_verify_tokenize_names_the_bad_piece(tokenizers, monkeypatch):
    """Pieces tokenised alone (no left context) with a tokenizer that prepends ``▁`` to every call: caught."""
    tokenizer = tokenizers["llama2_prepend"]
    text = shaped("code", 100_000)
    monkeypatch.setattr(T, "_encode_pieces", lambda tok, texts, bounds, docs, context, batch: (
        {doc: T._encode(tok, [texts[doc][a:b] for a, b in pairwise(bounds[doc])]) for doc in docs}, {}))
    with pytest.raises(ValueError, match=r"differs from the whole text at token \d+ .*piece 1 of"):
        verify_tokenize(tokenizer, text, segment_chars=SEGMENT)


# -- memory: bounded tokenizer calls ----------------------------------------------------------------

def test_tokenizer_calls_are_bounded(tokenizers):
    tokenizer = tokenizers["byte_level"]
    calls = []

    def recording(texts, **kwargs):
        calls.append([len(t) for t in texts])
        return tokenizer(texts, **kwargs)

    texts = [shaped("code", 400_000), "", "x = 1", shaped("docs")[:90_000], shaped("one_line", 300_000)]
    ids = tokenize(recording, texts, segment_chars=SEGMENT, batch_chars=4 * SEGMENT)
    whole = T._encode(tokenizer, texts)
    assert all(np.array_equal(a, b) and a.dtype == np.int64 for a, b in zip(ids, whole))
    assert max(max(c, default=0) for c in calls) <= 2 * SEGMENT + T.CONTEXT_CHARS
    assert max(sum(c) for c in calls) <= 4 * SEGMENT + 2 * SEGMENT + 8 * T.CONTEXT_CHARS  # one piece may overflow


# -- the API around it ---------------------------------------------------------------------------

def test_document_token_ids_and_tokenize_map_function(tokenizers):
    tokenizer = tokenizers["llama3_regex"]
    long = shaped("non_ascii", 100_000)
    batch = {"text": ["a b", long, "ignored"], "input_ids": [None, None, [5, 6]]}
    ids = document_token_ids(tokenizer, batch, segment_chars=4096)
    assert np.array_equal(ids[1], T._encode(tokenizer, [long])[0]) and ids[2].tolist() == [5, 6]
    out = Tokenize(tokenizer, segment_chars=4096)({"text": ["", long]})
    assert out["doc_num_tokens"] == [0, len(ids[1])] and np.array_equal(out["input_ids"][1], ids[1])
    assert tokenize(tokenizer, []) == []


def test_segment_bounds_shape_and_sizes(tokenizers):
    tokenizer = tokenizers["metaspace_always"]
    text = shaped("crlf", 200_000)
    bounds = segment_bounds(tokenizer, text, 4096, 100)
    assert bounds[0] == 0 and bounds[-1] == len(text) and all(b - a >= 4096 for a, b in pairwise(bounds[:-1]))
    assert all(text[cut - 2:cut] == "\r\n" or text[cut] == " " for cut in bounds[1:-1])
    assert segment_bounds(tokenizer, "short text") == [0, 10]
    with pytest.raises(ValueError, match="segment_chars > 2 \\* context_chars"):
        tokenize(tokenizer, ["x"], segment_chars=100, context_chars=50)


# -- the real SmolLM2 tokenizer ----------------------------------------------------------------------

@pytest.mark.smollm2
def test_smollm2_pieces_equal_whole_text(smollm2_gguf):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    big = stdlib_code(8_000_000)
    assert verify_tokenize(tokenizer, big)["num_pieces"] >= 30  # default sizes: 256 Ki-character pieces
    for shape in SHAPES:
        text = shaped(shape, 1_500_000)
        result = verify_tokenize(tokenizer, text, segment_chars=SEGMENT)
        assert result["num_pieces"] >= (1 if shape == "no_whitespace" else len(text) // (2 * SEGMENT)), shape

"""What a source of documents is (`SourceConfig`: a path, a Hub dataset, the embedded Python corpus) and how its files read.

Terms. A *source* is one place documents come from; it is described by a :class:`SourceConfig`
(``path``, ``hub`` or ``embedded``, plus ``category``, ``text_column``, ``id_column``, ``split``
and ``limit``). Every source is read into the same *document* columns, :data:`DOCUMENT_COLUMNS`:

* ``id`` (`string`): the row's ``id_column`` if it has one; otherwise a name that depends only on
  where the document is (``<file stem>:<row>``, ``<folder>/<relative path>``,
  ``<hub id>:<split>:<path in the repo>:<row>``): stable per file and row, whatever reads it.
* ``category`` (`string`): the source's ``category`` if given; else the row's ``category`` column;
  else the file's stem (records files), the first folder below the input folder (text files in
  a folder), or the Hub dataset's name.
* ``text`` (`string`), ``source`` (`string`, where the row came from) and ``license`` (`string`
  or null: the row's ``license`` column, else the source's ``license``).

Two *embedded* sources need nothing but a Python installation, so the demo runs offline:

* ``python-stdlib`` — the standard library's own code: one document per package (``asyncio``,
  ``email``, ...), its ``.py`` files concatenated in sorted order, each after a ``# file: <path>``
  header (the layout of ``../shared/data/code.jsonl.gz``). Tests, IDLE, codec tables, the
  deprecated ``distutils``/``lib2to3`` and demo packages are left out (:data:`STDLIB_EXCLUDED`).
* ``pydoc-topics`` — the documentation text bundled with every Python (``pydoc_data.topics``,
  what ``help("FOR")`` shows): its topics in sorted order, grouped into documents of at least
  :data:`PYDOC_DOCUMENT_CHARS` characters, each topic after a ``# topic: <name>`` header.
"""

from __future__ import annotations


import dataclasses
import logging
import sys
import sysconfig
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

from . import vocabulary as V

DOCUMENT_COLUMNS = V.DOCUMENT_COLUMNS
"""Columns of every document dataset `hf_longattn.shards.read_sources` returns, in this order."""

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
"""Files read as one document per record (row)."""

TEXT_SUFFIXES = (
    ".txt", ".text", ".md", ".rst", ".tex", ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts",
    ".go", ".rs", ".rb", ".sh", ".html", ".xml", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".csv", ".tsv",
)
"""Files inside a folder read as one document per file (a file given directly is read as text whatever its suffix)."""

EMBEDDED_SOURCES = ("python-stdlib", "pydoc-topics")
"""Names accepted by ``SourceConfig(embedded=...)``."""

STDLIB_EXCLUDED = frozenset(
    {"test", "idlelib", "encodings", "pydoc_data", "distutils", "lib2to3", "turtledemo", "__phello__", "site-packages"}
)
"""Standard-library packages left out of ``python-stdlib`` (tests, IDLE, codec tables, deprecated or demo code, the docs)."""

PYDOC_DOCUMENT_CHARS = 120_000
"""Minimum characters of one ``pydoc-topics`` document (~30K SmolLM2 tokens: 3–4 windows of 8192)."""

_LICENSES = {"python-stdlib": "PSF-2.0", "pydoc-topics": "PSF-2.0"}


@dataclass
class SourceConfig:
    """Where documents come from: exactly one of ``path``, ``hub`` or ``embedded``.

    Args:
        path (`str`, *optional*): a ``.jsonl``/``.jsonl.gz``/``.json``/``.parquet`` file (one
            document per row), any other file (one document), or a folder (every such file
            below it, in sorted order).
        hub (`str`, *optional*): a Hub dataset id, read with ``datasets.load_dataset(hub, name, split=...)``.
        embedded (`str`, *optional*): ``"python-stdlib"`` or ``"pydoc-topics"`` (see the module docstring).
        name (`str`, *optional*): the Hub dataset's configuration name.
        revision (`str`, *optional*): the Hub dataset's revision (pin a commit for reproducibility).
        data_dir (`str`, *optional*): the Hub dataset's ``data_dir``.
        category (`str`, *optional*): category of every document; by default the row's
            ``category_column``, else a name derived from the file, folder or dataset.
        text_column (`str`, defaults to `"text"`): column holding the document text.
        id_column (`str`, defaults to `"id"`): column holding the document id (generated when absent).
        category_column (`str`, defaults to `"category"`): column read when ``category`` is not given.
        split (`str`, defaults to `"train"`): the Hub dataset's split.
        limit (`int`, *optional*): read only the first ``limit`` documents (a Hub dataset is then streamed).
        license (`str`, *optional*): license of the documents when the rows have no ``license`` column.

    Example:

    >>> SourceConfig.from_dict({"path": "../shared/data/book.jsonl.gz", "limit": 2}).describe()
    '../shared/data/book.jsonl.gz (first 2 documents)'
    """

    path: str | None = None
    hub: str | None = None
    embedded: str | None = None
    name: str | None = None
    revision: str | None = None
    data_dir: str | None = None
    category: str | None = None
    text_column: str = "text"
    id_column: str = "id"
    category_column: str = "category"
    split: str = "train"
    limit: int | None = None
    license: str | None = None

    def __post_init__(self) -> None:
        given = [key for key in ("path", "hub", "embedded") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(
                f"A source needs exactly one of 'path', 'hub' or 'embedded', got {given or 'none'}: {self.to_dict()}"
            )
        if self.embedded is not None and self.embedded not in EMBEDDED_SOURCES:
            raise ValueError(f"Unknown embedded source {self.embedded!r}; available: {list(EMBEDDED_SOURCES)}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"A source's limit must be a positive int or null, got {self.limit!r}")
        for key in ("path", "hub", "embedded", "name", "revision", "data_dir", "category", "text_column", "id_column",
                    "category_column", "split", "license"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"A source's {key!r} must be a string, got {type(value).__name__} {value!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str) -> SourceConfig:
        """Build from a config mapping (or a bare path string); unknown keys raise an error listing the valid ones."""
        if isinstance(data, str):
            return cls(path=data)
        if not isinstance(data, Mapping):
            raise ValueError(f"A source must be a mapping like {{path: docs.jsonl, category: book}}, got {data!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in data if key not in valid]
        if unknown:
            from .errors import did_you_mean

            raise ValueError(f"Unknown source key(s) {unknown} in {dict(data)}{did_you_mean(unknown[0], valid)}; "
                             f"valid keys: {', '.join(valid)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The non-default fields, as written in a YAML config."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}

    def known_license(self) -> str | None:
        """The license of every document of this source, when the source says it (``license``, or an embedded corpus's)."""
        return self.license or (_LICENSES.get(self.embedded) if self.embedded else None)

    def describe(self) -> str:
        """A short human-readable name for logs and the dataset card."""
        if self.path is not None:
            where = self.path
        elif self.hub is not None:
            where = f"hf://datasets/{self.hub}" + (f" ({self.name})" if self.name else "") + f" [{self.split}]"
        else:
            where = f"embedded:{self.embedded}"
        return where + (f" (first {self.limit} documents)" if self.limit else "")


# ----------------------------------------------------------------------------------------------
# the embedded corpus
# ----------------------------------------------------------------------------------------------


def stdlib_documents() -> Iterator[dict[str, Any]]:
    """One document per standard-library package, its ``.py`` files concatenated with ``# file:`` headers.

    Packages in sorted order (:data:`STDLIB_EXCLUDED` left out, and ``test``/``tests`` folders
    inside packages too); files in sorted order of their path relative to the standard library.

    Example:

    >>> doc = next(d for d in stdlib_documents() if d["id"] == "python-stdlib/json")
    >>> doc["text"].splitlines()[0]
    '# file: json/__init__.py'
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    version = f"CPython {sys.version.split()[0]} standard library"
    for package in sorted(root.iterdir()):
        if not package.is_dir() or package.name in STDLIB_EXCLUDED or not (package / "__init__.py").is_file():
            continue
        parts = []
        for file in sorted(package.rglob("*.py")):
            relative = file.relative_to(root)
            if {"test", "tests"} & set(relative.parts[1:-1]):
                continue
            try:
                parts.append(f"# file: {relative.as_posix()}\n{file.read_text(encoding='utf-8')}")
            except (UnicodeDecodeError, OSError) as error:  # an unreadable file: skip it, say so
                logger.warning("python-stdlib: skipped %s (%s)", relative, error)
        if parts:
            yield {
                "id": f"python-stdlib/{package.name}",
                "text": "\n".join(parts),
                "source": f"{version}: {package.name}/",
                "license": _LICENSES["python-stdlib"],
            }


def pydoc_documents(min_chars: int = PYDOC_DOCUMENT_CHARS) -> Iterator[dict[str, Any]]:
    """The bundled documentation topics (``pydoc_data.topics``) grouped into long documents.

    Topics in sorted order, each after a ``# topic: <name>`` line, are appended to the current
    document until it holds at least ``min_chars`` characters; the rest forms the last document.

    Example:

    >>> docs = list(pydoc_documents())
    >>> docs[0]["id"], docs[0]["text"].splitlines()[0]
    ('pydoc-topics/000', '# topic: assert')
    """
    from pydoc_data.topics import topics

    version = f"CPython {sys.version.split()[0]} documentation (pydoc_data.topics)"
    current: list[str] = []
    size = 0
    index = 0
    names: list[str] = []
    for name in sorted(topics):
        current.append(f"# topic: {name}\n{topics[name]}")
        names.append(name)
        size += len(current[-1])
        if size >= min_chars:
            yield _pydoc_document(index, current, names, version)
            index, current, names, size = index + 1, [], [], 0
    if current:
        yield _pydoc_document(index, current, names, version)


def _pydoc_document(index: int, parts: list[str], names: list[str], version: str) -> dict[str, Any]:
    return {
        "id": f"pydoc-topics/{index:03d}",
        "text": "\n".join(parts),
        "source": f"{version}: topics {names[0]} … {names[-1]}",
        "license": _LICENSES["pydoc-topics"],
    }


# ----------------------------------------------------------------------------------------------
# reading one source
# ----------------------------------------------------------------------------------------------

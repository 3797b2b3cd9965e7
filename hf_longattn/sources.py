"""Read documents (jsonl(.gz), parquet, text files, folders, Hub datasets, the embedded Python corpus) as a `datasets.Dataset`.

Terms. A *source* is one place documents come from; it is described by a :class:`SourceConfig`
(``path``, ``hub`` or ``embedded``, plus ``category``, ``text_column``, ``id_column``, ``split``
and ``limit``). Every source is read into the same *document* columns, :data:`DOCUMENT_COLUMNS`:

* ``id`` (`string`): the row's ``id_column`` if it has one; otherwise a name that depends only on
  where the document is (``<file stem>:<row>``, ``<folder>/<relative path>``, ``<hub id>:<split>:<row>``).
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
import gzip
import json
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
"""Columns of every document dataset :func:`read_sources` returns, in this order."""

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
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"Unknown source key(s) {unknown} in {dict(data)}; valid keys: {valid}")
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


def _is_record_file(path: Path) -> bool:
    return path.name.lower().endswith(RECORD_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(RECORD_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _iter_record_file(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a jsonl / json / parquet file, streamed."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            yield from batch.to_pylist()
        return
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        if name.endswith((".json", ".json.gz")):
            head = handle.read(1)
            while head and head.isspace():
                head = handle.read(1)
            if head == "[":  # a JSON array of records
                yield from json.loads(head + handle.read())
                return
            handle.seek(0)
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from error


def _records_to_documents(rows: Iterator[dict[str, Any]], source: SourceConfig, default_category: str,
                          id_prefix: str, where: str, first_index: int = 0) -> Iterator[dict[str, Any]]:
    for row_index, row in enumerate(rows, start=first_index):
        if not isinstance(row, Mapping):
            raise ValueError(f"{where}: row {row_index} is not a JSON object but {type(row).__name__}")
        token_ids = None
        if source.text_column not in row:
            if row.get(V.INPUT_IDS) is None:
                raise ValueError(
                    f"{where}: row {row_index} has no text column {source.text_column!r} (set text_column in the "
                    f"source) and no pre-tokenised {V.INPUT_IDS!r}. Current columns: {sorted(row)}"
                )
            token_ids = _token_ids(row[V.INPUT_IDS], where, row_index)
        text = row.get(source.text_column)
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise ValueError(f"{where}: row {row_index}, column {source.text_column!r} holds {type(text).__name__}, not text")
        raw_id = row.get(source.id_column)
        category = source.category or row.get(source.category_column) or default_category
        document = {
            "id": str(raw_id) if raw_id is not None else f"{id_prefix}:{row_index}",
            "category": str(category),
            "text": text,
            "source": str(row.get("source") or where),
            "license": row.get("license") if row.get("license") is not None else source.license,
        }
        if token_ids is not None:
            document[V.INPUT_IDS] = token_ids
        yield document


def _token_ids(value: Any, where: str, row: int) -> list[int]:
    """A pre-tokenised row's ``input_ids``: a list of ints >= 0, else a clear error."""
    if not isinstance(value, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in value):
        raise ValueError(f"{where}: row {row}, column {V.INPUT_IDS!r} must be a list of token ids (ints >= 0)")
    return list(value)


def _read_text_file(path: Path, doc_id: str, category: str, source: SourceConfig) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        logger.warning("Skipped %s: not UTF-8 text", path)
        return None
    return {"id": doc_id, "category": category, "text": text, "source": str(path), "license": source.license}


def _iter_path(source: SourceConfig) -> Iterator[dict[str, Any]]:
    root = Path(source.path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"Source path {source.path} does not exist")
    if root.is_file():
        if _is_record_file(root):
            yield from _records_to_documents(_iter_record_file(root), source, _stem(root), _stem(root), str(root))
        else:
            document = _read_text_file(root, root.name, source.category or root.parent.resolve().name, source)
            if document is not None:
                yield document
        return
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    skipped = [p for p in files if not _is_record_file(p) and not p.name.lower().endswith(TEXT_SUFFIXES)]
    if skipped:
        logger.warning("%s: skipped %d file(s) of unknown type, e.g. %s (known: %s)", root, len(skipped), skipped[0],
                       ", ".join(RECORD_SUFFIXES + TEXT_SUFFIXES))
    root_name = root.resolve().name
    for path in files:
        relative = path.relative_to(root)
        if _is_record_file(path):
            prefix = f"{root_name}/{relative.parent.as_posix()}/{_stem(path)}".replace("/./", "/")
            yield from _records_to_documents(_iter_record_file(path), source, _stem(path), prefix, str(path))
        elif path.name.lower().endswith(TEXT_SUFFIXES):
            category = source.category or (relative.parts[0] if len(relative.parts) > 1 else root_name)
            document = _read_text_file(path, f"{root_name}/{relative.as_posix()}", category, source)
            if document is not None:
                yield document


def _iter_hub(source: SourceConfig) -> Iterator[dict[str, Any]]:
    from datasets import load_dataset

    streaming = source.limit is not None
    dataset = load_dataset(
        source.hub, source.name, split=source.split, revision=source.revision, data_dir=source.data_dir,
        streaming=streaming,
    )
    columns = dataset.column_names or []
    if columns and source.text_column not in columns:
        raise ValueError(
            f"Hub dataset {source.hub!r} has no text column {source.text_column!r} (set text_column). "
            f"Current columns: {columns}"
        )
    default_category = source.hub.rstrip("/").split("/")[-1]
    prefix = f"{source.hub}:{source.split}"
    yield from _records_to_documents(iter(dataset), source, default_category, prefix, f"hf://datasets/{source.hub}")


def iter_documents(source: SourceConfig) -> Iterator[dict[str, Any]]:
    """The documents of one source as dicts with :data:`DOCUMENT_COLUMNS`, at most ``source.limit`` of them.

    Example:

    >>> docs = list(iter_documents(SourceConfig(embedded="pydoc-topics", category="docs", limit=1)))
    >>> [(d["id"], d["category"]) for d in docs]
    [('pydoc-topics/000', 'docs')]
    """
    if source.embedded is not None:
        raw = stdlib_documents() if source.embedded == "python-stdlib" else pydoc_documents()
        category = source.category or ("code" if source.embedded == "python-stdlib" else "docs")
        rows: Iterator[dict[str, Any]] = ({**doc, "category": category} for doc in raw)
    elif source.hub is not None:
        rows = _iter_hub(source)
    else:
        rows = _iter_path(source)
    for count, row in enumerate(rows):
        if source.limit is not None and count >= source.limit:
            break
        yield row


class _Standardise:
    """Picklable ``datasets.map`` function: a Hub dataset's rows → :data:`DOCUMENT_COLUMNS` (disk-backed, no copy in memory)."""

    def __init__(self, source: SourceConfig, default_category: str, prefix: str, where: str) -> None:
        self.source, self.default_category, self.prefix, self.where = source, default_category, prefix, where

    def __call__(self, batch: Mapping[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in DOCUMENT_COLUMNS}
        for position, index in enumerate(indices):
            row = {name: batch[name][position] for name in batch}
            document = next(_records_to_documents(iter([row]), self.source, self.default_category, self.prefix,
                                                  self.where, first_index=index))
            for name in DOCUMENT_COLUMNS:
                out[name].append(document[name])
        return out


def _hub_dataset(source: SourceConfig) -> Any:
    """A whole Hub split standardised with ``map`` (Arrow on disk, so it scales past memory)."""
    from datasets import Features, Value, load_dataset

    dataset = load_dataset(source.hub, source.name, split=source.split, revision=source.revision, data_dir=source.data_dir)
    if source.text_column not in dataset.column_names:
        raise ValueError(
            f"Hub dataset {source.hub!r} has no text column {source.text_column!r} (set text_column). "
            f"Current columns: {dataset.column_names}"
        )
    function = _Standardise(source, source.hub.rstrip("/").split("/")[-1], f"{source.hub}:{source.split}",
                            f"hf://datasets/{source.hub}")
    return dataset.map(
        function, batched=True, with_indices=True, remove_columns=dataset.column_names,
        features=Features({name: Value("string") for name in DOCUMENT_COLUMNS}), desc=f"Reading {source.hub}",
    )


def read_sources(sources: list[SourceConfig] | SourceConfig) -> Any:
    """Read every source into one `datasets.Dataset` with :data:`DOCUMENT_COLUMNS`, sources in order.

    Local files and the embedded corpus are read into memory; a whole Hub split (no ``limit``)
    stays in Arrow files on disk. Raises a `ValueError` naming an example when two documents
    share an id, and when no document was read at all.

    Args:
        sources (`list[SourceConfig]` or `SourceConfig`): where to read from.

    Returns:
        `datasets.Dataset`: one row per document.

    Example:

    >>> docs = read_sources([SourceConfig(path="../shared/data/book.jsonl.gz", limit=1)])
    >>> docs.column_names, docs[0]["id"], docs[0]["category"]  # doctest: +SKIP
    (['id', 'category', 'text', 'source', 'license'], 'book/moby_dick', 'book')
    """
    import pyarrow.compute as pc
    from datasets import Dataset, Features, List, Value, concatenate_datasets

    if isinstance(sources, SourceConfig):
        sources = [sources]
    if not sources:
        raise ValueError("No sources given: add at least one under `sources:` (path, hub or embedded)")
    features = Features({name: Value("string") for name in DOCUMENT_COLUMNS})
    parts = []
    for source in sources:
        if source.hub is not None and source.limit is None:
            part = _hub_dataset(source)
        else:
            rows = list(iter_documents(source))
            columns: dict[str, list[Any]] = {name: [row[name] for row in rows] for name in DOCUMENT_COLUMNS}
            part_features = features
            if any(V.INPUT_IDS in row for row in rows):  # pre-tokenised documents (text rows get null)
                columns[V.INPUT_IDS] = [row.get(V.INPUT_IDS) for row in rows]
                part_features = Features({**features, V.INPUT_IDS: List(Value("int64"))})
            part = Dataset.from_dict(columns, features=part_features)
        logger.info("Read %d document(s) from %s", len(part), source.describe())
        if len(part) == 0:
            logger.warning("Source %s holds no document", source.describe())
        parts.append(part)
    if any(V.INPUT_IDS in part.column_names for part in parts):
        parts = [part if V.INPUT_IDS in part.column_names else
                 part.add_column(V.INPUT_IDS, [None] * len(part), feature=List(Value("int64"))) for part in parts]
    documents = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(documents) == 0:
        raise ValueError(f"The sources hold no document: {[s.describe() for s in sources]}")
    ids = documents.select_columns(["id"]).with_format("arrow")[:].column("id")
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        duplicate = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        where = [s.describe() for s, p in zip(sources, parts, strict=True)
                 if duplicate in set(p.select_columns(["id"]).with_format("arrow")[:].column("id").to_pylist())]
        raise ValueError(
            f"Duplicate document id {duplicate!r} (in {', '.join(where)}); ids must be unique "
            "(set id_column, or do not list a source twice)"
        )
    return documents

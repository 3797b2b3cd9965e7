"""Input shards: the sources' files, each read on its own by any task, streamed, with an identity that changes with its content.

The documents of whole sources (`read_sources`, `iter_documents`: for samples such as the probe's)
are read here too, through the same shards.

An *input shard* is one file of a ``path:`` source (a folder gives one shard per file, in sorted
order), one data file of a ``hub:`` dataset (resolved by `datasets` to ``hf://…@<commit>/…`` and
streamed with fsspec, never downloaded whole), or one embedded corpus. A source with a ``limit``
is one shard (its files read in order until the limit). Documents keep ids that depend only on
their file and row (``<file stem>:<row>`` without an ``id_column``), so any task reading a shard
names them the same way. A shard's *identity* — size and modification time of a local file, the
commit in a Hub URL, a content hash for an embedded corpus — tells a relaunch what changed.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import vocabulary as V
from .sources import DOCUMENT_COLUMNS, RECORD_SUFFIXES, TEXT_SUFFIXES, SourceConfig, pydoc_documents, stdlib_documents

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputShard:
    """One unit of reading: ``files`` of source ``source`` (an index into the configured sources).

    Attributes:
        index (`int`): position in the plan (documents of shard i come before those of shard i + 1).
        source (`int`): index of its source in the configuration's ``sources``.
        name (`str`): the file, or the source, in words (``docs/a.jsonl``, ``embedded:python-stdlib``).
        files (`tuple[str, ...]`): paths or ``hf://`` URLs read, in order (empty for an embedded corpus).
        identity (`str`): changes whenever the shard's documents can have changed.
        size (`int`): bytes on disk (0 when unknown).
    """

    index: int
    source: int
    name: str
    files: tuple[str, ...]
    identity: str
    size: int = 0


def plan_input_shards(sources: Sequence[SourceConfig]) -> list[InputShard]:
    """The input shards of ``sources``, in reading order, with their identities (no document is read).

    Example:

    >>> [s.files for s in plan_input_shards([SourceConfig(path="docs/")])]  # doctest: +SKIP
    [('docs/a.jsonl',), ('docs/b.jsonl',)]
    """
    plan: list[InputShard] = []
    for number, source in enumerate(sources):
        units = _source_units(source)
        if source.limit is not None and len(units) > 1:  # the first `limit` documents: read the files in order
            units = [(tuple(f for files, _, _ in units for f in files), "+".join(i for _, i, _ in units),
                      sum(s for _, _, s in units))]
        source_key = json.dumps(source.to_dict(), sort_keys=True)
        for files, identity, size in units:
            name = files[0] if len(files) == 1 else source.describe()
            plan.append(InputShard(len(plan), number, name, files, f"{identity}|{source_key}", size))
    return plan


def _source_units(source: SourceConfig) -> list[tuple[tuple[str, ...], str, int]]:
    """``(files, identity, size)`` of each shard of one source."""
    if source.embedded is not None:
        digest = hashlib.sha256()
        for document in _embedded_documents(source):
            digest.update(document["text"].encode("utf-8", "surrogatepass"))
        return [((), f"embedded:{source.embedded}:{digest.hexdigest()}", 0)]
    files = _hub_files(source) if source.hub is not None else [str(p) for p in _path_files(source)[1]]
    units = []
    for file in files:
        if "://" in file:
            units.append(((file,), file, 0))
        else:
            stat = os.stat(file)
            units.append(((file,), f"{file}:{stat.st_size}:{stat.st_mtime_ns}", stat.st_size))
    return units


def manifest_changes(old: Sequence[Mapping[str, Any]], new: Sequence[InputShard]) -> list[str]:
    """What differs between a stored manifest (see :func:`manifest`) and the current shards, in words.

    Example:

    >>> manifest_changes([{"name": "a.jsonl", "identity": "1"}], [InputShard(0, 0, "b.jsonl", ("b.jsonl",), "2")])
    ['added b.jsonl', 'removed a.jsonl']
    """
    before = {entry["name"]: entry["identity"] for entry in old}
    after = {shard.name: shard.identity for shard in new}
    changes = [f"added {name}" for name in after if name not in before]
    changes += [f"removed {name}" for name in before if name not in after]
    changes += [f"changed {name}" for name in after if name in before and before[name] != after[name]]
    return changes


def manifest(shards: Sequence[InputShard]) -> list[dict[str, Any]]:
    """The shards as JSON-ready dicts (what ``windows_stats.json`` records)."""
    return [asdict(shard) for shard in shards]


# -- reading one shard -----------------------------------------------------------------------------


def read_shard(sources: Sequence[SourceConfig], shard: InputShard) -> Iterator[dict[str, Any]]:
    """The documents of one shard, streamed, as dicts with :data:`~hf_longattn.vocabulary.DOCUMENT_COLUMNS`.

    Example:

    >>> shard = plan_input_shards([SourceConfig(embedded="pydoc-topics", category="docs")])[0]
    >>> next(read_shard([SourceConfig(embedded="pydoc-topics", category="docs")], shard))["id"]
    'pydoc-topics/000'
    """
    source = sources[shard.source]
    if source.embedded is not None:
        rows: Iterator[dict[str, Any]] = _embedded_documents(source)
    elif source.hub is not None:
        rows = (doc for file in shard.files for doc in _read_hub_file(source, file))
    else:
        root = _path_root(source)
        rows = (doc for file in shard.files for doc in _read_path_file(source, root, Path(file)))
    for count, row in enumerate(rows):
        if source.limit is not None and count >= source.limit:
            return
        yield row


def _embedded_documents(source: SourceConfig) -> Iterator[dict[str, Any]]:
    raw = stdlib_documents() if source.embedded == "python-stdlib" else pydoc_documents()
    category = source.category or ("code" if source.embedded == "python-stdlib" else "docs")
    return ({**doc, V.CATEGORY: category} for doc in raw)


def _path_root(source: SourceConfig) -> Path:
    """The file or folder of a ``path:`` source (``~`` expanded); raises `FileNotFoundError` if it does not exist."""
    root = Path(source.path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"Source path {source.path} does not exist")
    return root


def _path_files(source: SourceConfig) -> tuple[Path, list[Path]]:
    """The root of a ``path:`` source and its files, sorted (hidden files and unknown types left out, with a warning)."""
    root = _path_root(source)
    if root.is_file():
        return root, [root]
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    skipped = [p for p in files if not _is_record_file(p) and not p.name.lower().endswith(TEXT_SUFFIXES)]
    if skipped:
        logger.warning("%s: skipped %d file(s) of unknown type, e.g. %s (known: %s)", root, len(skipped), skipped[0],
                       ", ".join(RECORD_SUFFIXES + TEXT_SUFFIXES))
    return root, [p for p in files if p not in set(skipped)]


def _read_path_file(source: SourceConfig, root: Path, path: Path) -> Iterator[dict[str, Any]]:
    """Documents of one file of a ``path:`` source (ids and categories as documented in `hf_longattn.sources`)."""
    if root.is_file():
        if _is_record_file(path):
            yield from _records_to_documents(_iter_record_file(path), source, _stem(path), _stem(path), str(path))
        else:
            document = _read_text_file(path, path.name, source.category or path.parent.resolve().name, source)
            if document is not None:
                yield document
        return
    relative = path.relative_to(root)
    root_name = root.resolve().name
    if _is_record_file(path):
        prefix = f"{root_name}/{relative.parent.as_posix()}/{_stem(path)}".replace("/./", "/")
        yield from _records_to_documents(_iter_record_file(path), source, _stem(path), prefix, str(path))
    else:
        category = source.category or (relative.parts[0] if len(relative.parts) > 1 else root_name)
        document = _read_text_file(path, f"{root_name}/{relative.as_posix()}", category, source)
        if document is not None:
            yield document


def _hub_files(source: SourceConfig) -> list[str]:
    """The data files of a Hub dataset's split, as `datasets` resolves them (``hf://datasets/<repo>@<commit>/…``)."""
    from datasets import load_dataset_builder

    try:
        builder = load_dataset_builder(source.hub, source.name, revision=source.revision, data_dir=source.data_dir)
    except OSError as error:  # offline, unreachable, not found, gated: one line, before anything is written
        from .errors import LongAttnError

        reason = " ".join(str(error).split())[:300]
        raise LongAttnError(f"Hub source {source.hub!r}: cannot list its data files ({type(error).__name__}: "
                            f"{reason}). Check its name, the network and your token (unset HF_HUB_OFFLINE to "
                            f"reach the Hub), or point a `path:` source at a local copy") from error
    data_files = builder.config.data_files or {}
    if source.split not in data_files:
        raise ValueError(f"Hub dataset {source.hub!r} has no split {source.split!r}; splits: {sorted(data_files)}")
    files = [str(f) for f in data_files[source.split]]
    unknown = [f for f in files if not f.lower().endswith(RECORD_SUFFIXES)]
    if unknown:
        raise ValueError(f"Hub dataset {source.hub!r}: files of an unsupported type, e.g. {unknown[0]} "
                         f"(supported: {', '.join(RECORD_SUFFIXES)})")
    return files


def _read_hub_file(source: SourceConfig, file: str) -> Iterator[dict[str, Any]]:
    """Documents of one data file of a Hub dataset; ids ``<repo>:<split>:<path in the repo>:<row>`` without an ``id_column``."""
    default_category = source.hub.rstrip("/").split("/")[-1]
    prefix = f"{source.hub}:{source.split}:{hub_file_key(file, source.hub)}"
    yield from _records_to_documents(_iter_record_file(file), source, default_category, prefix, file)


def hub_file_key(url: str, repo: str) -> str:
    """The path of a data file inside its Hub repo (or local dataset folder), without its data suffix.

    Two files of one name in two folders (``data/en/train.jsonl``, ``data/de/train.jsonl``) get two keys,
    so their documents get distinct ids.

    Example:

    >>> hub_file_key("hf://datasets/me/docs@0a1b2c/data/en/train-00000-of-00001.jsonl.gz", "me/docs")
    'data/en/train-00000-of-00001'
    >>> hub_file_key("/data/my-dataset/data/de/train.parquet", "/data/my-dataset")
    'data/de/train'
    """
    path = url.split("://", 1)[-1]
    local = str(Path(repo).expanduser())
    if "@" in path:  # hf://datasets/<repo>@<commit>/<path in the repo>
        path = path.split("@", 1)[1].split("/", 1)[-1]
    elif path.startswith(local.rstrip("/") + "/"):  # a local dataset folder given as `hub:`
        path = path[len(local.rstrip("/")) + 1:]
    elif f"/{repo.strip('/')}/" in f"/{path}":  # hf://datasets/<repo>/<path> without a revision
        path = f"/{path}".split(f"/{repo.strip('/')}/", 1)[1]
    parent = Path(path).parent
    return _stem(Path(path)) if str(parent) in ("", ".") else f"{parent.as_posix()}/{_stem(Path(path))}"


# -- files of records ------------------------------------------------------------------------------------


def _is_record_file(path: Path | str) -> bool:
    return str(path).lower().endswith(RECORD_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(RECORD_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _open_binary(file: str | Path) -> Any:
    if "://" in str(file):
        import fsspec

        return fsspec.open(str(file), "rb").open()
    return open(file, "rb")


def _iter_record_file(file: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a jsonl / json / parquet file (local or ``hf://``), streamed; bad JSON or UTF-8 names the line."""
    name = str(file).lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        with _open_binary(file) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=64):
                yield from batch.to_pylist()
        return
    with _open_binary(file) as raw:
        binary = gzip.GzipFile(fileobj=raw) if name.endswith(".gz") else raw
        if name.endswith((".json", ".json.gz")):
            head = binary.read(1)
            while head and head.isspace():
                head = binary.read(1)
            if head == b"[":  # a JSON array of records
                yield from json.loads(_decode(head + binary.read(), file, 1))
                return
            if head:  # JSON lines: the first one with its peeked byte back, then the rest, streamed
                binary = itertools.chain([head + binary.readline()], binary)
        for number, line in enumerate(binary, start=1):
            if line.strip():
                try:
                    yield json.loads(_decode(line, file, number))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{file}, line {number}: not valid JSON ({error.msg})") from error


def _decode(data: bytes, file: str | Path, line: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{file}, line {line}: not UTF-8 ({error.reason} at byte {error.start} of the line); "
                         "fix or remove that line, or convert the file to UTF-8") from error


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
            V.ID: str(raw_id) if raw_id is not None else f"{id_prefix}:{row_index}",
            V.CATEGORY: str(category),
            V.TEXT: text,
            V.SOURCE: str(row.get(V.SOURCE) or where),
            V.LICENSE: row.get(V.LICENSE) if row.get(V.LICENSE) is not None else source.license,
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
    return {V.ID: doc_id, V.CATEGORY: category, V.TEXT: text, V.SOURCE: str(path), V.LICENSE: source.license}


# -- every document of the sources (for samples: the probe, small corpora) ------------------------------


def iter_documents(source: SourceConfig) -> Iterator[dict[str, Any]]:
    """The documents of one source as dicts with :data:`DOCUMENT_COLUMNS`, at most ``source.limit`` of them.

    Reads its input shards in order (`hf_longattn.shards`), streamed; a source with a ``limit`` is one
    shard, which `hf_longattn.shards.read_shard` stops at the limit.

    Example:

    >>> docs = list(iter_documents(SourceConfig(embedded="pydoc-topics", category="docs", limit=1)))
    >>> [(d["id"], d["category"]) for d in docs]
    [('pydoc-topics/000', 'docs')]
    """
    for shard in plan_input_shards([source]):
        yield from read_shard([source], shard)


def read_sources(sources: list[SourceConfig] | SourceConfig) -> Any:
    """Read every source into one `datasets.Dataset` with :data:`DOCUMENT_COLUMNS`, sources in order.

    Every document is read into memory: for samples (the probe) and small corpora. The job itself
    never does this: it reads one input shard at a time (`hf_longattn.shards`). Raises a
    `ValueError` naming an example when two documents share an id, and when no document was read.

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

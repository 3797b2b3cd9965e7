"""The test corpus, built from what every Python installation has (no ../shared/data, no network).

Three categories of real text, each a few documents long:

* ``code`` — standard-library modules' source code;
* ``docs`` — the documentation topics bundled with Python (``pydoc_data.topics``);
* ``prose`` — the docstrings of standard-library modules, joined per module.

`write_corpus` writes them as one ``.jsonl`` file per category (truncated to ``chars``
characters per document), plus one document too short for any window in ``code``.
"""

from __future__ import annotations

import ast
import json
import sys
import sysconfig
from pathlib import Path

CATEGORIES = ("code", "docs", "prose")
TOO_SHORT_ID = "code/too-short"
LICENSE = "PSF-2.0"
_MODULES = ("json/decoder.py", "textwrap.py", "csv.py", "heapq.py", "bisect.py", "fractions.py", "argparse.py",
            "difflib.py", "shlex.py", "statistics.py")
_TOPICS = ("assignment", "for", "if", "while", "try", "with", "function", "class", "lambda", "import")
_PROSE_MODULES = ("argparse.py", "difflib.py", "textwrap.py", "fractions.py", "statistics.py", "shutil.py",
                  "string.py", "heapq.py", "csv.py", "calendar.py")


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source() -> str:
    return f"CPython {sys.version.split()[0]}"


def code_documents(limit: int | None = None) -> list[dict]:
    """Standard-library modules, one document each (their source code)."""
    docs = [{"id": f"code/{name.replace('/', '-').removesuffix('.py')}", "category": "code",
             "text": (_stdlib() / name).read_text(encoding="utf-8"), "source": f"{_source()} Lib/{name}",
             "license": LICENSE} for name in _MODULES]
    return docs[:limit]


def docs_documents(limit: int | None = None) -> list[dict]:
    """Bundled documentation topics, one document each."""
    from pydoc_data.topics import topics

    names = [name for name in _TOPICS if name in topics]
    docs = [{"id": f"docs/{name}", "category": "docs", "text": topics[name],
             "source": f"{_source()} pydoc_data.topics", "license": LICENSE} for name in names]
    return docs[:limit]


def prose_documents(limit: int | None = None) -> list[dict]:
    """Every docstring of a standard-library module, joined: English prose about code."""
    docs = []
    for name in _PROSE_MODULES:
        tree = ast.parse((_stdlib() / name).read_text(encoding="utf-8"))
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))]
        text = "\n\n".join(doc for doc in (ast.get_docstring(n) for n in nodes) if doc)
        docs.append({"id": f"prose/{name.removesuffix('.py')}", "category": "prose", "text": text,
                     "source": f"{_source()} docstrings of Lib/{name}", "license": LICENSE})
    return docs[:limit]


def long_text(category: str) -> str:
    """One long real text of ``category`` (> 40,000 characters): for windows of a few thousand tokens."""
    if category == "docs":
        from hf_longattn.sources import pydoc_documents

        return next(pydoc_documents())["text"]
    return documents(category, limit=1)[0]["text"]


def documents(category: str, limit: int | None = None) -> list[dict]:
    """Documents of ``category`` (code, docs, prose), longest first."""
    reader = {"code": code_documents, "docs": docs_documents, "prose": prose_documents}[category]
    return sorted(reader(), key=lambda d: -len(d["text"]))[:limit]


def write_corpus(folder: Path, docs_per_category: int = 3, chars: int = 1200) -> Path:
    """One ``<category>.jsonl`` per category, documents truncated to ``chars``, and one too-short document in ``code``."""
    folder.mkdir(parents=True, exist_ok=True)
    for category in CATEGORIES:
        docs = documents(category, limit=docs_per_category)
        rows = [{**doc, "text": doc["text"][:chars]} for doc in docs]
        if category == "code":
            rows.append({**docs[0], "id": TOO_SHORT_ID, "text": "x = 1"})
        with open(folder / f"{category}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return folder

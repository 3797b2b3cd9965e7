"""The local Hub's storage: dataset repos as folders of commits, content-addressed blobs and LFS objects.

Layout under ``root`` (one folder per repo, so a test or a user can look at what was pushed)::

    datasets/<namespace>/<name>/repo.json          owner, private, gated, users granted access
    datasets/<namespace>/<name>/refs/<branch>      the commit a branch points at (replaced atomically)
    datasets/<namespace>/<name>/commits/<oid>.json parent, summary, description, date and the whole tree
    datasets/<namespace>/<name>/blobs/<git oid>    contents of regular files (git blob sha1)
    datasets/<namespace>/<name>/lfs/<sha256>       LFS objects, stored only once their sha256 and size checked
    datasets/<namespace>/<name>/incoming/          uploads in progress (never read)

A commit is written whole, then its branch moved to it: a failed or refused commit leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

GITATTRIBUTES = """\
*.7z filter=lfs diff=lfs merge=lfs -text
*.arrow filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.gz filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.parquet filter=lfs diff=lfs merge=lfs -text
*.pickle filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.tar filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
*.zst filter=lfs diff=lfs merge=lfs -text
*.png filter=lfs diff=lfs merge=lfs -text
*.jpg filter=lfs diff=lfs merge=lfs -text
"""
"""The ``.gitattributes`` of a new dataset repo (a subset of the Hub's default): which paths go to LFS."""

LFS_MIN_SIZE = 10 * 1024 * 1024
"""Files this large go to LFS whatever their name (as on the Hub)."""

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class HubError(Exception):
    """A refusal the server answers with ``status`` (and the Hub's ``X-Error-Code`` when it has one)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def git_blob_oid(content: bytes) -> str:
    """The git object id of a file's content (what the Hub calls a regular file's ``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that stands for an LFS object in git."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Repo:
    """One repository: its settings, branches, commits and objects (thread-safe for commits)."""

    def __init__(self, folder: Path, kind: str, repo_id: str) -> None:
        self.folder, self.kind, self.repo_id = folder, kind, repo_id
        self.lock = threading.Lock()

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.folder / "repo.json").read_text())

    def set_meta(self, **changes: Any) -> None:
        _write_atomic(self.folder / "repo.json", json.dumps({**self.meta, **changes}).encode())

    # -- revisions ---------------------------------------------------------------------------------

    def branches(self) -> dict[str, str]:
        refs = self.folder / "refs"
        return {path.name: path.read_text().strip() for path in refs.iterdir()} if refs.is_dir() else {}

    def resolve(self, revision: str) -> str:
        """A branch name or a full commit oid → the commit oid; `HubError` 404 otherwise."""
        branches = self.branches()
        if revision in branches:
            return branches[revision]
        if re.fullmatch(r"[0-9a-f]{40}", revision) and (self.folder / "commits" / f"{revision}.json").is_file():
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def commit(self, oid: str) -> dict[str, Any]:
        return json.loads((self.folder / "commits" / f"{oid}.json").read_text())

    def tree(self, revision: str) -> dict[str, dict[str, Any]]:
        """Path → ``{"oid", "size", "lfs"}`` (``lfs``: the sha256 of an LFS file, else None) at ``revision``."""
        return self.commit(self.resolve(revision))["tree"]

    def history(self, revision: str = "main") -> list[tuple[str, dict[str, Any]]]:
        """``(oid, commit)`` from ``revision`` back to the first commit."""
        oid, out = self.resolve(revision), []
        while oid:
            commit = self.commit(oid)
            out.append((oid, commit))
            oid = commit["parent"]
        return out

    # -- contents ----------------------------------------------------------------------------------

    def content_path(self, entry: dict[str, Any]) -> Path:
        return self.folder / "lfs" / entry["lfs"] if entry["lfs"] else self.folder / "blobs" / entry["oid"]

    def read(self, path: str, revision: str = "main") -> bytes:
        """The content of ``path`` at ``revision`` (for tests and users looking at a push)."""
        return self.content_path(self.tree(revision)[path]).read_bytes()

    def files(self, revision: str = "main") -> dict[str, bytes]:
        """Every file at ``revision``: path → content."""
        return {path: self.content_path(entry).read_bytes() for path, entry in self.tree(revision).items()}

    def has_lfs(self, sha256: str) -> bool:
        return re.fullmatch(r"[0-9a-f]{64}", sha256) is not None and (self.folder / "lfs" / sha256).is_file()

    def incoming(self) -> Path:
        folder = self.folder / "incoming"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"

    def store_lfs(self, tmp: Path, sha256: str) -> None:
        """Move a fully received and checked upload into the LFS store."""
        (self.folder / "lfs").mkdir(exist_ok=True)
        os.replace(tmp, self.folder / "lfs" / sha256)

    def upload_mode(self, path: str, size: int, sample: bytes, revision: str) -> str:
        """``"lfs"`` or ``"regular"``: LFS by the repo's ``.gitattributes``, by size, or for binary content."""
        tree = self.tree(revision)
        attributes = self.read(".gitattributes", revision).decode() if ".gitattributes" in tree else ""
        patterns = [line.split()[0] for line in attributes.splitlines() if "filter=lfs" in line]
        name = path.rsplit("/", 1)[-1]
        if any(fnmatch(name, p) or fnmatch(path, p) for p in patterns) or size >= LFS_MIN_SIZE or b"\0" in sample:
            return "lfs"
        return "regular"

    # -- commits -----------------------------------------------------------------------------------

    def apply(self, branch: str, operations: list[dict[str, Any]], summary: str, description: str = "",
              parent: str | None = None, author: str = "") -> str:
        """Commit ``operations`` (NDJSON items: file, lfsFile, deletedFile, deletedFolder) on ``branch``; its new oid.

        Raises `HubError` (nothing written) for an unknown branch, a stale ``parent``, a missing LFS
        object or a deleted path that does not exist.
        """
        with self.lock:
            head = self.branches().get(branch)
            if head is None:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent is not None and not head.startswith(parent):
                raise HubError(412, f"A commit has happened since. Please refresh and try again "
                                    f"(parent {parent} is not the head {head} of {branch}).")
            tree = dict(self.commit(head)["tree"])
            blobs: dict[str, bytes] = {}
            for op in operations:
                self._apply_one(tree, blobs, op)
            for oid, content in blobs.items():
                if not (self.folder / "blobs" / oid).is_file():
                    _write_atomic(self.folder / "blobs" / oid, content)
            return self._write_commit(branch, head, tree, summary, description, author)

    def _apply_one(self, tree: dict, blobs: dict, op: dict[str, Any]) -> None:
        import base64

        key, value = op["key"], op["value"]
        path = value.get("path", "")
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise HubError(400, f"Invalid path in commit: {path!r}")
        if key == "file":
            content = base64.b64decode(value["content"])
            oid = git_blob_oid(content)
            blobs[oid] = content
            tree[path] = {"oid": oid, "size": len(content), "lfs": None}
        elif key == "lfsFile":
            sha256 = value["oid"]
            if not self.has_lfs(sha256):
                raise HubError(422, f"LFS object {sha256} of {path} was never uploaded (or not verified)")
            size = (self.folder / "lfs" / sha256).stat().st_size
            if value.get("size") is not None and value["size"] != size:
                raise HubError(422, f"LFS object {sha256} of {path} has {size} bytes, not {value['size']}")
            tree[path] = {"oid": git_blob_oid(lfs_pointer(sha256, size)), "size": size, "lfs": sha256}
        elif key == "deletedFile":
            if path not in tree:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            del tree[path]
        elif key == "deletedFolder":
            inside = [p for p in tree if p.startswith(path.rstrip("/") + "/")]
            if not inside:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in inside:
                del tree[p]
        else:
            raise HubError(400, f"Unknown commit operation {key!r}")

    def _write_commit(self, branch: str, parent: str | None, tree: dict, summary: str, description: str,
                      author: str) -> str:
        commit = {"parent": parent, "summary": summary, "description": description, "author": author,
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()), "tree": dict(sorted(tree.items()))}
        data = json.dumps(commit, indent=1).encode()
        oid = hashlib.sha1(data).hexdigest()
        _write_atomic(self.folder / "commits" / f"{oid}.json", data)
        _write_atomic(self.folder / "refs" / branch, oid.encode())
        return oid


class Store:
    """Every repo under ``root``; creates them with a first commit holding ``.gitattributes``, as the Hub does."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lock = threading.Lock()

    def repo(self, repo_id: str, kind: str = "dataset") -> Repo | None:
        """The repo, or None if it does not exist."""
        with self._lock:
            key = (kind, repo_id)
            if key not in self._repos:
                folder = self.root / f"{kind}s" / repo_id
                if not (folder / "repo.json").is_file():
                    return None
                self._repos[key] = Repo(folder, kind, repo_id)
            return self._repos[key]

    def create(self, repo_id: str, owner: str, *, kind: str = "dataset", private: bool = False,
               gated: str | bool = False) -> Repo:
        """A new repo owned by ``owner`` with one commit (``.gitattributes``); `HubError` 409 if it exists."""
        if not REPO_ID.match(repo_id):
            raise HubError(400, f"Invalid repo id {repo_id!r}")
        if self.repo(repo_id, kind) is not None:
            raise HubError(409, f"You already created this {kind} repo")
        folder = self.root / f"{kind}s" / repo_id
        repo = Repo(folder, kind, repo_id)
        oid = git_blob_oid(GITATTRIBUTES.encode())
        _write_atomic(folder / "blobs" / oid, GITATTRIBUTES.encode())
        tree = {".gitattributes": {"oid": oid, "size": len(GITATTRIBUTES), "lfs": None}}
        repo._write_commit("main", None, tree, "initial commit", "", owner)
        _write_atomic(folder / "repo.json", json.dumps({"owner": owner, "private": private, "gated": gated,
                                                        "granted": [], "created": time.time()}).encode())
        return repo

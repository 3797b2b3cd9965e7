"""The local Hub's endpoints (one ``route_<name>`` method each), mixed into `tests.hub_server.Handler`."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from typing import Any
from urllib.parse import parse_qs, quote

try:
    from .hub_store import HubError, Repo, lfs_pointer
except ImportError:  # run as a script: python tests/hub_server.py
    from hub_store import HubError, Repo, lfs_pointer

COPY_CHUNK = 1 << 20


def entry_json(path: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A file as the tree and paths-info endpoints list it."""
    item = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        item["lfs"] = {"oid": entry["lfs"], "size": entry["size"],
                       "pointerSize": len(lfs_pointer(entry["lfs"], entry["size"]))}
    return item


def folder_json(path: str, tree: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A folder: its oid is a hash of what it holds."""
    inside = sorted((p, e["oid"]) for p, e in tree.items() if p.startswith(path + "/"))
    return {"type": "directory", "oid": hashlib.sha1(json.dumps(inside).encode()).hexdigest(), "size": 0, "path": path}


def folders(tree: dict[str, Any]) -> set[str]:
    return {"/".join(p.split("/")[:i]) for p in tree for i in range(1, p.count("/") + 1)}


def front_matter(card: str) -> Any:
    """The YAML metadata block of a card (None without one); `HubError` 400 when it is not valid YAML."""
    import yaml

    if not card.startswith("---"):
        return None
    end = card.find("\n---", 3)
    if end < 0:
        raise HubError(400, "The card's YAML block is not closed by a --- line")
    try:
        return yaml.safe_load(card[3:end])
    except yaml.YAMLError as error:
        raise HubError(400, f"Invalid YAML in the card: {' '.join(str(error).split())}") from error


def check_metadata(data: Any) -> list[str]:
    """What the Hub would refuse in a dataset card's metadata: the types of the keys a dataset card uses."""
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["The card's metadata must be a mapping"]
    errors = []
    for key in ("license", "language", "tags", "task_categories", "size_categories", "pretty_name"):
        value = data.get(key)
        if value is not None and not (isinstance(value, str) or (isinstance(value, list)
                                                                   and all(isinstance(v, str) for v in value))):
            errors.append(f"{key} must be a string or a list of strings")
    for config in data.get("configs") or []:
        if not isinstance(config, dict) or not isinstance(config.get("config_name"), str):
            errors.append("each of configs needs a config_name")
            continue
        files = config.get("data_files")
        entries = files if isinstance(files, list) else [files]
        if not all(isinstance(e, str) or (isinstance(e, dict) and isinstance(e.get("split"), str)
                                          and isinstance(e.get("path"), str | list)) for e in entries):
            errors.append(f"configs[{config['config_name']}].data_files must be paths or split/path mappings")
    return errors


class Endpoints:
    """The work of each route; `tests.hub_server.Handler` provides reading, answering and access checks."""

    # -- repos -------------------------------------------------------------------------------------------

    def route_create(self, method: str) -> None:
        body = self.json_body() or {}
        if body.get("type", "model") != "dataset":
            raise HubError(400, "The local Hub serves dataset repos only")
        repo_id = f"{body.get('organization') or self.user() or ''}/{body.get('name')}"
        self.require_write(repo_id)
        private = body.get("visibility") == "private" if "visibility" in body else bool(body.get("private"))
        url = f"{self.hub.url}/datasets/{repo_id}"
        if self.hub.store.repo(repo_id) is not None:  # the Hub's answer names the existing repo
            message = "You already created this dataset repo"
            return self.send_json({"error": message, "url": url}, 409, {"X-Error-Message": message})
        self.hub.store.create(repo_id, repo_id.split("/")[0], private=private)
        self.send_json({"url": url, "name": repo_id, "id": repo_id})

    def route_info(self, method: str) -> None:
        repo = self.readable(self.args["repo"])
        oid = repo.resolve(self.args.get("rev", "main"))
        commit = repo.commit(oid)
        tree = commit["tree"]
        blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = [{"rfilename": p, **({"size": e["size"], "blobId": e["oid"]} if blobs else {}),
                     **({"lfs": {"size": e["size"], "sha256": e["lfs"], "pointerSize": len(lfs_pointer(e["lfs"], e["size"]))}}
                        if blobs and e["lfs"] else {})} for p, e in tree.items()]
        meta = repo.meta
        card = front_matter(repo.read("README.md", oid).decode()) if "README.md" in tree else None
        info = {"_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0], "sha": oid, "lastModified": commit["date"],
                "private": meta["private"], "gated": meta["gated"], "disabled": False, "downloads": 0, "likes": 0,
                "tags": [], "siblings": siblings, "usedStorage": sum(e["size"] for e in tree.values())}
        if isinstance(card, dict):
            info["cardData"] = card
        expand = self.query.get("expand") or self.query.get("expand[]")
        if expand:
            info = {k: v for k, v in info.items() if k in {"_id", "id", *expand}}
        self.send_json(info)

    def route_validate_yaml(self, method: str) -> None:
        body = self.json_body() or {}
        try:
            errors = check_metadata(front_matter(body.get("content", "")))
        except HubError as error:
            errors = [error.message]
        if errors:
            return self.send_json({"errors": [{"message": e} for e in errors], "warnings": []}, 400)
        self.send_json({"errors": [], "warnings": []})

    # -- uploads -----------------------------------------------------------------------------------------

    def writable(self) -> Repo:
        repo = self.hub.store.repo(self.args["repo"])
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        self.require_write(repo.repo_id)
        return repo

    def route_preupload(self, method: str) -> None:
        repo = self.writable()
        body = self.json_body() or {}
        revision = self.args["rev"]
        tree = repo.tree(revision)
        files = []
        for item in body.get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            remote = tree.get(item["path"])
            files.append({"path": item["path"], "uploadMode": repo.upload_mode(item["path"], item["size"], sample, revision),
                          "shouldIgnore": False, "oid": (remote["lfs"] or remote["oid"]) if remote else None})
        self.send_json({"files": files, "commitOid": repo.resolve(revision)})

    def route_lfs_batch(self, method: str) -> None:
        repo = self.writable()
        body = self.json_body() or {}
        if body.get("operation") != "upload":
            raise HubError(400, "The local Hub's LFS endpoint takes uploads only (downloads go through resolve)")
        objects = []
        for item in body.get("objects", []):
            oid, size = item["oid"], item["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not repo.has_lfs(oid):
                ticket = secrets.token_hex(16)
                with self.hub.lock:
                    self.hub.tickets[ticket] = (repo.repo_id, oid, size)
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs/upload/datasets/{repo.repo_id}/{oid}?ticket={ticket}",
                               "header": {}},
                    "verify": {"href": f"{self.hub.url}/lfs/verify/datasets/{repo.repo_id}", "header": {}},
                }
            objects.append(entry)
        self.send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def route_lfs_upload(self, method: str) -> None:
        ticket = self.query.get("ticket", [""])[0]
        with self.hub.lock:
            granted = self.hub.tickets.get(ticket)
        if granted is None or granted[:2] != (self.args["repo"], self.args["oid"]):
            self.read_body()
            raise HubError(403, "Upload URL not issued by the LFS batch endpoint")
        repo, (_, oid, size) = self.hub.store.repo(self.args["repo"]), granted
        tmp, digest, received = repo.incoming(), hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as file:
                for data in self.body_chunks():
                    digest.update(data)
                    file.write(data)
                    received += len(data)
            if received != size or digest.hexdigest() != oid:
                raise HubError(400, f"Upload of {oid} does not match: {received} bytes, sha256 {digest.hexdigest()}")
            repo.store_lfs(tmp, oid)
        finally:
            tmp.unlink(missing_ok=True)
        self.answer(200, b"", {"ETag": f'"{oid}"'})

    def route_lfs_verify(self, method: str) -> None:
        repo = self.writable()
        body = self.json_body() or {}
        if not repo.has_lfs(body.get("oid", "")):
            raise HubError(404, f"LFS object {body.get('oid')} was not uploaded")
        self.send_json({"success": True})

    def route_commit(self, method: str) -> None:
        repo = self.writable()
        lines = [json.loads(line) for line in self.read_body().splitlines() if line.strip()]
        if self.query.get("create_pr"):
            raise HubError(400, "The local Hub does not serve pull requests")
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "A commit starts with its header line")
        header, operations = lines[0]["value"], lines[1:]
        limit = self.hub.max_files_per_commit
        if limit is not None and len(operations) > limit:
            raise HubError(413, f"Too many files in one commit: {len(operations)} > {limit}; commit them in several")
        branch = self.args["rev"]
        if branch not in repo.branches():
            raise HubError(404, f"Invalid rev id: {branch}: commits go to a branch", "RevisionNotFound")
        oid = repo.apply(branch, operations, header.get("summary", ""), header.get("description", ""),
                         header.get("parentCommit"), author=self.user() or "")
        self.send_json({"success": True, "commitOid": oid, "commitUrl": f"{self.hub.url}/datasets/{repo.repo_id}/commit/{oid}",
                        "hookOutput": "", "pullRequestUrl": None})

    def route_agent_harnesses(self, method: str) -> None:
        self.send_json({"standardEnvVars": [], "harnesses": {}})

    def route_xet(self, method: str) -> None:
        with self.hub.lock:
            self.hub.unknown.append(f"{method} {self.path} (Xet)")
        raise HubError(501, "This local Hub does not speak Xet: set HF_HUB_DISABLE_XET=1 to upload through LFS")

    # -- reading -----------------------------------------------------------------------------------------

    def route_tree(self, method: str) -> None:
        repo = self.readable(self.args["repo"])
        oid = repo.resolve(self.args["rev"])
        tree = repo.commit(oid)["tree"]
        base = self.args.get("path", "").strip("/")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        if base and base not in folders(tree):
            raise HubError(404, f"Entry not found: {base}", "EntryNotFound")
        prefix = base + "/" if base else ""
        entries = []
        for path in sorted(set(tree) | folders(tree)):
            if not path.startswith(prefix) or (not recursive and "/" in path[len(prefix):]):
                continue
            entries.append(entry_json(path, tree[path]) if path in tree else folder_json(path, tree))
        if self.query.get("expand", ["false"])[0].lower() in ("1", "true"):
            for entry in entries:
                entry["lastCommit"] = self.last_commit(repo, oid, entry)
        start = int(self.query.get("cursor", ["0"])[0])
        page = entries[start:start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(entries):
            query = "&".join(f"{k}={quote(v[0])}" for k, v in self.query.items() if k != "cursor")
            headers["Link"] = f'<{self.hub.url}{self.path.split("?")[0]}?{query}&cursor={start + self.hub.page_size}>; rel="next"'
        self.send_json(page, headers=headers)

    def last_commit(self, repo: Repo, oid: str, entry: dict[str, Any]) -> dict[str, str]:
        """The newest commit that changed ``entry`` (walking back while it stays the same)."""
        history = repo.history(oid)
        found = history[0]
        for commit_oid, commit in history:
            tree = commit["tree"]
            same = (tree.get(entry["path"], {}).get("oid") == entry["oid"] if entry["type"] == "file"
                    else folder_json(entry["path"], tree)["oid"] == entry["oid"])
            if not same:
                break
            found = (commit_oid, commit)
        return {"id": found[0], "title": found[1]["summary"], "date": found[1]["date"]}

    def route_paths_info(self, method: str) -> None:
        repo = self.readable(self.args["repo"])
        raw = self.read_body().decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            form = json.loads(raw or "{}")
            paths, expand = form.get("paths", []), bool(form.get("expand"))
        else:
            form = parse_qs(raw)
            paths, expand = form.get("paths", []), form.get("expand", ["False"])[0].lower() == "true"
        oid = repo.resolve(self.args["rev"])
        tree = repo.commit(oid)["tree"]
        out = []
        for path in paths:
            path = path.strip("/")
            if path in tree:
                out.append(entry_json(path, tree[path]))
            elif path in folders(tree):
                out.append(folder_json(path, tree))
            else:
                continue
            if expand:
                out[-1]["lastCommit"] = self.last_commit(repo, oid, out[-1])
        self.send_json(out)

    def route_resolve(self, method: str) -> None:
        repo = self.readable(self.args["repo"])
        meta = repo.meta
        user = self.user()
        if meta["gated"] and not self.can_write(repo.repo_id.split("/")[0]) and user not in meta["granted"]:
            raise HubError(403, f"Access to dataset {repo.repo_id} is restricted: you must accept its conditions",
                           "GatedRepo")
        oid = repo.resolve(self.args["rev"])
        entry = repo.commit(oid)["tree"].get(self.args["path"])
        if entry is None:
            raise HubError(404, f"Entry not found: {self.args['path']}", "EntryNotFound")
        etag = entry["lfs"] or entry["oid"]
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": oid, "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry["size"])})
        start, stop, status = 0, entry["size"], 200
        requested = self.headers.get("Range")
        if requested:
            start, stop = self.byte_range(requested, entry["size"])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{entry['size']}"
        self.stream(status, repo.content_path(entry), start, stop, headers)

    def byte_range(self, header: str, size: int) -> tuple[int, int]:
        """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` → ``[start, stop)``; 416 when it is outside the file."""
        unit, _, spec = header.partition("=")
        first, _, last = spec.strip().partition("-")
        if unit.strip() != "bytes" or "," in spec:
            raise HubError(416, f"Unsupported range {header!r}")
        if first == "":
            start, stop = max(0, size - int(last)), size
        else:
            start, stop = int(first), min(size, int(last) + 1) if last else size
        if start >= size or start >= stop:
            raise HubError(416, f"Range {header!r} is outside the file ({size} bytes)")
        return start, stop

    def stream(self, status: int, path, start: int, stop: int, headers: dict[str, str]) -> None:
        """Answer ``status`` with bytes ``[start, stop)`` of ``path`` (headers only for HEAD)."""
        self.answer(status, b"", {**headers, "Content-Length": str(stop - start)}, "application/octet-stream")
        if self.command == "HEAD":
            return
        with open(path, "rb") as file:
            file.seek(start)
            remaining = stop - start
            while remaining:
                data = file.read(min(COPY_CHUNK, remaining))
                self.wfile.write(data)
                remaining -= len(data)

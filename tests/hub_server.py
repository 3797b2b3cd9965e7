"""A local Hugging Face Hub for tests and rehearsals: the HTTP endpoints `huggingface_hub` and `datasets` call to push and load a dataset.

Run by hand (then point the clients at it with ``HF_ENDPOINT``; it speaks LFS, not Xet)::

    python tests/hub_server.py --port 8765 --root /tmp/local-hub
    HF_ENDPOINT=http://127.0.0.1:8765 HF_HUB_DISABLE_XET=1 HF_TOKEN=hf_local hf-longattn push --push-to-hub me/longabc

In tests, `LocalHub` runs it in a thread (fixture ``local_hub`` in ``tests/conftest.py``). What it
serves, and nothing more (an unknown request is answered 404 and recorded in ``LocalHub.unknown``):

    POST /api/repos/create                              create a repo (409 if it exists)
    GET  /api/datasets/{id}[/revision/{rev}]            repo info: sha, private, gated, siblings, cardData
    POST /api/validate-yaml                             a card's YAML metadata
    POST /api/datasets/{id}/preupload/{rev}             upload mode (regular or lfs) and remote oid of each file
    POST /datasets/{id}.git/info/lfs/objects/batch      LFS batch: upload + verify actions for missing objects only
    PUT  /lfs/upload/datasets/{id}/{sha256}             an LFS object (kept only if its sha256 and size match)
    POST /lfs/verify/datasets/{id}                      LFS verify
    POST /api/datasets/{id}/commit/{rev}                NDJSON commit: file, lfsFile (add or copy), deletedFile, deletedFolder
    GET  /api/datasets/{id}/tree/{rev}[/{path}]         tree listing (recursive, paginated with a Link header)
    POST /api/datasets/{id}/paths-info/{rev}            entries of some paths
    HEAD|GET /datasets/{id}/resolve/{rev}/{path}        a file, with ETag, X-Repo-Commit, X-Linked-* and Range
    GET  /api/agent-harnesses                           the (empty) registry huggingface_hub reads for its user agent

Tokens map to users (``users``); a user owns the namespace of its name. Without ``users`` (by
hand) any token may write anywhere. Faults (``LocalHub.fail``) make a route answer an error
status (with ``Retry-After``) or drop the connection mid-request, to test what a client does.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import socket
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

try:
    from .hub_api import Endpoints
    from .hub_store import HubError, Repo, Store
except ImportError:  # run as a script: python tests/hub_server.py
    from hub_api import Endpoints
    from hub_store import HubError, Repo, Store

logger = logging.getLogger("local_hub")

ID = r"(?P<repo>[^/]+/[^/]+?)"
ROUTES = [  # (name, method(s), pattern on the raw path)
    ("create", "POST", r"/api/repos/create"),
    ("info", "GET", rf"/api/datasets/{ID}(?:/revision/(?P<rev>[^/]+))?"),
    ("validate-yaml", "POST", r"/api/validate-yaml"),
    ("preupload", "POST", rf"/api/datasets/{ID}/preupload/(?P<rev>[^/]+)"),
    ("lfs-batch", "POST", rf"/datasets/{ID}\.git/info/lfs/objects/batch"),
    ("lfs-upload", "PUT", rf"/lfs/upload/datasets/{ID}/(?P<oid>[0-9a-f]{{64}})"),
    ("lfs-verify", "POST", rf"/lfs/verify/datasets/{ID}"),
    ("commit", "POST", rf"/api/datasets/{ID}/commit/(?P<rev>[^/]+)"),
    ("tree", "GET", rf"/api/datasets/{ID}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"),
    ("paths-info", "POST", rf"/api/datasets/{ID}/paths-info/(?P<rev>[^/]+)"),
    ("resolve", "GET HEAD", rf"/datasets/{ID}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
    ("xet", "GET POST", rf"/api/datasets/{ID}/xet-(?:read|write)-token/.*"),
    ("agent-harnesses", "GET", r"/api/agent-harnesses"),
]


@dataclass
class Fault:
    """What a route does instead of its work, ``times`` times: answer ``status`` or drop the connection."""

    route: str
    status: int | None = None
    retry_after: int | None = None
    drop_after_bytes: int | None = None
    times: int = 1
    after_work: bool = False  # fail after doing the work (a commit that lands but whose answer is lost)
    match: str = ""  # only requests whose path contains this (an LFS object's sha256, say)
    hold: threading.Event | None = None  # a drop waits for this (set ``reached`` first): the client can be killed then
    skip: int = 0  # let this many matching requests through first
    reached: threading.Event = field(default_factory=threading.Event)


class LocalHub:
    """The server: ``LocalHub(root).start()``; ``url``, ``store``, ``calls``, ``unknown``, ``received``; ``stop()``.

    Args:
        root: folder of the repos (see `hub_store`).
        users: token → user name; None lets any token write anywhere.
        max_files_per_commit: refuse larger commits with 413 (the real Hub times out instead).
        page_size: entries per page of a tree listing.
    """

    def __init__(self, root: str | Path, users: dict[str, str] | None = None, *, max_files_per_commit: int | None = None,
                 page_size: int = 1000) -> None:
        self.store = Store(root)
        self.users = users
        self.max_files_per_commit = max_files_per_commit
        self.page_size = page_size
        self.faults: list[Fault] = []
        self.calls: list[tuple[str, str, int]] = []  # (method, route, status)
        self.unknown: list[str] = []  # requests no route serves
        self.crashes: list[str] = []  # exceptions of the server itself
        self.received: Counter = Counter()  # route → request body bytes received
        self.tickets: dict[str, tuple[str, str, int]] = {}  # LFS upload URL ticket → (repo, sha256, size)
        self.active = 0  # requests being served
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    # -- life cycle ----------------------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> LocalHub:
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.server.hub = self  # type: ignore[attr-defined]
        threading.Thread(target=self.server.serve_forever, name="local-hub", daemon=True).start()
        return self

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # -- for tests -----------------------------------------------------------------------------------------

    def fail(self, route: str, status: int | None = None, *, retry_after: int | None = None,
             drop_after_bytes: int | None = None, times: int = 1, after_work: bool = False, match: str = "",
             hold: bool = False, skip: int = 0) -> Fault:
        """Make the next ``times`` requests of ``route`` (whose path contains ``match``) fail (see `Fault`)."""
        fault = Fault(route, status, retry_after, drop_after_bytes, times, after_work, match,
                      threading.Event() if hold else None, skip)
        with self.lock:
            self.faults.append(fault)
        return fault

    def take_fault(self, route: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.route == route and fault.times > 0 and fault.match in path:
                    if fault.skip > 0:
                        fault.skip -= 1
                        return None
                    fault.times -= 1
                    return fault
        return None

    def repo(self, repo_id: str) -> Repo:
        repo = self.store.repo(repo_id)
        assert repo is not None, f"no repo {repo_id} on the local Hub"
        return repo

    def routes_called(self) -> set[str]:
        return {route for _, route, _ in self.calls}


class Handler(Endpoints, BaseHTTPRequestHandler):
    """One request: route it, check access, do the work, answer JSON (errors with the Hub's X-Error-* headers)."""

    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1"

    @property
    def hub(self) -> LocalHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the request line only, never headers
        logger.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802
        self.route("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self.route("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self.route("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self.route("PUT")

    def route(self, method: str) -> None:
        with self.hub.lock:
            self.hub.active += 1
        try:
            self.dispatch(method)
        finally:
            with self.hub.lock:
                self.hub.active -= 1

    def dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.fault = None
        self.query = parse_qs(url.query)
        for name, methods, pattern in ROUTES:
            match = re.fullmatch(pattern, url.path)
            if match and method in methods.split():
                self.name = name
                self.args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                return self.serve(name, method)
        self.name = "unknown"
        with self.hub.lock:
            self.hub.unknown.append(f"{method} {url.path}")
        self.read_body()
        self.error(404, f"The local Hub does not serve {method} {url.path}")

    def serve(self, name: str, method: str) -> None:
        """Apply a pending fault, else run the route's method (``route_<name>``); `HubError` → an error answer."""
        self.fault = self.hub.take_fault(name, self.path)
        if self.fault is not None and not self.fault.after_work:
            if self.fault.drop_after_bytes is not None:
                return self.drop(self.fault.drop_after_bytes)
            self.read_body()
            return self.fail_with(self.fault)
        try:
            getattr(self, "route_" + name.replace("-", "_"))(method)
        except HubError as error:
            self.error(error.status, error.message, error.code)
        except (BrokenPipeError, ConnectionResetError):  # the client went away (killed mid-request)
            self.close_connection = True
        except Exception as error:  # noqa: BLE001 - a bug of the server: answered 500 and recorded
            logger.exception("local Hub error on %s %s", method, self.path)
            with self.hub.lock:
                self.hub.crashes.append(f"{method} {self.path}: {type(error).__name__}: {error}")
            self.error(500, f"local Hub error: {type(error).__name__}: {error}")

    # -- request bodies --------------------------------------------------------------------------------

    def body_chunks(self, limit: int | None = None):
        """The request body in pieces (Content-Length or chunked), counted in ``hub.received``; stops at ``limit``."""
        seen = 0

        def count(data: bytes) -> bytes:
            with self.hub.lock:
                self.hub.received[self.name] += len(data)
            return data

        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return
                remaining = size
                while remaining:
                    want = min(remaining, 1 << 20) if limit is None else min(remaining, 1 << 20, limit - seen)
                    if want <= 0:
                        return
                    data = count(self.rfile.read(want))
                    seen, remaining = seen + len(data), remaining - len(data)
                    yield data
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining:
            want = min(remaining, 1 << 20) if limit is None else min(remaining, 1 << 20, limit - seen)
            if want <= 0:
                return
            data = count(self.rfile.read(want))
            if not data:
                return
            seen, remaining = seen + len(data), remaining - len(data)
            yield data

    def read_body(self) -> bytes:
        return b"".join(self.body_chunks())

    def json_body(self) -> Any:
        try:
            return json.loads(self.read_body() or b"null")
        except ValueError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from error

    # -- answers -----------------------------------------------------------------------------------------

    def answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
               content_type: str = "application/json") -> None:
        """Send one response (the pending after-work fault replaces a success)."""
        if status < 400 and self.fault is not None and self.fault.after_work:
            return self.drop(0) if self.fault.drop_after_bytes is not None else self.fail_with(self.fault)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        headers = {"Content-Length": str(len(body)), **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        with self.hub.lock:
            self.hub.calls.append((self.command, self.name, status))
        logger.info("%s %s -> %d", self.command, urlsplit(self.path).path, status)

    def send_json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.answer(status, json.dumps(obj).encode(), headers)

    def error(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        extra = {"X-Error-Message": message.encode("ascii", "replace").decode()[:500], **(headers or {})}
        if code:
            extra["X-Error-Code"] = code
        self.fault, fault = None, self.fault  # an error is never replaced
        self.answer(status, json.dumps({"error": message}).encode(), extra)
        self.fault = fault

    def fail_with(self, fault: Fault) -> None:
        self.fault = None
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
        self.error(fault.status or 500, f"injected fault: {fault.status} on {self.name}", headers=headers)

    def drop(self, after_bytes: int) -> None:
        """Read ``after_bytes`` of the body, then close the connection without an answer."""
        for _ in self.body_chunks(limit=after_bytes) if after_bytes else ():
            pass
        if self.fault is not None and self.fault.hold is not None:
            self.fault.reached.set()
            self.fault.hold.wait(timeout=120)
        with self.hub.lock:
            self.hub.calls.append((self.command, self.name, 0))
        logger.info("%s %s -> connection dropped", self.command, urlsplit(self.path).path)
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- access --------------------------------------------------------------------------------------------

    def user(self) -> str | None:
        """The user of the request's token (``Authorization: Bearer``); None without a valid one."""
        header = self.headers.get("Authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token:
            return None
        if self.hub.users is None:
            return "user"
        return self.hub.users.get(token)

    def can_write(self, namespace: str) -> bool:
        return self.hub.users is None or self.user() == namespace

    def require_write(self, repo_id: str) -> str:
        """The user, if it may write to ``repo_id``; else 401 (no valid token) or 403."""
        user = self.user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header" if self.headers.get("Authorization")
                           else "You must be authenticated to write to a repo: pass a token")
        if not self.can_write(repo_id.split("/")[0]):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return user

    def readable(self, repo_id: str) -> Repo:
        """The repo if this request may see it; 404 RepoNotFound otherwise (as the Hub answers for private repos)."""
        repo = self.hub.store.repo(repo_id)
        if repo is None or (repo.meta["private"] and not self.can_write(repo_id.split("/")[0])):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo


def main(argv: list[str] | None = None) -> None:
    """``python tests/hub_server.py --port N --root DIR``: serve until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--root", required=True, help="folder of the repos (kept across restarts)")
    parser.add_argument("--max-files-per-commit", type=int, default=None, help="refuse larger commits (413)")
    parser.add_argument("--fail", action="append", default=[], metavar="ROUTE=STATUS|drop",
                        help="make the next request of ROUTE fail: commit=500, commit=429 (Retry-After: 30), "
                             "lfs-upload=drop (the connection cut in every try of the next upload)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="local hub: %(message)s", stream=sys.stderr)
    hub = LocalHub(args.root, max_files_per_commit=args.max_files_per_commit)
    for spec in args.fail:
        route, _, what = spec.partition("=")
        if what == "drop":  # every try of one request: huggingface_hub retries 5 times
            hub.fail(route, drop_after_bytes=1024, times=6)
        else:
            hub.fail(route, int(what), retry_after=30 if what == "429" else None)
    hub.start(args.host, args.port)
    print(f"local Hub on {hub.url} (repos in {args.root}); use it with:\n"
          f"  export HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1 HF_TOKEN=hf_local", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()

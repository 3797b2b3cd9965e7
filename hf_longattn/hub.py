"""Push an export folder to a Hub dataset repo: `huggingface_hub` commits, planned so every commit leaves the repo loadable.

How a push goes (`push_folder`):

1. Compare the folder with the repo's tree: a file whose content is already there (same sha256
   for an LFS file, same git oid for a regular one) is not sent; a file of an earlier export
   (under ``data/scored/``, ``data/filtered/``, ``plots/``) that this export does not have is deleted.
2. Commit with `HfApi.create_commit`, which sends the bytes (preupload, then LFS or Xet) and
   skips what the Hub already holds. When everything fits in ``max_files_per_commit``
   operations, that is one commit: the new files in, the old parts out. Otherwise the new data
   parts go first, in commits that the current card does not reference (their names carry the
   export's tag), then one commit with the card (the switch), then commits deleting the old
   parts. So every commit leaves either the previous export or the new one, never a mix; on a
   repo without a card, the first commit adds a placeholder card that says an upload is under way.
3. A refused commit (413, too many files) is retried in halves. Any other failure stops the
   push with one line naming the cause; rerunning resumes: committed files are not sent again,
   and LFS objects uploaded before a failed commit are not sent again either.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LongAttnError

EXPORT_RECORD = "hf_longattn_export.json"
"""The run's record of an export in its folder; never pushed."""

logger = logging.getLogger(__name__)

DEFAULT_MAX_FILES_PER_COMMIT = 50
"""Operations per commit: what `datasets`' own ``push_to_hub`` uses; the Hub recommends under 100 (its commits time out at 60 s)."""
REPLACED = ("data/scored/", "data/filtered/", "plots/")
"""Remote folders an export owns: what is there and not in the new export is deleted."""
CARD = "README.md"
PLACEHOLDER_CARD = """---
configs:
- config_name: upload_in_progress
  data_files: upload_in_progress/*.parquet
---
# Upload in progress

hf_longattn is uploading this dataset in several commits. Its card, with the configs to load, is
added by the last one; until then there is nothing to load.
"""


@dataclass
class LocalFile:
    """A file of the export: its path in the repo, on disk, its size and sha256."""

    path: str
    source: Path
    size: int
    sha256: str

    def git_oid(self) -> str:
        """The git blob id of the content (how the Hub names a regular file's content)."""
        data = self.source.read_bytes()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class PushPlan:
    """What a push changes: files to upload (data parts, then the rest), files to delete, files already there."""

    parts: list[LocalFile] = field(default_factory=list)
    others: list[LocalFile] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    has_card: bool = True

    def commits(self, limit: int) -> list[tuple[list[LocalFile | str], list[str]]]:
        """``(additions, deletions)`` per commit, at most ``limit`` operations each, in the order that keeps the repo loadable.

        An addition is a `LocalFile`, or `CARD` alone for the placeholder card of a repo that has none.
        """
        limit = max(1, limit)
        adds: list[LocalFile | str] = [*self.parts, *self.others]
        if len(adds) + len(self.stale) <= limit:
            return [(adds, list(self.stale))] if adds or self.stale else []
        card = [f for f in self.others if f.path == CARD]
        switch: list[LocalFile | str] = card + [f for f in self.others if f.path != CARD][:max(0, limit - len(card))]
        before: list[LocalFile | str] = [f for f in adds if f not in switch]
        if not self.has_card and before:
            before.insert(0, CARD)  # the placeholder: nothing loadable until the real card, instead of a wrong guess
        commits: list[tuple[list[LocalFile | str], list[str]]] = [
            (before[i:i + limit], []) for i in range(0, len(before), limit)]
        room = limit - len(switch)
        commits.append((switch, self.stale[:room]))
        rest = self.stale[room:]
        commits += [([], rest[i:i + limit]) for i in range(0, len(rest), limit)]
        return [c for c in commits if c[0] or c[1]]

    def done(self, adds: list[LocalFile | str], deletes: list[str]) -> None:
        """Forget what a commit has just made."""
        self.has_card = self.has_card or any(_key(a) == CARD for a in adds)
        self.parts = [f for f in self.parts if f not in adds]
        self.others = [f for f in self.others if f not in adds]
        self.stale = [p for p in self.stale if p not in deletes]


def sha256_of(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def local_files(folder: Path, skip: tuple[str, ...] = ()) -> list[LocalFile]:
    """The files of ``folder`` to upload, sorted, without ``skip`` and what `HfApi.upload_folder` leaves out (``.git``...)."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    paths = {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*")) if path.is_file()}
    kept = filter_repo_objects(list(paths), ignore_patterns=[*DEFAULT_IGNORE_PATTERNS, *skip])
    return [LocalFile(relative, paths[relative], paths[relative].stat().st_size, sha256_of(paths[relative]))
            for relative in kept]


def plan_push(files: list[LocalFile], remote: dict[str, Any]) -> PushPlan:
    """Compare the export's files with the repo's (path → `huggingface_hub.hf_api.RepoFile`)."""
    plan = PushPlan(has_card=CARD in remote)
    for local in files:
        there = remote.get(local.path)
        same = there is not None and (there.lfs.sha256 == local.sha256 if there.lfs else there.blob_id == local.git_oid())
        if same:
            plan.unchanged.append(local.path)
        else:
            (plan.parts if local.path.startswith("data/") else plan.others).append(local)
    mine = {f.path for f in files}
    plan.stale = sorted(p for p in remote if p.startswith(REPLACED) and p not in mine)
    return plan


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "Upload LongABC dataset with hf_longattn", skip: tuple[str, ...] = (),
                max_files_per_commit: int = DEFAULT_MAX_FILES_PER_COMMIT) -> str:
    """Create the dataset repo if needed and bring it to the content of ``folder``; returns its URL.

    Raises `LongAttnError` (one line: what failed, what to do) for every Hub or network failure.
    See the module docstring for the order of the commits and what a rerun skips.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    folder = Path(folder)
    files = local_files(folder, skip)
    api = HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        repo_id = getattr(repo_url, "repo_id", None) or repo_id  # the namespace the Hub resolved
        info = api.dataset_info(repo_id)
        if private and not info.private:
            logger.warning("[push] %s already exists and is public: --private does not change that "
                           "(change it in the repo's settings on the Hub).", repo_id)
        remote = {f.path: f for f in api.list_repo_tree(repo_id, repo_type="dataset", revision=info.sha, recursive=True)
                  if isinstance(f, RepoFile)}
        plan = plan_push(files, remote)
        _commit(api, repo_id, plan, info.sha, commit_message, max_files_per_commit)
    except LongAttnError:
        raise
    except Exception as error:  # noqa: BLE001 - network, auth and Hub errors: one line, the export is intact
        raise LongAttnError(f"could not push {folder} to the Hub dataset {repo_id}: {describe_error(error)}. "
                            f"The export is complete; {remedy(error)}, then run the push again: it resumes "
                            "(what is already on the Hub is not sent again).") from error
    return str(repo_url)


def _commit(api: Any, repo_id: str, plan: PushPlan, head: str, message: str, limit: int) -> str:
    """Make the plan's commits, in order (halving ``limit`` when the Hub refuses one as too large); the new head."""
    from huggingface_hub.errors import HfHubHTTPError

    logger.info("[push] %s: %d files to upload (%s), %d already on the Hub, %d to delete", repo_id,
                len(plan.parts) + len(plan.others), _size(sum(f.size for f in plan.parts + plan.others)),
                len(plan.unchanged), len(plan.stale))
    made = 0
    while commits := plan.commits(limit):
        adds, deletes = commits[0]
        total = made + len(commits)
        title = message if total == 1 else f"{message} (part {made + 1}/{total})"
        try:
            head = api.create_commit(repo_id, _operations(adds, deletes), commit_message=title, repo_type="dataset",
                                     parent_commit=head).oid
        except HfHubHTTPError as error:
            if error.response.status_code != 413 or len(adds) + len(deletes) <= 1:
                raise
            limit = max(1, (len(adds) + len(deletes)) // 2)
            logger.warning("[push] the Hub refused a commit of %d files as too large: at most %d per commit now",
                           len(adds) + len(deletes), limit)
            continue
        made += 1
        plan.done(adds, deletes)
        logger.info("[push] commit %d/%d: %d files added, %d deleted (%s)", made, total, len(adds), len(deletes),
                    head[:8])
    if made == 0:
        logger.info("[push] nothing to change: %s already holds this export", repo_id)
    return head


def _key(addition: LocalFile | str) -> str:
    return addition if isinstance(addition, str) else addition.path


def _operations(adds: list[LocalFile | str], deletes: list[str]) -> list[Any]:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    operations: list[Any] = []
    for add in adds:
        if isinstance(add, str):  # the placeholder card
            operations.append(CommitOperationAdd(path_in_repo=add, path_or_fileobj=PLACEHOLDER_CARD.encode()))
            continue
        operation = CommitOperationAdd(path_in_repo=add.path, path_or_fileobj=str(add.source))
        operation.upload_info.sha256 = bytes.fromhex(add.sha256)  # hashed once, for the plan
        operations.append(operation)
    return operations + [CommitOperationDelete(path_in_repo=p) for p in deletes]


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# -- errors in one line -----------------------------------------------------------------------------------


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _http_error(error: BaseException) -> Any:
    from huggingface_hub.errors import HfHubHTTPError

    return next((e for e in _chain(error) if isinstance(e, HfHubHTTPError) and e.response is not None), None)


def describe_error(error: BaseException) -> str:
    """What failed, in one line: the Hub's answer (status, request, its message, Retry-After) or the network error."""
    http = _http_error(error)
    if http is not None:
        response = http.response
        request = response.request
        where = f" to {request.method} {str(request.url).split('?')[0]}" if request is not None else ""
        text = f"the Hub answered {response.status_code} {response.reason_phrase}{where}"
        said = response.headers.get("X-Error-Message") or http.server_message
        if said:
            text += f" ({' '.join(str(said).split())[:200].rstrip('.')})"
        if response.headers.get("Retry-After"):
            text += f"; retry after {response.headers['Retry-After']} s"
        return text
    chain = _chain(error)
    network = [e for e in chain if type(e).__module__.split(".")[0] in ("httpx2", "httpx")]
    root = network[0] if network else chain[-1]  # the HTTP client's own error names the failure best
    context = [str(e) for e in chain[:chain.index(root)] if str(e) and str(e) != str(root)]
    text = f"{type(root).__name__}: {' '.join(str(root).split())[:200].rstrip('.') or 'no details'}"
    return f"{' '.join(context[0].split())[:200].rstrip('.')}: {text}" if context else text


def remedy(error: BaseException) -> str:
    """What to do about ``error`` before pushing again."""
    http = _http_error(error)
    status = http.response.status_code if http is not None else None
    if status == 401:
        return "log in again (`hf auth login`, or HF_TOKEN) with a token that has write access"
    if status == 403:
        return "push to a repo of your own namespace, or ask its owner for write access"
    if status == 404:
        return "check the repo id: the repo does not exist or is private to another account"
    if status == 412:
        return "someone else committed to the repo during the push: check that it is yours to overwrite"
    if status == 429:
        return "the Hub is rate-limiting this account: wait as long as it says"
    return "check the network and the Hub's status"


# -- the public push: the checks, then push_folder -------------------------------------------------------


def _offline() -> bool:
    """True when huggingface_hub's offline mode or the HF_HUB_OFFLINE env var is on."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES


def check_can_push(repo_id: str) -> None:
    """Raise before any work if pushing ``repo_id`` cannot succeed offline-detectably (offline mode, bad id).

    Every process of a launch may call it (it needs nothing but the environment); the token is
    checked by :func:`check_token`, where the push happens.

    Raises:
        `RuntimeError`: when ``HF_HUB_OFFLINE`` is set (in the environment or in ``huggingface_hub.constants``).
        `ValueError`: when ``repo_id`` is not a valid Hub repository id.

    Example:

    >>> check_can_push("me/longabc-32k")  # doctest: +SKIP
    """
    if _offline():
        raise RuntimeError(f"HF_HUB_OFFLINE=1 is set: cannot push to {repo_id}; unset it or export the folder only.")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"Invalid Hub repo id {repo_id!r}: {err}") from err


def check_token(repo_id: str, token: str | None = None) -> None:
    """Raise `LongAttnError` when no Hugging Face token is found (``token``, ``HF_TOKEN``, ``hf auth login``).

    Checked where the push happens: by `push_to_hub`, and by ``hf-longattn run``/``push`` on the
    main process before any work.

    Example:

    >>> check_token("me/longabc-32k")  # doctest: +SKIP
    """
    from huggingface_hub import get_token

    if not (token or get_token()):
        raise LongAttnError(f"cannot push to the Hub dataset {repo_id}: no Hugging Face token found. Run "
                            "`hf auth login` (or set HF_TOKEN to a token with write access), then run the push again.")


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload LongABC dataset with hf_longattn",
    max_files_per_commit: int | None = None,
) -> str:
    """Create (if needed) a dataset repository and make it hold an exported folder, resumably.

    Files already on the Hub are not sent again; files of an earlier export (``data/scored``,
    ``data/filtered``, ``plots``) that this one does not have are deleted; every commit leaves the
    repo loadable (see `hf_longattn.hub`). The token is never printed or logged; `None` lets
    `huggingface_hub` resolve it (``HF_TOKEN``, ``hf auth login``).

    Args:
        folder (`str` or `Path`): a folder written by `export_dataset` (must contain ``README.md``).
        repo_id (`str`): target dataset repository, ``"user/name"``.
        private (`bool`, defaults to `False`): create the repository as private (an existing one keeps its visibility).
        token (`str`, *optional*): Hub token; defaults to huggingface_hub's usual resolution.
        commit_message (`str`, defaults to `"Upload LongABC dataset with hf_longattn"`): the commit message
            (`" (part i/n)"` is added when the push takes several commits).
        max_files_per_commit (`int`, *optional*, defaults to `hf_longattn.hub.DEFAULT_MAX_FILES_PER_COMMIT`):
            operations per commit; halved automatically when the Hub refuses a commit as too large.

    Returns:
        `str`: the URL of the dataset repository.

    Raises:
        `LongAttnError`: one line naming what failed (the Hub's answer or the network error) and what to do.

    Example:

    >>> push_to_hub("longabc-export", "me/longabc-32k", private=True)  # doctest: +SKIP
    'https://huggingface.co/datasets/me/longabc-32k'
    """
    check_can_push(repo_id)
    check_token(repo_id, token)
    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder} has no README.md: export it first with hf_longattn.publication.export_dataset.")
    return push_folder(folder, repo_id, private=private, token=token, commit_message=commit_message,
                       skip=(EXPORT_RECORD,), max_files_per_commit=max_files_per_commit or DEFAULT_MAX_FILES_PER_COMMIT)

"""The local Hub itself (tests/hub_server.py), driven by huggingface_hub's real client: what the push tests rely on.

Run: ``python -m pytest -q tests/test_hub_server.py`` (a few seconds, no model).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationCopy, CommitOperationDelete, HfApi, HfFileSystem
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

from .conftest import HUB_TOKEN, OTHER_TOKEN

ROOT = Path(__file__).resolve().parent.parent
DATA = bytes(range(256)) * 40  # 10 kB with NUL bytes: an LFS file whatever its name


@pytest.fixture
def api(local_hub, monkeypatch) -> HfApi:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_XET", True)
    return HfApi(endpoint=local_hub.url, token=HUB_TOKEN)


def test_commit_copy_delete_and_read_back_with_ranges(api, local_hub):
    api.create_repo("user/r", repo_type="dataset")
    api.create_commit("user/r", [CommitOperationAdd("a/data.bin", DATA), CommitOperationAdd("a/note.txt", b"hello")],
                      commit_message="add", repo_type="dataset")
    sent = local_hub.received["lfs-upload"]
    assert sent == len(DATA)
    api.create_commit("user/r", [CommitOperationCopy("a/data.bin", "b/copy.bin"), CommitOperationDelete("a/note.txt")],
                      commit_message="copy", repo_type="dataset")
    assert local_hub.received["lfs-upload"] == sent  # a copy sends no bytes
    assert local_hub.repo("user/r").files() == {".gitattributes": local_hub.repo("user/r").read(".gitattributes"),
                                                "a/data.bin": DATA, "b/copy.bin": DATA}
    fs = HfFileSystem(endpoint=local_hub.url, token=HUB_TOKEN)
    with fs.open("datasets/user/r/b/copy.bin", "rb", block_size=512) as file:  # reads by Range requests
        file.seek(1000)
        assert file.read(300) == DATA[1000:1300]
    assert ("GET", "resolve", 206) in local_hub.calls
    url = f"{local_hub.url}/datasets/user/r/resolve/main/b/copy.bin"
    assert httpx2.get(url, headers={"Range": "bytes=-10"}).content == DATA[-10:]
    assert httpx2.get(url, headers={"Range": f"bytes={len(DATA)}-"}).status_code == 416
    head = httpx2.head(url)
    assert head.headers["X-Repo-Commit"] == api.dataset_info("user/r").sha
    assert head.headers["ETag"].strip('"') == head.headers["X-Linked-Etag"].strip('"') == \
        api.get_paths_info("user/r", ["b/copy.bin"], repo_type="dataset")[0].lfs.sha256


def test_tree_is_paginated_and_paths_info_lists_files_and_folders(api, local_hub):
    local_hub.page_size = 2
    api.create_repo("user/r", repo_type="dataset")
    api.create_commit("user/r", [CommitOperationAdd(f"d/{i}.txt", b"x%d" % i) for i in range(5)],
                      commit_message="five", repo_type="dataset")
    tree = [f.path for f in api.list_repo_tree("user/r", repo_type="dataset", recursive=True)]
    assert tree == [".gitattributes", "d", *(f"d/{i}.txt" for i in range(5))]
    info = api.get_paths_info("user/r", ["d", "d/3.txt", "missing"], repo_type="dataset")
    assert [type(e).__name__ for e in info] == ["RepoFolder", "RepoFile"] and info[1].size == 2


def test_reads_of_private_and_gated_repos_and_writes_to_others(api, local_hub):
    local_hub.store.create("other/private", "other", private=True)
    local_hub.store.create("other/gated", "other", gated="auto")
    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info("other/private")
    assert api.dataset_info("other/gated").gated == "auto"
    with pytest.raises(GatedRepoError):
        api.hf_hub_download("other/gated", ".gitattributes", repo_type="dataset", cache_dir=str(local_hub.store.root))
    assert HfApi(endpoint=local_hub.url, token=OTHER_TOKEN).dataset_info("other/private").private is True
    with pytest.raises(HfHubHTTPError, match="403"):
        api.create_commit("other/gated", [CommitOperationAdd("x.txt", b"x")], commit_message="x", repo_type="dataset")


def test_an_unknown_endpoint_is_refused_and_recorded(local_hub):
    assert httpx2.get(f"{local_hub.url}/api/models/user/m").status_code == 404
    assert local_hub.unknown == ["GET /api/models/user/m"]
    local_hub.unknown.clear()  # the fixture fails any other test that calls one


def test_runs_by_hand(tmp_path):
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hub_server.py"), "--port", "0", "--root",
                               str(tmp_path / "repos")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = server.stdout.readline()
        url = first.split()[3]
        assert first.startswith("local Hub on http://127.0.0.1:") and "HF_ENDPOINT=" in server.stdout.readline()
        created = HfApi(endpoint=url, token="hf_any").create_repo("me/rehearsal", repo_type="dataset")
        assert created.repo_id == "me/rehearsal" and (tmp_path / "repos" / "datasets" / "me" / "rehearsal").is_dir()
    finally:
        server.terminate()
        server.wait(timeout=10)

"""The push to the Hub, against the local Hub (tests/hub_server.py) with the real huggingface_hub and datasets clients.

Nothing is mocked below HTTP: ``hf-longattn run --push-to-hub`` (a subprocess with ``HF_ENDPOINT``)
or `hf_longattn.publication.push_to_hub` sends real requests; a fresh process loads the result
with `datasets.load_dataset` (tests/hub_check.py). Run: ``python -m pytest -q tests/test_hub_push.py``
(CPU, tiny model; about 2 minutes on 2 cores, 23 s of which is huggingface_hub's own backoff in the
dropped-connection test).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_longattn.errors import LongAttnError
from hf_longattn.publication import EXPORT_RECORD, push_to_hub

from .conftest import HUB_TOKEN

ROOT = Path(__file__).resolve().parent.parent
REPO = "user/longabc"


@pytest.fixture
def own_run(finished_run, tmp_path):
    """A copy of the finished tiny run and its config file: ``(config, config path)``."""
    config, _ = finished_run
    out = tmp_path / "out"
    shutil.copytree(config.output_dir, out)
    config = config.replace(output_dir=str(out))
    path = tmp_path / "run.yaml"
    path.write_text(config.to_yaml())
    return config, path


@pytest.fixture
def export(finished_run) -> Path:
    """The finished run's export folder (only read)."""
    return Path(finished_run[0].output_dir) / "hub"


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_longattn.cli", *args, "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def check(env: dict, repo: str, *args: str) -> dict:
    """`tests.hub_check` in a fresh process: which ``--expect`` folder the repo loads as (see its docstring)."""
    result = subprocess.run([sys.executable, "-m", "tests.hub_check", repo, *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def exported_files(folder: Path) -> dict[str, bytes]:
    """What a push of ``folder`` must leave in the repo (the run's record of the export stays local)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != EXPORT_RECORD}


def repo_files(hub, repo: str) -> dict[str, bytes]:
    files = hub.repo(repo).files()
    files.pop(".gitattributes")
    return files


def lfs_objects(folder: Path) -> dict[str, int]:
    """sha256 → size of the files that go to LFS (parquet and png, by the repo's .gitattributes)."""
    return {hashlib.sha256(p.read_bytes()).hexdigest(): p.stat().st_size for p in folder.rglob("*")
            if p.suffix in (".parquet", ".png")}


def stored(hub, repo: str) -> set[str]:
    folder = hub.repo(repo).folder / "lfs"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


# -- round trip ----------------------------------------------------------------------------------------------


def test_run_pushes_a_dataset_that_loads_back_exactly(own_run, local_hub, hub_env, tmp_path):
    config, path = own_run
    result = cli(hub_env, "run", "--config", str(path), "--push-to-hub", REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"[push] uploaded to {local_hub.url}/datasets/{REPO}" in result.stdout
    assert "[push] commit 1/1: 9 files added, 0 deleted" in result.stderr
    hub = Path(config.output_dir) / "hub"
    assert repo_files(local_hub, REPO) == exported_files(hub)  # byte for byte
    assert len(local_hub.repo(REPO).history()) == 2  # the repo's first commit, then the push in one commit
    assert {"create", "info", "tree", "validate-yaml", "preupload", "lfs-batch", "lfs-upload", "lfs-verify",
            "commit"} <= local_hub.routes_called()  # the LFS protocol, not a shortcut

    reader = {**hub_env, "HF_HOME": str(tmp_path / "reader-home")}  # a fresh process, an empty cache
    report = check(reader, REPO, "--expect", str(hub), "--streaming", "--card")
    assert report["revisions"]["main"]["matches"] == 0, report  # same splits, features and rows, in order
    assert report["streaming"]["matches"] == 0, report
    assert report["card"]["configs"] == ["filtered", "scored"] and report["card"]["default"] == ["filtered"]
    assert report["card"]["unmatched"] == []  # every data_files pattern of the card resolves over hf://
    from huggingface_hub import DatasetCard

    assert report["card"]["data"] == DatasetCard.load(hub / "README.md").data.to_dict()  # the metadata, as parsed
    assert "resolve" in local_hub.routes_called()


def test_a_second_push_replaces_the_first_in_one_commit(own_run, local_hub, hub_env, tmp_path):
    config, path = own_run
    assert cli(hub_env, "run", "--config", str(path), "--push-to-hub", REPO).returncode == 0
    hub = Path(config.output_dir) / "hub"
    first = tmp_path / "first-export"
    shutil.copytree(hub, first)
    reader = {**hub_env, "HF_HOME": str(tmp_path / "reader-home")}  # the user's default cache, kept between loads
    assert check(reader, REPO, "--expect", str(first))["revisions"]["main"]["matches"] == 0

    result = cli(hub_env, "run", "--config", str(path), "--keep-fraction", "0.6", "--push-to-hub", REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    history = local_hub.repo(REPO).history()
    assert len(history) == 3  # one more commit
    before, after = history[1][1]["tree"], history[0][1]["tree"]
    old_parts = {p for p in before if p.startswith("data/")}
    assert old_parts and not old_parts & set(after)  # the old parts left in the commit that brought the new ones
    assert repo_files(local_hub, REPO) == exported_files(hub)
    assert "[push] commit 1/1: 9 files added, 6 deleted" in result.stderr
    report = check(reader, REPO, "--expect", str(hub), "--expect", str(first))
    assert report["revisions"]["main"]["matches"] == 0, report  # the new rows, not the cached old ones


# -- failures and resumption ---------------------------------------------------------------------------------

FAULTS = {  # fault on the local Hub → what the one-line error must say
    "connection dropped mid-upload": (dict(route="lfs-upload", drop_after_bytes=1500, times=6),
                                      ["RemoteProtocolError", "Error while uploading 'data/scored/"]),
    "500 on the commit": (dict(route="commit", status=500),
                          ["the Hub answered 500 Internal Server Error to POST ", "/api/datasets/user/longabc/commit/main",
                           "injected fault", "check the network and the Hub's status"]),
    "429 with Retry-After on the commit": (dict(route="commit", status=429, retry_after=30),
                                           ["429 Too Many Requests", "retry after 30 s", "wait as long as it says"]),
    "commit applied, its answer lost": (dict(route="commit", drop_after_bytes=0, after_work=True),
                                        ["RemoteProtocolError", "Server disconnected"]),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_failed_push_says_why_in_one_line_and_the_rerun_sends_only_what_is_missing(fault, export, hub_client):
    hub = hub_client
    spec, expected = FAULTS[fault]
    if spec["route"] == "lfs-upload":  # every try of the largest data part is cut (huggingface_hub retries 5 times)
        spec = {**spec, "match": max(lfs_objects(export / "data" / "scored").items(), key=lambda item: item[1])[0]}
    hub.fail(**spec)
    with pytest.raises(LongAttnError) as failed:
        push_to_hub(export, REPO)
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"could not push {export} to the Hub dataset {REPO}: ")
    assert all(text in message for text in expected), message
    assert message.endswith("then run the push again: it resumes (what is already on the Hub is not sent again).")
    assert HUB_TOKEN not in message and "ticket" not in message  # no token, no signed upload URL
    lost_answer = spec.get("after_work", False)
    assert len(hub.repo(REPO).history()) == (2 if lost_answer else 1)  # nothing half-committed is visible

    arrived = stored(hub, REPO)
    hub.received.clear()
    push_to_hub(export, REPO)
    missing = {oid: size for oid, size in lfs_objects(export).items() if oid not in arrived}
    assert hub.received["lfs-upload"] == sum(missing.values())  # only what had not arrived is sent again
    assert len(missing) == (1 if spec["route"] == "lfs-upload" else 0)
    assert repo_files(hub, REPO) == exported_files(export)
    assert len(hub.repo(REPO).history()) == 2  # one commit in all: no duplicate after a lost answer


def test_a_failed_push_on_the_command_line_is_one_line_and_rerunning_finishes(own_run, local_hub, hub_env):
    config, path = own_run
    local_hub.fail("commit", 500)
    result = cli(hub_env, "run", "--config", str(path), "--push-to-hub", REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"hf-longattn run: error: could not push {config.output_dir}/hub to the Hub dataset {REPO}: "
                           "the Hub answered 500 Internal Server Error"), result.stderr[-2000:]
    assert cli(hub_env, "run", "--config", str(path), "--push-to-hub", REPO).returncode == 0
    assert repo_files(local_hub, REPO) == exported_files(Path(config.output_dir) / "hub")


def test_a_push_killed_halfway_resumes_without_sending_again_what_arrived(own_run, local_hub, hub_env):
    import time

    config, path = own_run
    held = local_hub.fail("lfs-upload", drop_after_bytes=1500, hold=True, skip=3)  # the 4th upload stops halfway
    push = subprocess.Popen([sys.executable, "-m", "hf_longattn.cli", "run", "--config", str(path), "--push-to-hub",
                             REPO, "--no-progress"], cwd=ROOT, env=hub_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert held.reached.wait(timeout=300), "the push never reached its uploads"
    deadline = time.monotonic() + 30
    while len(stored(local_hub, REPO)) < 3 and time.monotonic() < deadline:  # the first three have arrived
        time.sleep(0.05)
    push.kill()  # SIGKILL: no clean-up of any kind
    push.wait(timeout=60)
    held.hold.set()
    deadline = time.monotonic() + 30
    while local_hub.active and time.monotonic() < deadline:
        time.sleep(0.05)
    arrived = stored(local_hub, REPO)
    assert len(arrived) >= 3 and len(local_hub.repo(REPO).history()) == 1  # some files arrived, nothing committed

    local_hub.received.clear()
    result = cli(hub_env, "run", "--config", str(path), "--push-to-hub", REPO)  # the same command again
    assert result.returncode == 0, result.stderr[-3000:]
    hub = Path(config.output_dir) / "hub"
    missing = {oid: size for oid, size in lfs_objects(hub).items() if oid not in arrived}
    assert missing and local_hub.received["lfs-upload"] == sum(missing.values())
    assert repo_files(local_hub, REPO) == exported_files(hub) and len(local_hub.repo(REPO).history()) == 2


# -- access --------------------------------------------------------------------------------------------------


def test_without_a_token_the_run_stops_before_any_work(own_run, local_hub, hub_env):
    config, path = own_run
    env = {k: v for k, v in hub_env.items() if k != "HF_TOKEN"}
    scores = sorted(p.stat().st_mtime_ns for p in (Path(config.output_dir) / "scores").iterdir())
    result = cli(env, "run", "--config", str(path), "--push-to-hub", REPO, "--keep-fraction", "0.5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"hf-longattn run: error: cannot push to the Hub dataset {REPO}: no Hugging Face token found. Run `hf auth "
        "login` (or set HF_TOKEN to a token with write access), then run the push again. Nothing was done."]
    assert sorted(p.stat().st_mtime_ns for p in (Path(config.output_dir) / "scores").iterdir()) == scores
    assert local_hub.calls == []


ACCESS = {  # the repo as it is on the Hub, the token → what the one-line error must say
    "a token the Hub does not know": (None, "hf_notAtokenTheHubKnows0000000000000000",
                                      ["401 Unauthorized to POST", "/api/repos/create", "log in again"]),
    "a public repo of someone else": (dict(), None, ["403 Forbidden to POST", "/preupload/main", "own namespace"]),
    "a private repo of someone else": (dict(private=True), None, ["403 Forbidden to POST", "/api/repos/create"]),
    "a gated repo of someone else": (dict(gated="auto"), None, ["403 Forbidden to POST", "/preupload/main"]),
}


@pytest.mark.parametrize("case", ACCESS)
def test_a_repo_one_cannot_write_to_gives_one_line(case, export, hub_client):
    existing, token, expected = ACCESS[case]
    repo = REPO if existing is None else "other/theirs"
    if existing is not None:
        hub_client.store.create(repo, "other", **existing)
    with pytest.raises(LongAttnError) as failed:
        push_to_hub(export, repo, token=token)
    message = str(failed.value)
    assert "\n" not in message and all(text in message for text in expected), message
    assert HUB_TOKEN not in message and (token is None or token not in message)
    if existing is not None:
        assert len(hub_client.repo(repo).history()) == 1  # untouched


def test_private_creates_a_private_repo_and_keeps_an_existing_public_one_public(export, hub_client, caplog):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    push_to_hub(export, "user/mine", private=True)
    assert hub_client.repo("user/mine").meta["private"] is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub_client.url, token=False).dataset_info("user/mine")
    push_to_hub(export, REPO)
    push_to_hub(export, REPO, private=True)
    assert hub_client.repo(REPO).meta["private"] is False
    assert f"{REPO} already exists and is public: --private does not change that" in caplog.text


# -- large exports -------------------------------------------------------------------------------------------


def test_a_large_export_goes_in_commits_that_each_leave_the_repo_loadable(own_run, export, hub_client, hub_env,
                                                                           tmp_path):
    from hf_longattn.run.job import LongAttnPipeline

    hub_client.max_files_per_commit = 3  # the Hub refuses larger commits (413); the push halves until they fit
    push_to_hub(export, REPO)
    first_push = len(hub_client.repo(REPO).history())
    config, _ = own_run
    LongAttnPipeline(config.replace(keep_fraction=0.6), progress=False).run()
    second = Path(config.output_dir) / "hub"
    push_to_hub(second, REPO)
    assert repo_files(hub_client, REPO) == exported_files(second)

    history = [oid for oid, _ in reversed(hub_client.repo(REPO).history())]  # oldest first
    trees = [hub_client.repo(REPO).commit(oid)["tree"] for oid in history]
    for before, after in zip(trees, trees[1:]):
        changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
        assert 0 < len(changed) <= 3
    assert len(history) > 6  # several commits for each push

    reader = {**hub_env, "HF_HOME": str(tmp_path / "reader-home")}
    args = [a for oid in history[1:] for a in ("--revision", oid)]
    report = check(reader, REPO, "--expect", str(export), "--expect", str(second), *args)["revisions"]
    loads = [report[oid]["matches"] for oid in history[1:]]
    before_card = first_push - 2  # the first push's commits before its card: a placeholder card, nothing to load
    assert loads == [None] * before_card + [0] * (loads.count(0)) + [1] * (len(loads) - before_card - loads.count(0))
    assert loads.count(0) >= 3 and loads.count(1) >= 1, loads  # old export while the new parts arrive, then the new
    assert all("No (supported) data files found" in report[oid]["error"] for oid in history[1:before_card + 1])
    uploaded = {**lfs_objects(export), **lfs_objects(second)}
    assert hub_client.received["lfs-upload"] == sum(uploaded.values())  # nothing sent twice despite the refusals


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 50])
@pytest.mark.parametrize("has_card", [True, False])
def test_the_commit_plan_keeps_the_old_export_until_the_card_then_the_new_one(limit, has_card):
    from hf_longattn.hub import CARD, LocalFile, PushPlan

    def local(path: str) -> LocalFile:
        return LocalFile(path, Path(path), 1, path)

    parts = [local(f"data/scored/s-{i}-new.parquet") for i in range(4)]
    others = [local(CARD), local("plots/a.png"), local("plots/b.png")]
    stale = [f"data/scored/s-{i}-old.parquet" for i in range(3)]
    plan = PushPlan(parts=parts, others=others, stale=stale if has_card else [], has_card=has_card)
    commits = []
    while batch := plan.commits(limit):
        commits.append(batch[0])
        plan.done(*batch[0])
    assert all(len(adds) + len(deletes) <= limit for adds, deletes in commits)
    added = [a if isinstance(a, str) else a.path for adds, _ in commits for a in adds]
    card = next(i for i, (adds, _) in enumerate(commits) if any(getattr(a, "path", None) == CARD for a in adds))
    assert all(a.path.startswith("data/") is False or i <= card for i, (adds, _) in enumerate(commits) for a in adds
               if not isinstance(a, str))  # every new part arrives by the card's commit
    assert all(not deletes or i >= card for i, (_, deletes) in enumerate(commits))  # old parts go with or after it
    assert sorted(set(added) - {CARD}) == sorted(f.path for f in parts + others if f.path != CARD)
    assert [p for _, deletes in commits for p in deletes] == (stale if has_card else [])
    placeholder = [a for adds, _ in commits for a in adds if isinstance(a, str)]
    assert placeholder == ([CARD] if not has_card and len(commits) > 1 else [])  # a first push in several commits

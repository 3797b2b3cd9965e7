"""The run graph: each step's artifact key from what it derives from; what is current; what must run, in order.

Steps, in order (each reads only the artifacts of the steps before it)::

    probe → windows → plan → score → select → export → finish → push

An artifact is *current* when the key its record holds equals the key computed now from its
upstream artifacts and the settings it reads (`hf_longattn.run.records`). :func:`needed` is the
planner: for a target it lists the steps from the first one that is not current through the
target; the driver (`hf_longattn.run.driver`) runs them, and every step skips the units of work
that are already current (valid chunks, valid shards), so a relaunch redoes only what changed.
No step runs another step or decides freshness itself.

Selection settings are explicit state: ``export`` and ``push`` publish the selection the last
``select`` (or ``run``) made, with its settings, whatever the configuration now says; when the
two differ, :func:`effective_config` says so in one line. When the scores changed under that
selection, ``select`` runs again with the recorded settings.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .. import __version__
from ..errors import LongAttnError
from .chunks import check_chunk, unfinished_chunks
from .context import Run
from .records import ChunkPlan, ExportRecord, ProbeRecord, PushRecord, SelectionRecord, ShardRecord, WindowsStats
from ..storage import json_sha256, sha256_file

STEPS = ("probe", "windows", "plan", "score", "select", "export", "finish", "push")
TARGETS = {
    "windows": ("windows", "plan"),
    "score": ("windows", "plan", "score"),
    "select": ("windows", "plan", "score", "select"),
    "export": ("windows", "plan", "score", "select", "export", "finish"),
    "push": ("windows", "plan", "score", "select", "export", "finish", "push"),
    "run": ("windows", "plan", "score", "select", "export", "finish", "push"),
    "probe": ("probe",),
}
"""The steps each command (target) needs, in order."""
VERIFIED = {"windows": ("windows", "score", "run")}
"""Steps that run (and check every unit, e.g. each windows shard's sha256) even when their records look current,
for these targets: the commands that build the windows re-check them; ``select`` or ``export`` do not."""
SELECTION_SETTINGS = ("selection_method", "keep_fraction", "alpha", "normalization", "seed", "select_by")
CARD_SETTINGS = ("pretty_name", "license", "push_to_hub", "language")


# -- keys --------------------------------------------------------------------------------------------------


def windows_identity(run: Run) -> str:
    """What defines the windows besides their input: the tokenizer (through the checkpoint), W, faithful, version."""
    config = run.config
    return json_sha256({"checkpoint": run.scorer.identity(), "tokenizer": config.tokenizer,
                        "window_size": config.window_size, "faithful": config.faithful, "hf_longattn_version": __version__})


def shard_name(input_identity: str, identity: str) -> str:
    """``shard-<16 hex>``: named after its input and the windows identity, so unchanged inputs keep their shard."""
    return "shard-" + hashlib.sha256(f"{input_identity}\n{identity}".encode()).hexdigest()[:16]


def input_plan(run: Run) -> tuple[list, list[str], str]:
    """The input shards of the sources, the names of their windows shards, and the windows identity."""
    from ..shards import plan_input_shards

    plan = plan_input_shards(run.config.sources)
    identity = windows_identity(run)
    return plan, [shard_name(shard.identity, identity) for shard in plan], identity


def scores_key(run: Run, plan: ChunkPlan | None = None) -> str | None:
    """The key of the scores: each scorer's plan key and every chunk's sha256; `None` while a chunk is missing or invalid.

    With one scorer, the key of its scores alone (``plan``: its plan, read when not given).
    """
    keys = {}
    for view in run.scorer_runs():
        mine = plan if plan is not None and view is run else ChunkPlan.read_if_valid(view.folder.plan)
        keys[view.folder.scorer] = None if mine is None else _scores_key(view, mine)
        if keys[view.folder.scorer] is None:
            return None
    return next(iter(keys.values())) if len(keys) == 1 else json_sha256(keys)


def _scores_key(run: Any, plan: ChunkPlan) -> str | None:
    fingerprint, digests = run.fingerprint["fingerprint"], []
    for index, chunk in enumerate(plan.chunks):
        if check_chunk(run.folder.scores, index, chunk.rows, fingerprint, chunk.digest) is not None:
            return None
        digests.append(read_marker_sha256(run, index))
    return json_sha256({"plan": plan.key, "chunks": digests})


def read_marker_sha256(run: Any, index: int) -> str:
    from .records import ChunkMarker

    return ChunkMarker.read(run.folder.chunk_marker(index)).sha256


def selection_settings(config: Any) -> dict[str, Any]:
    """The settings a selection is made with (keys of `hf_longattn.config.RunConfig`).

    ``select_by`` is there unless the selection is LongAttn's LDS (then the settings are those of
    hf_longattn 0.2); unset, it is the run's ``scorer``.
    """
    from ..registry import SCORERS

    settings = {key: getattr(config, key) for key in SELECTION_SETTINGS if key != "select_by"}
    select_by = config.select_by if config.select_by is not None else SCORERS.resolve(config.scorer)
    return settings if select_by == "longattn_v1" else {**settings, "select_by": select_by}


def export_key(run: Run, selection: SelectionRecord, windows: WindowsStats) -> str:
    """The key (and file-name tag, 12 hex) of the export of ``selection`` with the card settings and the probe."""
    from ..publication import content_tag

    probe, compared = run.folder.probe_report, run.folder.compare / "compare.json"
    parts = [selection.sha256, windows.digest, *([sha256_file(probe)] if probe.is_file() else []),
             *([sha256_file(compared)] if compared.is_file() else [])]
    return content_tag(parts, {key: getattr(run.config, key) for key in CARD_SETTINGS}, __version__)


def probe_key(run: Run) -> str:
    """What the probe's report depends on: the model's weights, W, k, the probe settings and the sources."""
    from ..shards import plan_input_shards

    config = run.config
    settings = {key: getattr(config, key) for key in ("window_size", "min_distance", "probe_layers", "probe_num_windows",
                                                      "probe_chunk_size", "seed", "alpha", "keep_fraction", "dtype")}
    return json_sha256({"checkpoint": run.scorer.identity(), "settings": settings, "version": __version__,
                        "sources": [shard.identity for shard in plan_input_shards(config.sources)]})


# -- what is current ------------------------------------------------------------------------------------


def stale(run: Run, step: str) -> str | None:
    """`None` when ``step``'s artifacts are current, else why it must run (in words)."""
    return _CHECKS[step](run)


def _windows(run: Run) -> str | None:
    from ..shards import manifest_changes

    plan, names, identity = input_plan(run)
    todo = [shard.name for shard, name in zip(plan, names)
            if (record := ShardRecord.read_if_valid(run.folder.shard_record(name))) is None
            or record.input_identity != shard.identity or record.identity != identity]
    if not todo:
        return None
    stats = WindowsStats.read_if_valid(run.folder.windows_stats)
    if stats is None:
        return f"{len(todo)} of {len(plan)} input shard(s) to window"
    changes = manifest_changes(stats.manifest, plan) or ["the tokenizer, W or faithful"]
    return (f"the sources changed since the windows were built ({'; '.join(changes[:5])}{'; …' if len(changes) > 5 else ''})"
            ": windowing what changed; scores of unchanged windows are reused")


def _plan(run: Run) -> str | None:
    stats = WindowsStats.read_if_valid(run.folder.windows_stats)
    _, names, identity = input_plan(run)
    if stats is None or stats.identity != identity or stats.shard_names() != names \
            or stats.max_windows_per_category != run.config.max_windows_per_category:
        return "the windows changed (or were never counted)"
    missing = [view.folder.scorer for view in run.scorer_runs() if not plan_is_current(view, stats)]
    if missing:
        return "no chunk plan for these windows" + (f" ({', '.join(missing)})" if len(run.config.scorer_names()) > 1 else "")
    return None


def plan_is_current(run: Any, stats: WindowsStats) -> bool:
    """Whether the scorer of ``run`` (a run or `hf_longattn.run.context.ScorerRun`) has the chunk plan of ``stats``."""
    plan = ChunkPlan.read_if_valid(run.folder.plan)
    return plan is not None and plan.key == ChunkPlan.key_of(stats.digest, run.config.chunk_size, run.fingerprint["fingerprint"])


def _score(run: Run) -> str | None:
    todo = total = 0
    for view in run.scorer_runs():
        plan = ChunkPlan.read_if_valid(view.folder.plan)
        if plan is None:
            return "no chunk plan"
        total += len(plan.chunks)
        todo += len(unfinished_chunks(view.folder.scores, plan, view.fingerprint["fingerprint"]))
    return f"{todo} of {total} chunk(s) to score" if todo else None


def current_selection(run: Run) -> SelectionRecord | None:
    """The selection record when it matches the scores now, the configuration's settings and its own file."""
    record = SelectionRecord.read_if_valid(run.folder.selection_record)
    plan = ChunkPlan.read_if_valid(run.folder.plan)
    if record is None or plan is None or not run.folder.selection.is_file():
        return None
    key = SelectionRecord.key_of(scores_key(run, plan) or "", selection_settings(run.config))
    return record if record.key == key and sha256_file(run.folder.selection) == record.sha256 else None


def _select(run: Run) -> str | None:
    return None if current_selection(run) is not None else "the scores or the selection settings changed"


def _export(run: Run) -> str | None:
    selection, windows = current_selection(run), WindowsStats.read_if_valid(run.folder.windows_stats)
    record = ExportRecord.read_if_valid(run.folder.export_record)
    if selection is None or windows is None or record is None or not (run.folder.hub / "README.md").is_file():
        return "no export of the current selection"
    return None if record.tag == export_key(run, selection, windows) else "the export holds another selection or card"


def _push(run: Run) -> str | None:
    if not run.config.push_to_hub:
        return None
    record, export = PushRecord.read_if_valid(run.folder.push_record), ExportRecord.read_if_valid(run.folder.export_record)
    if record is None or export is None or record.repo_id != run.config.push_to_hub or record.export != export.tag:
        return f"{run.folder.hub} is not on {run.config.push_to_hub} yet"
    return None


def _probe(run: Run) -> str | None:
    record = ProbeRecord.read_if_valid(run.folder.probe_record)
    if record is None or record.key != probe_key(run) or not run.folder.probe_report.is_file():
        return "no probe of this model, window size and sources"
    return None if sha256_file(run.folder.probe_report) == record.report_sha256 else "probe/report.json changed"


_CHECKS = {"probe": _probe, "windows": _windows, "plan": _plan, "score": _score, "select": _select,
           "export": _export, "finish": _export, "push": _push}


# -- the planner ----------------------------------------------------------------------------------------


def needed(run: Run, target: str) -> list[tuple[str, str]]:
    """``(step, reason)`` for the steps ``target`` must run, in order: from the first stale one through the target."""
    steps = [s for s in TARGETS[target] if s != "push" or run.config.push_to_hub]
    if target == "run" and run.config.probe:
        steps = ["probe", *steps]
    plan: list[tuple[str, str]] = []
    for step in steps:
        reason = stale(run, step)
        if plan or reason:
            plan.append((step, reason or "current now; checked again after the steps before it"))
        elif target in VERIFIED.get(step, ()):
            plan.append((step, "checking every unit"))
    return plan


def effective_config(config: Any, target: str, run: Run) -> tuple[Any, str | None]:
    """The configuration ``target`` runs with, and a one-line notice when it differs from ``config``.

    ``export`` and ``push`` publish the last selection made (by ``select`` or ``run``): its settings
    replace the configuration's. Other targets select with the configuration's settings.
    """
    record = SelectionRecord.read_if_valid(run.folder.selection_record)
    if target not in ("export", "push") or record is None or record.settings == selection_settings(config):
        return config, None
    unknown = [key for key in record.settings if key not in SELECTION_SETTINGS]
    if unknown:
        raise LongAttnError(f"{run.folder.selection_record} holds unknown settings {unknown}: run `hf-longattn select`")
    now = selection_settings(config)
    differ = [f"{key} {record.settings.get(key, 'longattn_v1')!r} (the configuration says {now.get(key, 'longattn_v1')!r})"
              for key in SELECTION_SETTINGS if record.settings.get(key) != now.get(key)]
    notice = (f"[{target}] publishing the selection the last `select` made: {'; '.join(differ)}. To publish the "
              "configuration's instead, run `hf-longattn select` with it first.")
    return config.replace(**{"select_by": "longattn_v1", **record.settings}), notice

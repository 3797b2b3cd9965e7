"""The optional probe step (one task, before scoring): the scorer self-check on the run's own documents.

Writes ``probe/report.json``, ``probe/report.md``, ``probe/probe.png`` and, last,
``probe/probe.json`` (`hf_longattn.run.records.ProbeRecord`): the key of what was probed (the
model's weights, W, k, the probe settings, the sources), so a relaunch reuses a probe of the same
things and redoes one of anything else. The export puts the report into the dataset card.
"""

from __future__ import annotations

from typing import Any

from .context import Run
from .graph import probe_key, stale
from .records import ProbeRecord
from ..storage import atomic_write_text, sha256_file


def probe_task(run: Run) -> dict[str, int]:
    """The probe step (one task): reuse the report when current, else probe and write it."""
    from ..probe.core import probe_run_config
    from ..probe.report import ProbeReport
    from ..shards import read_sources

    folder = run.folder.probe
    if stale(run, "probe") is None:
        report = ProbeReport.from_json(run.folder.probe_report)
        run.print(f"[probe] reusing {run.folder.probe_report}: {report.verdict}")
        return {"windows_scored": 0}
    report = probe_run_config(run.config, read_sources(run.config.sources))
    folder.mkdir(parents=True, exist_ok=True)
    _plot(report, run.folder.probe_image)
    atomic_write_text(folder / "report.md", report.to_markdown("wide") + "\n\n" + report.verdict + "\n",
                      before_commit=run.fence)
    report.to_json(run.folder.probe_report)
    ProbeRecord(key=probe_key(run), report_sha256=sha256_file(run.folder.probe_report)).write(
        run.folder.probe_record, before_commit=run.fence)  # last: its presence marks the probe as done
    run.print(report.to_markdown("wide") + "\n" + report.verdict)
    return {"windows_scored": int(report.timings.get("windows_scored", 0))}


def _plot(report: Any, path: Any) -> None:
    try:
        report.plot(path)
    except ImportError as error:  # matplotlib missing: the report and the card's table still say everything
        print(f"[probe] no plot: {error}", flush=True)

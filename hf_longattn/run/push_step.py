"""Step 7, push (one task): upload ``hub/`` to the ``push_to_hub`` dataset repository, and record what was pushed.

The push uploads the export as it is: the planner made sure ``hub/`` holds the export of the
current selection first (`hf_longattn.run.graph`). ``push.json`` (`hf_longattn.run.records.PushRecord`)
records the repository and the export's key, so the same command run again after a success says
so instead of uploading again; after a failure it runs again and huggingface_hub skips what the
Hub already has.
"""

from __future__ import annotations

import time

from ..errors import LongAttnError
from .context import Run
from .graph import stale
from .records import ExportRecord, PushRecord


def push_task(run: Run) -> dict[str, int]:
    """The push step (one task): upload ``hub/`` unless this export is already on the repository."""
    config = run.config
    if not config.push_to_hub:
        return {"pushed": 0}
    if stale(run, "push") is None:
        run.print(f"[push] {run.folder.hub} is already on {config.push_to_hub} (push.json): nothing to upload")
        return {"pushed": 0}
    from .. import publication

    if not (run.folder.hub / "README.md").is_file() or not run.folder.export_record.is_file():
        raise LongAttnError(f"Nothing to push: {run.folder.hub} has no export; run the `export` step first")
    export = ExportRecord.read(run.folder.export_record)
    run.fence()
    url = publication.push_to_hub(run.folder.hub, config.push_to_hub, private=config.private,
                                  commit_message=config.commit_message)
    PushRecord(repo_id=config.push_to_hub, export=export.tag, url=str(url),
               pushed=time.strftime("%Y-%m-%d %H:%M:%S %Z")).write(run.folder.push_record)
    run.print(f"[push] uploaded to {url}")
    return {"pushed": 1}

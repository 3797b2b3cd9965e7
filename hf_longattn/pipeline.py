"""The names the LongABC job had in hf_longattn 0.1, kept so that existing code runs (the job now lives in `hf_longattn.run`)."""

from __future__ import annotations

from .config import DEMO_MODEL, DTYPES, NORMALIZATIONS, PipelineConfig, RunConfig  # noqa: F401
from .counts import format_summary, format_table  # noqa: F401
from .errors import LongAttnError, PipelineError  # noqa: F401
from .model_loading import SMOLLM2_FILE, resolve_model  # noqa: F401
from .run.chunks import check_chunk, num_chunks, owned_chunks  # noqa: F401
from .run.context import STEPS  # noqa: F401
from .run.executor import BARRIER_TIMEOUT  # noqa: F401
from .run.job import LongAttnPipeline  # noqa: F401
from .run.layout import (  # noqa: F401
    FINGERPRINT_FILE,
    SELECTION_FILE,
    SELECTOR_FILE,
    SUMMARY_FILE,
    TIMINGS_FILE,
    WINDOWS_STATS_FILE,
    chunk_name,
)
from .storage import atomic_write, atomic_write_json, sha256_file  # noqa: F401

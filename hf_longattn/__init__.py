"""hf_longattn: select long-context training data with LongAttn (arXiv 2502.16860) on the Hugging Face stack."""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

# Public name -> defining module; imported on first use so `hf-longattn --help` starts without torch.
_EXPORTS = {
    "DependencyStatistics": "attention_stats",
    "FarAttentionSums": "attention_stats",
    "dependency_statistics": "attention_stats",
    "far_attention_sums": "attention_stats",
    "LongAttnScorer": "scorer",
    "ProLongScorer": "scorers.prolong_scorer",
    "LadmCdsScorer": "scorers.ladm",
    "WindowScorer": "scorers.base",
    "compare": "compare",
    "SlidingWindows": "windows",
    "count_windows": "windows",
    "window_spans": "windows",
    "LongAttnSelector": "selection",
    "lds_scores": "selection",
    "export_dataset": "publication",
    "push_to_hub": "publication",
    "LongAttnPipeline": "run.job",
    "RunConfig": "config",
    "PipelineConfig": "config",
    "LongAttnError": "errors",
    "format_summary": "counts",
    "probe": "probe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'hf_longattn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

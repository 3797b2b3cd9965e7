"""hf_longattn: select long-context training data with LongAttn (arXiv 2502.16860) on the Hugging Face stack."""

__version__ = "0.1.0"

from .attention_stats import DependencyStatistics, FarAttentionSums, dependency_statistics, far_attention_sums
from .publication import export_dataset, push_to_hub
from .scorer import LongAttnScorer
from .selection import LongAttnSelector, lds_scores
from .windows import SlidingWindows, count_windows, window_spans

__all__ = [
    "DependencyStatistics",
    "FarAttentionSums",
    "LongAttnScorer",
    "LongAttnSelector",
    "SlidingWindows",
    "count_windows",
    "dependency_statistics",
    "export_dataset",
    "far_attention_sums",
    "lds_scores",
    "push_to_hub",
    "window_spans",
]

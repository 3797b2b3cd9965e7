"""hf_longattn: select long-context training data with LongAttn (arXiv 2502.16860) on the Hugging Face stack."""

__version__ = "0.1.0"

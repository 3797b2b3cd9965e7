"""Scorers beside LongAttn, each a plugin: its math, its reference port and its `datasets.map` callable, registered in `hf_longattn.registry.SCORERS`."""

"""Scorers beside LongAttn: each a module with its math and its datasets.map callable."""

"""Scorers other than LongAttn's own: ProLong (``prolong_v1``), each a plain function core plus a ``datasets.map`` class."""

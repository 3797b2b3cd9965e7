"""Tests of hf_longattn.registry: versioned names, aliases, lazy parts, errors that list what exists."""

from __future__ import annotations

import pytest

from hf_longattn.registry import SCORERS, Registry
from hf_longattn.selection import SELECTION_METHODS


def test_versioned_names_aliases_and_errors():
    registry = Registry("widget")

    @registry.register("round_v1", aliases=("round",))
    class Round:
        pass

    assert registry.get("round") is registry.get("round_v1") is Round and Round.registered_name == "round_v1"
    assert registry.accepted() == ["round", "round_v1"]
    with pytest.raises(ValueError, match=r"unknown widget 'square'; available: \['round_v1'\] \(aliases: round → round_v1\)"):
        registry.get("square")
    with pytest.raises(ValueError, match="must look like 'name_v1'"):
        registry.register("round")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("round_v1")(Round)


def test_lazy_parts_import_on_first_use():
    assert SCORERS.names() == ["ladm_cds_v1", "longattn_v1", "prolong_v1"]
    from hf_longattn.scorer import LongAttnScorer
    from hf_longattn.scorers.base import WindowScorer

    assert SCORERS.get("longattn") is LongAttnScorer
    for name in SCORERS.names():
        scorer = SCORERS.get(name)
        assert issubclass(scorer, WindowScorer) and scorer.name == scorer.registered_name == name
    assert SELECTION_METHODS.names() == ["lds_v1", "random_v1"]

"""Tests of hf_longattn.vocabulary: the closed set of statuses, the features, and that no other module spells a column."""

from __future__ import annotations

import re
from pathlib import Path

from hf_longattn import vocabulary as V

PACKAGE = Path(__file__).resolve().parents[1] / "hf_longattn"


def test_statuses_are_a_closed_set():
    assert list(V.STATUSES) == ["ok", "empty", "missing", "too_short", "bad_token", "oom", "non_finite", "error"]


def test_features_follow_the_column_lists():
    assert list(V.score_features()) == list(V.SCORE_COLUMNS)
    assert list(V.window_features(text=True)) == list(V.WINDOW_COLUMNS)
    assert list(V.selection_features()) == list(V.SELECTION_COLUMNS)


def test_no_module_but_the_vocabulary_spells_a_score_column():
    spelled = re.compile(r"""["']longattn_[a-z_]+["']""")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "vocabulary.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if spelled.search(code) and not code.strip().startswith((">>>", "...")):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert offenders == []

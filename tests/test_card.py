"""Tests of hf_longattn.card: the card rendered from a real tiny run agrees with summary.json; licenses; the template."""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import DatasetCard

from hf_longattn import vocabulary as V
from hf_longattn.card import CardData, CategoryRow, hub_license, markdown_table
from hf_longattn.counts import format_number

from .corpus import CATEGORIES


def card_rows(card: str, header_start: str) -> list[list[str]]:
    """The body rows of the markdown table whose header starts with ``header_start``."""
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_card_of_a_real_run_agrees_with_summary_json(finished_run):
    config, _ = finished_run
    out = Path(config.output_dir)
    summary = json.loads((out / "summary.json").read_text())["categories"]
    card = (out / "hub" / "README.md").read_text()
    rows = {row[0]: row for row in card_rows(card, "| category | split | documents")}
    assert set(rows) == {*CATEGORIES, "**total**"}
    names = ["documents", "documents_too_short", "windows_left_out", "windows", "scored_ok", "kept", "tokens_in",
             "tokens_out"]
    for category in CATEGORIES:
        row, counts = rows[category], summary[category]
        assert row[2:10] == [format_number(counts[name]) for name in names], category
        assert row[10] == f"{counts['tokens_out'] / counts['tokens_in']:.1%}"
        assert row[11] == format_number(counts["threshold"])
    total = rows["**total**"]
    assert total[2:10] == [format_number(sum(summary[c][name] for c in CATEGORIES)) for name in names]

    # The settings table names the configured layer and k in tokens; the header carries the rows' one license.
    assert f"| layer scored | {config.layer} |" in card and "| min distance k (tokens) | 16 |" in card
    assert "decoder layer 0 of the scoring model (the first decoder layer, as in the paper)" in card
    data = DatasetCard.load(out / "hub" / "README.md").data.to_dict()
    assert (data["license"], data["license_name"]) == ("other", "psf-2.0")
    # Every exported column is described; the sources are named in prose.
    described = dict((row[0].strip("`"), row[1]) for row in card_rows(card, "| column | description |"))
    assert described and all(described.values()) and "(a column of the source documents" not in card
    assert all(f"| {Path(s.path).as_posix()} |" in card for s in config.sources)


def test_a_layer_other_than_the_first_is_named_so():
    card = CardData(layer=3, window_size=64, categories=[CategoryRow("a", "a", 1, 1, 0, 64, 0)]).render()
    assert "decoder layer 3 of the scoring model;" in card and "first decoder layer" not in card.split("## Run")[0]


def test_hub_license_and_secrets():
    assert hub_license(None, ["CC-BY-4.0"]) == ("cc-by-4.0", None, None)
    assert hub_license(None, []) == ("other", None, None)
    card = CardData.from_metadata({"model": "m", "hf_token": "hf_secret", "nested": {"api_key": "k"}})
    assert "hf_secret" not in card.render() and "api_key" not in card.render()


def test_every_column_the_package_writes_has_a_description():
    for name in [*V.window_features(text=True), *V.score_features(distances=2, layers=2, per_head=True),
                 V.LDS, V.SELECTED, *V.DOCUMENT_COLUMNS, V.DOC_NUM_TOKENS, V.WINDOW_HASH]:
        assert V.COLUMN_DESCRIPTIONS.get(name), name


def test_markdown_table_escapes_cells():
    table = markdown_table(["a", "b"], [["x|y", 1234], ["line\nbreak", None]])
    assert table.splitlines()[2:] == ["| x\\|y | 1,234 |", "| line break | — |"]
    assert re.match(r"\|---\|---\|", table.splitlines()[1])


def test_run_then_probe_then_export_the_card_and_the_summary_say_the_same(tiny_model, corpus, tmp_path, capsys,
                                                                           monkeypatch):
    """The CLI as a user runs it: the summary and the card carry the same scorer check; no local path, no null."""
    from hf_longattn.cli import main

    monkeypatch.chdir(tmp_path)
    flags = ["--model", str(tiny_model), "--window-size", "64", "--output-dir", "out", "--no-progress",
             "--keep-fraction", "0.3", "--max-windows-per-category", "6", "--set", "language=[en]",
             *(arg for c in CATEGORIES for arg in ("--input", str(corpus / f"{c}.jsonl")))]
    assert main(["run", *flags]) == 0
    before = capsys.readouterr().out
    assert "scorer check: No probe was run" in before
    card = (tmp_path / "out" / "hub" / "README.md").read_text()
    assert "**Is this selection worth training on?** No probe was run" in card

    assert main(["probe", *flags, "--probe-num-windows", "6", "--probe-chunk-size", "8"]) == 0
    probed = capsys.readouterr().out
    check = re.search(r"For the run's layer 0: (.*)", probed).group(1)
    assert "run `hf-longattn export`" in probed  # the card predates the probe: say how to refresh it

    assert main(["export", *flags]) == 0
    exported = capsys.readouterr().out
    assert f"scorer check: {check}" in exported
    card = (tmp_path / "out" / "hub" / "README.md").read_text()
    assert f"**Is this selection worth training on?** {check}" in card
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["scorer_check"]["sentence"] == check
    assert str(tmp_path) not in card and "/probe/probe.png" not in card  # the image is plots/probe.png
    assert (tmp_path / "out" / "hub" / "plots" / "probe.png").is_file()
    metadata = json.loads(card.split("```json\n", 1)[1].split("```", 1)[0])
    assert "null" not in json.dumps(metadata) and "None" not in card.split("## Run configuration")[1].split("##")[0]
    data = DatasetCard.load(tmp_path / "out" / "hub" / "README.md").data.to_dict()
    assert data["language"] == ["en"] and None not in data.values()
    assert "| model checksum | local:" in card and "| tokenizer | the model's own |" in card
    assert "model revision" not in card  # unset: left out, not shown as —
    assert "the windows *left out* by the per-category cap (above) were not scored" in card

"""The report of `hf-longattn compare`: its format, reading it back when it was made on the current windows, its markdown tables."""

from __future__ import annotations

from typing import Any

FORMAT = "hf_longattn.compare/1"


def report_markdown(report: dict[str, Any]) -> str:
    """The comparison as markdown tables (agreement per category and pair; AUC and cost per scorer)."""
    from .card import markdown_table

    rows = [[category, f"{p['a']} × {p['b']}", p["windows"], p["spearman"], p["kendall"], p["jaccard"],
             report["random_jaccard"]] for category, entry in report["categories"].items() for p in entry["pairs"]]
    parts = [f"Scorers {', '.join(report['scorers'])} on the same {sum(e['windows'] for e in report['categories'].values())} "
             f"windows of {report['window_size']} tokens (model {report['model']}); kept sets at keep_fraction "
             f"{report['keep_fraction']}, each scorer selecting on its own.",
             markdown_table(["category", "scorers", "windows", "Spearman ρ", "Kendall τ_b", "Jaccard of kept",
                             "Jaccard if random"], rows)]
    categories = sorted({c for per in report.get("auc", {}).values() for c in per})
    scorer_rows = []
    for name in report["scorers"]:
        cost, per = report["cost"].get(name, {}), report.get("auc", {}).get(name, {})
        scorer_rows.append([name, *(per.get(c, {}).get("auc") for c in categories), cost.get("seconds_per_window"),
                            cost.get("multiply_adds_per_window")])
    parts.append(markdown_table(["scorer", *(f"AUC real vs controls, {c}" for c in categories), "s / window (measured)",
                                 "multiply-adds / window (estimate)"], scorer_rows))
    return "\n\n".join(parts)


def current_report(run: Any) -> dict[str, Any] | None:
    """``compare/compare.json`` when the comparison was made on the run's current windows, else `None`."""
    from .run.records import WindowsStats
    from .storage import read_json

    path = run.folder.compare / "compare.json"
    stats = WindowsStats.read_if_valid(run.folder.windows_stats)
    if not path.is_file() or stats is None:
        return None
    report = read_json(path, what="the comparison", remedy="run `hf-longattn compare` again")
    if not isinstance(report, dict) or report.get("format") != FORMAT or report.get("windows") != stats.digest:
        return None
    return report


def read_comparison(run: Any) -> str | None:
    """The comparison's tables (`report_markdown`) when it was made on the run's current windows, else `None`."""
    report = current_report(run)
    return None if report is None else report_markdown(report)

"""`ProbeReport`: what the probe measured per layer and group, its verdict, and its markdown, JSON and PNG forms."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .statistics import CHANCE_BAND, MEAN_OF_GROUPS, _finite, auc_standard_error


@dataclass
class ProbeReport:
    """What the probe measured, per layer and group, and its verdict.

    Attributes:
        rows (`list[dict]`): one per (group, layer), groups sorted, then one per layer for
            ``"mean of groups"``. Keys: ``group``, ``layer``, ``n_real``, ``n_control``,
            ``ds_real``, ``ds_control``, ``du_real``, ``du_control`` (means), ``auc_ds``,
            ``auc_du``, ``auc_lds``, ``auc_lds_se``, ``top_real_share`` (the mean-of-groups rows
            average the per-group values and leave the counts summed, means and SE null).
        verdict (`str`): a plain sentence (see the module docstring for the thresholds).
        best_layer (`int`, *optional*): the layer with the highest mean LDS AUC if it separates,
            else `None`.
        config (`dict`): the probe's arguments (model, window_size, layers, …).
        counts (`dict`): per group, documents / candidate windows / samples / unscored windows.
        timings (`dict`): seconds spent tokenising, sampling and scoring, and windows scored.
        samples (`list[dict]`): every window's id, group, kind, sources and per-layer DS_T / DU_T.
    """

    rows: list[dict[str, Any]]
    verdict: str
    best_layer: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        return sorted({row["layer"] for row in self.rows})

    @property
    def groups(self) -> list[str]:
        return sorted({row["group"] for row in self.rows if row["group"] != MEAN_OF_GROUPS})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path) -> Path:
        """Write the whole report (NaN as null) to ``path``; returns the path."""
        from ..storage import atomic_write_text

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(_json_safe(self.to_dict()), indent=1, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> ProbeReport:
        """Read a report written by :meth:`to_json` (nulls in AUC columns come back as NaN)."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        rows = [{k: (math.nan if v is None and k.startswith(("auc", "top", "ds_", "du_")) else v) for k, v in r.items()} for r in data["rows"]]
        return cls(rows, data["verdict"], data.get("best_layer"), data.get("config", {}), data.get("counts", {}),
                   data.get("timings", {}), data.get("samples", []))

    def to_markdown(self, style: str = "long") -> str:
        """The table as GitHub markdown.

        ``style="long"``: one line per group and layer with means, AUCs and the top-fraction share.
        ``style="wide"``: one line per layer, LDS AUC (and DS_T AUC) per group and their mean.
        """
        if style == "wide":
            groups = self.groups
            head = ["layer", *[f"{g} AUC LDS (DS)" for g in groups], "mean AUC LDS (DS)", "mean top-share"]
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            by_key = {(r["group"], r["layer"]): r for r in self.rows}
            for layer in self.layers:
                cells = [str(layer)]
                for g in [*groups, MEAN_OF_GROUPS]:
                    row = by_key.get((g, layer))
                    cells.append("–" if row is None else f"{_f(row['auc_lds'])} ({_f(row['auc_ds'])})")
                cells.append(_f(by_key[(MEAN_OF_GROUPS, layer)]["top_real_share"]) if (MEAN_OF_GROUPS, layer) in by_key else "–")
                lines.append("| " + " | ".join(cells) + " |")
            return "\n".join(lines + self._noise_note())
        if style != "long":
            raise ValueError(f"style must be 'long' or 'wide', got {style!r}")
        share = self.config.get("keep_fraction", 0.5)
        head = ["group", "layer", "n real/ctrl", "DS_T real", "DS_T ctrl", "DU_T real", "DU_T ctrl",
                "AUC DS_T", "AUC DU_T", "AUC LDS", f"real share of top {share:g}"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            lines.append("| " + " | ".join([
                str(row["group"]), str(row["layer"]), f"{row['n_real']}/{row['n_control']}",
                _f(row["ds_real"], 4), _f(row["ds_control"], 4), _e(row["du_real"]), _e(row["du_control"]),
                _f(row["auc_ds"]), _f(row["auc_du"]),
                _f(row["auc_lds"]),
                _f(row["top_real_share"]),
            ]) + " |")
        return "\n".join(lines + self._noise_note())

    def _noise_note(self) -> list[str]:
        """A line giving the standard error of an AUC near 0.5 for the counts in the table (empty if none)."""
        pairs = sorted({(r["n_real"], r["n_control"]) for r in self.rows if r["group"] != MEAN_OF_GROUPS and r["n_real"] and r["n_control"]})
        if not pairs:
            return []
        errors = ", ".join(f"±{auc_standard_error(0.5, n, m):.2f} for {n} real vs {m} control windows" for n, m in pairs)
        return ["", f"Standard error of a per-group AUC near 0.5 (Hanley–McNeil): {errors}."]

    def plot(self, path: str | Path) -> Path:
        """PNG: AUC per layer for DS_T and for LDS, one line per group (mean dashed), 0.5 reference."""
        from ..plots import _require_matplotlib, _save

        figure_cls, canvas_cls = _require_matplotlib()
        from matplotlib.ticker import MaxNLocator

        fig = figure_cls(figsize=(11, 4.2), layout="constrained")
        axes = fig.subplots(1, 2, sharey=True)
        for ax, key, title in ((axes[0], "auc_ds", "DS_T (dependency strength)"), (axes[1], "auc_lds", f"LDS (z-score, α = {self.config.get('alpha', 0.5):g})")):
            ax.axhspan(0.5 - CHANCE_BAND, 0.5 + CHANCE_BAND, color="#dddddd", alpha=0.6, label="close to chance")
            ax.axhline(0.5, color="#444444", linewidth=1, linestyle=":")
            for group in [*self.groups, MEAN_OF_GROUPS]:
                rows = sorted((r for r in self.rows if r["group"] == group), key=lambda r: r["layer"])
                if not rows:
                    continue
                mean = group == MEAN_OF_GROUPS
                ax.plot([r["layer"] for r in rows], [r[key] for r in rows], marker="o", markersize=3,
                        linestyle="--" if mean else "-", color="black" if mean else None,
                        linewidth=2 if mean else 1.3, label=group)
            ax.set_title(f"AUC of {title}", fontsize=10)
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("P(real window scores above control)")
        axes[1].legend(fontsize=8, loc="best")
        counts = sorted({r["n_real"] for r in self.rows if r["group"] != MEAN_OF_GROUPS})
        fig.suptitle(
            f"{Path(str(self.config.get('model', ''))).name} — W = {self.config.get('window_size')}, "
            f"N = {'/'.join(map(str, counts))} real + control per group", fontsize=11,
        )
        return _save(fig, canvas_cls, path)

    def scorer_check(self, layer: int) -> dict[str, Any]:
        """What this probe says about selecting with ``layer``: its mean LDS AUC, an assessment and a plain sentence.

        The assessment is ``separates`` (AUC ≥ 0.6), ``inverted`` (≤ 0.4), ``close to chance``
        (between), or ``not probed`` (``layer`` was not among the probed layers). The sentence is
        what the run's summary and the dataset card say (`hf_longattn.run.select_step.scorer_check`).

        Example:
            >>> report.scorer_check(0)["assessment"]  # doctest: +SKIP
            'close to chance'
        """
        from .statistics import SEPARATES

        mean = next((r for r in self.rows if r["group"] == MEAN_OF_GROUPS and r["layer"] == layer), None)
        check: dict[str, Any] = {"layer": layer, "auc_lds": None, "best_layer": self.best_layer,
                                 "num_windows": {g: c.get("real") for g, c in self.counts.items()}}
        if mean is None or not _finite(mean["auc_lds"]):
            check.update(assessment="not probed", sentence=f"The probe in this run did not score layer {layer}: "
                         f"probe it (`hf-longattn probe --layer {layer}`) before relying on this selection.")
            return check
        auc = float(mean["auc_lds"])
        check["auc_lds"] = round(auc, 3)
        per_group = ", ".join(f"{n} {g}" for g, n in sorted(check["num_windows"].items()))
        measured = f"mean LDS AUC {auc:.2f} over {len(self.groups)} group(s), with {per_group} real windows; 0.5 = chance"
        better = (f" Layer {self.best_layer} separates best; score with it, or with a larger model"
                  if self.best_layer is not None and self.best_layer != layer else
                  " No probed layer separates: take a larger scoring model")
        if auc >= SEPARATES:
            check.update(assessment="separates", sentence=f"The probe found that layer {layer} tells real windows "
                         f"from shuffled-chunk controls on this data ({measured}). That is a necessary check, not proof "
                         "that its ranking picks better training data (the paper's evidence is downstream training).")
        elif auc <= 0.5 - CHANCE_BAND:
            check.update(assessment="inverted", sentence=f"The probe found layer {layer} inverted on this data "
                         f"({measured}): it ranks shuffled text above coherent text, so this selection favours "
                         f"incoherent windows; do not train on it.{better}.")
        else:
            check.update(assessment="close to chance", sentence=f"The probe found layer {layer} close to chance on "
                         f"this data ({measured}): this selection shows the pipeline at work, not a quality "
                         f"filter.{better} (README: Choosing a scoring model and layer).")
        return check

    def __str__(self) -> str:
        return self.to_markdown() + "\n\n" + self.verdict


def _f(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "–"


def _e(value: Any) -> str:
    return f"{value:.2e}" if _finite(value) else "–"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value

"""Scorer self-check: does this model and layer tell coherent windows from shuffled-chunk controls on *my* data?

Terms. Per group (``by``, default ``category``) the probe takes ``N`` *real windows* — token-exact
``W``-token spans of the group's documents (paper Algorithm 1 spans, :func:`~hf_longattn.windows.window_spans`,
drawn without replacement under the seed) — and ``N`` *controls* of exactly ``W`` tokens, each
the concatenation of ``chunk_size``-token chunks cut from the same group's documents (the last
chunk is shorter when ``chunk_size`` does not divide ``W``). A control keeps local text and
vocabulary and destroys long-range structure. Rules of a control (see :func:`probe_samples`):

* its chunks come from the group's *source documents*: all its documents of at least
  ``chunk_size`` tokens (shorter documents of the group, too short for a real window, count);
* consecutive chunks come from different documents (when the group has two or more sources with
  room left; otherwise the fallback is counted in ``same_document_joins``);
* no chunk shares a token with any sampled real window of the group, nor with any other chunk of
  any control of the group (token positions are disjoint, per document);
* admissible starts tile each free gap ``[a, b)`` from its start, ``a, a + c, a + 2c, …`` for a
  chunk of ``c`` tokens (so placed chunks never leave unusable slivers); a chunk's document is
  drawn with probability proportional to its admissible starts, the start uniformly among them,
  from ``numpy.random.default_rng([seed, group hash])`` — the same seed gives the same windows,
  whatever the order of the groups.

Both kinds are scored in one pass with :class:`~hf_longattn.scorer.LongAttnScorer` (all
``layers`` in one forward). Per layer and group the report gives the mean DS_T and DU_T of real
and control windows, the AUC — the probability that a real window outscores a control (Mann–Whitney
U / (n·m), ties count 1/2) — for DS_T, DU_T and LDS (``selection.lds_scores`` z-score on the pooled
real + control windows of the group, weight ``alpha``), and the share of real windows among the top
``keep_fraction`` of the pooled mix by LDS (ties at the cut shared in proportion: the expected
share under random tie-breaking; 0.5 = no better than random).

Verdict: an AUC ≥ :data:`SEPARATES` (0.6) *separates*; ``|AUC − 0.5| <`` :data:`CHANCE_BAND`
(0.1) is *close to chance*; AUC ≤ 0.4 is *inverted* (the scorer prefers the shuffled controls).
The best layer is the one with the highest LDS AUC — per group, and overall by the mean over
groups; when that maximum is below 0.6, no layer separates and the scorer is too weak to select
with. With ``N`` windows per kind the AUC's standard error is about ``0.41/sqrt(N)`` near 0.5
(Hanley–McNeil; the tables print it under each table, and ``auc_lds_se`` holds it at the measured
AUC — where it is 0 for an AUC of 0 or 1, which understates the uncertainty of a small N): read
small-N tables with that in mind.

Run it: ``hf-longattn probe --model M --input D --window-size 4096 --layer 0,4,8 --probe-num-windows 16``
(or ``python -m hf_longattn.probe ...``; every ``hf-longattn`` configuration flag works, and the
flags of hf_longattn 0.1 — ``--data``, ``--layers``, ``--num-windows``, ``--chunk-size``,
``--output`` — are still accepted) prints the table, writes ``report.json``, ``report.md`` and
``probe.png`` to ``output_dir/probe`` (or ``--output``) and ends with the verdict.

Layout: `statistics` (AUC, verdict), `sampling` (real windows and controls), `report`
(`ProbeReport`), `core` (`probe`), `command` (the CLI).
"""

from __future__ import annotations

from .__main__ import main
from .command import add_probe_parser, run_probe_command
from .core import ALL_GROUPS, load_documents, parse_layers, probe, probe_run_config
from .report import ProbeReport
from .sampling import ProbeSample, probe_samples
from .statistics import (
    CHANCE_BAND,
    CONTROL,
    MEAN_OF_GROUPS,
    REAL,
    SEPARATES,
    auc,
    auc_label,
    auc_standard_error,
    layer_rows,
    top_fraction_share,
    verdict_of,
)

__all__ = [
    "ALL_GROUPS",
    "CHANCE_BAND",
    "CONTROL",
    "MEAN_OF_GROUPS",
    "REAL",
    "SEPARATES",
    "ProbeReport",
    "ProbeSample",
    "add_probe_parser",
    "auc",
    "auc_label",
    "auc_standard_error",
    "layer_rows",
    "load_documents",
    "main",
    "parse_layers",
    "probe",
    "probe_run_config",
    "probe_samples",
    "run_probe_command",
    "top_fraction_share",
    "verdict_of",
]

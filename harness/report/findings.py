"""The paper's findings, checked on the run: a study's `findings:` are its paper's ablation claims as data.

    findings:
      - claim: the jigsaw generator helps at S = 1          # what the paper says, in its words
        source: PMG section 4.3                             # where it says it
        better: {method.stages: 1, method.jigsaw: true}     # a cell (grid axes -> values), or a group of cells:
        worse: {method.stages: 1, method.jigsaw: false}     #   a list of values takes the mean over them
        paper: {better: 87.2, worse: 86.0}                  # optional: the paper's own numbers (%), or {effect: 1.2}
      - claim: the jigsaw generator brings no advantage at S = 4
        relation: not_better                                # `better` is not better than `worse` ("no advantage")
        better: {method.stages: 4, method.jigsaw: true}
        worse: {method.stages: 4, method.jigsaw: false}

Each finding is evaluated on the run's finished trials with the statistics of the tables (harness.report.stats): the
effect is the difference of the two sides' means (`better` - `worse`, in points of `metric`, default test/acc), paired
by seed on the seeds both sides ran (a group's value on a seed is the mean of its cells), with its 95% interval from
Student's t over those seeds (n - 1 degrees of freedom): the spread between training runs is in it. Two-sided
p-values are adjusted by Holm over the study's findings. The verdict:
- relation `better` (the default): **agrees** when the effect is positive and significant (adjusted p < 0.05),
  **contradicts** when it is negative and significant, else **not shown**;
- relation `not_better` ("brings no advantage"): two one-sided readings, Bonferroni over the two: **contradicts**
  when an advantage (effect > 0) is significant, **agrees** when an advantage below `margin` points is (default 1:
  "no advantage" shown within a point), else **not shown**.
One seed per side gives no interval and no test (one training run cannot tell a setting from an unlucky run): the
finding is **not shown** and the table gives the effect's direction only. A side with no finished trial: **not run**.
`direction` says whether the effect has the paper's sign whatever its significance.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from harness.report.stats import ALPHA
from harness.study.findings import Finding, _text

AGREES, CONTRADICTS, NOT_SHOWN, NOT_RUN = "agrees", "contradicts", "not shown", "not run"


def _matches(results: pd.DataFrame, side: dict[str, Any]) -> pd.Series:
    """Rows of the side's cells: every named axis equals the value (or one of the listed values), as printed."""
    keep = pd.Series(True, index=results.index)
    for axis, wanted in side.items():
        if axis not in results.columns:
            return pd.Series(False, index=results.index)
        allowed = {_text(v) for v in (wanted if isinstance(wanted, list) else [wanted])}
        keep &= results[axis].map(_text).isin(allowed)
    return keep


def _in_grid(results: pd.DataFrame, grid: str) -> pd.Series:
    """Rows of the trials of one named grid (results.parquet's `grids`: the JSON list of a trial's grids)."""
    import json

    if "grids" not in results:
        return pd.Series(False, index=results.index)
    return results["grids"].map(lambda g: isinstance(g, str) and grid in json.loads(g or "[]"))


def _by_seed(rows: pd.DataFrame, metric: str, axes: list[str]) -> dict[int, float]:
    """A side's value per seed: the mean over its cells of the cell's value on that seed (seeds every cell ran)."""
    if rows.empty or metric not in rows:
        return {}
    rows = rows[rows[metric].notna()]
    cells = [g for _, g in rows.groupby([a for a in axes if a in rows], dropna=False)] if axes else [rows]
    per_cell = [{int(s): float(v) for s, v in zip(g["seed"], g[metric])} for g in cells]
    seeds = set.intersection(*(set(c) for c in per_cell)) if per_cell else set()
    return {s: float(np.mean([c[s] for c in per_cell])) for s in sorted(seeds)}


def evaluate(results: pd.DataFrame, findings: list[Finding | dict], axes: list[str]) -> pd.DataFrame:
    """One row per finding: the run's effect with its interval, the raw and Holm-adjusted p, and the verdict (see
    the module docstring). `results`: the run's rows (only finished ones count); `axes`: the grid's axes."""
    findings = [f if isinstance(f, Finding) else Finding.model_validate(f) for f in findings]
    finished = results[results["status"] == "finished"] if "status" in results else results
    rows = []
    for f in findings:
        pool = finished if f.grid is None else finished[_in_grid(finished, f.grid)]
        better = _by_seed(pool[_matches(pool, f.better)], f.metric, axes)
        worse = _by_seed(pool[_matches(pool, f.worse)], f.metric, axes)
        seeds = sorted(set(better) & set(worse))
        scale = 100.0 if "/acc" in f.metric or f.metric.startswith("test/loc/") else 1.0
        d = np.array([better[s] - worse[s] for s in seeds]) * scale
        row = {"claim": f.claim, "source": f.source, "relation": f.relation, "metric": f.metric,
               "paper_effect": f.paper.difference() if f.paper else None,
               "better_mean": scale * float(np.mean([better[s] for s in seeds])) if seeds else None,
               "worse_mean": scale * float(np.mean([worse[s] for s in seeds])) if seeds else None,
               "seeds": len(seeds), "effect": float(d.mean()) if len(d) else None, "ci_low": None, "ci_high": None,
               "p_raw": None, "reading": None, "test": ""}
        if len(d) >= 2:
            _t_test(row, d, f)
        elif len(d) == 1:
            row["test"] = "one training run per side: no test (n >= 2 seeds)"
        else:
            row["test"] = "a side has no finished trial on a shared seed"
        rows.append(row)
    _holm(rows)
    for row, f in zip(rows, findings):
        row["direction"] = None if row["effect"] is None else (row["effect"] > 0) == (f.relation == "better") \
            if row["effect"] != 0 else f.relation == "not_better"
        row["verdict"] = _verdict(row)
        del row["reading"]
    return pd.DataFrame(rows)


def _t_test(row: dict, d: np.ndarray, f: Finding) -> None:
    from scipy.stats import t

    n = len(d)
    sd = float(d.std(ddof=1))
    if sd <= 1e-12:  # the same difference on every seed (discrete accuracies can do that): no variance to judge by
        row["test"] = "no spread over seeds: no test"
        return
    se = sd / math.sqrt(n)
    half = float(t.ppf(1 - ALPHA / 2, n - 1)) * se
    mean = float(d.mean())
    row.update(ci_low=mean - half, ci_high=mean + half, test=f"paired t over {n} seeds")
    if f.relation == "better":
        row["p_raw"] = float(2 * t.sf(abs(mean) / se, n - 1))  # two-sided: agrees or contradicts
        row["reading"] = AGREES if mean > 0 else CONTRADICTS
    else:  # two one-sided readings: an advantage (contradicts), or an advantage below the margin (agrees)
        p_advantage = float(t.sf(mean / se, n - 1))
        p_within = float(t.cdf((mean - f.margin) / se, n - 1))
        row["p_raw"] = min(1.0, 2 * min(p_advantage, p_within))  # Bonferroni over the two readings
        row["reading"] = CONTRADICTS if p_advantage < p_within else AGREES


def _holm(rows: list[dict]) -> None:
    """Holm's step-down over the study's tested findings."""
    tested = [(i, r["p_raw"]) for i, r in enumerate(rows) if r["p_raw"] is not None]
    for r in rows:
        r["p_adjusted"] = None
    running = 0.0
    for rank, (i, p) in enumerate(sorted(tested, key=lambda x: x[1])):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        rows[i]["p_adjusted"] = running


def _verdict(row: dict) -> str:
    if row["effect"] is None:
        return NOT_RUN
    if row["p_adjusted"] is None or row["p_adjusted"] >= ALPHA:
        return NOT_SHOWN
    return row["reading"]


def markdown(table: pd.DataFrame) -> str:
    """The report's "The paper's findings" section (Markdown)."""
    from harness.core.escape import markdown_cell

    if table.empty:
        return ""
    lines = ["| finding | source | paper | run (95% CI) | seeds | p (Holm) | verdict |",
             "|:--|:--|--:|:--|--:|--:|:--|"]
    for r in table.to_dict("records"):
        paper = "-" if r["paper_effect"] is None or pd.isna(r["paper_effect"]) else f"{r['paper_effect']:+.1f}"
        run = "-" if r["effect"] is None or pd.isna(r["effect"]) else f"{r['effect']:+.1f}"
        if r["ci_low"] is not None and not pd.isna(r["ci_low"]):
            run += f" ({r['ci_low']:+.1f} to {r['ci_high']:+.1f})"
        p = "-" if r["p_adjusted"] is None or pd.isna(r["p_adjusted"]) else f"{r['p_adjusted']:.3g}"
        verdict = r["verdict"] + ("" if r["verdict"] in (AGREES, CONTRADICTS, NOT_RUN) or r["direction"] is None
                                  else " (same direction)" if r["direction"] else " (opposite direction)")
        lines.append("| " + " | ".join(markdown_cell(str(x)) for x in (r["claim"], r["source"] or "-", paper, run,
                                                                     r["seeds"], p, verdict)) + " |")
    counts = table["verdict"].value_counts()
    summary = ", ".join(f"{counts.get(v, 0)} {v}" for v in (AGREES, CONTRADICTS, NOT_SHOWN, NOT_RUN) if counts.get(v))
    return ("Each claim of the paper's ablation, evaluated on this run (effect = better - worse in points; paired t "
            "over seeds, Holm over the findings, α = 0.05; `not_better` claims agree when the advantage is below "
            f"their margin). {summary}.\n\n" + "\n".join(lines) + "\n")

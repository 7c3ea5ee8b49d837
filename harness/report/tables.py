"""Tables in the paper's layout, with honest statistics, from a run's results.parquet.

A cell is the mean over the seeds that finished, in % for accuracies: "65.0 ± 7.1 (n=2)", and with 3
or more seeds its 95% confidence interval "(n=3, CI 58.1-71.9)". Within a table, for each accuracy
metric and column, the best cell on the seeds every cell of the column ran is marked `*`; with 2 or more
shared seeds every other cell is compared with it on those seeds, one-sided (harness.report.stats.compare_column: a
paired t-test over the seeds with the column's pooled error, which is the spread between training runs), with
Holm's correction over the column after the choice of the best: `≈` when it is not shown different from the best
(adjusted p >= 0.05), nothing when it is significantly worse, `?` when no test applies: above all one training run
per cell (one seed), where differences between settings cannot be tested. A column's only finished cell gets `-`.
A table with `model_comparison: true` also marks `†` a one-seed cell whose trained model is less accurate than the
best cell's on the same test images (exact McNemar): a comparison of two networks, not of two settings.
The long-form statistics (mean, std, n, CI, the raw and the adjusted p, the test) are attached as
`table.attrs["stats"]` and written as table_stats.csv; `table.attrs["power"]` is the table's power note (the
minimum detectable effect of the test used, or why there is none).
"""

from __future__ import annotations

import numbers
from pathlib import Path

import numpy as np
import pandas as pd

from harness.results.store import FAILED, FINISHED
from harness.report.stats import (ALPHA, CORRECTION, MCNEMAR, ONE_RUN, POWER, T_POOLED, ColumnResult, Comparison,
                                  compare_column, summarize)
from harness.core.records import unpack_correct

MISSING = "-"
_NO_TEST = Comparison("")  # a cell of a metric no test applies to (not an accuracy)
LEGEND = ("mean ± std over the n seeds that finished (95% CI with n ≥ 3); `*` the best cell of its column on the "
          "seeds all its cells ran; `≈` not shown different from the best; no mark: significantly worse than the best "
          "(one-sided paired t-test over those seeds, whose pooled error is the spread between training runs; Holm "
          "over the column after the choice of the best, α = 0.05); `?` no test applies, above all one training run "
          "per cell: differences between settings cannot be tested (n ≥ 2 seeds); `-` after a value: nothing to "
          "compare (the only finished cell of its column); `†` (tables with model_comparison): this trained model is "
          "less accurate than the best cell's on the same test images (exact McNemar, Holm), a statement about two "
          "networks, not their settings")


def _number(value: float) -> str:
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.1f}k"
    return f"{value:.4g}"


def is_accuracy(metric: str) -> bool:
    return "/acc" in metric


def is_percent(metric: str) -> bool:
    """Shown in %: accuracies and the localisation scores (shares of energy, pointing hit rates)."""
    return is_accuracy(metric) or metric.startswith("test/loc/")


def _label(axis: str, value) -> str:
    return f"{axis.split('.')[-1]}={value}"


def _sort_key(value):
    """Numbers in numeric order (numpy's too: parquet columns come back as numpy scalars), then text."""
    return (0, float(value)) if isinstance(value, numbers.Number) else (1, str(value))


def _cell_text(values: pd.Series, statuses: pd.Series, percent: bool) -> tuple[str, object]:
    ok = values[statuses == FINISHED].dropna()
    n_failed = int((statuses == FAILED).sum())
    if ok.empty:
        return ("failed" if n_failed else MISSING), None
    s = summarize(ok.tolist())
    scale = 100 if percent else 1
    fmt = (lambda v: f"{scale * v:.1f}") if percent else _number
    text = fmt(s.mean)
    if s.n > 1:
        text += f" ± {fmt(s.std)}" + (f" (n={s.n}, CI {fmt(s.ci95[0])}-{fmt(s.ci95[1])})" if s.ci95 else f" (n={s.n})")
    return text + (f" ({n_failed} failed)" if n_failed else ""), s


def paper_table(results: pd.DataFrame, rows: str, columns: str | list[str] | None,
                metric: str | list[str], model_comparison: bool = False) -> pd.DataFrame:
    """rows x columns of `metric` (in % for accuracies), with statistics and significance marks (see the
    module docstring); 'failed' where every seed failed, '-' where nothing ran.

    `columns` may name several axes (e.g. WS-DAN's crop and drop): one column per combination;
    `metric` may list several metrics (e.g. MKSMT's heads): one column per metric, after the axes;
    `model_comparison`: also compare one-seed cells' trained models (McNemar, mark `†`)."""
    metrics = [metric] if isinstance(metric, str) else list(metric)
    for m in metrics:
        if m not in results.columns:
            results = results.assign(**{m: float("nan")})
    cols = [columns] if isinstance(columns, str) else list(columns or [])
    texts, groups = {}, {}
    for key, group in results.groupby([rows] + cols, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        for m in metrics:
            texts[key + (m,)] = _cell_text(group[m], group["status"], percent=is_percent(m))
            groups[key + (m,)] = group
    row_values = sorted(results[rows].unique(), key=_sort_key)
    combos = sorted({tuple(v) for v in results[cols].itertuples(index=False)}, key=lambda t: [_sort_key(x) for x in t])
    combos = combos if cols else [()]
    labels, keys = [], []
    for combo in combos:
        for m in metrics:
            parts = [_label(a, v) for a, v in zip(cols, combo)] + ([m] if len(metrics) > 1 or not cols else [])
            labels.append(", ".join(parts))
            keys.append(combo + (m,))
    stats, columns_tested = _significance(texts, groups, metrics, model_comparison)
    marks = {(r["row_key"], r["col_key"]): r["mark"] + (" †" if r["cmp"].model_worse else "") for r in stats}
    body = [[_marked(texts.get((r,) + k, (MISSING, None))[0], marks.get(((r,), k), "")) for k in keys]
            for r in row_values]
    table = pd.DataFrame(body, index=pd.Index([str(r) for r in row_values], name=rows.split(".")[-1]), columns=labels)
    label_of = dict(zip(keys, labels))
    nan = float("nan")
    table.attrs["stats"] = pd.DataFrame([{
        "row": str(r["row_key"][0]), "column": label_of.get(r["col_key"], ""), "metric": r["col_key"][-1],
        "mean": r["summary"].mean, "std": r["summary"].std, "n": r["summary"].n,
        "ci_low": r["summary"].ci95[0] if r["summary"].ci95 else np.nan,
        "ci_high": r["summary"].ci95[1] if r["summary"].ci95 else np.nan,
        "shared_seeds": r["seeds"],
        "mean_on_shared_seeds": nan if r["cmp"].shared_mean is None else r["cmp"].shared_mean,
        "p_raw": nan if r["cmp"].p_raw is None else r["cmp"].p_raw,
        "p_adjusted": nan if r["cmp"].p_adjusted is None else r["cmp"].p_adjusted,
        "test": r["cmp"].test, "correction": CORRECTION if r["cmp"].p_adjusted is not None else "",
        "significantly_worse_than_best": r["cmp"].worse, "mark": r["mark"],
        "min_detectable_effect": nan if r["mde"] is None else r["mde"],
        **({"model_p_raw": nan if r["cmp"].model_p_raw is None else r["cmp"].model_p_raw,
            "model_p_adjusted": nan if r["cmp"].model_p_adjusted is None else r["cmp"].model_p_adjusted,
            "model_test": MCNEMAR if r["cmp"].model_p_raw is not None else "",
            "model_less_accurate_than_best": r["cmp"].model_worse} if model_comparison else {})}
        for r in stats])
    table.attrs["power"] = power_note(columns_tested, model_comparison)
    return table


def _marked(text: str, mark: str) -> str:
    return f"{text} {mark}" if mark else text


def _significance(texts: dict, groups: dict, metrics: list[str],
                  model_comparison: bool = False) -> tuple[list[dict], list[ColumnResult]]:
    """Each finished cell against the best cell of its column (the rows compared under one setting of the
    column axes and one metric: the best method per dataset, the best S with and without jigsaw), and the
    columns that were tested."""
    out, tested = [], []
    for column in dict.fromkeys(k[1:] for k in texts):
        m = column[-1]
        cells = {k: v[1] for k, v in texts.items() if k[1:] == column and v[1] is not None}
        if not cells:
            continue
        result = None
        if is_accuracy(m):
            primary = m == "test/acc"
            result = compare_column({k: _by_seed(groups[k], m) for k in cells},
                                    {k: _outcomes(groups[k]) for k in cells} if primary and model_comparison else None,
                                    models=primary and model_comparison)
            if len(result.cells) > 1:
                tested.append(result)
        for k, summary in cells.items():
            cmp = result.cells[k] if result else None
            out.append({"row_key": k[:1], "col_key": k[1:], "summary": summary, "cmp": cmp or _NO_TEST,
                        "mark": cmp.mark if cmp else "", "seeds": ",".join(map(str, result.seeds)) if result else "",
                        "mde": result.mde if result and len(result.cells) > 1 else None})
    return out, tested


def power_note(columns: list[ColumnResult], model_comparison: bool = False) -> str:
    """What the marks can and cannot mean in a table: the smallest gap to the best that the test used detects 80% of
    the time (exact: harness.report.stats.t_test_mde), or why no test applies (one training run per cell)."""
    if not columns:
        return ""
    span = (lambda v: f"{v[0]}" if v[0] == v[-1] else f"{v[0]}-{v[-1]}")
    gaps = (lambda v: f"{v[0]:.1f}" if v[-1] - v[0] < 0.05 else f"{v[0]:.1f}-{v[-1]:.1f}")
    notes = []
    tested = [c for c in columns if not c.one_run]
    if tested:
        k = sorted({len(c.cells) for c in tested})
        n = sorted({len(c.seeds) for c in tested})
        known = [c for c in tested if c.mde is not None]
        what = f"{span(k)} cells per column, {span(n)} shared seeds"
        if known:
            notes.append(f"Power: {what} ({T_POOLED}, Holm over the column, α = {ALPHA}): a cell about "
                         f"{gaps(sorted(100 * c.mde for c in known))} points below the best is marked worse "
                         f"{POWER:.0%} of the time when it is the only one behind (noncentral t with the column's "
                         "spread between seeds); smaller gaps often read ≈, which then means \"not shown different\", "
                         "not \"equal\".")
        else:
            notes.append(f"Power: {what}; the seeds show no spread, so no test applies and no mark says whether "
                         "cells differ.")
    lone = [c for c in columns if c.one_run]
    if lone:
        k = sorted({len(c.cells) for c in lone})
        note = (f"{'Also: ' if tested else 'Power: '}{span(k)} cells per column, 1 seed: {ONE_RUN}; the table "
                "shows the highest cell (`*`) but marks none worse. Run more seeds (--set \"seeds=[0,1,2]\").")
        models = [c for c in lone if c.model_mde is not None or c.test_images]
        if model_comparison and models:
            mdes = sorted(100 * c.model_mde for c in models if c.model_mde is not None)
            images = sorted({c.test_images for c in models if c.test_images})
            found = (f"finds a gap of about {gaps(mdes)} points between two trained models {POWER:.0%} of the time "
                     "(exact binomial power at Holm's first level)") if mdes else \
                "cannot reach its level with so few discordant images"
            note += f" `†` ({MCNEMAR}, on {span(images)} test images) {found}."
        notes.append(note)
    return " ".join(notes)


def _by_seed(group: pd.DataFrame, metric: str) -> dict[int, float]:
    ok = group[(group["status"] == FINISHED) & group[metric].notna()]
    return {int(s): float(v) for s, v in zip(ok["seed"], ok[metric])}


def _outcomes(group: pd.DataFrame) -> dict[int, tuple[np.ndarray, str | None]]:
    """seed -> (per-image correctness of the primary head, hash of the test set it was scored on)."""
    if "test/correct" not in group.columns:
        return {}
    ok = group[(group["status"] == FINISHED) & group["test/correct"].notna() & group["test/acc"].notna()]
    hashes = ok["test/set_hash"] if "test/set_hash" in ok.columns else pd.Series(None, index=ok.index)
    return {int(s): (unpack_correct(c), h if isinstance(h, str) and h else None)
            for s, c, h in zip(ok["seed"], ok["test/correct"], hashes)}


def add_references(table: pd.DataFrame, reference: dict | None, study_path: str) -> pd.DataFrame:
    """Print paper numbers beside ours: '92.1 (paper 92.8, -0.7)' in the cells the study maps."""
    if not reference:
        return table
    path = Path(reference["file"])
    if not path.is_absolute():
        path = Path(study_path).parent / "references" / path
    if not path.exists():
        raise FileNotFoundError(f"reference file {path} not found (table.reference.file in {study_path})")
    from harness.core.bounded import read_reference_csv

    paper = read_reference_csv(path)  # a regular file of at most 1 MiB: /dev/zero or a FIFO is refused
    attrs = dict(table.attrs)
    table = table.copy()
    table.attrs.update(attrs)
    for cell in reference.get("cells", []):
        match = paper[paper["setting"] == cell["setting"]]
        if match.empty:
            raise ValueError(f"{path}: no row with setting {cell['setting']!r}")
        if cell["row"] not in table.index or cell["column"] not in table.columns:
            continue
        value = float(match["value"].iloc[0])
        ours = table.loc[cell["row"], cell["column"]]
        try:
            delta = f", {float(ours.split()[0]) - value:+.1f}"
        except ValueError:
            delta = ""
        table.loc[cell["row"], cell["column"]] = f"{ours} (paper {value:.1f}{delta})"
    return table


def head_table(results: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Every head's accuracy per grid point (mean over finished seeds), in %; columns in the order of the trial
    that lists the most heads (`heads`: primary first; PMG's S=5 has stage1..stage5 where S=1 has only
    stage5), the others after them by name."""
    heads = [c for c in results.columns if c.startswith("test/acc/")]
    listed = results["heads"].dropna() if "heads" in results else pd.Series(dtype=object)
    head_order = max((h.split(",") for h in listed), key=len, default=None)
    if head_order:
        heads = sorted(heads, key=lambda c: (head_order.index(c[9:]) if c[9:] in head_order else len(head_order), c))
    finished = results[results["status"] == FINISHED]
    if finished.empty or not heads:
        return pd.DataFrame()
    table = (finished.groupby(axes, dropna=False)[heads].mean() * 100 if axes
             else finished[heads].mean().to_frame().T * 100)
    return table.rename(columns=lambda c: c.removeprefix("test/acc/")).round(1)

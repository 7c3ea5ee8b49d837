"""The report's account of a study's search (harness.study.search): for each cell, its search trials (knob values,
status, epochs trained, validation score, cost), their validation scores over the epochs, and the configuration
the final cells retrained. Read from results.parquet (rows of kind `search`), curves.parquet and
runs/<study>/<profile>/search/<unit>.json; written as search.md, search/<unit>.png and a section of index.html."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import pandas as pd

from harness.core.bounded import BoundedReadError, read_json
from harness.core.escape import markdown_frame, markdown_text, printable
from harness.core.paths import identity_problem, inside
from harness.core.atomic import atomic_write_bytes

MAX_SUMMARY_BYTES = 16 << 20


def search_note(study: dict) -> str:
    """What a tuned table says: 'tuned (budget 6 trials per method, searcher tpe, scheduler asha ...)'."""
    if not study.get("search"):
        return ""
    from harness.study.search_space import SearchConfig

    try:
        config = SearchConfig.model_validate(study["search"])
    except ValueError:
        return "tuned (search settings unreadable)"
    kind = "GPU-hours" if (study.get("resources") or {}).get("gpu") else "CPU-hours"
    validation = config.validation
    return (f"{config.describe(kind)}: each cell's best configuration on a validation split ({validation.fraction:g} "
            f"of each class's training images, seed {validation.seed}), retrained on the whole training split and "
            "tested")


def _summaries(run_dir: Path) -> dict[str, dict]:
    """search/<unit>.json by unit id: stored data, so each is bounded, a mapping, and named by its own identity
    (a file that is not is left out, with a warning)."""
    out = {}
    for path in sorted((run_dir / "search").glob("*.json")):
        try:
            data = read_json(path, MAX_SUMMARY_BYTES, "search summary")
            if not isinstance(data, dict) or data.get("unit_id") != path.stem or identity_problem(path.stem):
                raise BoundedReadError("not a search summary of its unit")
            out[data["unit_id"]] = data
        except (OSError, ValueError) as e:
            print(printable(f"warning: {path}: left out of the report ({e})"), file=sys.stderr)
    return out


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _number(value) -> str:
    try:
        return str(int(value))
    except (TypeError, ValueError):
        return "?"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def build(run_dir: Path, out: Path, study: dict, rows: pd.DataFrame, curves: pd.DataFrame) -> list[dict]:
    """One entry per searched cell (label, summary line, chosen configuration, trials table as a DataFrame, plot
    path); also writes search.md and the plots. `rows`: the run's search rows."""
    if rows.empty or "search_unit" not in rows:
        return []
    summaries = _summaries(run_dir)
    metric = (study.get("search") or {}).get("metric", "val/acc")
    entries, md = [], [f"# Search of {study['name']} ({study['profile']} profile)\n", search_note(study) + "\n"]
    for unit_id, group in rows.groupby("search_unit", sort=False):
        if identity_problem(unit_id):  # results.parquet is stored data: a unit id is checked before it names a file
            print(printable(f"warning: search rows of unit {unit_id!r} left out: {identity_problem(unit_id)}"),
                  file=sys.stderr)
            continue
        summary = summaries.get(unit_id, {})
        knobs = [str(k) for k in _dict(summary.get("knobs"))] or [
            c for c in group.columns if c.split(".")[0] in ("train", "method", "backbone")]
        label = str(summary.get("label") or ", ".join(str(group.iloc[0].get(a)) for a in ("method", "dataset")
                                                      if a in group))
        best = summary.get("best") if isinstance(summary.get("best"), dict) else None
        table = pd.DataFrame({
            "#": group["search_index"].astype("Int64") if "search_index" in group else None,
            **{k: group[k].map(_fmt) if k in group else "-" for k in knobs},
            "status": group["status"],
            "epochs": group["epoch"].astype("Int64") if "epoch" in group else None,
            f"{metric} %": (100 * group[metric]).round(1) if metric in group else None,
            "CPU s": group["cpu_time_s"].round(1) if "cpu_time_s" in group else None,
            "wall s": group["wall_time_s"].round(1) if "wall_time_s" in group else None,
        }).sort_values("#")
        chosen_id = best.get("trial_id") if best else None
        table["chosen"] = ["*" if t == chosen_id else "" for t in group.loc[table.index, "trial_id"]]
        points = [p for p in summary.get("points") or [] if isinstance(p, dict)]
        repeats = sum(p.get("state") == "alias" for p in points)
        counts = group["status"].value_counts().to_dict()
        budget = _dict(summary.get("budget"))
        spent = [f"{budget['trials']} trials" if budget.get("trials") else "",
                 f"{_fmt(budget['device_hours'])} device-hours" if budget.get("device_hours") else ""]
        line = (f"budget {' or '.join(s for s in spent if s) or '?'}: {len(group)} trained ("
                + ", ".join(f"{n} {s}" for s, n in counts.items())
                + (f"; {repeats} suggestions repeated an earlier configuration" if repeats else "")
                + f"), {group.get('cpu_time_s', pd.Series(dtype=float)).sum() / 3600:.3f} CPU-hours")
        if not summary:
            line += "; the search has not ended (rerun the study to resume it)"
        try:
            chosen = (", ".join(f"{k} = {_fmt(v)}" for k, v in _dict(best.get("values")).items())
                      + f" (#{_number(best['index'])}, {metric} {100 * float(best['value']):.1f}% after "
                        f"{_number(best['epochs'])} epochs)") if best else (
                "none: every search trial failed" if summary else "not chosen yet")
        except (KeyError, TypeError, ValueError):
            chosen = "unreadable (its search summary is malformed)"
        plot = _plot(curves, group, metric, best, inside(out / "search", f"{unit_id}.png"), label)
        entries.append({"label": label, "summary": line, "chosen": chosen, "table": table, "plot": plot})
        md.append(f"\n## {markdown_text(label)}\n\n{markdown_text(line)}.\n\nChosen: {markdown_text(chosen)}.\n\n"
                  f"{markdown_frame(table).to_markdown(index=False)}\n")
    atomic_write_bytes(out / "search.md", "".join(md).encode())
    return entries


def _plot(curves: pd.DataFrame, group: pd.DataFrame, metric: str, best: dict | None, path: Path,
          label: str) -> Path | None:
    if curves.empty or "trial_id" not in curves:
        return None
    data = curves[curves["trial_id"].isin(group["trial_id"]) & (curves["metric"] == metric)]
    if data.empty:
        return None
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False  # labels are text, not mathtext
    import matplotlib.pyplot as plt

    from harness.report.plots import _save

    index = dict(zip(group["trial_id"], group.get("search_index", pd.Series(range(len(group))))))
    fig, ax = plt.subplots(figsize=(6, 4))
    for trial_id, trial in data.groupby("trial_id"):
        trial = trial.sort_values("epoch")
        chosen = best is not None and trial_id == best.get("trial_id")
        ax.plot(trial["epoch"], 100 * trial["value"], marker="o", lw=2.5 if chosen else 1, alpha=1 if chosen else 0.6,
                color="black" if chosen else None,
                label=f"#{_number(index.get(trial_id))}" + (" (chosen)" if chosen else ""))
    ax.set(xlabel="epoch", ylabel=f"{metric} (%)", title=f"search: {label}")
    ax.legend(fontsize=7, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, inside(path.parent, path.name))


def html_entries(entries: list[dict], out: Path) -> list[dict]:
    """The entries as the page shows them: tables escaped by pandas, plots inlined."""
    shown = []
    for e in entries:
        plot = base64.b64encode(e["plot"].read_bytes()).decode() if e.get("plot") else ""
        shown.append({"label": e["label"], "summary": e["summary"], "chosen": e["chosen"], "plot": plot,
                      "html": e["table"].to_html(escape=True, border=0, na_rep="-", index=False)})
    return shown

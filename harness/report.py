"""Tables in the paper's layout and seaborn plots, rebuilt from a run's stored results.

    python -m harness.report runs/<study>/<profile> [--out reports/<study>/<profile>]

Reads results.parquet, curves.parquet and study.yaml of the run; writes table.md, table.csv,
table.tex (rows and columns from the study's `table:`, mean +- std over seeds in %, failed cells
marked), and PNG plots: the metric against each grid axis, and learning curves.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

from harness.results import FAILED, FINISHED, atomic_write_bytes
from harness.tables import LEGEND, add_references, head_table, paper_table  # noqa: F401 - the table API

def combined_axis(df: pd.DataFrame, axes: list[str]) -> tuple[pd.DataFrame, str | None]:
    """One string column standing for several axes (for a plot's hue or style)."""
    axes = [a for a in axes if a in df.columns]
    if not axes:
        return df, None
    if len(axes) == 1:
        return df.assign(**{axes[0]: df[axes[0]].astype(str)}), axes[0]
    name = ", ".join(a.split(".")[-1] for a in axes)
    return df.assign(**{name: df[axes].astype(str).agg(", ".join, axis=1)}), name


def write_tables(tables: dict[str, tuple[pd.DataFrame, str]], heads: pd.DataFrame, out: Path, title: str,
                 protocol: str = "") -> None:
    """table.md holds every table; each also as CSV and LaTeX (table.csv, or table_<name>.csv when named)."""
    md = f"# {title}\n\nTop-1 % for accuracies: {LEGEND}.\n"
    for name, (table, metric) in tables.items():
        md += f"\n## {name or (metric if isinstance(metric, str) else ', '.join(metric))}\n\n{table.to_markdown()}\n"
        stem = f"table_{name}" if name else "table"
        atomic_write_bytes(out / f"{stem}.csv", table.to_csv().encode())
        if "stats" in table.attrs:
            atomic_write_bytes(out / f"{stem}_stats.csv", table.attrs["stats"].to_csv(index=False).encode())
        caption = f"{title}{': ' + name if name else ''} (top-1 \\%)"
        atomic_write_bytes(out / f"{stem}.tex", table.to_latex(escape=True, caption=caption).encode())
    if not heads.empty:
        md += f"\n## Accuracy of every head (%)\n\n{heads.to_markdown()}\n"
    if protocol:
        md += f"\n## Protocol: the paper's beside this run's\n\n{protocol}"
        atomic_write_bytes(out / "protocol.md", protocol.encode())
    atomic_write_bytes(out / "table.md", md.encode())


def write_plots(results: pd.DataFrame, curves: pd.DataFrame, axes: list[str], rows: str | None,
                columns: str | list[str] | None, metric: str, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    cols = [columns] if isinstance(columns, str) else list(columns or [])
    written = []
    finished = results[results["status"] == FINISHED].copy()
    if metric in finished.columns:
        finished[metric] = finished[metric] * 100
    for axis in axes:
        if finished.empty or metric not in finished.columns:
            break
        others = [a for a in cols if a != axis] or [a for a in (rows,) if a and a != axis]
        data, hue = combined_axis(finished, others)
        fig, ax = plt.subplots(figsize=(6, 4))
        dodge = 0.2 if hue and data[hue].nunique() > 1 else False
        sns.pointplot(data=data, x=axis, y=metric, hue=hue, errorbar="sd", dodge=dodge, ax=ax)
        ax.set(ylabel=f"{metric} (%)", title=f"{metric} against {axis}")
        written.append(_save(fig, out / f"{metric.replace('/', '_')}_vs_{axis.replace('.', '_')}.png"))
    if not curves.empty:
        panels = [m for m in ("test/acc", "train/loss") if m in set(curves["metric"])]
        fig, axs = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        for ax, m in zip(axs[0], panels):
            data = curves[curves["metric"] == m]
            data = data.assign(value=data["value"] * (100 if m.startswith("test/acc") else 1))
            data, hue = combined_axis(data, [rows] if rows else [])
            data, style = combined_axis(data, cols)
            sns.lineplot(data=data, x="epoch", y="value", hue=hue, style=style, errorbar="sd", ax=ax)
            ax.set(ylabel=m + (" (%)" if m.startswith("test/acc") else ""), title=f"learning curves: {m}")
        written.append(_save(fig, out / "learning_curves.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import io
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def build_reports(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    study_file = run_dir / "study.yaml"
    results_file = run_dir / "results.parquet"
    if not results_file.exists() or not study_file.exists():
        raise FileNotFoundError(f"{run_dir}: no results.parquet/study.yaml here; run the study first "
                                "(python -m harness.run studies/<study>.yaml)")
    study = yaml.safe_load(study_file.read_text())
    out = Path(out_dir) if out_dir else Path("reports") / study["name"] / study["profile"]
    results = pd.read_parquet(results_file)
    curves_file = run_dir / "curves.parquet"
    curves = pd.read_parquet(curves_file) if curves_file.exists() else pd.DataFrame()
    grids = study.get("grids") or {}
    axes = list(dict.fromkeys([*(study.get("grid") or {})] + [a for g in grids.values() for a in g]))
    specs = study.get("tables") or ({"": study["table"]} if study.get("table") else {})
    if not specs:
        first = axes[0] if axes else "seed"
        specs = {"": {"rows": first, "columns": [a for a in axes if a != first] or None}}
    out.mkdir(parents=True, exist_ok=True)
    if results.empty:
        atomic_write_bytes(out / "table.md", f"# {study['name']}\n\nno results yet\n".encode())
        return out
    tables = {}
    for name, spec in specs.items():
        subset, subset_curves = results, curves
        if spec.get("grid"):
            member = results["grids"].map(lambda g: spec["grid"] in json.loads(g or "[]"))
            subset = results[member]
            if not curves.empty:
                subset_curves = curves[curves["trial_id"].isin(subset["trial_id"])]
        metric = spec.get("metric", "test/acc")
        table = paper_table(subset, spec["rows"], spec.get("columns"), metric)
        tables[name] = (add_references(table, spec.get("reference"), study.get("path", "")), metric)
        first_metric = metric if isinstance(metric, str) else metric[0]
        plot_dir = out / name if name else out
        plot_dir.mkdir(parents=True, exist_ok=True)
        columns = spec.get("columns")
        plot_axes = [spec["rows"]] + ([columns] if isinstance(columns, str) else list(columns or []))
        write_plots(subset, subset_curves, plot_axes, spec["rows"], columns, first_metric, plot_dir)
    from harness.protocol import protocol_markdown

    order = results["heads"].dropna().iloc[0].split(",") if "heads" in results and results["heads"].notna().any() else None
    write_tables(tables, head_table(results, axes, order), out, f"{study['name']} ({study['profile']} profile)",
                 protocol_markdown(study))
    summary = {"trials": len(results), "finished": int((results["status"] == FINISHED).sum()),
               "failed": int((results["status"] == FAILED).sum())}
    atomic_write_bytes(out / "summary.json", json.dumps(summary).encode())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="runs/<study>/<profile>")
    parser.add_argument("--out", help="output folder (default reports/<study>/<profile>)")
    args = parser.parse_args(argv)
    try:
        out = build_reports(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"reports written to {out}/")
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

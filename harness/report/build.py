"""The report of a run: tables in the paper's layout, seaborn plots and one HTML page, from its stored results.

    python -m harness.report runs/<study>/<profile> [--out reports/<study>/<profile>]
    python -m harness.report --compare RUN_DIR RUN_DIR ... [--out DIR]

Reads results.parquet, curves.parquet, study.yaml, run.json and each trial's maps.npz; writes table.md,
table.csv, table.tex, table_stats.csv (harness.report.tables: rows x columns from the study's `table:`, with
statistics and significance marks), protocol.md, PNG plots (each metric against each grid axis, the
localisation scores too, learning curves) and index.html (harness.report.html). `--compare` puts the
tables of several runs side by side (compare.md and compare.html).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
from pathlib import Path

import pandas as pd
import yaml

from harness.core.escape import (csv_frame, latex, latex_frame, latex_label, markdown_frame, markdown_text, printable)
from harness.core.paths import inside, name_problem, own_path, table_names_problem, write_problem
from harness.report.checks import checked_curves, checked_results
from harness.core.atomic import atomic_write_bytes
from harness.core.versions import __version__
from harness.results.store import FAILED, FINISHED
from harness.report.search import search_note
from harness.report.tables import LEGEND, add_references, head_table, is_percent, paper_table  # noqa: F401 - the table API
from harness.report.plots import write_plots

LOCALISATION = ["test/loc/energy", "test/loc/pointing", "test/loc/chance", "test/loc/center"]


def write_tables(tables: dict[str, tuple[pd.DataFrame, str]], heads: pd.DataFrame, out: Path, title: str,
                 protocol: str = "", outside_note: str = "", findings: str = "") -> None:
    """table.md holds every table; each also as CSV and LaTeX (table.csv, or table_<name>.csv when named)."""
    md = f"# {title}\n\nTop-1 % for accuracies: {LEGEND}.\n" + (f"\n{outside_note}\n" if outside_note else "")
    for name, (table, metric) in tables.items():
        note = f"**{markdown_text(table.attrs['note'])}**\n\n" if table.attrs.get("note") else ""
        power = f"\n{table.attrs['power']}\n" if table.attrs.get("power") else ""  # what ≈ can mean here
        heading = name or (metric if isinstance(metric, str) else ', '.join(metric))
        md += f"\n## {heading}\n\n{note}{markdown_frame(table).to_markdown()}\n{power}"
        stem = f"table_{name}" if name else "table"
        atomic_write_bytes(inside(out, f"{stem}.csv"), csv_frame(table).to_csv().encode())  # = + - @: text
        if "stats" in table.attrs:
            stats = csv_frame(table.attrs["stats"])
            atomic_write_bytes(inside(out, f"{stem}_stats.csv"), stats.to_csv(index=False).encode())
        # Cells, index and column labels are escaped by pandas; the caption and label are ours to escape.
        caption = latex(f"{title}{': ' + name if name else ''}") + r" (top-1 \%)"
        tex = latex_frame(table).to_latex(escape=True, caption=caption,  # one line per cell: no blank line
                                          label=latex_label(f"tab:{title.split()[0]}:{stem}"))
        atomic_write_bytes(inside(out, f"{stem}.tex"), tex.encode())
    if findings:
        md += f"\n## The paper's findings\n\n{findings}"
    if not heads.empty:
        md += f"\n## Accuracy of every head (%)\n\n{markdown_frame(heads).to_markdown()}\n"
    if protocol:
        md += f"\n## Protocol: the paper's beside this run's\n\n{protocol}"
        atomic_write_bytes(out / "protocol.md", protocol.encode())
    atomic_write_bytes(out / "table.md", md.encode())


def findings_markdown(findings: pd.DataFrame) -> str:
    from harness.report.findings import markdown

    return markdown(findings) if not findings.empty else ""


def mixed_precision_note(results: pd.DataFrame) -> str:
    """A warning when a table's finished trials ran in different precisions (e.g. results reused from a machine
    with bf16 units beside new fp32 ones): its cells do not compare like with like."""
    if "precision" not in results:
        return ""
    counts = results.loc[results["status"] == FINISHED, "precision"].dropna().value_counts()
    if len(counts) < 2:
        return ""
    return ("cells mix precisions: " + ", ".join(f"{p} in {n} trials" for p, n in counts.items()) +
            "; rerun the older ones with train.precision set (or a fresh --runs-dir) to compare like with like")


def load_run(run_dir: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    study_file, results_file = run_dir / "study.yaml", run_dir / "results.parquet"
    if not results_file.exists() or not study_file.exists():
        raise FileNotFoundError(f"{run_dir}: no results.parquet/study.yaml here; run the study first "
                                "(python -m harness.run studies/<study>.yaml)")
    from harness.study import reader as study_yaml

    curves_file = run_dir / "curves.parquet"
    try:
        curves = pd.read_parquet(curves_file) if curves_file.exists() else pd.DataFrame()
        results = pd.read_parquet(results_file)
        study = study_yaml.load(study_yaml.read_text(study_file), str(study_file))[0]
    except (OSError, ValueError, yaml.YAMLError) as e:  # pyarrow's errors are ValueErrors; StudyFileError too
        raise ReportError(f"{run_dir}: cannot read its results ({type(e).__name__}: {e})") from None
    if not isinstance(study, dict) or not all(isinstance(study.get(k), str) for k in ("name", "profile")):
        raise ReportError(f"{study_file}: not a study written by harness.run (no name and profile)")
    for name in [study["name"], study["profile"], *(study.get("tables") or {})]:
        if name_problem(name):
            raise ReportError(f"{study_file}: {name_problem(name)}")
    if table_names_problem(list(study.get("tables") or {})):
        raise ReportError(f"{study_file}: {table_names_problem(list(study['tables']))}")
    results, curves = checked_results(results, str(results_file)), checked_curves(curves)  # any one bad trial
    if "in_grid" in results:  # the tables show the current grid; results.parquet also keeps earlier finished trials
        study["_outside_grid"] = int((~results["in_grid"].fillna(False).astype(bool)).sum())
        results = results[results["in_grid"].fillna(False).astype(bool)].reset_index(drop=True)
    if "kind" in results:  # a study's search trials are not cells: its report's search section shows them
        results = results[results["kind"].fillna("final") != "search"].reset_index(drop=True)
    return study, results, curves


def search_rows(run_dir: Path) -> pd.DataFrame:
    """The current search trials of a run (results.parquet rows of kind `search`, in the grid)."""
    results = pd.read_parquet(run_dir / "results.parquet")
    if "kind" not in results:
        return results.iloc[0:0]
    keep = (results["kind"] == "search") & results.get("in_grid", pd.Series(True, index=results.index)).fillna(False)
    return results[keep.astype(bool)].reset_index(drop=True)


class ReportError(ValueError):
    """A run folder whose results cannot be reported (missing, unreadable, or not written by harness.run)."""


def outside_note(study: dict) -> str:
    """What the report says about stored trials that the tables leave out."""
    n = study.get("_outside_grid", 0)
    return (f"{n} more finished trial{'s' if n != 1 else ''} of this study and profile (an earlier, wider grid or "
            "another harness version) are kept in results.parquet (in_grid false) and left out of these tables."
            if n else "")


def study_axes(study: dict) -> list[str]:
    grids = study.get("grids") or {}
    return list(dict.fromkeys([*(study.get("grid") or {})] + [a for g in grids.values() for a in g]))


def table_specs(study: dict) -> dict[str, dict]:
    """The study's tables (named `tables:` or one `table:`), else rows = the first axis, columns = the rest."""
    specs = study.get("tables") or ({"": study["table"]} if study.get("table") else {})
    if not specs:
        axes = study_axes(study)
        first = axes[0] if axes else "seed"
        specs = {"": {"rows": first, "columns": [a for a in axes if a != first] or None}}
    return specs


def spec_subset(results: pd.DataFrame, spec: dict) -> pd.DataFrame:
    """The trials a table shows: those of its named grid, or all."""
    if not spec.get("grid"):
        return results
    return results[results["grids"].map(lambda g: spec["grid"] in json.loads(g or "[]"))]


INPUTS_FILE = ".report-inputs"  # the digest of what the report was last built from (build_reports)


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """The report's code: every module and template of harness.report and the escaping it relies on."""
    h = hashlib.sha256(__version__.encode())
    here = Path(__file__).parent
    for path in sorted([*here.glob("*.py"), *here.glob("*.html"), here.parent / "core" / "escape.py"]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def inputs_digest(run_dir: Path) -> str:
    """What a report is built from: results.parquet, curves.parquet, study.yaml, the search's summaries and the report
    code (not run.json, whose wall time changes with every run: a rerun that trains nothing leaves the report as it
    is, and the page keeps the run that produced its results)."""
    h = hashlib.sha256(_code_digest().encode())
    files = [run_dir / name for name in ("results.parquet", "curves.parquet", "study.yaml")]
    files += sorted((run_dir / "search").glob("*.json")) if (run_dir / "search").is_dir() else []
    for path in files:
        h.update(path.name.encode() + b"\0")
        h.update(path.read_bytes() if path.is_file() else b"(none)")
    return h.hexdigest()


def build_reports(run_dir: str | Path, out_dir: str | Path | None = None, skip_unchanged: bool = False) -> Path:
    """Write the run's report into `out_dir` (default reports/<study>/<profile>). `skip_unchanged` (a run that
    trained nothing: harness.run): nothing is rewritten when its inputs are what the report there was built from
    (inputs_digest) and its page and tables exist."""
    run_dir = Path(run_dir)
    study, results, curves = load_run(run_dir)
    out = Path(out_dir) if out_dir else inside("reports", study["name"], study["profile"])
    digest = inputs_digest(run_dir)
    marker = out / INPUTS_FILE
    if skip_unchanged and marker.is_file() and all((out / f).is_file()
                                                   for f in ("table.md", "index.html", "summary.json")):
        try:
            if marker.read_text().strip() == digest:
                return out
        except OSError:
            pass
    marker.unlink(missing_ok=True)  # a build that stops half-way is never "unchanged"
    axes = study_axes(study)
    out.mkdir(parents=True, exist_ok=True)
    if results.empty:
        atomic_write_bytes(out / "table.md", f"# {study['name']}\n\nno results yet\n{outside_note(study)}\n".encode())
        return out
    tables, localisation = {}, {}
    located = "test/loc/energy" in results and results["test/loc/energy"].notna().any()
    for name, spec in table_specs(study).items():
        subset = spec_subset(results, spec)
        subset_curves = curves[curves["trial_id"].isin(subset["trial_id"])] if not curves.empty else curves
        metric = spec.get("metric", "test/acc")
        table = add_references(paper_table(subset, spec["rows"], spec.get("columns"), metric,
                                           bool(spec.get("model_comparison"))),
                               spec.get("reference"), study.get("path", ""))
        table.attrs["note"] = "; ".join(n for n in (search_note(study), mixed_precision_note(subset)) if n)
        tables[name] = (table, metric)
        first_metric = metric if isinstance(metric, str) else metric[0]
        plot_dir = own_path(out, name) if name else out  # table names follow the safe-name rule; a second guard
        plot_dir.mkdir(parents=True, exist_ok=True)
        columns = spec.get("columns")
        plot_axes = [spec["rows"]] + ([columns] if isinstance(columns, str) else list(columns or []))
        write_plots(subset, subset_curves, plot_axes, spec["rows"], columns, first_metric, plot_dir)
        if located:  # where the primary head looks, tabled and plotted against the same axes
            localisation[name] = paper_table(subset, spec["rows"], columns, LOCALISATION)
            if "loc/map" in subset:  # which map each score is of: the stage must resolve the parts
                maps = sorted(subset["loc/map"].dropna().astype(str).unique())
                localisation[name].attrs["note"] = "map scored: " + "; ".join(maps) if maps else ""
            write_plots(subset, pd.DataFrame(), plot_axes, spec["rows"], columns, "test/loc/energy", plot_dir)
    from harness.report.protocol import protocol_markdown

    heads = head_table(results, axes)
    findings = pd.DataFrame()
    if study.get("findings"):  # the paper's claims, on this run's results (harness.report.findings)
        from harness.report.findings import evaluate

        findings = evaluate(results, study["findings"], axes)
        atomic_write_bytes(out / "findings.csv", csv_frame(findings).to_csv(index=False).encode())
    write_tables({**tables, **{f"{name}_localisation" if name else "localisation": (t, LOCALISATION)
                               for name, t in localisation.items()}},
                 heads, out, f"{study['name']} ({study['profile']} profile)", protocol_markdown(study),
                 outside_note(study), findings_markdown(findings))
    search = []
    if study.get("search"):  # each cell's search: its trials, their validation scores by epoch, the choice
        from harness.report import search as search_report

        search = search_report.build(run_dir, out, study, search_rows(run_dir), curves)
        if search:
            md = (out / "search.md").read_text().split("\n", 1)[1].replace("\n## ", "\n### ")
            table_md = (out / "table.md").read_text() + f"\n## Search\n{md}"
            atomic_write_bytes(out / "table.md", table_md.encode())
    from harness.report.html import write_html

    write_html(out, run_dir, study, results, tables, localisation, heads, axes, search=search, findings=findings)
    summary = {"trials": len(results), "finished": int((results["status"] == FINISHED).sum()),
               "failed": int((results["status"] == FAILED).sum()), "outside_grid": study.get("_outside_grid", 0)}
    atomic_write_bytes(out / "summary.json", json.dumps(summary).encode())
    atomic_write_bytes(marker, digest.encode())
    return out


def compare_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """compare.md and compare.html: each table of the first run, with the same table of every run side by side
    (columns '<run> | <column>'); a run is named by its profile, or its folder when profiles repeat, with its
    harness version and commit."""
    runs = []
    for run_dir in map(Path, run_dirs):
        study, results, _ = load_run(run_dir)
        commit = results["git_commit"].dropna().iloc[0] if "git_commit" in results and len(results) else "?"
        runs.append((run_dir, study, results, commit))
    profiles = [study["profile"] for _, study, _, _ in runs]
    labels = [(p if profiles.count(p) == 1 else str(d)) + f" ({c})" for (d, _, _, c), p in zip(runs, profiles)]
    md = ("# " + printable(" vs ".join(labels)).replace("\n", " ")
          + f"\n\nTop-1 % for accuracies: {LEGEND} (within each run).\n")
    html = []
    for name, spec in table_specs(runs[0][1]).items():
        parts = []
        for label, (_, study, results, _) in zip(labels, runs):
            own = table_specs(study).get(name, spec)
            table = paper_table(spec_subset(results, own), own["rows"], own.get("columns"),
                                own.get("metric", "test/acc"), bool(own.get("model_comparison")))
            table = table.rename(columns=lambda c, label=label: f"{label} | {c}")
            table.attrs = {}  # per-run statistics frames: pandas would compare them when concatenating
            parts.append(table)
        side = pd.concat(parts, axis=1).fillna("-")
        title = name or spec.get("metric", "test/acc")
        title = title if isinstance(title, str) else ", ".join(map(str, title))
        md += f"\n## {title}\n\n{markdown_frame(side).to_markdown()}\n"
        html.append({"title": title, "html": side.to_html(escape=True, border=1)})
    out = Path(out)
    atomic_write_bytes(out / "compare.md", md.encode())
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    # Through the escaping template, as index.html: run labels (folders, profiles, commits) and table titles
    # come from files anyone may have written; the tables themselves are escaped by pandas.
    env = Environment(loader=FileSystemLoader(Path(__file__).parent), autoescape=select_autoescape(["html"]))
    page = env.get_template("compare_template.html").render(labels=labels, legend=LEGEND.replace("`", ""),
                                                            tables=html)
    atomic_write_bytes(out / "compare.html", page.encode())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", help="runs/<study>/<profile>")
    parser.add_argument("--out", help="output folder (default reports/<study>/<profile>; with --compare: .)")
    parser.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                        help="put the tables of several runs side by side (a profile against another, a harness "
                             "version against another)")
    args = parser.parse_args(argv)
    if not args.run_dir and not args.compare:
        parser.error("give a RUN_DIR, or --compare RUN_DIR RUN_DIR ...")
    try:
        if args.compare:
            out = compare_runs(([args.run_dir] if args.run_dir else []) + args.compare, args.out or ".")
            print(printable((out / "compare.md").read_text()))
            print(printable(f"written: {out / 'compare.md'} and {out / 'compare.html'}"))
            return 0
        out = build_reports(args.run_dir, args.out)
    except (OSError, ValueError) as e:  # missing or unreadable results, a reference file, an unwritable --out
        full = isinstance(e, OSError) and e.errno is not None and e.filename and not isinstance(e, FileNotFoundError)
        print(printable(f"error: {write_problem(e, '--out') if full else e}"), file=sys.stderr)
        return 2
    print(printable(f"reports written to {out}/ (open {out / 'index.html'})"))
    print(printable((out / "table.md").read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

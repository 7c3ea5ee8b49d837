"""The Python API, for notebooks and scripts: what `python -m harness.run` does, with the results as DataFrames.

    import harness

    results = harness.run_study("studies/pmg_ablation.yaml", overrides=["train.epochs=2"])
    results.get_dataframe()            # results.parquet: one row per trial (as Ray Tune's ResultGrid.get_dataframe())
    results.tables["accuracy"]         # the paper-layout tables, with their statistics in .attrs["stats"]
    results.findings                   # the paper's findings, evaluated on the run
    results.report_dir / "index.html"  # the report

    again = harness.load_results("runs/pmg_ablation/default")  # a stored run, nothing trained

`run_study` takes a study file (or an already loaded `ResolvedStudy`), a profile and `--set` style overrides, and
the command line's options as keywords (`address`, `storage`, `num_cpus`, `max_retries`, `keep_checkpoints`,
`loggers`, `connect_timeout`: harness.orchestrate.RunOptions). Invalid input raises harness.study.StudyError;
another driver on the same study raises harness.results.RunLocked. In a notebook the progress is one output of the
cell, updated in place (harness.orchestrate.progress).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from harness.study.trials import ResolvedStudy


@dataclass
class StudyResults:
    """A run's stored results and its report: `results` (results.parquet: every finished trial of the study and
    profile, `in_grid` false for those outside the current grid), `curves` (curves.parquet: per-epoch metrics in
    long form), `tables` (each of the study's tables in the paper's layout, statistics in `.attrs["stats"]`),
    `findings` (the paper's claims evaluated on the run), `summary` (what this run trained, skipped and failed; None
    for load_results) and the folders."""

    run_dir: Path
    report_dir: Path | None
    study: dict
    results: "pd.DataFrame"
    curves: "pd.DataFrame"
    tables: dict[str, "pd.DataFrame"] = field(default_factory=dict)
    findings: "pd.DataFrame | None" = None
    summary: Any = None

    def get_dataframe(self) -> "pd.DataFrame":
        """One row per trial (results.parquet), as Ray Tune's ResultGrid.get_dataframe()."""
        return self.results

    def __repr__(self) -> str:
        finished = int((self.results["status"] == "finished").sum()) if "status" in self.results else 0
        return (f"StudyResults({self.study.get('name')}/{self.study.get('profile')}: {len(self.results)} trials, "
                f"{finished} finished; tables {list(self.tables)}; {self.run_dir})")


def load_results(run_dir: str | os.PathLike, report_dir: str | os.PathLike | None = None) -> StudyResults:
    """A stored run (`runs/<study>/<profile>`) as DataFrames, its tables rebuilt from the results (nothing trained,
    nothing written)."""
    from harness.report.build import load_run, spec_subset, study_axes, table_specs
    from harness.report.findings import evaluate
    from harness.report.tables import paper_table

    run_dir = Path(run_dir)
    study, results, curves = load_run(run_dir)
    tables = {}
    for name, spec in table_specs(study).items():
        tables[name or "table"] = paper_table(spec_subset(results, spec), spec["rows"], spec.get("columns"),
                                              spec.get("metric", "test/acc"), bool(spec.get("model_comparison")))
    findings = evaluate(results, study["findings"], study_axes(study)) if study.get("findings") else None
    return StudyResults(run_dir, Path(report_dir) if report_dir else None, study, results, curves, tables, findings)


def run_study(study: "str | os.PathLike | ResolvedStudy", profile: str | None = None,
              overrides: list[str] | tuple[str, ...] = (), *, runs_dir: str | os.PathLike = "runs",
              reports_dir: str | os.PathLike = "reports", report: bool = True, max_trials: int | None = None,
              **options) -> StudyResults:
    """Run a study's unfinished trials (a rerun trains nothing), write its report, and return its results (see the
    module docstring). `options`: harness.orchestrate.RunOptions' fields."""
    from harness.study.config import MAX_TRIALS
    from harness.study.load import load_study
    from harness.study.trials import ResolvedStudy

    resolved = study if isinstance(study, ResolvedStudy) else load_study(study, profile, list(overrides),
                                                                         max_trials=max_trials or MAX_TRIALS)
    run_dir, report_dir = prepare_folders(resolved, runs_dir, reports_dir)
    summary, out, _ = execute(resolved, run_dir, report_dir if report else None, options)
    loaded = load_results(run_dir, out)
    loaded.summary = summary
    return loaded


def prepare_folders(resolved: "ResolvedStudy", runs_dir, reports_dir) -> tuple[Path, Path]:
    """`<runs_dir>/<study>/<profile>` and the report's, made now (an unwritable one is found before any training),
    each guarded to stay under its root (harness.core.paths.inside)."""
    from harness.core.paths import inside

    run_dir = inside(runs_dir, resolved.name, resolved.profile)
    report_dir = inside(reports_dir, resolved.name, resolved.profile)
    run_dir.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, report_dir


def execute(resolved: "ResolvedStudy", run_dir: Path, report_dir: Path | None, options: dict):
    """Under the run lock: study.yaml, the trials (harness.orchestrate), run.json, the report. Returns (summary, the
    report's folder or None, wall seconds); raises what the command line turns into its exit codes (RunLocked,
    StudyError, DatasetError, OSError, ValueError, KeyboardInterrupt; a report that cannot be written raises
    ReportWriteError with the summary)."""
    import yaml

    from harness import orchestrate
    from harness.core.escape import scrub_data
    from harness.report.build import build_reports
    from harness.results.store import RunLock, atomic_write_bytes

    log = options.get("log", print)
    t0, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with RunLock(run_dir):
        study_dump = scrub_data(resolved.study.model_dump(mode="json", exclude={"profiles"}))  # no ${VAR} values
        atomic_write_bytes(run_dir / "study.yaml", yaml.safe_dump(study_dump, sort_keys=False).encode())
        log(f"study {resolved.name}, profile {resolved.profile}: {count_text(resolved)} -> {run_dir}/")
        try:
            summary = orchestrate.run_study(resolved, run_dir, options=orchestrate.RunOptions(**options))
        finally:
            orchestrate.shutdown()
        elapsed = time.perf_counter() - t0
        where = SimpleNamespace(address=options.get("address"), storage=options.get("storage"))
        write_run_metadata(run_dir, where, summary, started, elapsed)
        out = None
        if report_dir is not None:
            try:
                out = build_reports(run_dir, report_dir, skip_unchanged=True)
            except (OSError, ValueError) as e:
                raise ReportWriteError(e, summary, elapsed) from e
    return summary, out, elapsed


class ReportWriteError(Exception):
    """The trials are stored, but the report could not be written (`cause`, and the run's `summary`)."""

    def __init__(self, cause: Exception, summary, elapsed: float):
        super().__init__(str(cause))
        self.cause, self.summary, self.elapsed = cause, summary, elapsed


def count_text(resolved) -> str:
    """What a run holds: its trials, or a search's cells, budget and final cells."""
    plan = resolved.search
    if plan is None:
        return f"{len(resolved.trials)} trials"
    most = plan.max_search_trials()
    return (f"{len(plan.units)} cells {plan.describe()}: {f'up to {most}' if most else 'a device-hour budget of'} "
            f"search trials on a validation split, then {len(resolved.trials)} final cells")


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports kilobytes)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_run_metadata(run_dir: Path, where, summary, started: str, elapsed: float) -> None:
    """run.json: how this run went and on what (the report shows it beside the tables); `where`: the run's options
    (its `address` and `storage`: harness.run's arguments, or a namespace of them)."""
    import json
    import platform
    import socket

    from harness.core.escape import redact_uri, scrub_data
    from harness.results.store import atomic_write_bytes, versions

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    meta = {"started": started, "wall_time_s": elapsed, "driver_peak_rss_mb": peak_rss_mb(),
            "trained": len(summary.finished), "failed": len(summary.failed), "skipped": summary.skipped,
            "interrupted": summary.interrupted, "address": where.address or "local",
            "storage": redact_uri(where.storage) if where.storage else None,  # an s3 URI may carry its keys
            "cluster": summary.cluster, "driver_host": socket.gethostname(), "platform": platform.platform(),
            "cpu": cpu, "cpu_count": os.cpu_count(), **versions()}
    meta = scrub_data(json.loads(json.dumps(meta, default=str)))  # no credential, no ${VAR}'s value
    atomic_write_bytes(run_dir / "run.json", json.dumps(meta, indent=1).encode())


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""

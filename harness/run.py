"""Run a study: python -m harness.run studies/<study>.yaml [--profile NAME] [--set key=value ...]

Exit codes: 0 all trials finished; 2 invalid study, arguments, dataset or storage, or the same study and
profile already running (nothing started); 3 finished with failed trials; 130 interrupted (run the same
command again to resume).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import yaml

EXIT_OK, EXIT_INVALID, EXIT_FAILED, EXIT_INTERRUPTED = 0, 2, 3, 130


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.run", description=__doc__.split("\n\n")[0])
    p.add_argument("study", help="a study file, e.g. studies/pmg_ablation.yaml")
    p.add_argument("--profile", default=None, help="a profile of the study file (default: the base settings)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key, e.g. --set train.epochs=2 --set grid.method.stages=[1,2]")
    p.add_argument("--dry-run", action="store_true", help="validate, print the trials, start nothing")
    p.add_argument("--address", default=None, help="join a Ray cluster: auto or HOST:PORT (default: local Ray)")
    p.add_argument("--runs-dir", default="runs", help="results root (default runs/)")
    p.add_argument("--reports-dir", default="reports", help="reports root (default reports/)")
    p.add_argument("--max-retries", type=int, default=1, help="Tune retries of a trial whose worker died")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished trial's last checkpoint (default: deleted once its result is stored)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--log", dest="loggers", action="append", default=[], choices=["tensorboard", "mlflow", "wandb"],
                   help="also send each trial's epochs and config to a tracker (several allowed): TensorBoard files "
                        "in <run>/tensorboard, MLflow to $MLFLOW_TRACKING_URI (else <run>/mlruns), W&B offline "
                        "in <run>/wandb")
    p.add_argument("--storage", default=None, metavar="PATH|URI",
                   help="where Ray persists checkpoints: a local path, an NFS mount, s3://... or gs://... "
                        "(default: <runs-dir>/<study>/<profile>/ray; a cluster needs one every node can reach)")
    return p.parse_args(argv)


def print_trials(resolved) -> None:
    from harness.protocol import describe, protocol_markdown

    print(f"study {resolved.name}, profile {resolved.profile}: {len(resolved.trials)} trials")
    study = resolved.study.model_dump(mode="json")
    print(protocol_markdown(study) or "\n".join(f"  {k}: {v}" for k, v in describe(study).items()))
    for spec in resolved.trials:
        print(f"  {spec.trial_id}  {spec.config['method']['name']:<10} {spec.label}")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from harness.study import StudyError, load_study

    args = parse_args(argv)
    try:
        resolved = load_study(args.study, args.profile, args.overrides)
    except StudyError as e:
        print(f"invalid study:\n{e}", file=sys.stderr)
        return EXIT_INVALID
    if args.dry_run:
        print_trials(resolved)
        return EXIT_OK

    from harness import orchestrate
    from harness.data._decode import DatasetError
    from harness.report import build_reports
    from harness.results import RunLock, RunLocked, atomic_write_bytes

    run_dir = Path(args.runs_dir) / resolved.name / resolved.profile
    run_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        with RunLock(run_dir):
            study_dump = resolved.study.model_dump(mode="json", exclude={"profiles"})
            atomic_write_bytes(run_dir / "study.yaml", yaml.safe_dump(study_dump, sort_keys=False).encode())
            print(f"study {resolved.name}, profile {resolved.profile}: {len(resolved.trials)} trials -> {run_dir}/")
            try:
                summary = orchestrate.run_study(resolved, run_dir, address=args.address,
                                                max_retries=args.max_retries, num_cpus=args.num_cpus,
                                                keep_checkpoints=args.keep_checkpoints, storage=args.storage,
                                                loggers=args.loggers)
            except KeyboardInterrupt:
                print("\ninterrupted: finished trials are kept; run the same command again to resume",
                      file=sys.stderr)
                return EXIT_INTERRUPTED
            except (ValueError, DatasetError) as e:  # a broken dataset, storage or resources the cluster lacks
                print(f"cannot run: {e}", file=sys.stderr)
                return EXIT_INVALID
            finally:
                orchestrate.shutdown()
            elapsed = time.perf_counter() - t0
            write_run_metadata(run_dir, args, summary, started, elapsed)
            out = build_reports(run_dir, Path(args.reports_dir) / resolved.name / resolved.profile)
    except RunLocked as e:
        print(f"cannot run: {e}", file=sys.stderr)
        return EXIT_INVALID
    print(f"{len(summary.finished)} trials trained, {summary.skipped} skipped (already finished), "
          f"{len(summary.failed)} failed, in {elapsed:.0f} s; driver peak memory {peak_rss_mb():.0f} MB")
    print(f"results: {run_dir}/results.parquet   reports: {out}/")
    print((out / "table.md").read_text())
    if summary.interrupted:
        print("interrupted: finished trials are kept; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILED if summary.failed else EXIT_OK


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports kilobytes)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_run_metadata(run_dir: Path, args: argparse.Namespace, summary, started: str, elapsed: float) -> None:
    """run.json: how this run went and on what (the report shows it beside the tables)."""
    import json
    import platform
    import socket

    from harness.results import atomic_write_bytes, versions

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    meta = {"started": started, "wall_time_s": elapsed, "driver_peak_rss_mb": peak_rss_mb(),
            "trained": len(summary.finished), "failed": len(summary.failed), "skipped": summary.skipped,
            "interrupted": summary.interrupted, "address": args.address or "local", "storage": args.storage,
            "cluster": summary.cluster, "driver_host": socket.gethostname(), "platform": platform.platform(),
            "cpu": cpu, "cpu_count": os.cpu_count(), **versions()}
    atomic_write_bytes(run_dir / "run.json", json.dumps(meta, indent=1, default=str).encode())


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())

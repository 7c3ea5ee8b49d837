"""Run a study: python -m harness.run studies/<study>.yaml [--profile NAME] [--set key=value ...]

Exit codes: 0 all trials finished; 2 invalid study, arguments, dataset or storage, or the same study and
profile (or the same --storage prefix) already running (nothing started); 3 finished with failed trials, or
finished but its report could not be written; 130 interrupted (run the same command again to resume).

Everything printed goes through harness.core.escape.printable: a label or error from a study file cannot send
escape codes to the terminal.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys


from harness.core.escape import printable

EXIT_OK, EXIT_INVALID, EXIT_FAILED, EXIT_INTERRUPTED = 0, 2, 3, 130


def say(*parts: object, file=None) -> None:
    """print, with control characters dropped (harness.core.escape.printable)."""
    print(printable(" ".join(str(p) for p in parts)), file=file or sys.stdout, flush=True)


def _bounded(kind: type, minimum: float, what: str, maximum: float = float("inf")):
    """An argparse type: a number of `kind` in [minimum, maximum] (argparse turns the error into exit 2)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (minimum <= value <= maximum) or not math.isfinite(value):
            upper = f" and <= {maximum:g}" if math.isfinite(maximum) else ""
            raise argparse.ArgumentTypeError(f"{text!r}: give {what} >= {minimum:g}{upper}")
        return value
    return parse


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
    p.add_argument("--max-retries", type=_bounded(int, 0, "a whole number"), default=1,
                   help="Tune retries of a trial whose worker died (>= 0)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished trial's last checkpoint (default: deleted once its result is stored)")
    p.add_argument("--num-cpus", type=_bounded(int, 1, "a whole number", 100_000), default=None,
                   help="CPUs of the local Ray (>= 1; default: all)")
    p.add_argument("--max-trials", type=_bounded(int, 1, "a whole number"), default=None,
                   help="refuse a grid of more trials than this before expanding it (default 10000)")
    p.add_argument("--connect-timeout", type=_bounded(float, 0.1, "a number of seconds", 86_400), default=60.0,
                   metavar="SECONDS", help="with --address: give up joining the cluster after this long (default 60)")
    p.add_argument("--log", dest="loggers", action="append", default=[], choices=["tensorboard", "mlflow", "wandb"],
                   help="also send each trial's epochs and config to a tracker (several allowed): TensorBoard files "
                        "in <run>/tensorboard, MLflow to $MLFLOW_TRACKING_URI (else <run>/mlruns), W&B offline "
                        "in <run>/wandb")
    p.add_argument("--storage", default=None, metavar="PATH|URI",
                   help="where Ray persists checkpoints: a local path, an NFS mount, s3://... or gs://... "
                        "(default: <runs-dir>/<study>/<profile>/ray; a cluster needs one every node can reach)")
    return p.parse_args(argv)


def print_trials(resolved) -> None:
    from harness.api import count_text
    from harness.report.protocol import describe, protocol_markdown

    say(f"study {resolved.name}, profile {resolved.profile}: {count_text(resolved)}")
    study = resolved.study.model_dump(mode="json")
    say(protocol_markdown(study) or "\n".join(f"  {k}: {v}" for k, v in describe(study).items()))
    if resolved.search is not None:
        for unit in resolved.search.units:
            knobs = ", ".join(f"{k}: {v}" for k, v in unit.knobs.items())
            budget = unit.budget.describe(resolved.search.device_kind)
            say(f"  search {unit.unit_id}  {unit.label}: {knobs}; budget {budget}")
        say("  final cells (their knobs chosen by the search; the identities below are the untuned settings'):")
    for spec in resolved.trials:
        say(f"  {spec.trial_id}  {spec.config['method']['name']:<10} {spec.label}")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from harness.study.config import MAX_TRIALS
    from harness.study.errors import StudyError
    from harness.study.load import load_study

    args = parse_args(argv)

    def announce(count: int) -> None:  # a large grid takes seconds to validate: say its size first
        if args.dry_run and count > 100:
            say(f"{count:,} trials in the grid (cells x seeds); validating each...")

    try:
        resolved = load_study(args.study, args.profile, args.overrides, max_trials=args.max_trials or MAX_TRIALS,
                              on_count=announce)
    except StudyError as e:
        say(f"invalid study:\n{e}", file=sys.stderr)
        return EXIT_INVALID
    if args.dry_run:
        print_trials(resolved)
        return EXIT_OK
    from harness.api import ReportWriteError, execute, peak_rss_mb, prepare_folders
    from harness.core.paths import UnsafePath

    try:  # a second guard behind the safe-name rule of the study loader
        run_dir, report_dir = prepare_folders(resolved, args.runs_dir, args.reports_dir)
    except (UnsafePath, OSError) as e:
        say(f"cannot run: {_reason(e)}", file=sys.stderr)
        return EXIT_INVALID

    from harness.data._decode import DatasetError
    from harness.results.store import RunLocked

    signal.signal(signal.SIGTERM, _raise_interrupt)
    options = {"address": args.address, "max_retries": args.max_retries, "num_cpus": args.num_cpus,
               "keep_checkpoints": args.keep_checkpoints, "storage": args.storage, "loggers": tuple(args.loggers),
               "log": say, "connect_timeout": args.connect_timeout}
    try:
        summary, out, elapsed = execute(resolved, run_dir, report_dir, options)
    except KeyboardInterrupt:
        say("\ninterrupted: finished trials are kept; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ReportWriteError as e:
        say(f"the results are stored in {run_dir}, but the report could not be written: "
            f"{_reason(e.cause, '--reports-dir')}\nrebuild it with python -m harness.report {run_dir}",
            file=sys.stderr)
        return EXIT_FAILED
    except (RunLocked, UnsafePath) as e:  # another driver; a .lock planted as a link
        say(f"cannot run: {e}", file=sys.stderr)
        return EXIT_INVALID
    except (ValueError, DatasetError, OSError) as e:  # a broken dataset or storage (OSError: ConnectionError too), an
        say(f"cannot run: {_reason(e)}", file=sys.stderr)  # unreachable cluster, resources it lacks, a full disk
        return EXIT_INVALID
    say(f"{len(summary.finished)} trials trained, {summary.skipped} skipped (already finished), "
        f"{len(summary.failed)} failed, in {elapsed:.0f} s; driver peak memory {peak_rss_mb():.0f} MB")
    say(f"results: {run_dir}/results.parquet   reports: {out}/")
    say((out / "table.md").read_text())
    if summary.interrupted:
        say("interrupted: finished trials are kept; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILED if summary.failed else EXIT_OK


def _reason(e: Exception, flag: str = "--runs-dir") -> str:
    """What went wrong, said with its path and the fix when it is a write that failed (harness.core.paths)."""
    from harness.core.paths import write_problem

    if isinstance(e, OSError) and e.errno is not None and e.filename and not isinstance(e, FileNotFoundError):
        return write_problem(e, flag)
    return str(e)


if __name__ == "__main__":
    sys.exit(main())

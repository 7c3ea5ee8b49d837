"""A regression gate for CI: compare a run of a study with a known-good baseline.

    python -m harness.gate RUN_DIR BASELINE [--abs-tol 0.05] [--k 3] [--loss-tol 0.1] [--max-slowdown 0.3]
                           [--junit FILE]
    python -m harness.gate RUN_DIR --write-baseline BASELINE

Exit 0 when no cell regressed, 1 when one did (each named), 2 on bad input (a missing run, a malformed
baseline: the reason is printed).

A cell is a grid point of the study (its trials over seeds). The baseline (JSON, committed under
baselines/) holds per cell the accuracy's mean, its spread over seeds, the seeds and test images it
came from, and its relative throughput. A cell regresses when
- its accuracy falls below the baseline mean by more than max(abs_tol, k x se), where se combines the
  spread over the baseline's seeds and the binomial error of one run on the test set,
  sqrt(std_seeds^2 + p (1 - p) / n_test): the noise of comparing one new run with the baseline;
- or its final training loss (`train/loss`, the last epoch's mean) rose above the baseline's by more
  than max(loss_tol x baseline, k x its spread over seeds): a method whose accuracy is still near chance
  in a short smoke run still shows a broken loss or gradient here;
- or its relative throughput (`train/images_per_s_rel`: the trial's images/s over a reference
  network timed in the same process, harness.reference) falls by more than `max_slowdown`, a
  fraction; a faster or slower machine moves both and leaves the ratio;
- or it is missing, or failed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from xml.sax.saxutils import escape

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.results import FINISHED, atomic_write_bytes
from harness.stats import unpack_correct

EXIT_OK, EXIT_REGRESSED, EXIT_INVALID = 0, 1, 2


class BaselineCell(BaseModel):
    model_config = ConfigDict(extra="forbid")
    accuracy: float = Field(..., ge=0.0, le=1.0, description="mean top-1 over the baseline's seeds")
    accuracy_std: float = Field(0.0, ge=0.0, description="its standard deviation over seeds (0 with one)")
    seeds: int = Field(..., ge=1)
    test_images: int = Field(..., ge=1)
    throughput_rel: float | None = Field(None, gt=0.0, description="train/images_per_s_rel, mean over seeds")
    train_loss: float | None = Field(None, description="train/loss of the last epoch, mean over seeds")
    train_loss_std: float = Field(0.0, ge=0.0, description="its standard deviation over seeds (0 with one)")
    images_per_s: float | None = Field(None, gt=0.0, description="raw images/s where it was written (information)")


class Baseline(BaseModel):
    model_config = ConfigDict(extra="forbid")
    study: str
    profile: str
    written: str = ""
    git_commit: str = ""
    machine: str = ""
    cells: dict[str, BaselineCell] = Field(..., min_length=1)


def cell_name(row: pd.Series, axes: list[str]) -> str:
    return ",".join(f"{a}={row[a]}" for a in axes) or "all"


def measure(run_dir: Path) -> tuple[dict, dict[str, dict]]:
    """The run's study (study.yaml) and, per cell, what a baseline records."""
    import yaml

    results_file, study_file = run_dir / "results.parquet", run_dir / "study.yaml"
    if not results_file.exists() or not study_file.exists():
        raise FileNotFoundError(f"{run_dir}: no results.parquet/study.yaml; run the study first "
                                "(python -m harness.run studies/<study>.yaml)")
    study = yaml.safe_load(study_file.read_text())
    results = pd.read_parquet(results_file)
    grids = [study.get("grid") or {}] + list((study.get("grids") or {}).values())
    axes = [a for a in dict.fromkeys(a for g in grids for a in g) if a in results.columns]
    cells: dict[str, dict] = {}
    for name, group in results.groupby(results.apply(lambda r: cell_name(r, axes), axis=1), sort=True):
        ok = group[group["status"] == FINISHED]
        cell = {"status": "finished" if len(ok) == len(group) else "failed", "seeds": len(ok)}
        if len(ok):
            acc = ok["test/acc"].astype(float)
            cell.update(accuracy=float(acc.mean()), accuracy_std=float(acc.std(ddof=1)) if len(ok) > 1 else 0.0,
                        test_images=int(len(unpack_correct(ok["test/correct"].iloc[0])))
                        if "test/correct" in ok and ok["test/correct"].notna().any() else 0)
            if "train/images_per_s_rel" in ok and ok["train/images_per_s_rel"].notna().any():
                cell["throughput_rel"] = float(ok["train/images_per_s_rel"].mean())
            cell["images_per_s"] = float(ok["train/images_per_s"].mean())
            if "train/loss" in ok and ok["train/loss"].notna().all():
                loss = ok["train/loss"].astype(float)
                cell.update(train_loss=float(loss.mean()), train_loss_std=float(loss.std(ddof=1)) if len(ok) > 1 else 0.0)
        cells[name] = cell
    return study, cells


def write_baseline(run_dir: Path, path: Path) -> Baseline:
    import platform

    from harness.results import git_commit

    study, cells = measure(run_dir)
    broken = [n for n, c in cells.items() if c["status"] != "finished" or not c.get("test_images")]
    if broken:
        raise ValueError(f"cells {broken} failed or have no per-image results: a baseline needs a clean run")
    baseline = Baseline(study=study["name"], profile=study["profile"], written=time.strftime("%Y-%m-%d %H:%M"),
                        git_commit=git_commit(), machine=f"{platform.machine()} {platform.processor()}".strip(),
                        cells={n: BaselineCell(**{k: v for k, v in c.items() if k != "status"})
                               for n, c in cells.items()})
    atomic_write_bytes(path, (baseline.model_dump_json(indent=1) + "\n").encode())
    return baseline


def load_baseline(path: Path) -> Baseline:
    if not path.exists():
        raise FileNotFoundError(f"baseline {path} not found; write one from a known-good run with "
                                f"python -m harness.gate RUN_DIR --write-baseline {path}")
    try:
        return Baseline.model_validate_json(path.read_text())
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ValueError(f"baseline {path} is malformed: {problems}") from None


def compare(baseline: Baseline, cells: dict[str, dict], abs_tol: float, k: float,
            max_slowdown: float, loss_tol: float = 0.1) -> list[dict]:
    """One verdict per baseline cell (and per cell the run has and the baseline does not: new, not judged)."""
    rows = []
    for name, base in baseline.cells.items():
        now = cells.get(name)
        row = {"cell": name, "acc_base": base.accuracy, "thr_base": base.throughput_rel, "problems": []}
        if now is None:
            row["problems"].append("missing from the run")
        elif now["status"] != "finished":
            row["problems"].append("failed")
        if now and now.get("accuracy") is not None:
            se = math.sqrt(base.accuracy_std ** 2 + base.accuracy * (1 - base.accuracy) / base.test_images)
            tol = max(abs_tol, k * se)
            row.update(acc_now=now["accuracy"], acc_diff=now["accuracy"] - base.accuracy, acc_tol=tol)
            if now["accuracy"] < base.accuracy - tol:
                row["problems"].append(f"accuracy {100 * now['accuracy']:.1f}% < baseline {100 * base.accuracy:.1f}% "
                                       f"- {100 * tol:.1f} points")
            if base.train_loss is not None and now.get("train_loss") is not None:
                allowed = max(loss_tol * abs(base.train_loss), k * base.train_loss_std)
                row.update(loss_base=base.train_loss, loss_now=now["train_loss"])
                if not now["train_loss"] <= base.train_loss + allowed:  # a NaN loss fails too
                    row["problems"].append(f"training loss {now['train_loss']:.3f} > baseline {base.train_loss:.3f} "
                                           f"+ {allowed:.3f}")
            if base.throughput_rel and now.get("throughput_rel"):
                ratio = now["throughput_rel"] / base.throughput_rel
                row.update(thr_now=now["throughput_rel"], thr_ratio=ratio)
                if ratio < 1 - max_slowdown:
                    row["problems"].append(f"relative throughput {ratio:.2f}x the baseline's "
                                           f"(allowed down to {1 - max_slowdown:.2f}x)")
        row["verdict"] = "REGRESSED" if row["problems"] else "ok"
        rows.append(row)
    for name in sorted(set(cells) - set(baseline.cells)):
        rows.append({"cell": name, "acc_now": cells[name].get("accuracy"), "problems": [], "verdict": "new"})
    return rows


def render(rows: list[dict]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    def num(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    table = pd.DataFrame([{
        "cell": r["cell"], "acc base %": pct(r.get("acc_base")), "acc now %": pct(r.get("acc_now")),
        "diff": num(r.get("acc_diff") and 100 * r["acc_diff"], "{:+.1f}"),
        "tolerance": num(r.get("acc_tol") and 100 * r["acc_tol"], "{:.1f}"),
        "loss base": num(r.get("loss_base")), "loss now": num(r.get("loss_now")),
        "thr base": num(r.get("thr_base")), "thr now": num(r.get("thr_now")), "ratio": num(r.get("thr_ratio"), "{:.2f}"),
        "verdict": r["verdict"]} for r in rows])
    return table.to_markdown(index=False)


def junit(rows: list[dict], suite: str) -> str:
    failures = sum(r["verdict"] == "REGRESSED" for r in rows)
    cases = []
    for r in rows:
        body = ""
        if r["verdict"] == "REGRESSED":
            message = escape("; ".join(r["problems"]), {'"': "&quot;"})
            body = f'<failure message="{message}">{escape(chr(10).join(r["problems"]))}</failure>'
        cases.append(f'  <testcase classname="{escape(suite)}" name="{escape(r["cell"])}">{body}</testcase>')
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<testsuite name="{escape(suite)}" tests="{len(rows)}" '
            f'failures="{failures}" errors="0">\n' + "\n".join(cases) + "\n</testsuite>\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="runs/<study>/<profile> of the run to judge (or to record)")
    parser.add_argument("baseline", nargs="?", help="the baseline JSON to compare with")
    parser.add_argument("--write-baseline", metavar="BASELINE", help="record this run as the baseline instead")
    parser.add_argument("--abs-tol", type=float, default=0.05, help="accuracy drop always allowed (fraction, 0.05)")
    parser.add_argument("--k", type=float, default=3.0, help="standard errors of accuracy allowed (3)")
    parser.add_argument("--loss-tol", type=float, default=0.1,
                        help="final training loss may rise by this fraction of the baseline's (0.1)")
    parser.add_argument("--max-slowdown", type=float, default=0.3,
                        help="relative throughput may fall by this fraction (0.3: down to 0.7x)")
    parser.add_argument("--junit", metavar="FILE", help="also write JUnit XML")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        if args.write_baseline:
            baseline = write_baseline(run_dir, Path(args.write_baseline))
            print(f"baseline of {len(baseline.cells)} cells written to {args.write_baseline}")
            return EXIT_OK
        if not args.baseline:
            parser.error("give a BASELINE to compare with, or --write-baseline BASELINE")
        baseline = load_baseline(Path(args.baseline))
        study, cells = measure(run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"gate: {e}", file=sys.stderr)
        return EXIT_INVALID
    if (study["name"], study["profile"]) != (baseline.study, baseline.profile):
        print(f"gate: the baseline is of {baseline.study}/{baseline.profile}, the run of {study['name']}/"
              f"{study['profile']}", file=sys.stderr)
        return EXIT_INVALID
    rows = compare(baseline, cells, args.abs_tol, args.k, args.max_slowdown, args.loss_tol)
    print(render(rows))
    if args.junit:
        atomic_write_bytes(Path(args.junit), junit(rows, f"{baseline.study}/{baseline.profile}").encode())
    regressed = [r["cell"] for r in rows if r["verdict"] == "REGRESSED"]
    if regressed:
        print(f"\nREGRESSED: {', '.join(regressed)}")
        for r in rows:
            if r["problems"]:
                print(f"  {r['cell']}: {'; '.join(r['problems'])}")
        return EXIT_REGRESSED
    print(f"\nno regression in {len(baseline.cells)} cells (accuracy within max({args.abs_tol}, {args.k} se), "
          f"training loss within max({args.loss_tol} x baseline, {args.k} sd), "
          f"relative throughput above {1 - args.max_slowdown:.2f}x)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

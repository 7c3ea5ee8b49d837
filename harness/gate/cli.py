"""A regression gate for CI: compare a run of a study with a known-good baseline of the same precision.

    python -m harness.gate RUN_DIR BASELINE [--k 4.5] [--chance-margin 0.1] [--keep-share 0.5] [--loss-tol 0.1]
                           [--max-slowdown 0.3] [--no-throughput] [--junit FILE]
    python -m harness.gate RUN_DIR --write-baseline BASELINE

BASELINE may hold `{precision}` (baselines/ci_smoke.{precision}.json): it is filled with the precision the run's
trials ran in (bf16 on a CPU with bf16 units, fp32 elsewhere; harness.engine.precision), so every run is compared with
a baseline of its own precision; a baseline of another precision is an error, never compared.

Exit 0 when no cell regressed; 1 when one did (each named, with the reason), and when every trial of the run
failed (their errors shown); 2 when the input cannot be judged (each reason printed, naming the cell): no run or
baseline, a baseline of another precision, study, test set or configuration, an accuracy outside [0, 1] or NaN, a
NaN loss, the same trial id twice, the same seed twice in a cell, a finished trial that does not say its precision,
a missing or zero throughput (unless --no-throughput), a cell of the baseline missing from the run, a new cell that
failed or has no finite accuracy, a missing column, a baseline with NaN, infinite or impossible values (a spread no
accuracies in [0, 1] can have), a non-finite or non-positive --k (or another setting out of range), or anything
else unexpected.

A cell is a grid point of the study (its trials over seeds). The baseline (JSON, committed under baselines/,
written from a clean run of at least 3 seeds) holds the study's resolved config hash (per cell too), the
precision, and per cell the accuracy's mean and spread over seeds, the test set's size and identity
(test/set_hash), the chance level, the last epoch's training loss and the relative throughput with their
spreads. A cell of the run (its mean over its n_run seeds) regresses when (harness.gate.rules.judge_cell)
- its accuracy falls below the baseline mean by more than k standard errors of the difference of two means,
  k x sd x sqrt(1/n_base + 1/n_run), where sd is the larger of the cell's spread over the baseline's seeds and
  the typical spread of the baseline's cells (3 seeds alone can agree by luck; harness.gate.rules.Pooled);
- or below max(chance + chance_margin, chance + keep_share x (baseline - chance)): a cell that lost its
  learning fails whatever the noise;
- or its final training loss (`train/loss`, the last epoch's mean) rose above the baseline's by more than
  max(loss_tol x its scale, k standard errors as above with the loss's spread);
- or its relative throughput (`train/images_per_s_rel`: the trial's images/s over a reference network timed
  in the same process, harness.engine.reference) fell below min(1 - max_slowdown, exp(-k standard errors of the
  log throughput)): a faster or slower machine moves both and leaves the ratio;
- or one of its trials failed.
tests/benchmarks/bench_gate.py simulates this rule with the committed baseline's noise: false alarms and
detection rates.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from xml.sax.saxutils import escape

import pandas as pd
from pydantic import ValidationError

from harness.gate.rules import (MIN_BASELINE_SEEDS, Baseline, CellRun, GateInputError, Rules, judge, pooled_noise)
from harness.core.atomic import atomic_write_bytes
from harness.results.store import FINISHED
from harness.core.records import unpack_correct

EXIT_OK, EXIT_REGRESSED, EXIT_INVALID = 0, 1, 2
MAX_BASELINE_BYTES = 1 << 20  # a baseline of hundreds of cells is a few hundred kB
REQUIRED = ("trial_id", "status", "seed", "config", "test/acc", "precision")


def cell_name(row: pd.Series, axes: list[str]) -> str:
    return ",".join(f"{a}={row[a]}" for a in axes) or "all"


def cell_config_hash(config_json: str, math_version) -> str:
    """What a cell computes: its trials' identity config (harness.study.trials: every non-default setting; not
    the seed, nor what is identity-neutral such as timeout_s) and the harness's math version."""
    import hashlib
    import json

    from harness.study.trials import identity_config

    identity = identity_config(json.loads(config_json))
    identity.pop("seed", None)
    blob = json.dumps({**identity, "math_version": str(math_version)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def study_config_hash(cell_hashes: dict[str, str]) -> str:
    import hashlib

    return hashlib.sha256(";".join(f"{n}={h}" for n, h in sorted(cell_hashes.items())).encode()).hexdigest()[:12]


def measure(run_dir: Path) -> tuple[dict, dict[str, CellRun], str, str]:
    """The run's study (study.yaml), what each cell shows (CellRun), the precision its trials ran in and their CPU
    ('model (torch capability)', empty when the rows do not say or disagree)."""
    from harness.study import reader as study_yaml

    results_file, study_file = run_dir / "results.parquet", run_dir / "study.yaml"
    if not results_file.exists() or not study_file.exists():
        raise GateInputError(f"{run_dir}: no results.parquet/study.yaml; run the study first "
                             "(python -m harness.run studies/<study>.yaml)")
    try:  # the study loader's bounds (size, depth, aliases, duplicate keys): a run folder is stored data
        study = study_yaml.load(study_yaml.read_text(study_file), str(study_file))[0]
    except study_yaml.StudyFileError as e:
        raise GateInputError(str(e)) from None
    if not isinstance(study, dict):
        raise GateInputError(f"{study_file}: not a study written by harness.run")
    results = pd.read_parquet(results_file)
    if "in_grid" in results:  # results.parquet also keeps finished trials of earlier grids: judge the current one
        results = results[results["in_grid"].fillna(False).astype(bool)]
    missing = [c for c in REQUIRED if c not in results.columns]
    if missing:
        raise GateInputError(f"{results_file}: no column {', '.join(missing)} (written by another harness version?)")
    if results.empty:
        raise GateInputError(f"{results_file}: no trials")
    twice = results["trial_id"][results["trial_id"].duplicated()].astype(str).unique().tolist()
    if twice:
        raise GateInputError(f"{results_file}: trial {', '.join(twice[:3])} has more than one row (a copied row would "
                             "count as another seed); the harness writes one row per trial")
    grids = [study.get("grid") or {}] + list((study.get("grids") or {}).values())
    axes = [a for a in dict.fromkeys(a for g in grids for a in g) if a in results.columns]
    finished = results[results["status"] == FINISHED]
    unsaid = finished["trial_id"][finished["precision"].isna() | (finished["precision"].astype(str).str.strip() == "")]
    if len(unsaid):
        raise GateInputError(f"{results_file}: finished trial {', '.join(unsaid.astype(str)[:3])} does not say its "
                             "precision (written by another harness version?); rerun the study")
    precisions = sorted(set(finished["precision"].dropna().astype(str)))
    if len(precisions) > 1:
        raise GateInputError(f"the run's trials ran in several precisions ({', '.join(precisions)}): rerun it in a "
                             "fresh --runs-dir, or with train.precision set")
    precision = precisions[0] if precisions else ""
    math_version = results["version/math"] if "version/math" in results else pd.Series("?", index=results.index)
    cells: dict[str, CellRun] = {}
    names = results.apply(lambda r: cell_name(r, axes), axis=1)
    for name, group in results.groupby(names, sort=True):
        ok = group[group["status"] == FINISHED]
        hashes = {cell_config_hash(c, v) for c, v in zip(group["config"], math_version[group.index])}
        if len(hashes) > 1:
            raise GateInputError(f"cell {name}: its trials differ in more than the seed (several configs)")
        errors = [str(e) for e in group.loc[group["status"] != FINISHED, "error"]] if "error" in group else []
        cell = CellRun(name=name, seeds=len(ok), failed=len(group) - len(ok), errors=errors[:3],
                       config_hash=hashes.pop(), seed_list=sorted(int(s) for s in ok["seed"]))
        if len(ok):
            cell.accuracies = _floats(ok["test/acc"])
            if "train/loss" in ok:
                cell.losses = _floats(ok["train/loss"])
            if "train/images_per_s_rel" in ok:
                cell.throughputs = _floats(ok["train/images_per_s_rel"])
            if "train/images_per_s" in ok and pd.notna(pd.to_numeric(ok["train/images_per_s"], errors="coerce")).all():
                cell.images_per_s = float(pd.to_numeric(ok["train/images_per_s"]).mean())
            if "num_classes" in ok and ok["num_classes"].notna().all():
                cell.chance = 1.0 / float(ok["num_classes"].iloc[0])  # a balanced test set: synthfg's, ...
            if "test/correct" in ok and ok["test/correct"].notna().all():
                cell.test_images = sorted({len(unpack_correct(c)) for c in ok["test/correct"]})
            if "test/set_hash" in ok and ok["test/set_hash"].notna().all():
                cell.test_set_hashes = sorted(set(ok["test/set_hash"].astype(str)))
        cells[name] = cell
    return study, cells, precision, _cpu_of(finished)


def _cpu_of(finished: pd.DataFrame) -> str:
    """'model (torch capability)' of the finished trials (empty when the rows do not say or disagree)."""
    if not {"cpu_model", "cpu_capability"} <= set(finished.columns):
        return ""
    ok = finished.dropna(subset=["cpu_model", "cpu_capability"])
    labels = {f"{m} ({c})" for m, c in zip(ok["cpu_model"], ok["cpu_capability"])}
    return labels.pop() if len(labels) == 1 else ""


def _floats(values: pd.Series) -> list[float]:
    """Numbers, with None and anything that is not one as NaN (which the rules refuse to judge)."""
    return [float(v) for v in pd.to_numeric(values, errors="coerce")]


def resolve_baseline_path(template: str, precision: str) -> Path:
    if "{precision}" not in template:
        return Path(template)
    if not precision:
        raise GateInputError("the run has no finished trial that says its precision; cannot choose the baseline "
                             f"{template}")
    return Path(template.replace("{precision}", precision))


def write_baseline(run_dir: Path, template: str, rules: Rules, no_throughput: bool = False) -> tuple[Path, Baseline]:
    import platform

    from harness.results.store import git_commit

    study, cells, precision, cpu_here = measure(run_dir)
    path = resolve_baseline_path(template, precision)
    problems = []
    for name, c in cells.items():
        problems += [f"{name}: {p}" for p in c.baseline_problems(rules, no_throughput)]
    if problems:
        raise GateInputError("not a clean run to record as a baseline:\n  " + "\n  ".join(problems))
    seeds = sorted({s for c in cells.values() for s in c.seed_list})
    cpu = ""
    try:
        from harness.engine.precision import cpu_info

        cpu = cpu_info()["cpu_model"]
    except Exception:  # noqa: BLE001 - information only
        pass
    from harness.engine.reference import MEASURE

    baseline = Baseline(
        throughput_measure=MEASURE, study=study["name"], profile=study["profile"],
        written=time.strftime("%Y-%m-%d %H:%M"), git_commit=git_commit(),
        machine=f"{platform.machine()} {cpu}".strip(), cpu=cpu_here, precision=precision, seeds=seeds,
        config_hash=study_config_hash({n: c.config_hash for n, c in cells.items()}),
        cells={n: c.to_baseline_cell() for n, c in cells.items()})
    atomic_write_bytes(path, (baseline.model_dump_json(indent=1) + "\n").encode())
    return path, baseline


def load_baseline(path: Path) -> Baseline:
    if not path.exists():
        raise GateInputError(f"baseline {path} not found; write one from a known-good run of at least "
                             f"{MIN_BASELINE_SEEDS} seeds with python -m harness.gate RUN_DIR --write-baseline {path}")
    if path.stat().st_size > MAX_BASELINE_BYTES or not path.is_file():
        raise GateInputError(f"baseline {path} is not a regular file of at most {MAX_BASELINE_BYTES} bytes")
    try:
        return Baseline.model_validate_json(path.read_bytes())
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise GateInputError(f"baseline {path} is malformed: {problems}") from None


def render(rows: list[dict]) -> str:
    def pct(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    def num(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    table = pd.DataFrame([{
        "cell": r["cell"], "acc base %": pct(r.get("acc_base")), "acc now %": pct(r.get("acc_now")),
        "diff": num(r.get("acc_diff") and 100 * r["acc_diff"], "{:+.1f}"),
        "allowed": num(r.get("acc_tol") and 100 * r["acc_tol"], "{:.1f}"), "floor %": pct(r.get("acc_floor")),
        "loss base": num(r.get("loss_base")), "loss now": num(r.get("loss_now")),
        "thr ratio": num(r.get("thr_ratio"), "{:.2f}"), "thr floor": num(r.get("thr_floor"), "{:.2f}"),
        "verdict": r["verdict"]} for r in rows])
    return table.to_markdown(index=False)


def junit(rows: list[dict], suite: str) -> str:
    failures = sum(r["verdict"] == "REGRESSED" for r in rows)
    errors = sum(r["verdict"] == "ERROR" for r in rows)
    cases = []
    for r in rows:
        body = ""
        if r["verdict"] in ("REGRESSED", "ERROR"):
            reasons = r["errors"] or r["problems"]
            tag = "error" if r["verdict"] == "ERROR" else "failure"
            message = escape("; ".join(reasons), {'"': "&quot;"})
            body = f'<{tag} message="{message}">{escape(chr(10).join(reasons))}</{tag}>'
        cases.append(f'  <testcase classname="{escape(suite)}" name="{escape(r["cell"])}">{body}</testcase>')
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<testsuite name="{escape(suite)}" tests="{len(rows)}" '
            f'failures="{failures}" errors="{errors}">\n' + "\n".join(cases) + "\n</testsuite>\n")


def _gate(args, parser) -> int:
    rules = Rules(k=args.k, chance_margin=args.chance_margin, keep_share=args.keep_share, loss_tol=args.loss_tol,
                  max_slowdown=args.max_slowdown, throughput=not args.no_throughput)  # GateInputError: exit 2
    run_dir = Path(args.run_dir)
    if args.write_baseline:
        path, baseline = write_baseline(run_dir, args.write_baseline, rules, args.no_throughput)
        print(f"baseline of {len(baseline.cells)} cells ({len(baseline.seeds)} seeds, {baseline.precision}) "
              f"written to {path}")
        return EXIT_OK
    if not args.baseline:
        parser.error("give a BASELINE to compare with, or --write-baseline BASELINE")
    study, cells, precision, cpu_here = measure(run_dir)
    if not any(c.seeds for c in cells.values()):  # the clearest regression there is, whatever the baseline says
        print(f"REGRESSED: every trial of the run failed ({sum(c.failed for c in cells.values())} trials)")
        for c in cells.values():
            print(f"  {c.name}: failed: " + ("; ".join(e[:300] for e in c.errors[:2]) or "no error recorded"))
        if args.junit:
            rows = [{"cell": c.name, "verdict": "REGRESSED", "errors": [],
                     "problems": [f"failed: {'; '.join(c.errors)}"]}
                    for c in cells.values()]
            atomic_write_bytes(Path(args.junit), junit(rows, f"{study.get('name')}/{study.get('profile')}").encode())
        return EXIT_REGRESSED
    path = resolve_baseline_path(args.baseline, precision)
    baseline = load_baseline(path)
    if (study["name"], study["profile"]) != (baseline.study, baseline.profile):
        raise GateInputError(f"the baseline is of {baseline.study}/{baseline.profile}, the run of {study['name']}/"
                             f"{study['profile']}")
    if precision and precision != baseline.precision:
        raise GateInputError(f"the run trained in {precision}, the baseline {path} in {baseline.precision}: "
                             f"compare with a baseline of {precision} (e.g. baselines/<study>.{precision}.json, "
                             "python -m harness.gate RUN_DIR --write-baseline 'baselines/<study>.{precision}.json')")
    from harness.engine.reference import MEASURE

    if rules.throughput and baseline.throughput_measure != MEASURE:
        rules = dataclasses.replace(rules, max_slowdown=max(rules.max_slowdown, rules.other_cpu_slowdown))
        print(f"gate: the baseline {path} holds relative throughput measured as {baseline.throughput_measure!r}, the "
              f"run as {MEASURE!r}: judged only against {1 - rules.max_slowdown:.2f}x (the two differ in scale); "
              f"record the baseline again (make smoke-baseline) to judge it strictly", file=sys.stderr)
    elif rules.throughput and baseline.cpu and cpu_here and cpu_here != baseline.cpu:
        rules = dataclasses.replace(rules, max_slowdown=max(rules.max_slowdown, rules.other_cpu_slowdown))
        print(f"gate: the run's trials ran on {cpu_here}, the baseline's on {baseline.cpu}: relative throughput is "
              f"judged only against {1 - rules.max_slowdown:.2f}x there (ops speed up unevenly across CPUs); "
              "record a baseline on this CPU to judge it strictly", file=sys.stderr)
    rows = judge(baseline, cells, rules, pooled_noise(baseline))
    print(render(rows))
    if args.junit:
        atomic_write_bytes(Path(args.junit), junit(rows, f"{baseline.study}/{baseline.profile}").encode())
    errors = [r for r in rows if r["errors"]]
    regressed = [r for r in rows if r["verdict"] == "REGRESSED"]
    for r in errors:
        print(f"gate: {r['cell']}: {'; '.join(r['errors'])}", file=sys.stderr)
    if errors:
        print(f"\nCANNOT JUDGE: {', '.join(r['cell'] for r in errors)} (exit 2)", file=sys.stderr)
        return EXIT_INVALID
    if regressed:
        print(f"\nREGRESSED: {', '.join(r['cell'] for r in regressed)}")
        for r in regressed:
            print(f"  {r['cell']}: {'; '.join(r['problems'])}")
        return EXIT_REGRESSED
    print(f"\nno regression in {len(baseline.cells)} cells against {path} ({baseline.precision}, "
          f"{len(baseline.seeds)} seeds): accuracy within {args.k} se and above max(chance + {args.chance_margin}, "
          f"chance + {args.keep_share} x the baseline's gain), training loss within max({args.loss_tol} x baseline, "
          f"{args.k} se)" + ("" if args.no_throughput else
                             f", relative throughput above min({1 - rules.max_slowdown:.2f}x, {args.k} se)"))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="runs/<study>/<profile> of the run to judge (or to record)")
    parser.add_argument("baseline", nargs="?", help="the baseline JSON to compare with ({precision} is filled in)")
    parser.add_argument("--write-baseline", metavar="BASELINE", help="record this run (>= 3 seeds) as the baseline")
    defaults = Rules()
    parser.add_argument("--k", type=float, default=defaults.k, help=f"standard errors allowed ({defaults.k})")
    parser.add_argument("--chance-margin", type=float, default=defaults.chance_margin,
                        help=f"accuracy must stay this far above chance ({defaults.chance_margin})")
    parser.add_argument("--keep-share", type=float, default=defaults.keep_share,
                        help=f"and keep this share of the baseline's accuracy above chance ({defaults.keep_share})")
    parser.add_argument("--loss-tol", type=float, default=defaults.loss_tol,
                        help=f"final training loss may always rise by this fraction of the baseline's "
                             f"({defaults.loss_tol})")
    parser.add_argument("--max-slowdown", type=float, default=defaults.max_slowdown,
                        help=f"relative throughput may always fall by this fraction ({defaults.max_slowdown}: down "
                             f"to {1 - defaults.max_slowdown:.1f}x)")
    parser.add_argument("--no-throughput", action="store_true",
                        help="do not judge throughput (a run without train.reference_workload)")
    parser.add_argument("--junit", metavar="FILE", help="also write JUnit XML")
    args = parser.parse_args(argv)
    try:
        return _gate(args, parser)
    except (GateInputError, FileNotFoundError, ValueError) as e:
        print(f"gate: {e}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - any input the gate cannot read is exit 2 with its reason, not exit 1
        print(f"gate: unexpected input ({type(e).__name__}: {e}); cannot judge", file=sys.stderr)
    return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())

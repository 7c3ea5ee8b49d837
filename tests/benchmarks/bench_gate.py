"""How often the CI gate cries wolf, and how often it catches a real regression: a simulation through the gate's own
decision function (harness.gate_rules.judge) with the noise the committed baseline records.

    python -m tests.benchmarks.bench_gate [--baseline baselines/ci_smoke.fp32.json ...] [--worlds 10000]
                                          [--run-seeds 1] [--noise-scale 1.0] [--k K] [--seed 0]

Each simulated world draws, from every cell's recorded mean and the gate's own per-cell sd (the largest of the
cell's spread over seeds, that spread pooled over the cells, and the binomial error of its test images; the same
for the training loss and, on the log scale, the relative throughput), a fresh baseline of as many seeds as the
committed one (its means and spreads re-estimated from those draws, as --write-baseline does: the baseline is itself
a noisy draw) and a run of --run-seeds seeds (the smoke study's default: 1), and asks the gate for its verdict:
- false alarms: an unchanged system, any cell flagged (per run: what CI sees);
- detection: one cell 5 or 10 accuracy points lower, or 1.5x or 2x slower (its relative throughput / 1.5, / 2),
  that cell flagged; shown as the mean over the cells and the worst cell.
Targets (issue 18): false alarms <= 1% per run, a 10-point drop caught >= 95%, a 2x slowdown caught >= 99%.
--noise-scale 1.5 asks the same with 1.5x the recorded noise (what if the 3 seeds understated it);
--fixed-baseline judges against the committed baseline as recorded (only the run is drawn).
Not a pytest benchmark: it measures the gate's statistics, not time (`make bench` leaves it alone).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from harness.gate_rules import (Baseline, BaselineCell, CellRun, Rules, accuracy_sd, judge, loss_sd, pooled_noise,
                                throughput_log_sd)

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {"false alarms": 0.01, "10-point drop": 0.95, "2x slowdown": 0.99}


def _noise(base: Baseline) -> dict[str, tuple[float, float, float]]:
    """Per cell: the sd of one seed's accuracy, training loss and log relative throughput (the gate's own)."""
    pooled = pooled_noise(base)
    return {name: (accuracy_sd(c, pooled), loss_sd(c, pooled), throughput_log_sd(c, pooled))
            for name, c in base.cells.items()}


def _check_of(problem: str) -> str:
    """Which of the gate's checks a problem message comes from."""
    if problem.startswith("accuracy"):
        return "accuracy floor" if "floor" in problem else "accuracy"
    return {"training": "loss", "relative": "throughput"}.get(problem.split()[0], problem.split()[0])


def _draw_baseline(base: Baseline, noise: dict, rng: np.random.Generator, scale: float) -> Baseline:
    n = len(base.seeds)
    cells = {}
    for name, c in base.cells.items():
        acc_sd, loss_sd, thr_sd = (scale * v for v in noise[name])
        acc = np.clip(rng.normal(c.accuracy, acc_sd, n), 0, 1)
        loss = rng.normal(c.train_loss, loss_sd, n)
        log_thr = rng.normal(math.log(c.throughput_rel), thr_sd, n) if c.throughput_rel else None
        cells[name] = BaselineCell.model_construct(
            **{**c.__dict__, "accuracy": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)),
               "train_loss": float(loss.mean()), "train_loss_std": float(loss.std(ddof=1)),
               **({"throughput_rel": float(math.exp(log_thr.mean())), "throughput_log_std": float(log_thr.std(ddof=1))}
                  if log_thr is not None else {})})
    return Baseline.model_construct(**{**base.__dict__, "cells": cells})


def _draw_run(base: Baseline, noise: dict, rng: np.random.Generator, scale: float, seeds: int,
              drop: dict[str, float], slowdown: dict[str, float]) -> dict[str, CellRun]:
    cells = {}
    for name, c in base.cells.items():
        acc_sd, loss_sd, thr_sd = (scale * v for v in noise[name])
        acc = np.clip(rng.normal(c.accuracy - drop.get(name, 0.0), acc_sd, seeds), 0, 1)
        loss = rng.normal(c.train_loss, loss_sd, seeds)
        thr = np.exp(rng.normal(math.log(c.throughput_rel), thr_sd, seeds)) / slowdown.get(name, 1.0) \
            if c.throughput_rel else np.full(seeds, np.nan)
        cells[name] = CellRun(name=name, seeds=seeds, config_hash=c.config_hash, accuracies=acc.tolist(),
                              losses=loss.tolist(), throughputs=thr.tolist(), chance=c.chance,
                              test_images=[c.test_images], test_set_hashes=[c.test_set_hash])
    return cells


def simulate(base: Baseline, worlds: int, rules: Rules, run_seeds: int = 1, scale: float = 1.0,
             seed: int = 0, redraw_baseline: bool = True) -> dict:
    """{scenario: (rate averaged over the cells, worst cell's rate)}; false alarms: (rate per run, per cell), and
    "false alarms by check": {check: alarms per run}."""
    rng = np.random.default_rng(seed)
    noise = _noise(base)

    def baseline() -> Baseline:
        return _draw_baseline(base, noise, rng, scale) if redraw_baseline else base

    names = list(base.cells)
    scenarios = {"false alarms": ({}, {}), "5-point drop": (0.05, None), "10-point drop": (0.10, None),
                 "1.5x slowdown": (None, 1.5), "2x slowdown": (None, 2.0)}
    out = {}
    for scenario, (drop, slow) in scenarios.items():
        if scenario == "false alarms":
            alarms = cell_alarms = 0
            kinds: dict[str, int] = {}
            for _ in range(worlds):
                rows = judge(baseline(), _draw_run(base, noise, rng, scale, run_seeds, {}, {}), rules)
                flagged = sum(r["verdict"] != "ok" for r in rows)
                alarms += flagged > 0
                cell_alarms += flagged
                for r in rows:
                    for problem in r["problems"] + r["errors"]:
                        kind = _check_of(problem)
                        kinds[kind] = kinds.get(kind, 0) + 1
            out[scenario] = (alarms / worlds, cell_alarms / (worlds * len(names)))
            out["false alarms by check"] = {k: v / worlds for k, v in sorted(kinds.items())}
            continue
        caught = dict.fromkeys(names, 0)
        per_cell = max(1, worlds // len(names))
        for name in names:
            for _ in range(per_cell):
                run = _draw_run(base, noise, rng, scale, run_seeds, {name: drop} if drop else {},
                                {name: slow} if slow else {})
                rows = judge(baseline(), run, rules)
                caught[name] += any(r["cell"] == name and r["verdict"] != "ok" for r in rows)
        rates = [caught[n] / per_cell for n in names]
        out[scenario] = (float(np.mean(rates)), float(min(rates)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", nargs="+", default=sorted(str(p.relative_to(ROOT))
                                                                for p in (ROOT / "baselines").glob("ci_smoke.*.json")))
    parser.add_argument("--worlds", type=int, default=10000, help="simulated runs per scenario (10000)")
    parser.add_argument("--run-seeds", type=int, default=1, help="seeds of the judged run (the smoke default: 1)")
    parser.add_argument("--noise-scale", type=float, default=1.0, help="x the recorded noise (1.0)")
    parser.add_argument("--fixed-baseline", action="store_true",
                        help="judge against the committed baseline itself, not a fresh draw of it (the noise of one "
                             "run only, given this baseline)")
    parser.add_argument("--k", type=float, default=Rules().k, help=f"the gate's --k ({Rules().k})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rules = Rules(k=args.k)
    ok = True
    for path in args.baseline:
        base = Baseline.model_validate_json((ROOT / path if not Path(path).is_absolute() else Path(path)).read_text())
        noise = _noise(base)
        print(f"\n{path}: {base.precision}, {len(base.cells)} cells, {len(base.seeds)} seeds; the gate's rules "
              f"{rules}; run of {args.run_seeds} seed(s); {args.worlds} worlds; noise x {args.noise_scale}; "
              + ("the committed baseline itself" if args.fixed_baseline else "the baseline redrawn in every world"))
        for name, (a, l, t) in noise.items():
            c = base.cells[name]
            print(f"  {name:30s} acc {100 * c.accuracy:5.1f}% sd {100 * a:4.2f} pts on {c.test_images} images | "
                  f"loss {c.train_loss:.3f} sd {l:.3f} | throughput {c.throughput_rel or float('nan'):.3f} "
                  f"log-sd {t:.3f}")
        results = simulate(base, args.worlds, rules, args.run_seeds, args.noise_scale, args.seed,
                           redraw_baseline=not args.fixed_baseline)
        by_check = results.pop("false alarms by check")
        for scenario, (mean, other) in results.items():
            label = "per run, per cell" if scenario == "false alarms" else "mean over cells, worst cell"
            target = TARGETS.get(scenario)
            verdict = ""
            if target is not None:
                met = mean <= target if scenario == "false alarms" else other >= target
                ok &= met
                verdict = f"  target {'<=' if scenario == 'false alarms' else '>='} {target:.0%}: " + \
                          ("met" if met else "NOT MET")
            print(f"  {scenario:15s} {100 * mean:6.2f}% / {100 * other:6.2f}%  ({label}){verdict}")
            if scenario == "false alarms" and by_check:
                print("    by check (per run): " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in by_check.items()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

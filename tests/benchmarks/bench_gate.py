"""How often the CI gate cries wolf, and how often it catches a real regression: a simulation through the gate's own
decision function (harness.gate.rules.judge), with the noise measured on repeated smoke runs, idle and loaded.

    python -m tests.benchmarks.bench_gate [--baseline baselines/ci_smoke.fp32.json ...] [--worlds 10000]
                                          [--run-seeds 1] [--k K] [--seed 0] [--self-noise]

The noise comes from measurements, not from the gate's own assumptions: `baselines/ci_smoke.<precision>.noise.json`
holds repeated `make smoke` runs (tests/benchmarks/gate_noise.py), idle and with two CPU-bound processes beside them,
each cell's accuracy, training loss and relative throughput. Per condition, each simulated run draws every cell's
- relative throughput from the measured runs: log(run / baseline) ~ normal with the cell's measured mean offset and the
  measured run-to-run spread of that condition (pooled over the cells; with one run, the spread of the offsets
  across the cells);
- accuracy and training loss from the spread the baseline measured over its seeds (a one-seed run is one seed's draw;
  a rerun of the same seed on one machine is bit-identical, so the seeds are where a run's accuracy varies),
and the committed baseline judges it (`--self-noise`: the previous simulation, each world redrawing the baseline too
from the gate's own per-cell sd: it can only show that the rule agrees with itself). Scenarios:
- false alarms: an unchanged system, any cell flagged (per run: what CI sees);
- detection: one cell 5 or 10 accuracy points lower, or 1.5x or 2x slower (its relative throughput / 1.5, / 2),
  that cell flagged; shown as the mean over the cells and the worst cell.
Targets (issue 25): false alarms <= 1% per run on the loaded runner, a 10-point drop caught >= 95%, a 2x slowdown
caught >= 95%.
Not a pytest benchmark: it measures the gate's statistics, not time (`make bench` leaves it alone).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from harness.gate.rules import (Baseline, BaselineCell, CellRun, Rules, accuracy_sd, judge, loss_sd, pooled_noise,
                                throughput_log_sd)

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {"false alarms": 0.01, "10-point drop": 0.95, "2x slowdown": 0.95}


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


def measured_noise(base: Baseline, noise_file: Path) -> dict[str, dict]:
    """{condition: {"offset": {cell: mean log(run / baseline throughput)}, "sd": run-to-run log sd, "runs": n}} from the
    measured runs of the baseline's precision (tests/benchmarks/gate_noise.py)."""
    data = json.loads(noise_file.read_text())
    out = {}
    for condition in sorted({r["condition"] for r in data["runs"]}):
        runs = [r for r in data["runs"] if r["condition"] == condition and r.get("slowdown", 1) == 1]
        logs = {name: [math.log(r["cells"][name]["throughput_rel"] / c.throughput_rel) for r in runs
                       if (r["cells"].get(name) or {}).get("throughput_rel")]
                for name, c in base.cells.items() if c.throughput_rel}
        offset = {name: float(np.mean(v)) for name, v in logs.items() if v}
        within = [(v, offset[name]) for name, v in logs.items() if len(v) > 1]
        df = sum(len(v) - 1 for v, _ in within)
        sd = math.sqrt(sum((x - m) ** 2 for v, m in within for x in v) / df) if df else \
            float(np.std(list(offset.values()), ddof=1))
        out[condition] = {"offset": offset, "sd": sd, "runs": len(runs),
                          "cpus": sorted({r["cpu"] for r in runs}), "hogs": sorted({r["hogs"] for r in runs}),
                          "gate_exits": [r["gate_exit"] for r in runs]}
    return out


def simulate_measured(base: Baseline, condition: dict, worlds: int, rules: Rules, run_seeds: int = 1,
                      seed: int = 0) -> dict:
    """simulate() with a condition's measured throughput noise and the baseline's measured seed spread (see the module
    docstring); the committed baseline judges every run."""
    rng = np.random.default_rng(seed)
    pooled = pooled_noise(base)
    acc_sd = {n: max(c.accuracy_std, pooled.accuracy_sd) for n, c in base.cells.items()}
    loss_spread = {n: max(c.train_loss_std, pooled.loss_cv * abs(c.train_loss)) for n, c in base.cells.items()}

    def draw(drop: dict, slowdown: dict) -> dict[str, CellRun]:
        cells = {}
        for name, c in base.cells.items():
            acc = np.clip(rng.normal(c.accuracy - drop.get(name, 0.0), acc_sd[name], run_seeds), 0, 1)
            loss = rng.normal(c.train_loss, loss_spread[name], run_seeds)
            log_thr = rng.normal(math.log(c.throughput_rel) + condition["offset"].get(name, 0.0), condition["sd"],
                                 run_seeds) if c.throughput_rel else np.full(run_seeds, np.nan)
            cells[name] = CellRun(name=name, seeds=run_seeds, config_hash=c.config_hash,
                                  seed_list=list(range(run_seeds)),
                                  accuracies=(np.round(acc * c.test_images) / c.test_images).tolist(),
                                  losses=loss.tolist(),
                                  throughputs=(np.exp(log_thr) / slowdown.get(name, 1.0)).tolist(),
                                  chance=c.chance, test_images=[c.test_images], test_set_hashes=[c.test_set_hash])
        return cells

    return _rates(base, worlds, rules, draw)


def _rates(base: Baseline, worlds: int, rules: Rules, draw) -> dict:
    names = list(base.cells)
    out = {}
    alarms = 0
    kinds: dict[str, int] = {}
    for _ in range(worlds):
        rows = judge(base, draw({}, {}), rules)
        alarms += any(r["verdict"] != "ok" for r in rows)
        for r in rows:
            for problem in r["problems"] + r["errors"]:
                kinds[_check_of(problem)] = kinds.get(_check_of(problem), 0) + 1
    out["false alarms"] = (alarms / worlds, alarms / worlds)
    out["false alarms by check"] = {k: v / worlds for k, v in sorted(kinds.items())}
    per_cell = max(1, worlds // len(names))
    for scenario, drop, slow in [("5-point drop", 0.05, None), ("10-point drop", 0.10, None),
                                 ("1.5x slowdown", None, 1.5), ("2x slowdown", None, 2.0)]:
        rates = []
        for name in names:
            caught = 0
            for _ in range(per_cell):
                rows = judge(base, draw({name: drop} if drop else {}, {name: slow} if slow else {}), rules)
                caught += any(r["cell"] == name and r["verdict"] != "ok" for r in rows)
            rates.append(caught / per_cell)
        out[scenario] = (float(np.mean(rates)), float(min(rates)))
    return out


def _print(results: dict, ok: bool, loaded: bool = True) -> bool:
    by_check = results.pop("false alarms by check")
    for scenario, (mean, other) in results.items():
        label = "per run" if scenario == "false alarms" else "mean over cells, worst cell"
        target = TARGETS.get(scenario)
        verdict = ""
        if target is not None and (loaded or scenario != "false alarms"):
            met = mean <= target if scenario == "false alarms" else other >= target
            ok &= met
            verdict = f"  target {'<=' if scenario == 'false alarms' else '>='} {target:.0%}: " + \
                      ("met" if met else "NOT MET")
        shown = f"{100 * mean:6.2f}%" if scenario == "false alarms" else f"{100 * mean:6.2f}% / {100 * other:6.2f}%"
        print(f"  {scenario:15s} {shown}  ({label}){verdict}")
        if scenario == "false alarms" and by_check:
            print("    by check (per run): " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in by_check.items()))
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", nargs="+", default=sorted(str(p.relative_to(ROOT)) for p in
                                                                (ROOT / "baselines").glob("ci_smoke.*.json")
                                                                if not p.name.endswith(".noise.json")))
    parser.add_argument("--worlds", type=int, default=10000, help="simulated runs per scenario (10000)")
    parser.add_argument("--run-seeds", type=int, default=1, help="seeds of the judged run (the smoke default: 1)")
    parser.add_argument("--self-noise", action="store_true",
                        help="the previous simulation: noise from the gate's own recorded spreads, baseline redrawn")
    parser.add_argument("--noise-scale", type=float, default=1.0, help="--self-noise: x the recorded noise (1.0)")
    parser.add_argument("--k", type=float, default=Rules().k, help=f"the gate's --k ({Rules().k})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rules = Rules(k=args.k)
    ok = True
    for path in args.baseline:
        file = ROOT / path if not Path(path).is_absolute() else Path(path)
        base = Baseline.model_validate_json(file.read_text())
        noise_file = file.with_name(file.name.removesuffix(".json") + ".noise.json")
        print(f"\n{path}: {base.precision}, {len(base.cells)} cells, {len(base.seeds)} seeds, throughput measured as "
              f"{base.throughput_measure!r} on {base.cpu or '?'}; k {rules.k}; runs of {args.run_seeds} seed(s); "
              f"{args.worlds} worlds")
        if args.self_noise or not noise_file.exists():
            if not args.self_noise:
                print(f"  no measured noise ({noise_file.name}: python -m tests.benchmarks.gate_noise): the gate's own "
                      "recorded spreads instead, which only shows the rule agrees with itself")
            ok = _print(simulate(base, args.worlds, rules, args.run_seeds, args.noise_scale, args.seed), ok)
            continue
        for condition, noise in measured_noise(base, noise_file).items():
            offsets = sorted(noise["offset"].values())
            print(f" {condition} ({noise['runs']} measured runs, hogs {noise['hogs']}, on {', '.join(noise['cpus'])}; "
                  f"their gate exits {noise['gate_exits']}): throughput log offset "
                  f"{offsets[0]:+.3f}..{offsets[-1]:+.3f}"
                  f" per cell, run-to-run log sd {noise['sd']:.3f}")
            ok = _print(simulate_measured(base, noise, args.worlds, rules, args.run_seeds, args.seed), ok,
                        loaded=condition == "loaded")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Measured noise for the gate's simulation: the smoke study run again and again, idle and beside busy processes, each
run gated against the committed baseline, and what each cell showed stored in baselines/.

    python -m tests.benchmarks.gate_noise --condition idle --runs 3
    python -m tests.benchmarks.gate_noise --condition loaded --runs 3 [--hogs 2]
    python -m tests.benchmarks.gate_noise --condition loaded --runs 1 --slowdown 2   # a 2x slower training step

Each run is `make smoke`'s: `python -m harness.run studies/ci_smoke.yaml` in a fresh temporary folder, then
`python -m harness.gate` against `baselines/ci_smoke.{precision}.json`; with `--condition loaded`, `--hogs` CPU-bound
processes (`while True: pass`, at this process's priority) run beside it from start to end. `--slowdown F` makes every
training step F times slower (tests/benchmarks/_slowdown/sitecustomize.py on the run's PYTHONPATH sleeps (F - 1) x
each training batch's time in every process; the harness's code is untouched) to check that the gate catches it.
The runs are appended to
`baselines/ci_smoke.<precision>.noise.json` (not with --slowdown): per run its condition, machine, load, wall time, the
gate's exit code, and per cell the accuracy, the training loss and the relative throughput.
`python -m tests.benchmarks.bench_gate` simulates the gate from these measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def one_run(hogs: int, slowdown: float, keep: Path | None) -> dict:
    from harness.gate.cli import measure
    from harness.engine.precision import cpu_info

    work = Path(tempfile.mkdtemp(prefix="gate_noise_", dir=keep))
    env = dict(os.environ)
    if slowdown != 1:  # tests/benchmarks/_slowdown/sitecustomize.py, in every process of the run
        env["FGVC_TEST_SLOWDOWN"] = str(slowdown)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent / "_slowdown"),
                                                          env.get("PYTHONPATH")]))
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        run = subprocess.run([sys.executable, "-m", "harness.run", "studies/ci_smoke.yaml", "--runs-dir",
                              str(work / "runs"), "--reports-dir", str(work / "reports")], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        wall = time.perf_counter() - t0
        run_dir = work / "runs" / "ci_smoke" / "default"
        gate = subprocess.run([sys.executable, "-m", "harness.gate", str(run_dir),
                               "baselines/ci_smoke.{precision}.json"], cwd=ROOT, capture_output=True, text=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    _, cells, precision, cpu = measure(run_dir)
    info = cpu_info()
    return {"when": time.strftime("%Y-%m-%d %H:%M"), "hogs": hogs, "slowdown": slowdown, "precision": precision,
            "cpu": cpu or f"{info['cpu_model']} ({info['cpu_capability']})", "load_before": round(load_before, 2),
            "run_exit": run.returncode, "wall_s": round(wall, 1), "gate_exit": gate.returncode,
            "gate_tail": gate.stdout.strip().splitlines()[-1:] + gate.stderr.strip().splitlines()[-2:],
            "cells": {name: {"accuracy": c.accuracies[0] if c.accuracies else None,
                             "train_loss": c.losses[0] if c.losses else None,
                             "throughput_rel": c.throughputs[0] if c.throughputs else None}
                      for name, c in cells.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.gate_noise", description=__doc__.split("\n\n")[0])
    p.add_argument("--condition", choices=["idle", "loaded"], required=True)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--hogs", type=int, default=2, help="busy processes beside a loaded run (2: both cores of a runner)")
    p.add_argument("--slowdown", type=float, default=1.0, help="make every training step this much slower (a check)")
    p.add_argument("--keep", type=Path, default=None, help="leave the runs in this folder")
    args = p.parse_args(argv)
    hogs = args.hogs if args.condition == "loaded" else 0
    for i in range(args.runs):
        record = {"condition": args.condition, **one_run(hogs, args.slowdown, args.keep)}
        ratios = ", ".join(f"{n.split(',')[0].removeprefix('method=')} {c['throughput_rel']:.2f}"
                           for n, c in record["cells"].items() if c["throughput_rel"])
        print(f"run {i + 1}/{args.runs} {args.condition} (hogs {hogs}, slowdown {args.slowdown:g}): wall "
              f"{record['wall_s']} s, gate exit {record['gate_exit']}; relative throughput {ratios}", flush=True)
        print("  " + " | ".join(record["gate_tail"]), flush=True)
        if args.slowdown == 1 and record["run_exit"] == 0:
            path = ROOT / "baselines" / f"ci_smoke.{record['precision']}.noise.json"
            data = json.loads(path.read_text()) if path.exists() else {"study": "ci_smoke", "runs": []}
            data["runs"].append(record)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which throughput measure survives a busy machine: the smoke study's trials trained in this process, idle and beside
CPU-bound processes, each judged by three measures at once.

    python -m tests.benchmarks.bench_throughput_measure [--reps 3] [--hogs 2] [--methods baseline pmg]

The measures (issue 25):
- interleaved: `train/images_per_s_rel`, the median over ~12 windows of training images/s over a reference step timed
  between the window's batches (harness.engine.reference.ReferenceProbe; what the gate judges);
- before/after: training images/s over the reference network timed before and after the training (the measure up to
  issue 25, computed here beside the other with harness.engine.reference.reference_throughput);
- CPU per image: `train/cpu_s_per_image`, this process's CPU seconds per training image (blind to a sleep).
Conditions: idle; `--hogs` busy loops (`while True: pass`, at this process's priority) for the whole trial; and the
same hogs switched on and off every few seconds (a load that comes and goes: a CI neighbour's build, an editor).
For each measure it prints, per condition, the geometric mean over the trials relative to the idle one, and the
sd of its log over repeated trials of the same method (what the gate's tolerance must cover), pooled over methods.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _config(method: str) -> dict:
    from harness.study.load import load_study

    resolved = load_study(ROOT / "studies" / "ci_smoke.yaml")
    spec = next(t for t in resolved.trials if t.config["method"]["name"] == method)
    return {**spec.config, "train": {**spec.config["train"], "precision": "fp32", "timeout_s": None}}


class Hogs:
    """`n` busy loops, always on or toggled every `period` seconds."""

    def __init__(self, n: int, period: float | None = None):
        self.n, self.period, self.procs, self.stop = n, period, [], threading.Event()
        self.thread = None

    def _on(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]

    def _off(self):
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs = []

    def __enter__(self):
        if self.n and self.period is None:
            self._on()
        elif self.n:
            def toggle():
                on = False
                while not self.stop.wait(self.period):
                    self._off() if on else self._on()
                    on = not on
            self.thread = threading.Thread(target=toggle, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread:
            self.thread.join()
        self._off()


def measure(method: str, imageset, hogs: Hogs) -> dict:
    from harness.engine.loop import run_trial
    from harness.engine.reference import reference_throughput

    config = _config(method)
    with hogs:
        before = reference_throughput("cpu", "fp32")
        out = run_trial(config, imageset, threads=1)
        after = reference_throughput("cpu", "fp32")
    return {"interleaved": out["train/images_per_s_rel"],
            "before/after": out["train/images_per_s"] / ((before + after) / 2),
            "CPU per image": 1 / out["train/cpu_s_per_image"],  # as a rate: higher is faster, like the others
            "wall": out["wall_time_s"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_throughput_measure",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--hogs", type=int, default=2)
    p.add_argument("--period", type=float, default=4.0, help="seconds on, then off, for the coming-and-going load")
    p.add_argument("--methods", nargs="+", default=["baseline", "pmg"])
    args = p.parse_args(argv)
    from harness.data import load_imageset
    from harness.engine.loop import set_threads
    from harness.study.trials import TrialConfig

    set_threads(1)
    cfg = TrialConfig.parse(_config(args.methods[0]))
    imageset = load_imageset(cfg.dataset, cfg.stored_size)
    conditions = {"idle": Hogs(0), f"{args.hogs} hogs": Hogs(args.hogs),
                  f"{args.hogs} hogs on/off {args.period:g} s": Hogs(args.hogs, args.period)}
    print(f"CPU: {_cpu()}; load before: {os.getloadavg()[0]:.2f}; {args.reps} trials per method and condition, "
          f"methods {args.methods}, 1 thread, fp32, niceness {os.nice(0)}")
    results: dict = {c: {m: [] for m in args.methods} for c in conditions}
    for rep in range(args.reps):
        for condition, hogs in conditions.items():
            for method in args.methods:
                r = measure(method, imageset, hogs)
                results[condition][method].append(r)
                print(f"  rep {rep} {condition:22s} {method:9s} " +
                      "  ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
    measures = ["interleaved", "before/after", "CPU per image"]
    print(f"\n{'measure':15s} {'condition':24s} {'vs idle':>8s} {'log-sd':>7s}")
    for measure_name in measures:
        idle = {m: _gmean([r[measure_name] for r in results["idle"][m]]) for m in args.methods}
        for condition in conditions:
            logs = {m: [math.log(r[measure_name] / idle[m]) for r in results[condition][m]] for m in args.methods}
            shift = math.exp(sum(sum(v) for v in logs.values()) / sum(len(v) for v in logs.values()))
            print(f"{measure_name:15s} {condition:24s} {shift:8.3f} {_pooled_sd(list(logs.values())):7.3f}")
    return 0


def _gmean(x: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in x) / len(x))


def _pooled_sd(groups: list[list[float]]) -> float:
    """sd within groups (each method's repeated trials), pooled."""
    ss = sum(sum((v - sum(g) / len(g)) ** 2 for v in g) for g in groups if len(g) > 1)
    df = sum(len(g) - 1 for g in groups if len(g) > 1)
    return math.sqrt(ss / df) if df else float("nan")


def _cpu() -> str:
    from harness.engine.precision import cpu_info

    info = cpu_info()
    return f"{info['cpu_model']} ({info['cpu_capability']})"


if __name__ == "__main__":
    sys.exit(main())

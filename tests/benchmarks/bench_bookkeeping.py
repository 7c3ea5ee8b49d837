"""The driver's bookkeeping per trial end, against the number of stored trials: what harness.orchestrate's callback
does when a trial finishes (its record written and fsynced, results.parquet rewritten when due), without Ray.

    python -m tests.benchmarks.bench_bookkeeping [--trials 10000] [--every]

Prints the mean milliseconds per trial end in windows of the run (trials 1-50, ..., the last 500) and the CPU
seconds of the whole run; flat means the cost does not grow with the stored trials. `--every` rewrites
results.parquet after every trial (the behaviour before issue 30), for comparison in the same run's terms.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def run(trials: int, every: bool, root: Path) -> list[float]:
    from harness.results.store import ResultStore
    from harness.study.trials import TrialSpec

    store = ResultStore(root)
    specs = [TrialSpec(trial_id=f"{i:012x}", study="bench", profile="default",
                       config={"method": {"name": "pmg", "stages": i % 5 + 1}, "dataset": {"name": "synthfg"},
                               "backbone": {"name": "resnet18"}, "train": {"epochs": 4}, "seed": i % 3},
                       axes={"method.stages": i % 5 + 1}, kind="final", title=f"trial {i}")
             for i in range(trials)]
    times = []
    for spec in specs:
        t0 = time.perf_counter()
        store.write_record(spec, "finished", {"test/acc": 0.5, "train/loss": 1.0, "wall_time_s": 10.0,
                                              **{f"test/acc/stage{k}": 0.4 for k in range(5)}})
        store.write_tables(specs, curves=False) if every else store.write_tables_soon(specs)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    store.write_tables(specs, curves=False)  # the run's end
    times[-1] += time.perf_counter() - t0
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_bookkeeping",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=10_000)
    p.add_argument("--every", action="store_true", help="rewrite results.parquet after every trial (the old way)")
    args = p.parse_args(argv)
    cpu0 = time.process_time()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        times = run(args.trials, args.every, Path(tmp))
    n = len(times)
    windows = [(0, 50), (50, 800), (800, n // 2), (max(800, n - 500), n)]
    print(f"{n} trial ends ({'rewriting results.parquet each time' if args.every else 'results.parquet when due'}); "
          f"load {os.getloadavg()[0]:.2f}; CPU {time.process_time() - cpu0:.1f} s")
    for a, b in windows:
        if b > a:
            chunk = times[a:b]
            print(f"  trials {a + 1:>6}-{b:<6} {1000 * sum(chunk) / len(chunk):7.2f} ms per trial end")
    return 0


if __name__ == "__main__":
    sys.exit(main())

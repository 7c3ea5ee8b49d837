"""Bookkeeping of a 2,000-trial study: storing each trial's record as it ends and refreshing results.parquet
(as the driver does), then the end-of-run tables with curves.parquet. A script:

    python -m tests.benchmarks.bench_results_store [--trials 2000] [--epochs 50]

Prints the total and per-trial cost, and where the time goes (the last 100 trials vs the first 100:
a store that re-read every record after each trial end would grow linearly, i.e. quadratically in all).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from harness.results.store import ResultStore
from harness.study.trials import TrialSpec


def fake_trials(n: int) -> list[TrialSpec]:
    return [TrialSpec(trial_id=f"{i:012x}", study="big", profile="default",
                      config={"method": {"name": "pmg", "stages": i % 5 + 1}, "dataset": {"name": "synthfg"},
                              "backbone": {"name": "resnet18"}, "train": {"lr": 0.01 * (i % 7 + 1)}, "seed": i % 3},
                      axes={"method.stages": i % 5 + 1, "train.lr": 0.01 * (i % 7 + 1)}) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=50)
    args = parser.parse_args()
    trials = fake_trials(args.trials)
    metrics = {f"test/acc/head{h}": 0.5 for h in range(6)} | {f"train/loss/{k}": 1.0 for k in range(6)} | {
        "test/acc": 0.5, "wall_time_s": 100.0, "train/images_per_s": 90.0}
    curves = [{"epoch": e + 1, **metrics} for e in range(args.epochs)]
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultStore(tmp)
        store.finished_ids([t.trial_id for t in trials])  # the driver's look at what is done, once per run
        per_trial = []
        t0 = time.perf_counter()
        for spec in trials:
            t = time.perf_counter()
            store.write_record(spec, "finished", metrics, curves=curves)
            store.write_tables(trials, curves=False)
            per_trial.append(time.perf_counter() - t)
        during = time.perf_counter() - t0
        t = time.perf_counter()
        store.write_tables(trials)
        end = time.perf_counter() - t
    first, last = sum(per_trial[:100]) / 100, sum(per_trial[-100:]) / 100
    print(f"{args.trials} trials x {args.epochs} epochs x {len(metrics)} metrics")
    print(f"per trial end: {1000 * during / args.trials:.1f} ms on average (first 100: {1000 * first:.1f} ms, "
          f"last 100: {1000 * last:.1f} ms); all {args.trials}: {during:.1f} s")
    print(f"end of run (results.parquet + curves.parquet, {args.trials * args.epochs * len(metrics):,} curve rows): "
          f"{end:.1f} s")


if __name__ == "__main__":
    main()

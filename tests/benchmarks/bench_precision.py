"""Precision on this CPU, and what a study's default profile costs here (a script, not a pytest benchmark):

    python -m tests.benchmarks.bench_precision [STUDY ...] [--batches 3] [--set KEY=VALUE] [--check RUN_DIR]

For this machine it prints
1. the CPU: model, torch's kernel capability, whether it has bf16 units (harness.engine.precision), torch threads;
2. the fp32/bf16 time ratio of one training step of each study's most expensive trial (a batch of the study's
   own data through its own method), and the precision `auto` chooses here;
3. each study's expected wall time in its default profile: every trial's training batches and test passes
   timed (CPU time of this process, so another load on the machine weighs little) in the chosen precision,
   scheduled longest first on the slots the harness gives it (CPUs / resources.cpu, 1 thread each), plus the
   fixed costs of a run measured here (Ray start, dataset, report). The bar: 5 minutes on a 2-core AVX2 CPU.
`--check RUN_DIR` puts the estimate beside a real run's per-trial CPU seconds (results.parquet, cpu_time_s).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from harness.engine import precision
from harness.data import load_imageset
from harness.data.imageset import NORMALIZATIONS, BatchPipeline
from harness.engine.loop import build_method, build_optimizer, set_threads
from harness.plugin.method import OptimizerSteps
from harness.study.load import load_study
from harness.study.trials import TrialConfig, estimated_cost

ROOT = Path(__file__).resolve().parents[2]
# Measured here (python -m harness.run of the shipped studies): Ray's local start and the prepare task
# (~4 s + ~3 s), the driver's imports, results and the report with its maps (~10 s). Same order on any CPU.
FIXED_S = 20.0


def _batches(cfg: TrialConfig, imageset, train: bool, count: int):
    t = cfg.train
    mean, std = NORMALIZATIONS[t.normalize]
    split = imageset.train if train else imageset.test
    size = t.batch_size if train else (t.eval_batch_size or 2 * t.batch_size)
    pipe = BatchPipeline(split, t.image_size, size, train=train, padding=t.crop_padding, hflip=t.hflip,
                         colour_jitter=t.colour_jitter if train else None,
                         random_scale=t.random_scale if train else None,
                         mean=mean, std=std, channels_last=t.channels_last)
    return [b for _, b in zip(range(count), pipe.batches(torch.Generator().manual_seed(0)))], len(pipe)


def time_trial(config: dict, prec: str, batches: int) -> dict:
    """CPU seconds per training batch and per test batch of one trial, in `prec`, one thread."""
    cfg = TrialConfig.parse(config)
    imageset = load_imageset(cfg.dataset, cfg.stored_size)
    method = build_method(cfg, imageset.num_classes)
    if cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    steps = OptimizerSteps(build_optimizer(method, cfg.train), set_to_none=method.zero_grad_set_to_none,
                           scaler=torch.amp.GradScaler("cpu") if prec == "fp16" else None)
    if method.uses_boxes:
        return {"skipped": "uses boxes"}
    train_batches, n_train = _batches(cfg, imageset, True, batches + 1)
    test_batches, n_test = _batches(cfg, imageset, False, 2)
    generator = torch.Generator().manual_seed(0)
    method.train()
    times = []
    for i, (images, labels, *_) in enumerate(train_batches):
        t0 = time.process_time()
        with precision.autocast("cpu", prec):
            method.training_step(images, labels, steps, generator)
        if i:  # the first batch warms up the kernels
            times.append(time.process_time() - t0)
    method.eval()
    eval_times = []
    with torch.no_grad():
        for images, *_ in test_batches:
            t0 = time.process_time()
            with precision.autocast("cpu", prec):
                method.predict(images)
            eval_times.append(time.process_time() - t0)
    per_epoch = min(n_train, cfg.train.max_train_batches or n_train)
    return {"train_batch_s": sorted(times)[len(times) // 2], "test_batch_s": min(eval_times),
            "train_batches": per_epoch * cfg.train.epochs,
            "test_batches": n_test * (cfg.train.epochs // cfg.train.eval_every + 2)}  # + localisation, maps


def longest_first(durations: list[float], slots: int) -> float:
    """Makespan of the durations started longest first, each on the first free slot (what the harness does)."""
    free = [0.0] * max(1, slots)
    for d in sorted(durations, reverse=True):
        i = free.index(min(free))
        free[i] += d
    return max(free)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_precision", description=__doc__.split("\n\n")[0])
    p.add_argument("studies", nargs="*", default=["studies/pmg_ablation.yaml"])
    p.add_argument("--batches", type=int, default=3, help="timed training batches per trial (after one warm-up)")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray (default: this machine's)")
    p.add_argument("--check", metavar="RUN_DIR", help="compare with a real run's per-trial cpu_time_s")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the studies as harness.run does (e.g. --set train.precision=fp32)")
    args = p.parse_args(argv)
    set_threads(1)
    info = precision.cpu_info()
    chosen = precision.resolve("auto", "cpu")
    print(f"CPU: {info['cpu_model']}; torch capability {info['cpu_capability']}; bf16 units: "
          f"{'yes' if info['cpu_bf16'] else 'no'} ({info['cpu_bf16_from']}); torch threads {torch.get_num_threads()}")
    print(f"precision auto -> {chosen} on this CPU")
    for path in args.studies:
        resolved = load_study(ROOT / path if not Path(path).is_absolute() else path, overrides=args.overrides)
        trials = resolved.trials
        requested = {t.config["train"]["precision"] for t in trials}
        prec = {r: precision.resolve(r, "cpu") for r in requested}
        heaviest = max(trials, key=lambda t: estimated_cost(t.config))
        ratio = ""
        fp32 = time_trial(heaviest.config, "fp32", 2)
        if "train_batch_s" in fp32:
            bf16 = time_trial(heaviest.config, "bf16", 1 if not info["cpu_bf16"] else 2)
            ratio = (f"fp32/bf16 step time of its heaviest trial ({heaviest.label}): {fp32['train_batch_s']:.3f} s / "
                     f"{bf16['train_batch_s']:.3f} s = {fp32['train_batch_s'] / bf16['train_batch_s']:.2f}x")
        print(f"\n{resolved.name} (default profile): {len(trials)} trials, precision "
              f"{', '.join(f'{r} -> {e}' for r, e in prec.items())}; {ratio}")
        per_trial = {}
        for spec in trials:
            t = time_trial(spec.config, prec[spec.config["train"]["precision"]], args.batches)
            if "skipped" in t:
                continue
            per_trial[spec.trial_id] = (spec.label, t["train_batch_s"] * t["train_batches"]
                                        + t["test_batch_s"] * t["test_batches"])
        slots = max(1, int(args.cpus // resolved.study.resources.cpu))
        makespan = longest_first([s for _, s in per_trial.values()], slots)
        total = sum(s for _, s in per_trial.values())
        print(f"  trials: {total:.0f} CPU-s of training and testing in all; on {slots} slots longest first: "
              f"{makespan:.0f} s; with the fixed costs ({FIXED_S:.0f} s): expected wall {makespan + FIXED_S:.0f} s")
        if args.check:
            import pandas as pd

            rows = pd.read_parquet(Path(args.check) / "results.parquet").set_index("trial_id")
            print("  | trial | estimated CPU-s | measured cpu_time_s |")
            for trial_id, (label, s) in per_trial.items():
                measured = rows["cpu_time_s"].get(trial_id, float("nan")) if "cpu_time_s" in rows else float("nan")
                print(f"  | {label} | {s:.1f} | {measured:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

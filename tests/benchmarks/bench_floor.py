"""How close a study runs to the training it contains, and a rerun to its imports (issue 30).

    python -m tests.benchmarks.bench_floor [studies/pmg_ablation.yaml] [--set key=value ...] [--skip-study]

1. The floor: every trial of the study trained by a plain loop in this process (its dataset decoded before the clock
   starts; the method, its optimizer and the data pipeline built as the engine builds them; then epochs x batches of
   `training_step` and nothing else: no evaluation, no localisation or maps, no Ray, no records), one thread per
   trial as the study's trials have; each trial's wall time, and the study's floor = those times packed longest
   first on the study's slots (cores / resources.cpu), as its trials are.
2. The study: `python -m harness.run STUDY` in a fresh runs folder (Ray start, dataset preparation, trials, records
   and report included), its wall time over the floor: the target is 1.3x.
3. The rerun: the same command again (it trains nothing), its wall time over the time of `import torch, pandas` in
   a fresh interpreter: the target is 2x.
The floor and the study run one after the other on the same machine; the load is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def plain_loop(config: dict) -> float:
    """Wall seconds of one trial's training alone (see the module docstring)."""
    import torch

    from harness.data import load_imageset
    from harness.data.imageset import NORMALIZATIONS, BatchPipeline, target_boxes
    from harness.engine import precision as precisions
    from harness.engine.loop import DATA_STREAM, METHOD_STREAM, build_method, build_optimizer, epoch_generator, \
        seed_everything
    from harness.plugin.method import OptimizerSteps
    from harness.study.trials import TrialConfig

    cfg = TrialConfig.parse(config)
    train = cfg.train
    imageset = load_imageset(cfg.dataset, cfg.stored_size)
    device = torch.device("cpu")
    precision = precisions.resolve(train.precision, device)
    seed_everything(cfg.seed)
    method = build_method(cfg, imageset.num_classes)
    method = method.to(device, memory_format=torch.channels_last if train.channels_last else torch.contiguous_format)
    steps = OptimizerSteps(build_optimizer(method, train), set_to_none=method.zero_grad_set_to_none,
                           grad_clip=train.grad_clip)
    mean, std = NORMALIZATIONS[train.normalize]
    boxes = target_boxes(imageset, "train") if method.uses_boxes else None
    pipe = BatchPipeline(imageset.train, train.image_size, train.batch_size, train=True, padding=train.crop_padding,
                         hflip=train.hflip, colour_jitter=train.colour_jitter, random_scale=train.random_scale,
                         boxes=boxes, rank=0, world_size=1, device=device, mean=mean, std=std,
                         channels_last=train.channels_last)
    t0 = time.perf_counter()
    method.train()
    for epoch in range(train.epochs):
        data, gen = epoch_generator(cfg.seed, epoch, DATA_STREAM), epoch_generator(cfg.seed, epoch, METHOD_STREAM)
        for images, labels, *rest in pipe.batches(data, train.max_train_batches):
            with precisions.autocast(device.type, precision):
                method.training_step(images, labels, steps, gen, **({"boxes": rest[0]} if rest else {}))
    return time.perf_counter() - t0


def packed(times: list[float], slots: int) -> float:
    """Longest first on `slots` lanes: the makespan."""
    lanes = [0.0] * max(1, slots)
    for t in sorted(times, reverse=True):
        lanes[lanes.index(min(lanes))] += t
    return max(lanes)


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("study", nargs="?", default="studies/pmg_ablation.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--profile", default=None)
    args = p.parse_args(argv)
    import torch

    from harness.engine.loop import set_threads
    from harness.study.load import load_study

    resolved = load_study(ROOT / args.study, args.profile, args.overrides)
    cpu = max(1, int(resolved.study.resources.cpu))
    slots = max(1, (os.cpu_count() or 1) // cpu)
    set_threads(cpu)
    print(f"{resolved.name}/{resolved.profile}: {len(resolved.trials)} trials, {slots} slots x {cpu} thread(s); "
          f"torch {torch.__version__}; load {os.getloadavg()[0]:.2f}", flush=True)
    times = [plain_loop(t.config) for t in resolved.trials]
    floor = packed(times, slots)
    print(f"plain-loop floor: {floor:.1f} s packed ({sum(times):.1f} s of training in all); load "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "harness.run", args.study, "--runs-dir", f"{tmp}/runs", "--reports-dir",
               f"{tmp}/reports", *sum((["--set", o] for o in args.overrides), []),
               *(["--profile", args.profile] if args.profile else [])]
        study = timed(cmd)
        print(f"study: {study:.1f} s wall = {study / floor:.2f}x its floor (target <= 1.3x); load "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        rerun = timed(cmd)
        imports = min(timed([sys.executable, "-c", "import torch, pandas"]) for _ in range(2))
        print(f"rerun: {rerun:.1f} s wall = {rerun / imports:.2f}x importing torch and pandas ({imports:.1f} s; "
              f"target <= 2x); load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

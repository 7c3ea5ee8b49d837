"""Data-parallel trials on this machine's CPUs, side by side (a script, not a pytest benchmark: it spawns
worker processes and a whole `harness.run`):

    python -m tests.benchmarks.bench_data_parallel [--epochs 1] [--skip-harness]

1. global training images/s of one PMG trial: 1 process x 1 thread, 1 process x 2 threads, and
   2 workers x 1 thread (gloo, sync BN), same global batch;
2. the cost of the gradient all-reduce of every parameter (PMG S=3 on ResNet-18, 11.5 M parameters:
   46 MB of float32 in two buckets, plus the flags), against a whole optimizer step;
3. the harness's overhead: one trial through `python -m harness.run` (Ray, Tune, results, reports)
   against the same engine call in a fresh Python process, both timed from the outside.
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

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.data import load_imageset
from harness.data.synthfg import SynthFGParams
from harness.plugin.distributed import ProcessGroupCollective
from harness.engine.loop import build_method, run_trial

DATA = SynthFGParams(classes=16, train_per_class=50, test_per_class=25)
METHOD = {"name": "pmg", "stages": 3, "feature_size": 64, "stage_dim": 128, "backbone_lr_scale": 1.0,
          "early_exit": True}
ROOT = Path(__file__).resolve().parents[2]


def config(epochs: int) -> dict:
    return {"method": METHOD, "dataset": DATA.model_dump(), "backbone": {"name": "resnet18"},
            "train": {"epochs": epochs, "batch_size": 32, "image_size": 64, "resize": 72, "lr": 0.1,
                      "precision": "bf16"},
            "seed": 0}


def _worker(rank: int, world: int, init: str, cfg: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        collective = ProcessGroupCollective()
        final = run_trial(cfg, load_imageset(DATA, 72), collective=collective, threads=1)
        # The all-reduce alone: the trial's parameters with gradients, as OptimizerSteps hands them over.
        method = build_method(cfg, 16)
        params = [p for p in method.parameters()]
        for p in params:
            p.grad = torch.randn_like(p)
        loss = torch.tensor(1.0)
        for _ in range(3):
            collective.average_gradients(params, loss)
        t0 = time.perf_counter()
        for _ in range(20):
            collective.average_gradients(params, loss)
        reduce_ms = (time.perf_counter() - t0) / 20 * 1000
        if rank == 0:
            Path(out).write_text(json.dumps({"images_per_s": final["train/images_per_s"], "reduce_ms": reduce_ms,
                                             "steps": final["optimizer_steps"], "time_s": final["train/time_s"],
                                             "params": sum(p.numel() for p in params)}))
    finally:
        dist.destroy_process_group()


def two_workers(cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), cfg, out), nprocs=2, join=True)
        return json.loads(Path(out).read_text())


def harness_overhead(epochs: int) -> tuple[float, float, float, float]:
    """(harness.run wall, its trial's wall_time_s, direct wall, direct wall_time_s), each a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "one.yaml"
        cfg = config(epochs)
        study.write_text(json.dumps({"name": "one", "method": cfg["method"], "dataset": cfg["dataset"],
                                     "backbone": cfg["backbone"], "train": cfg["train"], "seeds": [0],
                                     "resources": {"cpu": 2}}))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "harness.run", str(study), "--runs-dir", f"{tmp}/runs", "--reports-dir",
                        f"{tmp}/reports"], cwd=ROOT, check=True, capture_output=True)
        via_harness = time.perf_counter() - t0
        import pandas as pd
        trial_wall = float(pd.read_parquet(f"{tmp}/runs/one/default/results.parquet")["wall_time_s"].iloc[0])
        code = ("import json,sys; from harness.engine.loop import run_trial; from harness.data import load_imageset; "
                "from harness.data.synthfg import SynthFGParams; cfg = json.loads(sys.argv[1]); "
                "f = run_trial(cfg, load_imageset(SynthFGParams(**cfg['dataset']), 72), threads=2); "
                "print(f['wall_time_s'])")
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout
        direct = time.perf_counter() - t0
        return via_harness, trial_wall, direct, float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--skip-harness", action="store_true")
    args = parser.parse_args()
    cfg = config(args.epochs)
    load_imageset(DATA, 72)  # build the dataset cache once, outside every timing
    rows = []
    for threads in (1, 2):
        final = run_trial(cfg, load_imageset(DATA, 72), threads=threads)
        rows.append((f"1 process x {threads} thread(s)", final["train/images_per_s"], final["optimizer_steps"]))
    two = two_workers(cfg)
    rows.append(("2 workers x 1 thread (gloo, sync BN)", two["images_per_s"], two["steps"]))
    local_bn = two_workers({**cfg, "train": {**cfg["train"], "sync_bn": False}})
    rows.append(("2 workers x 1 thread (gloo, BN per worker)", local_bn["images_per_s"], local_bn["steps"]))
    base = rows[0][1]
    print(f"PMG S=3, ResNet-18, 64 px, global batch 32, bf16, {args.epochs} epoch(s) of 800 images")
    print(f"{'configuration':40s} {'images/s':>9s} {'vs 1x1':>7s} {'steps':>6s}")
    for name, ips, steps in rows:
        print(f"{name:40s} {ips:9.1f} {ips / base:6.2f}x {steps:6d}")
    per_step_ms = two["time_s"] / two["steps"] * 1000
    print(f"gradient all-reduce of all {two['params'] / 1e6:.1f} M parameters (2 workers, gloo): "
          f"{two['reduce_ms']:.1f} ms; a 2-worker optimizer step (sync BN) takes {per_step_ms:.0f} ms in all, "
          f"a 1x1 one {rows[0][2] and 1000 * 800 * args.epochs / rows[0][1] / rows[0][2]:.0f} ms")
    if not args.skip_harness:
        via, trial_via, direct, trial_direct = harness_overhead(args.epochs)
        print(f"one trial via python -m harness.run: {via:.1f} s (trial {trial_via:.1f} s); "
              f"engine called directly: {direct:.1f} s (trial {trial_direct:.1f} s); "
              f"ratio {via / direct:.2f}x whole, {trial_via / trial_direct:.2f}x trial")


if __name__ == "__main__":
    main()

"""The paper-profile PMG training step on a GPU, side by side: fp32 as the authors ran it, bf16 autocast,
bf16 + channels_last, and bf16 + channels_last + torch.compile (a script, not a pytest benchmark: compile
warm-up takes minutes and it needs CUDA).

    python -m tests.benchmarks.bench_gpu_pmg [--size 448] [--batch 16] [--steps 20] [--device cuda]

The step is the paper profile's (ResNet-50, S = 3: four optimizer steps per batch, full forward,
feature_size 512, stage_dim 1024, jigsaw on, 200 classes), timed after warm-up with CUDA events
synchronised per step; prints images/s per variant and the ratio to fp32. `--device cpu --size 64
--batch 4 --steps 2` checks the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from harness.plugin.backbones import BackboneConfig, build_backbone
from harness.engine.loop import build_optimizer
from harness.plugin.method import OptimizerSteps
from harness.study.config import TrainConfig
from methods.pmg import PMG, PMGParams

VARIANTS = {"fp32": (False, False, False), "bf16": (True, False, False),
            "bf16 + channels_last": (True, True, False), "bf16 + channels_last + compile": (True, True, True)}


def images_per_s(device: torch.device, size: int, batch: int, steps: int, amp: bool, channels_last: bool,
                 compile_: bool) -> float:
    torch.manual_seed(0)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    model = PMG(build_backbone(BackboneConfig(name="resnet50")), 200,
                PMGParams(stages=3, feature_size=512, stage_dim=1024, backbone_lr_scale=0.1, early_exit=False))
    model = model.to(device, memory_format=memory).train()
    steps_ = OptimizerSteps(build_optimizer(model, TrainConfig(lr=0.002, batch_size=batch)),
                            set_to_none=model.zero_grad_set_to_none)
    if compile_:
        model.compile()
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=memory)
    y = torch.arange(batch, device=device) % 200
    g = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def step():
        with autocast:
            model.training_step(x, y, steps_, g)

    for _ in range(3 if not compile_ else 5):  # warm-up: cuDNN autotuning, allocator, compilation
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device here; run on a GPU machine (or --device cpu to check the script)")
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name()
    else:
        name = "CPU"
    print(f"PMG paper step (ResNet-50, S=3, {args.size} px, batch {args.batch}) on {name}, torch {torch.__version__}")
    base = None
    for variant in args.variants:
        rate = images_per_s(device, args.size, args.batch, args.steps, *VARIANTS[variant])
        base = base or rate
        print(f"  {variant:32s} {rate:8.1f} img/s  {rate / base:5.2f}x", flush=True)


if __name__ == "__main__":
    main()

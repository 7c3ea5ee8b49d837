"""A reference workload timed inside each trial, so throughput can be compared across machines and runs.

`train.reference_workload: true` makes the engine time this fixed convolutional network (pure torch, so
no change to the harness or to timm moves it) training on random 64 px images, in the trial's own
process, threads, device and precision, just before the trial trains and again after (the mean). The trial's
`train/images_per_s_rel` = its training throughput / this workload's: what a slower or busier machine
slows down, it slows down for both, and the ratio stays (tests/benchmarks measure how much it moves).
"""

from __future__ import annotations

import time
import torch
from torch import nn


def _network() -> nn.Module:
    layers, cin = [], 3
    for cout, stride in ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2)):
        layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


def reference_throughput(device: torch.device | str = "cpu", precision: str = "fp32", batch: int = 16,
                         iterations: int = 5, warmup: int = 2) -> float:
    """Images per second of the reference network's training steps (median over `iterations` timed steps)."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # the trial's own random state is not touched
        torch.manual_seed(0)
        net = _network().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    images = torch.rand(batch, 3, 64, 64, generator=generator).to(device)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(device)
    from harness.precision import autocast
    times = []
    for i in range(warmup + iterations):
        t0 = time.perf_counter()
        with autocast(device.type, precision):
            loss = nn.functional.cross_entropy(net(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return batch / sorted(times)[len(times) // 2]

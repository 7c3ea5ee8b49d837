"""A reference workload timed inside each trial, interleaved with its training, so throughput survives a busy machine.

`train.reference_workload: true` makes the engine time this fixed convolutional network (pure torch, so no change to
the harness or to timm moves it) training on random 64 px images, in the trial's own process, threads, device and
precision, *between* the trial's training batches (`ReferenceProbe`): about a dozen reference steps spread over the
training, each closing a window of training batches. A window's ratio is the training images/s over the reference
images/s measured in the same few seconds, and the trial's `train/images_per_s_rel` is the median of the windows'
ratios: what a slower or busier machine slows down at some moment, it slows down for the training and the reference
step of that moment alike, and a load that comes and goes moves the median little; a slower training step (more work,
or a sleep) moves only the training side. The reference steps' time is not counted in the training's own time.

Before (up to issue 25) the reference was timed only before and after the training: a load that started or stopped
meanwhile moved the ratio by 0.84-1.39x on a shared runner. The two measures differ in scale (the median pair vs the
epoch's mean): a baseline records which it holds (`throughput_measure`), and the gate judges a baseline of the older
one only loosely.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from harness.engine.convnet import reference_network
from harness.engine.precision import autocast

BATCH = 16
WINDOWS = 12  # reference steps spread over a trial's training: about as many as were timed before and after it
MEASURE = "interleaved-pairs-v1"  # what train/images_per_s_rel is (recorded in gate baselines)


class _Reference:
    """The reference network, its optimiser and one fixed batch on the trial's device; `step()` times one step."""

    def __init__(self, device: torch.device | str = "cpu", precision: str = "fp32", batch: int = BATCH):
        self.device, self.precision, self.batch = torch.device(device), precision, batch
        generator = torch.Generator().manual_seed(0)
        with torch.random.fork_rng(devices=[]):  # the trial's own random state is not touched
            torch.manual_seed(0)
            self.net = reference_network().to(self.device)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9)
        self.images = torch.rand(batch, 3, 64, 64, generator=generator).to(self.device)
        self.labels = torch.randint(0, 10, (batch,), generator=generator).to(self.device)

    def step(self) -> float:
        """Seconds of one training step of the reference network."""
        t0 = time.perf_counter()
        with autocast(self.device.type, self.precision):
            loss = nn.functional.cross_entropy(self.net(self.images), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def reference_throughput(device: torch.device | str = "cpu", precision: str = "fp32", batch: int = BATCH,
                         iterations: int = 5, warmup: int = 2) -> float:
    """Images per second of the reference network's training steps (median over `iterations` timed steps)."""
    reference = _Reference(device, precision, batch)
    times = [reference.step() for _ in range(warmup + iterations)][warmup:]
    return batch / sorted(times)[len(times) // 2]


class ReferenceProbe:
    """Interleaves reference steps with a trial's training batches (see the module docstring).

    The engine calls `batch_done(images, seconds)` after every training batch (`seconds`: that batch's wall time,
    data included, reference steps excluded). Every `every` batches the probe times one reference step and pairs it
    with the training batches on either side of it (the last before it, the first after it): the three run within
    a fraction of a second of each other, so whatever else the machine is doing then weighs on all three, where a
    window of many batches averages a load that the one reference step samples at an instant. `spent` is the wall
    time the probe took (the engine leaves it out of the training's time)."""

    def __init__(self, device: torch.device | str, precision: str, batches: int, windows: int = WINDOWS,
                 warmup: int = 2):
        t0 = time.perf_counter()
        self.reference = _Reference(device, precision)
        for _ in range(warmup):
            self.reference.step()
        self.every = max(1, math.ceil(max(1, batches) / windows))
        self.ratios: list[float] = []
        self.reference_rates: list[float] = []
        self._batches = 0
        self._pending: tuple[float, int, float] | None = None  # (reference rate, images, seconds) before the step
        self.spent = time.perf_counter() - t0

    def batch_done(self, images: int, seconds: float) -> None:
        if self._pending is not None:  # the batch just after a reference step completes its pair
            rate, before_images, before_seconds = self._pending
            self._pending = None
            self._record(rate, before_images + images, before_seconds + seconds)
        self._batches += 1
        if self._batches >= self.every:
            self._batches = 0
            t0 = time.perf_counter()
            rate = self.reference.batch / self.reference.step()
            self.spent += time.perf_counter() - t0
            self._pending = (rate, images, seconds)

    def _record(self, rate: float, images: int, seconds: float) -> None:
        if seconds > 0 and images:
            self.ratios.append(images / seconds / rate)
            self.reference_rates.append(rate)

    def result(self) -> dict:
        """`train/images_per_s_rel` (the median pair ratio) and `reference/images_per_s` (the median reference rate);
        the last reference step, with no batch after it, pairs with the batch before it alone; a trial too short to
        reach a reference step times one at its end."""
        if self._pending is not None:
            self._record(*self._pending)
            self._pending = None
        if not self.ratios:
            return {}
        return {"train/images_per_s_rel": _median(self.ratios), "reference/images_per_s": _median(self.reference_rates),
                "reference/windows": len(self.ratios), "reference/time_s": self.spent}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2

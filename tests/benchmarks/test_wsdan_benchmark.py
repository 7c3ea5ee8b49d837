"""One WS-DAN training step (raw + crop + drop forward, one backward) at the default study's settings:
ResNet-18 up to layer2, M = 32, 64 px, batch 32, bf16 autocast, 1 thread per trial. images/s is in
the benchmark's extra_info (batch / mean time)."""

import pytest
import torch

from harness.plugin.backbones import BackboneConfig, build_backbone
from harness.engine.loop import build_optimizer
from harness.plugin.method import OptimizerSteps
from harness.study.config import TrainConfig
from methods.wsdan import WSDAN, WSDANParams

BATCH = 32


@pytest.mark.parametrize("augment", [True, False], ids=["crop+drop", "raw-only"])
def test_wsdan_step(benchmark, augment):
    benchmark.group = "wsdan step resnet18/layer2 M=32 64px b32"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = WSDAN(build_backbone(BackboneConfig(name="resnet18")), 16,
                  WSDANParams(attention_maps=32, stage=-3, crop=augment, drop=augment)).train()
    steps = OptimizerSteps(build_optimizer(model, TrainConfig(lr=1e-3)))
    x, y = torch.rand(BATCH, 3, 64, 64), torch.arange(BATCH) % 16
    g = torch.Generator().manual_seed(0)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.training_step(x, y, steps, g)

    step()  # warm-up
    benchmark.pedantic(step, rounds=5, iterations=1)
    benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.mean

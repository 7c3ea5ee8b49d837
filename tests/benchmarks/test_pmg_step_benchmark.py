"""One PMG training step (S+1 optimizer steps on a batch), full forward vs early exit, side by side.

At the default study's settings (ResNet-18, 64 px, batch 32, bf16 autocast, 1 thread per trial) for
S = 3 and 5. The loss and gradients are the same (tests/test_pmg.py); only the cost differs.
"""

import pytest
import torch

from harness.plugin.backbones import BackboneConfig, build_backbone
from harness.engine.loop import build_optimizer
from harness.plugin.method import OptimizerSteps
from harness.study.config import TrainConfig
from methods.pmg import PMG, PMGParams


def make_step(stages: int, early_exit: bool):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = PMG(build_backbone(BackboneConfig(name="resnet18")), 16,
                PMGParams(stages=stages, feature_size=64, stage_dim=128, backbone_lr_scale=1.0,
                          early_exit=early_exit)).train()
    steps = OptimizerSteps(build_optimizer(model, TrainConfig(lr=0.01)), set_to_none=model.zero_grad_set_to_none)
    x, y = torch.rand(32, 3, 64, 64), torch.arange(32) % 16
    g = torch.Generator().manual_seed(0)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.training_step(x, y, steps, g)
    return step


@pytest.mark.parametrize("early_exit", [False, True], ids=["full", "early_exit"])
@pytest.mark.parametrize("stages", [3, 5])
def test_pmg_step(benchmark, stages, early_exit):
    benchmark.group = f"pmg step S={stages} resnet18 64px b32"
    step = make_step(stages, early_exit)
    step()  # warm-up: allocations and oneDNN primitives
    benchmark.pedantic(step, rounds=5, iterations=1)

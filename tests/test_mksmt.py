"""MKSMT against the article: distillation loss, 1/2/3 updates per batch, heads, OPM, sync/async."""

import pytest
import torch
import torch.nn.functional as F

from harness.plugin.backbones import BackboneConfig, build_backbone
from harness.engine.complexity import inference_complexity
from harness.engine.loop import build_optimizer
from harness.plugin.method import OptimizerSteps
from harness.study.config import TrainConfig
from methods.mksmt import MKSMT, MKSMTParams, distillation_loss

C = 6


def make(**kw):
    torch.manual_seed(0)
    return MKSMT(build_backbone(BackboneConfig(name="resnet18")), C, MKSMTParams(opm_dim=16, **kw))


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0, 10.0])
def test_decision_kd_equals_a_direct_computation(t):
    g = torch.Generator().manual_seed(int(t))
    student, teacher = torch.randn(5, C, generator=g), torch.randn(5, C, generator=g)
    p_t, p_s = (teacher / t).softmax(1), (student / t).softmax(1)
    direct = t * t * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    assert torch.allclose(distillation_loss(student, teacher, t), direct, atol=1e-6)


def test_kd_is_zero_when_student_equals_teacher():
    z = torch.randn(4, C)
    assert distillation_loss(z, z.clone(), 3.0).abs() < 1e-6
    assert distillation_loss(z, z.clone(), 1.0, kind="feature") == 0


def test_detached_teacher_gets_no_gradient():
    student, teacher = torch.randn(4, C, requires_grad=True), torch.randn(4, C, requires_grad=True)
    distillation_loss(student, teacher, 2.0).backward()
    assert teacher.grad is None and student.grad is not None and student.grad.abs().sum() > 0
    teacher2 = torch.randn(4, C, requires_grad=True)
    distillation_loss(torch.randn(4, C), teacher2, 2.0, detach_teacher=False).backward()
    assert teacher2.grad is not None


def test_feature_distillation_is_mse():
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    assert torch.allclose(distillation_loss(a, b, 5.0, kind="feature"), ((a - b) ** 2).mean())


@pytest.mark.parametrize("steps_per_batch", [1, 2, 3])
def test_optimizer_steps_per_batch(steps_per_batch):
    model = make(steps=steps_per_batch).train()
    steps = OptimizerSteps(build_optimizer(model, TrainConfig(lr=0.01)))
    losses = model.training_step(torch.rand(4, 3, 64, 64), torch.arange(4) % C, steps)
    assert steps.count == steps_per_batch
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_async_splits_the_last_step():
    model = make(execution="async").train()
    steps = OptimizerSteps(build_optimizer(model, TrainConfig(lr=0.01)))
    model.training_step(torch.rand(4, 3, 64, 64), torch.arange(4) % C, steps)
    assert steps.count == 3  # step 1, then CE(S4) and KD as two updates
    model = make(distillation="none", execution="async").train()
    steps = OptimizerSteps(build_optimizer(model, TrainConfig(lr=0.01)))
    model.training_step(torch.rand(4, 3, 64, 64), torch.arange(4) % C, steps)
    assert steps.count == 2  # nothing to distil


def test_heads_and_three_step_uses_s2():
    two, three = make(steps=2).eval(), make(steps=3).eval()
    with torch.no_grad():
        assert list(two.predict(torch.rand(2, 3, 64, 64))) == ["S4", "S3"]
        out = three.predict(torch.rand(2, 3, 64, 64))
    assert list(out) == ["S4", "S3", "S2"] and all(v.shape == (2, C) for v in out.values())
    # resnet18 stages: stem, layer1..layer4 -> S1..S4 are layer1..layer4.
    assert three.stage_of == {"S2": 2, "S3": 3, "S4": 4}


def test_step_one_touches_only_the_network_up_to_s3():
    model = make(steps=2).train()
    x, y = torch.rand(4, 3, 64, 64), torch.arange(4) % C
    F.cross_entropy(model(x, upto="S3")["S3"][1], y).backward()
    assert model.backbone.body.layer4[0].conv1.weight.grad is None
    assert model.outputs["S4"].weight.grad is None
    assert model.backbone.body.layer3[0].conv1.weight.grad is not None


def test_no_ce_on_s3_in_step_two():
    """Step 2's loss is lambda1 CE(S4) + lambda2 KD: without KD, the S3 output layer is not in its graph."""
    model = make(steps=2, distillation="none").train()
    steps = OptimizerSteps(build_optimizer(model, TrainConfig(lr=0.01)))  # zero_grad(set_to_none=True)
    model.training_step(torch.rand(4, 3, 64, 64), torch.arange(4) % C, steps)
    assert model.outputs["S3"].weight.grad is None  # step 1 gave it a gradient; step 2 did not
    assert model.outputs["S4"].weight.grad is not None
    with_kd = make(steps=2, distillation="decision").train()
    steps = OptimizerSteps(build_optimizer(with_kd, TrainConfig(lr=0.01)))
    with_kd.training_step(torch.rand(4, 3, 64, 64), torch.arange(4) % C, steps)
    assert with_kd.outputs["S3"].weight.grad is not None  # the student learns from the teacher
    assert with_kd.outputs["S4"].weight.grad is not None


def test_opm_and_inference_complexity():
    model = make(steps=2)
    c = inference_complexity(model, 64)
    backbone = sum(p.numel() for p in model.backbone.parameters())
    heads = sum(p.numel() for p in (*model.opms.parameters(), *model.outputs.parameters()))
    assert c["inference/params"] == backbone + heads
    assert 0.1 < c["inference/gflops"] < 1.0  # resnet18 at 64 px is about 0.15 GMAC = 0.3 GFLOP


def test_needs_four_stages():
    with pytest.raises(ValueError, match="4 stages"):
        MKSMT(build_backbone(BackboneConfig(name="resnet18", out_indices=[3, 4])), C, MKSMTParams())

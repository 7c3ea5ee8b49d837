"""GAIN against its paper: Grad-CAM of the true class inside the step, the soft mask, the erased image, the
attention-mining loss, and the external supervision on boxes."""

import pytest
import torch
import torch.nn.functional as F

from harness.backbones import BackboneConfig, build_backbone
from harness.engine import build_optimizer
from harness.plugin import OptimizerSteps
from harness.study import TrainConfig
from methods.gain import GAIN, GAINParams, box_masks, erase, gradcam, normalise_map, soft_mask


def test_soft_mask_and_erased_image():
    a = torch.tensor([0.0, 0.4, 0.5, 0.6, 1.0]).view(1, 1, 1, 5)
    t = soft_mask(a, sigma=0.5, omega=10)
    torch.testing.assert_close(t, torch.sigmoid(10 * (a - 0.5)))
    assert t[0, 0, 0, 2] == 0.5 and t[0, 0, 0, 0] < 0.01 and t[0, 0, 0, 4] > 0.99
    images = torch.rand(1, 3, 1, 5)
    torch.testing.assert_close(erase(images, t), images * (1 - t))  # I - T(A) * I
    assert erase(images, torch.ones_like(t)).abs().max() == 0 and torch.equal(erase(images, torch.zeros_like(t)), images)


def test_gradcam_of_a_known_linear_head():
    """score = sum_k v_k GAP(f_k): d score / d f_k = v_k / (h w) everywhere, so A = ReLU(sum_k v_k f_k) / (h w)."""
    f = torch.randn(2, 4, 3, 3, requires_grad=True)
    v = torch.tensor([1.0, -2.0, 0.5, 0.0])
    score = (f.mean((2, 3)) * v).sum(1)
    cam = gradcam(f, score)
    torch.testing.assert_close(cam, F.relu((v.view(1, 4, 1, 1) * f).sum(1, keepdim=True)) / 9)
    norm = normalise_map(cam.detach(), (6, 6))
    assert norm.shape == (2, 1, 6, 6) and norm.amin() == 0 and abs(norm.amax().item() - 1) < 1e-6


def test_mining_loss_falls_when_the_map_covers_the_object():
    """A classifier whose evidence is the bright object: erasing the object (map on it) leaves the true class
    little probability; erasing the background (map off it) leaves it all. L_am is that probability."""
    images = torch.zeros(4, 3, 8, 8)
    images[:, :, 2:5, 2:5] = 1.0  # the object

    def classifier(x):  # class 0 = "object present", class 1 = its absence
        evidence = x[:, :, 2:5, 2:5].mean((1, 2, 3)) * 10
        return torch.stack([evidence, torch.full_like(evidence, 5.0)], 1)

    on_object = torch.zeros(4, 1, 8, 8)
    on_object[:, :, 2:5, 2:5] = 1.0
    def mining_loss(attention):
        return classifier(erase(images, soft_mask(attention))).softmax(1)[:, 0].mean()
    assert mining_loss(on_object) < 0.01 < 0.99 < mining_loss(1 - on_object)


def test_box_masks():
    boxes = torch.tensor([[[1.0, 2.0, 3.0, 5.0], [-1, -1, -1, -1]], [[0.0, 0.0, 2.0, 2.0], [4.0, 4.0, 6.0, 6.0]]])
    m = box_masks(boxes, (6, 6))
    assert m.shape == (2, 1, 6, 6)
    assert m[0, 0].sum() == 2 * 3 and m[0, 0, 2:5, 1:3].all()
    assert m[1, 0].sum() == 4 + 4 and m[1, 0, 4:6, 4:6].all() and m[1, 0, :2, :2].all()


@pytest.mark.parametrize("external", [False, True])
def test_training_step_losses(external):
    torch.manual_seed(0)
    model = GAIN(build_backbone(BackboneConfig(name="resnet18")), 4, GAINParams(external=external)).train()
    assert model.uses_boxes is external and model.heads == ("linear",)
    steps = OptimizerSteps(build_optimizer(model, TrainConfig(lr=0.01)))
    boxes = torch.tensor([[[4.0, 4.0, 20.0, 20.0]]]).repeat(4, 1, 1)
    out = model.training_step(torch.rand(4, 3, 32, 32), torch.arange(4), steps, boxes=boxes if external else None)
    assert {"loss", "loss/cl", "loss/am"} <= set(out) and ("loss/e" in out) is external
    assert 0 <= out["loss/am"] <= 1 and steps.count == 1
    bn = model.backbone.body.bn1
    assert bn.training  # the erased pass froze BatchNorm only while it ran

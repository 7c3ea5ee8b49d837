"""GAIN against its paper: Grad-CAM of the true class inside the step, the soft mask, the erased image, the
attention-mining loss, and the external supervision on boxes."""

import pytest
import torch
import torch.nn.functional as F

from harness.plugin.backbones import BackboneConfig, build_backbone
from harness.engine.loop import build_optimizer
from harness.plugin.method import OptimizerSteps
from harness.study.config import TrainConfig
from methods.gain import GAIN, GAINParams, box_masks, erase, external_loss, gradcam, normalise_map, soft_mask


def test_soft_mask_and_erased_image():
    a = torch.tensor([0.0, 0.4, 0.5, 0.6, 1.0]).view(1, 1, 1, 5)
    t = soft_mask(a, sigma=0.5, omega=10)
    torch.testing.assert_close(t, torch.sigmoid(10 * (a - 0.5)))
    assert t[0, 0, 0, 2] == 0.5 and t[0, 0, 0, 0] < 0.01 and t[0, 0, 0, 4] > 0.99
    images = torch.rand(1, 3, 1, 5)
    torch.testing.assert_close(erase(images, t), images * (1 - t))  # I - T(A) * I
    assert (erase(images, torch.ones_like(t)).abs().max() == 0
            and torch.equal(erase(images, torch.zeros_like(t)), images))


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


def test_external_loss_leaves_out_unsupervised_and_cropped_away_images():
    """L_e = (1/B) sum over supervised images that still have a box of mean (A - H)^2."""
    boxes = torch.tensor([[[0.0, 0.0, 2.0, 2.0]],       # 4 of 16 pixels
                          [[1.0, 1.0, 3.0, 4.0]],       # 6 of 16
                          [[-1.0, -1.0, -1.0, -1.0]],   # its box was cropped away: no target
                          [[0.0, 0.0, 4.0, 4.0]]])      # supervised? no (below)
    zero = torch.zeros(4, 1, 4, 4)
    every = torch.tensor([True, True, True, False])
    torch.testing.assert_close(external_loss(zero, boxes, every), torch.tensor((4 / 16 + 6 / 16) / 4))
    exact = box_masks(boxes, (4, 4))
    assert external_loss(exact, boxes, torch.ones(4, dtype=torch.bool)) == 0  # A = H: nothing to learn
    ones = torch.ones(4, 1, 4, 4)  # the empty target of image 2 would have cost 1; it is left out
    torch.testing.assert_close(external_loss(ones, boxes, torch.ones(4, dtype=torch.bool)),
                               torch.tensor((12 / 16 + 10 / 16 + 0 / 16) / 4))
    assert external_loss(ones, boxes, torch.zeros(4, dtype=torch.bool)) == 0


def test_ext_fraction_draws_the_supervised_share_from_the_method_generator():
    torch.manual_seed(0)
    boxes = torch.tensor([[[4.0, 4.0, 20.0, 20.0]]]).repeat(8, 1, 1)
    images, labels = torch.rand(1, 3, 32, 32).repeat(8, 1, 1, 1), torch.zeros(8, dtype=torch.long)  # 8 alike

    def loss_e(fraction, seed):
        torch.manual_seed(0)
        model = GAIN(build_backbone(BackboneConfig(name="resnet18")), 4,
                     GAINParams(external=True, alpha=0.0, ext_fraction=fraction)).train()
        steps = OptimizerSteps(build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.0)))  # L_e is before the step
        return model.training_step(images, labels, steps, torch.Generator().manual_seed(seed), boxes=boxes)["loss/e"]

    full = loss_e(1.0, 0)
    share = (torch.rand(8, generator=torch.Generator().manual_seed(1)) < 0.5).float().mean().item()
    assert 0 < share < 1  # seed 1 supervises some of the 8 images, not all
    # Eight identical images have identical maps and errors: L_e is the full one times the supervised share.
    assert full > 0 and loss_e(0.5, 1) == pytest.approx(full * share, rel=1e-5)
    assert GAINParams().ext_fraction == pytest.approx(1464 / 10582, abs=1e-3)

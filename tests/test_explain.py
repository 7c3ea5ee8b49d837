"""Where each method looks: maps for every registered method, and the localisation score on constructed maps
whose answers are known."""

import numpy as np
import pytest
import torch

from harness.plugin.backbones import BackboneConfig, build_backbone
from harness.engine.explain import localisation, method_maps
from harness.plugin.method import METHODS


def test_all_energy_in_the_box_scores_one_and_a_uniform_map_scores_the_box_area():
    maps = np.zeros((3, 10, 10))
    maps[0, 2:5, 3:7] = 1.0  # all the mass inside the box
    maps[1] = 1.0  # uniform
    maps[2, 8, 8] = 5.0  # the maximum outside the box, a little mass inside
    maps[2, 3, 3] = 1.0
    boxes = np.array([[[3, 2, 7, 5]]] * 3, dtype=float)  # x 3..7, y 2..5: 12 of 100 pixels
    scores = localisation(maps, boxes)
    assert scores["energy"][0] == 1.0 and scores["pointing"][0] == 1.0 and scores["energy_raw"][0] == 1.0
    assert scores["energy"][1] == pytest.approx(0.12) and scores["box_share"][1] == pytest.approx(0.12)
    assert scores["chance"][1] == pytest.approx(0.12)  # no tolerance: a random point hits the box itself
    assert scores["pointing"][2] == 0.0 and scores["energy_raw"][2] == pytest.approx(1 / 6)
    assert scores["energy"][2] == pytest.approx(0.2 / 1.2)  # min-max normalised: 1 -> 0.2, 5 -> 1


def test_several_boxes_absent_boxes_and_empty_maps():
    maps = np.zeros((3, 4, 4))
    maps[0, 0, 0], maps[0, 3, 3] = 1.0, 1.0
    boxes = np.array([[[0, 0, 1, 1], [3, 3, 4, 4]],          # two parts: both peaks inside
                      [[-1, -1, -1, -1], [-1, -1, -1, -1]],  # no box: left out (NaN)
                      [[0, 0, 2, 2], [-1, -1, -1, -1]]], dtype=float)
    scores = localisation(maps, boxes)  # image 2: an empty map counts as uniform
    assert scores["energy"][0] == 1.0 and np.isnan(scores["energy"][1]) and np.isnan(scores["pointing"][1])
    assert scores["energy"][2] == pytest.approx(4 / 16) == scores["chance"][2] == scores["pointing"][2]
    assert scores["energy_raw"][2] == pytest.approx(4 / 16) == scores["box_share"][2]


def test_gradcam_of_a_known_linear_head_on_the_last_stage():
    """A GAP-linear head: d score / d A_k = W[c, k] / (h w), so Grad-CAM = ReLU(sum_k W[c, k] A_k) / (h w): the
    CAM, up to scale (and both normalised alike)."""
    from harness.engine.explain import gradcam

    method = METHODS.get("baseline")(build_backbone(BackboneConfig(name="resnet18")), 3,
                                     METHODS.get("baseline").Params()).eval()
    x, y = torch.rand(2, 3, 64, 64), torch.tensor([0, 2])
    raw = gradcam(method, x, y, -1, "linear", normalise=False)
    with torch.no_grad():
        cam = torch.relu(method.class_activation_map(x, y))[:, None] / 4  # layer4 is 2 x 2 at 64 px
        cam = torch.nn.functional.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(raw, cam.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_has_maps(name):
    cls = METHODS.get(name)
    torch.manual_seed(0)
    method = cls(build_backbone(BackboneConfig(name="resnet18")), 3, cls.Params()).train()
    maps = method_maps(method, torch.rand(2, 3, 32, 32), torch.tensor([0, 2]))
    assert method.training  # restored
    assert {"guided gradcam", "deconvnet"} <= set(maps) and any(k.startswith("gradcam") for k in maps)
    for key, value in maps.items():
        if value.ndim == 3:
            assert value.shape == (2, 32, 32) and 0 <= value.min() and value.max() <= 1 + 1e-6, key
        else:
            assert value.shape == (2, 4), key  # a box
    expected = {"baseline": {"cam"}, "aam": {"cam", "spatial attention stage 4"}, "gain": {"cam"},
                "wsdan": {"attention (mean)", "crop box"}, "racnn": {"region scale2", "region scale3"},
                "pmg": {"gradcam combined", "gradcam stage3"}, "mksmt": {"gradcam S4", "gradcam S3"}}
    assert expected.get(name, set()) <= set(maps)


def test_gradcam_and_guided_backprop_equal_pytorch_grad_cams():
    """The harness computes Grad-CAM with its own hook and torch.autograd.grad, and guided backpropagation with its
    own ReLU (pytorch-grad-cam's package imports scikit-learn: seconds in every worker): the same maps as the
    library's ActivationsAndGradients and GuidedBackpropReLUasModule on the same model and images."""
    pytest.importorskip("pytorch_grad_cam")
    import numpy as np
    import torch
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients
    from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUasModule
    from pytorch_grad_cam.utils.find_layers import replace_all_layer_type_recursive

    from harness.engine.explain import gradcam, input_gradient

    torch.manual_seed(0)
    cls = METHODS.get("baseline")
    backbone = build_backbone(BackboneConfig(name="resnet18", kwargs={"channels": [8, 8, 16, 16], "stem_width": 8}))
    method = cls(backbone, 5, cls.Params()).eval()
    images, labels = torch.rand(3, 3, 32, 32), torch.tensor([0, 2, 4])
    stage = -2
    module, reshape = method.backbone.stage_module(stage)

    class Head(torch.nn.Module):
        def forward(self, x):
            return method.predict(x)[method.primary_head]

    capture = ActivationsAndGradients(Head(), [module], reshape)
    scores = capture(images)
    method.zero_grad()
    scores.gather(1, labels[:, None]).sum().backward()
    a, g = capture.activations[0], capture.gradients[0]
    capture.release()
    theirs = torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    theirs = torch.nn.functional.interpolate(theirs, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    method.zero_grad(set_to_none=True)
    ours = gradcam(method, images, labels, stage, method.primary_head, normalise=False)
    assert np.allclose(ours, theirs.numpy(), atol=1e-6)
    assert all(p.grad is None for p in method.parameters())  # no parameter gradient computed
    method.zero_grad(set_to_none=True)
    ours = input_gradient(method, images, labels, method.primary_head, "guided")
    replace_all_layer_type_recursive(method, torch.nn.ReLU, GuidedBackpropReLUasModule())
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(method.predict(x)[method.primary_head].gather(1, labels[:, None]).sum(), x)
    theirs = grad.abs().sum(1).numpy()
    theirs = (theirs - theirs.reshape(3, -1).min(1)[:, None, None]) / (
        theirs.reshape(3, -1).max(1)[:, None, None] - theirs.reshape(3, -1).min(1)[:, None, None] + 1e-12)
    assert np.allclose(ours, theirs, atol=1e-5)

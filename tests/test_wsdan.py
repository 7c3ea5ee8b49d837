"""WS-DAN against the paper and the authors' code: BAP, crop, drop, centres, head size, one step."""

import pytest
import torch
import torch.nn.functional as F

from harness.plugin.backbones import BackboneConfig, build_backbone
from harness.engine.loop import build_optimizer
from harness.plugin.method import OptimizerSteps
from harness.study.config import TrainConfig
from methods.wsdan import (WSDAN, WSDANParams, attention_crop, attention_crop_boxes, attention_drop,
                           bilinear_attention_pooling, choose_maps)

C = 5


def make(**kw):
    torch.manual_seed(0)
    params = WSDANParams(**{"attention_maps": 4, **kw})
    return WSDAN(build_backbone(BackboneConfig(name="resnet18")), C, params)


def test_bap_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    features, maps = torch.randn(3, 7, 5, 6, generator=g), torch.rand(3, 4, 5, 6, generator=g)
    parts = [(features * maps[:, k:k + 1]).mean((2, 3)) for k in range(4)]  # GAP of A_k * F, each (B, C)
    expected = torch.cat(parts, 1)
    expected = torch.sign(expected) * torch.sqrt(expected.abs() + 1e-12)
    expected = expected / expected.norm(dim=1, keepdim=True)
    out = bilinear_attention_pooling(features, maps)
    assert out.shape == (3, 4 * 7)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("seed", range(5))
def test_crop_boxes_inside_the_image_and_containing_the_region(seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(4, 1, 6, 6, generator=g) ** 4
    size = (48, 40)
    boxes = attention_crop_boxes(maps, size, theta=0.5, padding=0.1)
    up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0]
    mask = up >= 0.5 * up.flatten(1).amax(1)[:, None, None]
    for (x0, y0, x1, y1), m in zip(boxes.tolist(), mask):
        assert 0 <= x0 < x1 <= 40 and 0 <= y0 < y1 <= 48
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
        # Padded by 10% of the side unless clipped by the border.
        assert x0 == max(int(xs.min()) - 4, 0) and y1 == min(int(ys.max()) + 1 + 4, 48)


def test_crop_resizes_the_box_back_to_the_input_size():
    images = torch.arange(16.0).reshape(1, 1, 4, 4).expand(1, 3, 4, 4).contiguous()
    maps = torch.zeros(1, 1, 4, 4)
    maps[0, 0, 1:3, 1:3] = 1.0  # the centre 2x2 block only
    crop = attention_crop(images, maps, theta=0.99, padding=0.0)
    assert crop.shape == images.shape
    boxes = attention_crop_boxes(maps, (4, 4), theta=0.99, padding=0.0)
    x0, y0, x1, y1 = boxes[0].tolist()
    expected = F.interpolate(images[:, :, y0:y1, x0:x1], size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.equal(crop, expected)


def test_drop_zeroes_exactly_the_region_above_threshold():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 32, 32, generator=g) + 0.5  # no zero pixels of their own
    maps = torch.rand(3, 1, 8, 8, generator=g)
    dropped = attention_drop(images, maps, theta=0.4)
    up = F.interpolate(maps, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    above = up >= 0.4 * up.flatten(1).amax(1)[:, None, None]
    assert torch.equal(dropped == 0, above[:, None].expand_as(images))
    assert torch.equal(dropped[~above[:, None].expand_as(images)], images[~above[:, None].expand_as(images)])


def test_random_thresholds_come_from_the_ranges():
    maps = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    images = torch.ones(64, 1, 16, 16)
    kept = attention_drop(images, maps, theta=(0.2, 0.5), generator=torch.Generator().manual_seed(0))
    frac = kept.mean((1, 2, 3))
    lo = attention_drop(images, maps, theta=0.2).mean((1, 2, 3))
    hi = attention_drop(images, maps, theta=0.5).mean((1, 2, 3))
    assert (frac >= lo - 1e-6).all() and (frac <= hi + 1e-6).all() and frac.std() > 0


def test_map_choice_follows_sqrt_of_spatial_sums():
    maps = torch.zeros(2000, 3, 2, 2)
    maps[:, 0] = 1.0  # sum 4 -> sqrt 2
    maps[:, 1] = 4.0  # sum 16 -> sqrt 4; map 2 is all zero and is never chosen
    chosen = choose_maps(maps, 1, generator=torch.Generator().manual_seed(0))[:, 0]
    assert (chosen != 2).all()
    assert abs((chosen == 1).float().mean().item() - 4 / 6) < 0.03
    # The authors' draw is with replacement: crop and drop pick the same map as often as two independent
    # draws do, (2/6)^2 + (4/6)^2 = 5/9 of the images.
    both = choose_maps(maps, 2, generator=torch.Generator().manual_seed(0))
    assert abs((both[:, 0] == both[:, 1]).float().mean().item() - 5 / 9) < 0.03
    distinct = choose_maps(maps, 2, generator=torch.Generator().manual_seed(0), replacement=False)
    assert (distinct[:, 0] != distinct[:, 1]).all()  # the option: two different maps while M allows


def test_center_loss_and_momentum_update():
    model = make()
    matrix = F.normalize(torch.randn(4, model.centers.shape[1]), dim=1)
    labels = torch.tensor([0, 1, 1, 3])
    model.centers.copy_(torch.randn_like(model.centers))
    before = model.centers.clone()
    normalised = F.normalize(before[labels], dim=-1)
    loss = model.center_loss(matrix, labels)
    assert torch.allclose(loss, ((matrix - normalised) ** 2).sum() / 4)
    beta = 0.05
    assert torch.allclose(model.centers[0], before[0] + beta * (matrix[0] - normalised[0]))
    # Repeated labels accumulate both updates.
    assert torch.allclose(model.centers[1], before[1] + beta * (matrix[1] - normalised[1] + matrix[2] - normalised[2]))
    assert torch.equal(model.centers[2], before[2])
    assert "centers" in model.state_dict()  # the centres travel with checkpoints


@pytest.mark.parametrize("m", [1, 8, 32])
def test_head_parameter_count(m):
    model = make(attention_maps=m, stage=-1)
    channels = 512  # resnet18 layer4
    head = sum(p.numel() for p in (*model.attentions.parameters(), *model.fc.parameters()))
    assert head == channels * m + 2 * m + m * channels * C  # 1x1 conv (no bias), BN, Linear(M*C, classes, no bias)
    assert model.centers.shape == (C, m * channels)


def test_truncates_the_backbone_at_the_attention_stage():
    model = make(stage=-2)
    assert model.backbone.num_stages == 4 and "layer4" not in dict(model.backbone.body.named_children())
    inception = WSDAN(build_backbone(BackboneConfig(name="inception_v3")), C, WSDANParams(attention_maps=32))
    assert inception.backbone.channels[-1] == 768  # Mixed_6e, the paper's feature map
    assert inception.attentions[1].eps == 1e-3


@pytest.mark.parametrize("crop,drop,terms", [(True, True, 3), (True, False, 2), (False, True, 2), (False, False, 1)])
def test_one_step_per_batch_with_a_finite_loss(crop, drop, terms):
    model = make(crop=crop, drop=drop).train()
    steps = OptimizerSteps(build_optimizer(model, TrainConfig(lr=0.01)))
    losses = model.training_step(torch.rand(4, 3, 64, 64), torch.arange(4) % C, steps, torch.Generator())
    assert steps.count == 1
    assert len([k for k in losses if k in ("loss/raw", "loss/crop", "loss/drop")]) == terms
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    expected = (sum(losses[k] for k in ("loss/raw", "loss/crop", "loss/drop") if k in losses) / terms
                + losses["loss/center"])
    assert losses["loss"] == pytest.approx(expected, rel=1e-5)


def test_predict_heads():
    model = make().eval()
    with torch.no_grad():
        out = model.predict(torch.rand(3, 3, 64, 64))
    assert set(out) == {"raw", "refined"}
    assert torch.allclose(out["refined"].sum(1), torch.ones(3), atol=1e-5)  # averaged probabilities
    logits_model = make(refine_average="logits").eval()
    with torch.no_grad():
        assert set(logits_model.predict(torch.rand(3, 3, 64, 64))) == {"raw", "refined"}
    assert make(refine=False).primary_head == "raw"


def test_invalid_parameters():
    with pytest.raises(ValueError, match="crop_theta must be"):
        WSDANParams(crop_theta=(0.7, 0.2))
    with pytest.raises(ValueError, match="backbone has 5 stages"):
        make(stage=7)


# The three geometries (methods/wsdan_geometry.py) on one small map, every number worked out by hand.
# Map m = [[0, 1], [2, 4]] (h = w = 2) at a 4 x 4 image; bilinearly, m(y, x) = x + 2y + xy between its
# corners. Each geometry reads it at its own source positions s_i for the output pixels i = 0..3:
#   tf (TF 1.x resize_bilinear): s_i = i * 2/4 = 0, .5, 1, 1.5 (-> 1, the last row);
#   port (align_corners=True): s_i = i * 1/3 = 0, 1/3, 2/3, 1;
#   harness (half-pixel): s_i = (i + .5) * 2/4 - .5 = -.25 (-> 0), .25, .75, 1.25 (-> 1).
SMALL_MAP = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
UPSAMPLED = {
    "tf": [[0, .5, 1, 1], [1, 1.75, 2.5, 2.5], [2, 3, 4, 4], [2, 3, 4, 4]],
    "port": [[0, 1 / 3, 2 / 3, 1], [2 / 3, 10 / 9, 14 / 9, 2], [4 / 3, 17 / 9, 22 / 9, 3], [2, 8 / 3, 10 / 3, 4]],
    "harness": [[0, .25, .75, 1], [.5, .8125, 1.4375, 1.75], [1.5, 1.9375, 2.8125, 3.25], [2, 2.5, 3.5, 4]],
}
# theta = 0.45: every geometry's reference max is 4 here (the port's, the small map's, is reached at the
# corner), so the limit is 1.8 and the drop keeps the pixels below it.
KEPT = {
    "tf": [[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    "port": [[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]],
    "harness": [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]],
}


@pytest.mark.parametrize("geometry", ["tf", "port", "harness"])
def test_each_geometry_upsamples_and_drops_as_worked_out(geometry):
    from methods.wsdan_geometry import upsample_maps
    assert torch.allclose(upsample_maps(SMALL_MAP, (4, 4), geometry)[0], torch.tensor(UPSAMPLED[geometry]),
                          atol=1e-6)
    kept = attention_drop(torch.ones(1, 1, 4, 4), SMALL_MAP, theta=0.45, geometry=geometry)
    assert torch.equal(kept[0, 0], torch.tensor(KEPT[geometry], dtype=torch.float32))


def test_harness_and_port_boxes_as_worked_out():
    # Mask >= 1.8: harness rows 2-3, columns 0-3; port rows 1-3 (2 >= 1.8 at row 1, column 3), columns 0-3.
    # harness: [min - floor(pH), max + 1 + floor(pH)): p = 0 -> y [2, 4), x [0, 4); p = .25 (pH = 1) -> y [1, 4).
    assert attention_crop_boxes(SMALL_MAP, (4, 4), 0.45, 0.0, geometry="harness")[0].tolist() == [0, 2, 4, 4]
    assert attention_crop_boxes(SMALL_MAP, (4, 4), 0.45, 0.25, geometry="harness")[0].tolist() == [0, 1, 4, 4]
    # port: [floor(min - pH), floor(max + pH)), the last row and column left out: p = 0 -> y [1, 3), x [0, 3);
    # p = .25 -> y [floor(0), floor(4)) = [0, 4), x [max(floor(-1), 0), 4) = [0, 4).
    assert attention_crop_boxes(SMALL_MAP, (4, 4), 0.45, 0.0, geometry="port")[0].tolist() == [0, 1, 3, 3]
    assert attention_crop_boxes(SMALL_MAP, (4, 4), 0.45, 0.25, geometry="port")[0].tolist() == [0, 0, 4, 4]
    # The port's crop of y [1, 3), x [0, 3) of the image 4y + x, resized with align_corners=True: output (i, j)
    # reads row 1 + i/3 and column 2j/3, 4 (1 + i/3) + 2j/3.
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    i, j = torch.arange(4.0)[:, None], torch.arange(4.0)[None, :]
    crop = attention_crop(image, SMALL_MAP, 0.45, 0.0, geometry="port")
    assert torch.allclose(crop[0, 0], 4 * (1 + i / 3) + 2 * j / 3, atol=1e-5)


def test_tf_box_and_crop_as_worked_out():
    from methods.wsdan_geometry import tf_crop_boxes
    # Mask >= 1.8 on tf's map: rows 1-3 (row 1 from column 2), columns 0-3. Box with p = .25, in TF's order
    # (y1, x1, y2, x2) = (1/4 - .25, 0/4 - .25, 3/4 + .25, 3/4 + .25), not clipped.
    box = tf_crop_boxes(SMALL_MAP, (4, 4), 0.45, 0.25)
    assert torch.equal(box, torch.tensor([[0.0, -0.25, 1.0, 1.0]]))
    # crop_and_resize to 4 x 4: rows sample 0 * 3 + j * (1 - 0) * 3 / 3 = 0, 1, 2, 3; columns
    # -.25 * 3 + j * 1.25 * 3 / 3 = -.75 (outside: 0), .5, 1.75, 3; the image 4y + x is linear: a sample
    # reads 4 row + column.
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    rows = torch.arange(4.0)[:, None]
    expected = torch.cat([torch.zeros(4, 1), 4 * rows + torch.tensor([[.5, 1.75, 3.0]])], 1)
    assert torch.allclose(attention_crop(image, SMALL_MAP, 0.45, 0.25, geometry="tf")[0, 0], expected, atol=1e-6)
    # As pixel edges (explanations): sample centres x1 (W - 1) .. x2 (W - 1), + 0.5.
    edges = attention_crop_boxes(SMALL_MAP, (4, 4), 0.45, 0.25, geometry="tf")[0].tolist()
    assert edges == pytest.approx([-0.25, 0.5, 3.5, 3.5])


def test_the_port_thresholds_against_the_small_maps_max():
    # A 3 x 3 map with its peak 1 in the centre, at 4 x 4 with align_corners: samples at 0, 2/3, 4/3, 2 never hit
    # the centre, and the upsampled peak is (2/3)^2 = 4/9. The port's drop at theta .5 (limit .5 x 1) keeps every
    # pixel; tf's and harness's reference is the upsampled peak, so they drop around it.
    peak = torch.zeros(1, 1, 3, 3)
    peak[0, 0, 1, 1] = 1.0
    ones = torch.ones(1, 1, 4, 4)
    assert attention_drop(ones, peak, 0.5, geometry="port").min() == 1
    assert attention_drop(ones, peak, 0.5, geometry="tf").min() == 0
    # Its crop at theta .5 has an empty mask (the port would fail): the mask becomes the upsampled peak's pixels,
    # rows and columns 1-2, and the port's box [min, max) of them, [1, 2).
    assert attention_crop_boxes(peak, (4, 4), 0.5, 0.0, geometry="port")[0].tolist() == [1, 1, 2, 2]


@pytest.mark.parametrize("geometry", ["tf", "port"])
def test_a_step_and_predict_in_each_authors_geometry(geometry):
    model = make(geometry=geometry).train()
    steps = OptimizerSteps(build_optimizer(model, TrainConfig(lr=0.01)))
    losses = model.training_step(torch.rand(4, 3, 64, 64), torch.arange(4) % C, steps, torch.Generator())
    assert steps.count == 1 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    with torch.no_grad():
        assert model.eval().predict(torch.rand(2, 3, 64, 64))["refined"].shape == (2, C)

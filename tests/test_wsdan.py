"""WS-DAN against the paper and the authors' code: BAP, crop, drop, centres, head size, one step."""

import pytest
import torch
import torch.nn.functional as F

from harness.backbones import BackboneConfig, build_backbone
from harness.engine import build_optimizer
from harness.plugin import OptimizerSteps
from harness.study import TrainConfig
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
    expected = sum(losses[k] for k in ("loss/raw", "loss/crop", "loss/drop") if k in losses) / terms + losses["loss/center"]
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

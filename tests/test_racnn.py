"""RA-CNN against its paper: the boxcar crop and zoom, its gradients, the ranking loss, the APN's constraints
and initial square, and the alternating schedule."""

import pytest
import torch
import torch.nn.functional as F

from harness.plugin.backbones import BackboneConfig, build_backbone
from harness.engine.loop import build_optimizer
from harness.plugin.method import OptimizerSteps
from harness.study.config import TrainConfig
from methods.racnn import APN, RACNN, RACNNParams, attend, boxcar_mask, highest_response_square, ranking_loss


def test_a_known_box_cuts_the_expected_region():
    """t = (0.5, 0.5, 0.25): the central half of the image, zoomed to the full size; with a steep boxcar it is
    the bilinear resize of that crop."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    boxes = torch.tensor([[0.5, 0.5, 0.25], [0.25, 0.75, 0.25]])
    out = attend(images, boxes, k=50.0, out_size=32)
    expected = torch.cat([F.interpolate(images[0:1, :, 8:24, 8:24], size=32, mode="bilinear", align_corners=False),
                          F.interpolate(images[1:2, :, 16:32, 0:16], size=32, mode="bilinear", align_corners=False)])
    torch.testing.assert_close(out[:, :, 2:-2, 2:-2], expected[:, :, 2:-2, 2:-2], atol=1e-4, rtol=1e-4)
    mask = boxcar_mask(boxes[:1], 32, k=50.0)[0, 0]
    assert mask[16, 16] > 0.99 and mask[2, 2] < 0.01 and mask[16, 2] < 0.01  # ~1 inside, ~0 outside


def test_the_attended_region_has_gradients_in_tx_ty_tl():
    images = torch.rand(1, 3, 24, 24)
    boxes = torch.tensor([[0.45, 0.55, 0.3]], requires_grad=True)
    (attend(images, boxes, k=10.0, out_size=12) * torch.rand(1, 3, 12, 12)).sum().backward()
    assert (boxes.grad.abs() > 0).all()
    mask_only = torch.tensor([[0.45, 0.55, 0.3]], requires_grad=True)
    (boxcar_mask(mask_only, 24, k=10.0) * torch.rand(1, 1, 24, 24)).sum().backward()
    assert (mask_only.grad.abs() > 0).all()  # the boxcar alone is differentiable in all three


def test_ranking_loss():
    assert ranking_loss(torch.tensor([0.5]), torch.tensor([0.9]), 0.05) == 0  # the finer scale is surer by > margin
    torch.testing.assert_close(ranking_loss(torch.tensor([0.5, 0.9]), torch.tensor([0.52, 0.3]), 0.05),
                               torch.tensor(((0.5 - 0.52 + 0.05) + (0.9 - 0.3 + 0.05)) / 2))


def test_apn_boxes_obey_the_constraints_and_the_initial_square():
    apn = APN(8, 16, 2, min_ratio=1 / 3)
    boxes = apn(torch.randn(64, 8, 4, 4) * 5)
    tx, ty, tl = boxes.unbind(1)
    assert (tl >= 1 / 6 - 1e-6).all() and (tl <= 0.5 + 1e-6).all()  # >= a third of the whole image's 1/2
    assert (tx - tl >= -1e-6).all() and (tx + tl <= 1 + 1e-6).all() and (ty - tl >= -1e-6).all()
    features = torch.zeros(1, 4, 8, 8)
    features[0, :, 1, 6] = 1.0  # the highest response: row 1, column 6
    square = highest_response_square(features)[0]
    torch.testing.assert_close(square, torch.tensor([0.75, 0.25, 0.25]))  # (6.5/8, 1.5/8) moved inside; half side 1/4
    features[0, :, 4, 3] = 2.0  # a stronger response well inside: the square is centred on it
    torch.testing.assert_close(highest_response_square(features)[0], torch.tensor([3.5 / 8, 4.5 / 8, 0.25]))


def make(**kw):
    torch.manual_seed(0)
    return RACNN(build_backbone(BackboneConfig(name="resnet18")), 5, RACNNParams(**{"apn_init_batches": 1, **kw}))


@pytest.mark.parametrize("scales,heads", [(1, ("fused", "scale1")), (2, ("fused", "scale1", "scale2")),
                                          (3, ("fused", "fused12", "scale1", "scale2", "scale3"))])
def test_heads_and_separate_networks(scales, heads):
    model = make(scales=scales).eval()
    assert model.heads == heads
    out = model.predict(torch.rand(2, 3, 32, 32))
    assert tuple(out) == heads and all(v.shape == (2, 5) for v in out.values())
    nets = model.nets()
    assert len(nets) == scales and len({id(n) for n in nets}) == scales
    if scales > 1:  # the same initialisation, separate weights
        assert torch.equal(nets[0].body.conv1.weight, nets[1].body.conv1.weight)
        assert nets[0].body.conv1.weight.data_ptr() != nets[1].body.conv1.weight.data_ptr()


def test_alternating_steps_update_their_own_parts():
    model = make(scales=2).train()
    steps = OptimizerSteps(build_optimizer(model, TrainConfig(lr=0.05, weight_decay=0.0)))
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    first = model.training_step(x, y, steps)  # batch 1: the APN regresses its initial square
    assert steps.count == 2 and "loss/apn_init" in first and "loss/rank" not in first
    apn_before = [p.detach().clone() for p in model.apns.parameters()]
    net_before = model.backbone.body.conv1.weight.detach().clone()
    # Step 2 alone (the APN step): only the APN moves.
    for q in (*model.backbone.parameters(), *model.extra_nets.parameters(), *model.classifiers.parameters()):
        q.requires_grad_(False)
    apn_loss, name = model._apn_loss(model(x), y)
    steps.step(apn_loss)
    for q in model.parameters():
        q.requires_grad_(True)
    assert name == "loss/rank" and torch.equal(model.backbone.body.conv1.weight, net_before)
    assert any(not torch.equal(a, b) for a, b in zip(apn_before, model.apns.parameters()))
    second = model.training_step(x, y, steps)
    assert {"loss", "loss/cls", "loss/rank"} <= set(second)
    joint = make(scales=3, training="joint").train()
    joint_steps = OptimizerSteps(build_optimizer(joint, TrainConfig(lr=0.05)))
    joint.training_step(x, y, joint_steps)
    assert joint_steps.count == 1
    no_rank = make(scales=2, ranking=False, apn_init_batches=0).train()
    no_rank_steps = OptimizerSteps(build_optimizer(no_rank, TrainConfig(lr=0.05)))
    no_rank.training_step(x, y, no_rank_steps)
    assert no_rank_steps.count == 1  # without the ranking loss the APN keeps its initialisation


def test_apn_pretraining_first_trains_the_apns_alone():
    """The paper's step 2: for apn_init_batches batches only the APNs move (one step each), then the alternation."""
    model = make(scales=2, apn_pretrain="first", apn_init_batches=1).train()
    steps = OptimizerSteps(build_optimizer(model, TrainConfig(lr=0.05, weight_decay=0.0)))
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    nets = [p.detach().clone() for p in (*model.nets()[0].parameters(), *model.classifiers.parameters())]
    apn = [p.detach().clone() for p in model.apns.parameters()]
    first = model.training_step(x, y, steps)
    assert steps.count == 1 and set(first) == {"loss/apn_init", "loss"}
    assert all(torch.equal(a, b)
               for a, b in zip(nets, (*model.nets()[0].parameters(), *model.classifiers.parameters())))
    assert any(not torch.equal(a, b) for a, b in zip(apn, model.apns.parameters()))
    second = model.training_step(x, y, steps)  # pre-training over: classification step, then the ranking step
    assert steps.count == 3 and {"loss/cls", "loss/rank"} <= set(second)


def small_fc(backbone, pretrained=True):
    """fc6/fc7 of VGG's form (timm's ConvMlp), narrow and 1 x 1 so that a test runs at 32 px."""
    from timm.models.vgg import ConvMlp

    return ConvMlp(backbone.channels[-1], 32, kernel_size=1, drop_rate=0.5)


def test_vgg_fc_classifier_per_scale(monkeypatch):
    """classifier: vgg_fc: each scale its own copy of fc6/fc7 (same initialisation), after pool5, averaged over the
    map; a new fc8 per scale; the fusion reads the fc7 descriptors; fc6/fc7 train with the backbone's group."""
    import methods.racnn as racnn

    monkeypatch.setattr(racnn, "vgg_fc_layers", small_fc)
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="vgg11", out_indices=[0, 1, 2, 3, 4]))  # up to conv5 (stride 16)
    model = RACNN(backbone, 5, RACNNParams(scales=3, classifier="vgg_fc")).eval()
    assert len(model.dense_fc) == 3 and all(d.pool for d in model.dense_fc)  # pool5 after conv5
    a, b = model.dense_fc[0].fc.fc1.weight, model.dense_fc[1].fc.fc1.weight
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert model.classifiers[0][-1].in_features == 32 and model.fusion.in_features == 3 * 32
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        pool5 = F.max_pool2d(out["features"][0], 2, 2)
        fc7 = model.dense_fc[0].fc(pool5).mean((2, 3))
        torch.testing.assert_close(out["logits"][0], model.classifiers[0](fc7))
    groups = {g["name"]: {id(p) for p in g["params"]} for g in model.param_groups()}
    assert {id(p) for p in model.dense_fc.parameters()} <= groups["backbone"]
    assert sum(len(g) for g in groups.values()) == len({id(p) for p in model.parameters()})


def test_vgg_fc_layers_are_vgg_fc6_fc7():
    """The real thing: fc6 a 7 x 7 convolution 512 -> 4096 (the ImageNet Linear(25088, 4096) reshaped), fc7 1 x 1,
    dropout 0.5; fc6 refuses pool5 maps smaller than 7 x 7."""
    from methods.racnn import DenseFC, vgg_fc_layers

    fc = vgg_fc_layers(build_backbone(BackboneConfig(name="vgg11", out_indices=[0, 1, 2, 3, 4])), pretrained=False)
    assert fc.fc1.weight.shape == (4096, 512, 7, 7) and fc.fc2.weight.shape == (4096, 4096, 1, 1)
    assert fc.drop.p == 0.5
    with pytest.raises(ValueError, match="224 px"):
        DenseFC(fc, pool=True)(torch.zeros(1, 512, 8, 8))  # a 128 px input: pool5 is 4 x 4
    with pytest.raises(ValueError, match="VGG backbone"):
        RACNN(build_backbone(BackboneConfig(name="resnet18")), 5, RACNNParams(classifier="vgg_fc"))

"""The AAM plugin: modules after each residual stage, CE / center / cross-channel losses."""

import pytest
import torch

from harness.plugin.backbones import BackboneConfig, build_backbone
from harness.engine.loop import build_optimizer
from harness.plugin.method import OptimizerSteps
from harness.study.config import TrainConfig
from methods.aam import AAMNet, AAMParams, cross_channel_loss
from methods.attention_modules import AAM

CLASSES = 8


def make(**kw):
    torch.manual_seed(0)
    return AAMNet(build_backbone(BackboneConfig(name="resnet18")), CLASSES, AAMParams(**kw))


def test_module_after_each_residual_stage():
    model = make(module="aam", k=5)
    for name, channels in (("layer1", 64), ("layer2", 128), ("layer3", 256), ("layer4", 512)):
        stage = model.backbone.body[name]
        assert isinstance(stage[1], AAM)
    assert model.extra_metrics()["attention/params"] == 4 * (5 + 2 * 49)
    assert make(module="none").extra_metrics()["attention/params"] == 0
    assert "stem" not in model.attention and list(model.attention) == ["1", "2", "3", "4"]
    only_last = make(module="se", placement=[4])
    assert list(only_last.attention) == ["4"]


def test_every_parameter_is_in_exactly_one_group():
    for loss in ("ce", "center", "cc"):
        model = make(module="cbam", loss=loss)
        grouped = [id(p) for g in model.param_groups() for p in g["params"]]
        assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))


def test_cross_channel_loss_terms():
    features = torch.randn(4, 32, 5, 5)
    labels = torch.tensor([0, 1, 2, 3])
    total, dis, div = cross_channel_loss(features, labels, 8, eta=10.0, training=False)
    assert torch.isfinite(total) and 1.0 <= div <= 4.0  # xi = 32 // 8 = 4 channels per class
    assert torch.allclose(total, dis - 10.0 * div)
    # Identical channels inside a group attend to the same place: diversity is at its minimum, 1.
    same = features[:, :8].repeat_interleave(4, dim=1)
    assert torch.allclose(cross_channel_loss(same, labels, 8, 1.0, training=False)[2], torch.tensor(1.0))
    with pytest.raises(ValueError, match="channel per class"):
        cross_channel_loss(torch.randn(2, 4, 3, 3), torch.tensor([0, 1]), 8, 1.0)


@pytest.mark.parametrize("loss,terms", [("ce", {"loss/ce"}), ("center", {"loss/ce", "loss/center"}),
                                        ("cc", {"loss/ce", "loss/dis", "loss/div"})])
def test_losses_finite_and_decrease_on_a_tiny_overfit(loss, terms):
    model = make(module="aam", loss=loss, center_weight=1.0, mu=0.1).train()
    steps = OptimizerSteps(build_optimizer(model, TrainConfig(lr=0.05, weight_decay=0.0)))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 32, 32, generator=g), torch.arange(8) % CLASSES
    history = [model.training_step(x, y, steps, torch.Generator().manual_seed(1)) for _ in range(15)]
    assert terms | {"loss"} <= set(history[0])
    assert all(torch.isfinite(torch.tensor(v)) for h in history for v in h.values())
    assert history[-1]["loss/ce"] < history[0]["loss/ce"]
    assert history[-1]["loss"] < history[0]["loss"]
    if loss == "center":
        assert history[-1]["loss/center"] < history[0]["loss/center"] or history[0]["loss/center"] == 0


def test_even_k_is_rejected():
    with pytest.raises(ValueError, match="must be odd"):
        make(module="aam", k=4)


def test_inference_complexity_leaves_out_training_state():
    from harness.engine.complexity import inference_complexity
    with_centers, plain = make(module="se", loss="center"), make(module="se", loss="ce")
    assert (inference_complexity(with_centers, 32)["inference/params"]
            == inference_complexity(plain, 32)["inference/params"])
    assert inference_complexity(plain, 32)["inference/params"] == sum(p.numel() for p in plain.parameters())


def test_center_update_is_wen_et_al_rule():
    """c_j <- c_j - alpha * sum_{y_i = j} (c_j - f_i) / (1 + n_j); the loss is ||f - c_y||^2 / 2 (batch mean);
    the centres are no parameter: no optimizer, no weight decay touches them."""
    model = make(module="none", loss="center", center_alpha=0.5)
    assert "centers" in dict(model.named_buffers()) and "centers" not in dict(model.named_parameters())
    channels = model.centers.shape[1]
    torch.manual_seed(3)
    model.centers.copy_(torch.randn(CLASSES, channels))
    before = model.centers.clone()
    f = torch.randn(5, channels)
    labels = torch.tensor([2, 2, 5, 2, 0])
    loss = model.center_loss(f, labels)
    assert loss.item() == pytest.approx(((f - before[labels]) ** 2).sum(1).mean().item() / 2, rel=1e-6)
    expected = before.clone()
    for j in range(CLASSES):
        members = labels == j
        delta = (before[j] - f[members]).sum(0) / (1 + members.sum())
        expected[j] = before[j] - 0.5 * delta
    torch.testing.assert_close(model.centers, expected)
    assert torch.equal(model.centers[1], before[1])  # a class absent from the batch does not move


def test_eca_adaptive_kernel_size_from_channels():
    from methods.aam import eca_kernel_size

    assert [eca_kernel_size(c) for c in (64, 128, 256, 512, 2048)] == [3, 5, 5, 5, 7]
    model = make(module="eca", k_adaptive=True)
    assert [model.attention[s].conv.kernel_size[0] for s in ("1", "2", "3", "4")] == [3, 5, 5, 5]


def test_residual_attention_in_stages_1_to_3_with_the_paper_pools():
    """The paper's layout: modules after stages 1-3 (none after the last), pooling down to the last stage's size:
    3, 2 and 1 pools at a ResNet's strides 4, 8 and 16 (56 -> 7, 28 -> 7, 14 -> 7 at 224 px)."""
    model = make(module="resatt", loss="ce")
    assert list(model.attention) == ["1", "2", "3"]
    assert [model.attention[s].pools for s in ("1", "2", "3")] == [3, 2, 1]
    explicit = make(module="resatt", placement=[2, 4], mask_pools=[1, 0])
    assert list(explicit.attention) == ["2", "4"] and [m.pools for m in explicit.attention.values()] == [1, 0]
    with pytest.raises(ValueError, match="mask_pools"):
        make(module="resatt", mask_pools=[3, 2])  # three placed stages, two counts


@pytest.mark.parametrize("size", [32, 64, 112])
def test_residual_attention_params_are_what_it_adds_at_inference(size):
    """attention/params = the parameters a forward pass uses over the same backbone without a module, at any size."""
    from harness.engine.complexity import inference_complexity

    for learning in ("arl", "nal"):
        with_module, plain = make(module="resatt", attention_learning=learning), make(module="none")
        added = inference_complexity(with_module, size)["inference/params"] - \
            inference_complexity(plain, size)["inference/params"]
        assert with_module.extra_metrics()["attention/params"] == added > 0

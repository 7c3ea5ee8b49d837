"""The plugin contract, over every registered method and dataset family (new plugins included without being
listed): defaults validate, a training step returns its losses with `loss`, `predict` returns the heads it
names (the primary first), the state dict round-trips; dataset parameters validate and carry their name."""

import io

import pytest
import torch

from harness.plugin.backbones import BackboneConfig, build_backbone
from harness.data import DATASETS, RootedParams
from harness.engine.loop import build_optimizer
from harness.plugin.method import METHODS, OptimizerSteps
from harness.study.config import TrainConfig

CLASSES = 4


def build(name: str):
    cls = METHODS.get(name)
    params = cls.Params()
    backbone = build_backbone(BackboneConfig(name="resnet18"))
    cls.validate_with(params, backbone.num_stages)
    torch.manual_seed(0)
    return cls(backbone, CLASSES, params)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_keeps_the_contract(name):
    cls = METHODS.get(name)
    assert cls.Params().name == name and cls.Params.model_validate({"name": name}) == cls.Params()
    method = build(name)
    heads = method.heads
    assert heads == cls.head_names(cls.Params(), 5) and method.primary_head == heads[0]
    steps = OptimizerSteps(build_optimizer(method, TrainConfig(lr=0.01)), set_to_none=method.zero_grad_set_to_none)
    images, labels = torch.rand(4, 3, 32, 32), torch.arange(4) % CLASSES
    extra = {"boxes": torch.tensor([[[2.0, 2.0, 20.0, 20.0]]]).repeat(4, 1, 1)} if method.uses_boxes else {}
    losses = method.train().training_step(images, labels, steps, torch.Generator().manual_seed(0), **extra)
    assert "loss" in losses and all(isinstance(v, float) for v in losses.values()) and steps.count >= 1
    method.eval()
    with torch.no_grad():
        out = method.predict(images)
    assert tuple(out) == heads and all(v.shape == (4, CLASSES) for v in out.values())
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    twin = build(name).eval()
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        again = twin.predict(images)
    for head in heads:
        torch.testing.assert_close(again[head], out[head])


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_family_validates_its_defaults(name):
    family = DATASETS.get(name)
    needed = {"root": "/data/x"} if issubclass(family.Params, RootedParams) else {}
    params = family.Params.model_validate(needed)
    assert params.name == name and family.registry_name == name
    with pytest.raises(ValueError, match="extra"):
        family.Params.model_validate({**needed, "no_such_knob": 1})

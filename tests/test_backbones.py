"""Backbones: timm multi-stage features, early exit, pretrained weights from a local file."""

import pytest
import timm
import torch

from harness.backbones import BackboneConfig, build_backbone


def test_resnet18_stages_and_early_exit():
    torch.manual_seed(0)
    b = build_backbone(BackboneConfig(name="resnet18")).eval()
    assert b.channels == [64, 64, 128, 256, 512] and b.num_stages == 5 and b.supports_early_exit
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        full = b(x)
        for upto in range(5):
            early = b(x, upto=upto)
            assert len(early) == upto + 1
            assert all(torch.equal(e, f) for e, f in zip(early, full))


@pytest.mark.parametrize("name", ["resnet50", "vgg16_bn"])
def test_paper_backbones_build(name):
    b = build_backbone(BackboneConfig(name=name))
    assert b.num_stages >= 5 and b.channels[-1] in (2048, 512)


def test_pretrained_weights_from_a_local_file(tmp_path):
    reference = timm.create_model("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    b = build_backbone(BackboneConfig(name="resnet18", pretrained=str(path)))
    assert torch.equal(b.body.conv1.weight, reference.conv1.weight)
    assert torch.equal(b.body.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_clear_errors():
    with pytest.raises(FileNotFoundError, match="no weights file at"):
        build_backbone(BackboneConfig(name="resnet18", pretrained="/nonexistent/weights.pth"))
    with pytest.raises(ValueError, match="timm has no model 'resnet81'.*did you mean"):
        build_backbone(BackboneConfig(name="resnet81"))

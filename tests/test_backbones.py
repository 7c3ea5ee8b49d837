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


def test_swin_stages_come_channels_first():
    b = build_backbone(BackboneConfig(name="swin_tiny_patch4_window7_224", kwargs={"img_size": 64, "window_size": 2}))
    assert b.channels == [96, 192, 384, 768] and b.channels_last_output
    feats = b(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 96, 16, 16), (1, 192, 8, 8), (1, 384, 4, 4), (1, 768, 2, 2)]
    early = b(torch.rand(1, 3, 64, 64), upto=1)
    assert [f.shape[1] for f in early] == [96, 192]

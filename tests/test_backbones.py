"""Backbones: timm multi-stage features, early exit, pretrained weights from a local file."""

import pytest
import timm
import torch

from harness.plugin.backbones import BackboneConfig, build_backbone


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


SMALL_SWIN = {"name": "swin_tiny_patch4_window7_224", "kwargs": {"img_size": 64, "window_size": 2}}


@pytest.mark.parametrize("final_norm", [True, False])
def test_swin_stages_come_channels_first(final_norm):
    b = build_backbone(BackboneConfig(**SMALL_SWIN, final_norm=final_norm))
    assert b.channels == [96, 192, 384, 768] and b.channels_last_output is not final_norm
    feats = b(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 96, 16, 16), (1, 192, 8, 8), (1, 384, 4, 4), (1, 768, 2, 2)]
    early = b(torch.rand(1, 3, 64, 64), upto=1)
    assert [f.shape[1] for f in early] == [96, 192]


def test_swin_last_stage_passes_the_pretrained_final_norm():
    """timm's features_only drops a Swin's final LayerNorm; the last stage must be what the network's head saw
    (timm's forward_features), the earlier stages untouched."""
    torch.manual_seed(0)
    b = build_backbone(BackboneConfig(**SMALL_SWIN)).eval()
    with torch.no_grad():
        x = torch.rand(2, 3, 64, 64)
        feats = b(x)
        full = b.body.model  # the whole timm model, its norm kept and its weights shared
        assert not isinstance(full.norm, torch.nn.Identity)
        torch.testing.assert_close(feats[-1], full.forward_features(x).permute(0, 3, 1, 2))
        raw = build_backbone(BackboneConfig(**SMALL_SWIN, final_norm=False))
        raw.load_state_dict({k.removeprefix("model."): v for k, v in b.body.state_dict().items()}, strict=False)
        assert not torch.allclose(raw(x)[-1], feats[-1])  # without it the maps are un-normalised


def test_stem_pooled_is_the_pmg_authors_first_stage():
    """The PMG authors' ResNet returns x1 = maxpool(relu(bn1(conv1(x)))) as its first map; timm's is before the pool."""
    torch.manual_seed(0)
    pooled = build_backbone(BackboneConfig(name="resnet18", stem_pooled=True)).eval()
    with torch.no_grad():
        x = torch.rand(2, 3, 64, 64)
        feats = pooled(x)
        body = pooled.body
        torch.testing.assert_close(feats[0], body.maxpool(body.act1(body.bn1(body.conv1(x)))))
        assert [tuple(f.shape[-2:]) for f in feats] == [(16, 16), (16, 16), (8, 8), (4, 4), (2, 2)]
        assert pooled.reductions[0] == 4 and [f.shape[1] for f in pooled(x, upto=0)] == [64]
    with pytest.raises(ValueError, match="stem_pooled: swin_tiny.* has no pooling layer"):
        build_backbone(BackboneConfig(**SMALL_SWIN, final_norm=False, stem_pooled=True))


def test_pretrained_weights_must_be_named():
    with pytest.raises(ValueError, match=r"untagged name 'resnet50' would load timm's default weights "
                                         r"'resnet50\.a1_in1k'.*tv_in1k"):
        BackboneConfig(name="resnet50", pretrained=True)
    assert BackboneConfig(name="resnet50.tv_in1k", pretrained=True).pretrained is True
    assert BackboneConfig(name="resnet50", pretrained=False).name == "resnet50"  # random init needs no tag

"""SE, ECA, CBAM, AAM: shapes, parameter counts, gates in [0, 1], parallel vs sequential branches."""

import pytest
import torch

from methods.attention_modules import AAM, CBAM, ECA, SE, build_attention

C, R = 64, 16


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("kind", ["none", "se", "eca", "cbam", "aam"])
def test_modules_keep_the_input_shape(kind):
    x = torch.randn(2, C, 9, 7)
    assert build_attention(kind, C).eval()(x).shape == x.shape


def test_parameter_counts_match_the_formulas():
    assert count(SE(C, R)) == C * (C // R) + C // R + (C // R) * C + C  # two Linear layers with biases
    for k in (1, 3, 5, 7, 9):
        assert count(ECA(C, k)) == k  # one 1-D conv over k neighbours, no bias
        assert count(AAM(C, k, kernel_size=7)) == k + 2 * 7 * 7
        assert count(AAM(C, k, kernel_size=3)) == k + 2 * 3 * 3
    assert count(CBAM(C, R, 7)) == C * (C // R) + C // R + (C // R) * C + C + 2 * 7 * 7 + 2  # MLP, 7x7 conv, BN


def test_gates_are_in_0_1():
    x = torch.randn(3, C, 8, 8) * 10
    cbam, aam = CBAM(C).eval(), AAM(C)
    for gate in (SE(C).gate(x), ECA(C).gate(x), cbam.channel_gate(x), cbam.spatial_gate(x),
                 torch.sigmoid(aam.channel_logits(x)), torch.sigmoid(aam.spatial_logits(x))):
        assert gate.min() >= 0 and gate.max() <= 1


def capture_input(module):
    seen = []
    module.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    return seen


def test_aam_branches_see_the_same_input_in_parallel():
    aam = AAM(C)
    x = torch.randn(2, C, 8, 8)
    spatial_in = capture_input(aam.spatial)
    aam(x)
    mean_max = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
    assert torch.equal(spatial_in[0], mean_max)  # computed from F itself, not from F * Mc
    expected = x * torch.sigmoid(aam.channel_logits(x)) + x * torch.sigmoid(aam.spatial_logits(x))
    assert torch.allclose(aam(x), expected)
    joint = AAM(C, fusion="joint")
    assert torch.allclose(joint(x), x * torch.sigmoid(joint.channel_logits(x) + joint.spatial_logits(x)))


def test_cbam_spatial_branch_sees_channel_refined_features():
    cbam = CBAM(C).eval()
    x = torch.randn(2, C, 8, 8)
    spatial_in = capture_input(cbam.spatial)
    cbam(x)
    refined = x * cbam.channel_gate(x)
    assert torch.allclose(spatial_in[0], torch.cat([refined.mean(1, keepdim=True), refined.amax(1, keepdim=True)], 1))


def test_aam_channel_attention_uses_max_pooling_and_eca_average():
    x = torch.zeros(1, C, 4, 4)
    x[0, 5, 0, 0] = 8.0  # max 8, mean 0.5 in channel 5
    aam, eca = AAM(C, k=1), ECA(C, k=1)
    with torch.no_grad():
        aam.channel.weight.fill_(1.0)
        eca.conv.weight.fill_(1.0)
    assert aam.channel_logits(x)[0, 5, 0, 0] == 8.0
    assert eca.gate(x)[0, 5, 0, 0] == torch.sigmoid(torch.tensor(0.5))


def test_invalid_settings():
    with pytest.raises(ValueError, match="odd"):
        ECA(C, k=4)
    with pytest.raises(ValueError, match="unknown attention module"):
        build_attention("bam", C)


def test_residual_attention_arl_is_the_trunk_when_the_mask_is_zero():
    from methods.attention_modules import attention_residual

    trunk, zero = torch.randn(2, 8, 5, 5), torch.zeros(2, 8, 5, 5)
    assert torch.equal(attention_residual(trunk, zero, "arl"), trunk)  # (1 + 0) * T
    assert torch.equal(attention_residual(trunk, zero, "nal"), zero)  # 0 * T: naive learning loses the trunk
    mask = torch.rand(2, 8, 5, 5)
    torch.testing.assert_close(attention_residual(trunk, mask, "arl"), trunk + mask * trunk)


def count_units(module):
    from methods.attention_modules import ResidualUnit

    return sum(isinstance(m, ResidualUnit) for m in module.modules())


def test_residual_attention_builds_the_prototxt_units():
    """Attention-56's stage-1 module (3 pools): pre 1, trunk 2, post 1; mask: 1 unit after pools 1 and 2, 2 at the
    lowest resolution (res3_1, res3_2), skips at the two pooled scales above it, 1 unit back up at each:
    2 + 2 + 2 + 2 = 8 mask units. Stage 2 (2 pools): 1 + 2 + 1 + 1 = 5; stage 3 (1 pool): 2, no skip."""
    from methods.attention_modules import ResidualAttention

    for pools, mask_units, skips in ((3, 8, 2), (2, 5, 1), (1, 2, 0), (0, 2, 0)):
        module = ResidualAttention(16, pools=pools)
        assert count_units(module) == 4 + mask_units and len(module.skips) == skips, pools
        assert len(module.bottom) == 2  # 2r at the lowest resolution, r = 1
    head_convs = [m for m in ResidualAttention(16).head if isinstance(m, torch.nn.Conv2d)]
    assert len(head_convs) == 2 and all(c.bias is None for c in head_convs)  # linear_1, linear_2: no bias


@pytest.mark.parametrize("pools", [0, 1, 2, 3])
def test_residual_attention_uses_every_parameter_it_builds(pools):
    """Every parameter takes part in a forward pass and gets a gradient, at a small and a large input."""
    from methods.attention_modules import ResidualAttention

    module = ResidualAttention(16, pools=pools)
    for size in (6, 28):
        module.zero_grad(set_to_none=True)
        module(torch.randn(2, 16, size, size)).square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), (pools, size)


def test_residual_attention_module_shapes_and_mask_range():
    from methods.attention_modules import ResidualAttention

    for pools in (0, 1, 3):
        module = ResidualAttention(16, pools=pools).eval()
        for size in (28, 16, 7, 2):
            x = torch.randn(2, 16, size, size)
            with torch.no_grad():
                m = module.mask(x)
                assert m.shape == x.shape and m.min() > 0 and m.max() < 1
                assert module(x).shape == x.shape
    module = ResidualAttention(16, pools=2).eval()
    with torch.no_grad():  # a zero mask-head makes M = 0.5 everywhere: output = post(1.5 * trunk(pre(x)))
        module.head[-1].weight.zero_()
        x = torch.randn(1, 16, 14, 14)
        pre = module.pre(x)
        torch.testing.assert_close(module(x), module.post(1.5 * module.trunk(pre)))
    with pytest.raises(ValueError, match="arl or nal"):
        ResidualAttention(16, learning="both")

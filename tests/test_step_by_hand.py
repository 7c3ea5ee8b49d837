"""Every method's training step against its paper, by hand: on a small float64 network and fixed images, each test
writes out the paper's losses in plain torch (tests/hand.py: cross-entropy, softmax, SGD; none of the method's loss
code) on a copy of the method, takes the updates PyTorch's SGD defines (momentum, weight decay, each group's lr),
and checks the losses the step reports and every parameter and buffer after it. Two batches each, so momentum and
the state carried between batches (centres, PyTorch 1.x zero_grad) are in it. The networks' forward passes are the
methods' own (their architectures are tested in tests/test_<method>.py); what is checked is the step.

PMG, WS-DAN and MKSMT here; AAM, Residual Attention, RA-CNN and GAIN in tests/test_step_by_hand_attention.py."""

import pytest
import torch

from methods.mksmt import MKSMT, MKSMTParams
from methods.pmg import PMG, PMGParams
from methods.wsdan import WSDAN, WSDANParams
from tests.hand import LR, HandSGD, assert_same_state, batch, ce, pair, softmax, tiny_backbone
from tests.reference import authors_block_swap

CLASSES = 4


def test_pmg_step_by_hand():
    """Du et al., Algorithm 1: per batch S + 1 updates; update k on alpha CE(y^l_k(P(d, n_k))) with n = 2^(L-l+1)
    (8, 4, 2 for stages 3-5 of L = 5), the last on beta CE(y_concat(d)), alpha = 1, beta = 2; SGD with the backbone
    at 0.1 x the new layers' lr, and the authors' PyTorch 1.x zero_grad (a parameter a step does not reach still
    moves by momentum and weight decay)."""
    model, hand, steps = pair(PMG(tiny_backbone(), CLASSES, PMGParams(stages=3, feature_size=16, stage_dim=32)))
    sgd = HandSGD(hand, lr_of=lambda name: LR * (0.1 if name.startswith("backbone.") else 1.0), zero_fill=True)
    g_model, g_hand = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for seed in range(2):
        x, y = batch(seed=seed)
        losses = model.training_step(x, y, steps, g_model)
        expected = []
        for k, n in enumerate((8, 4, 2)):
            order = torch.randperm(n * n, generator=g_hand).tolist()  # the authors' random.shuffle of the blocks
            expected.append(sgd.step(1.0 * ce(hand(authors_block_swap(x, n, order))[k], y)))
        expected.append(sgd.step(2.0 * ce(hand(x)[-1], y)))
        assert [losses[k] for k in ("loss/stage3", "loss/stage4", "loss/stage5", "loss/concat")] == pytest.approx(
            expected, rel=1e-9)
        assert losses["loss"] == pytest.approx(sum(expected), rel=1e-9)
        assert_same_state(model, hand)


def wsdan_by_hand(hand, images):
    """BAP (Hu et al., Eq. 2-3): f = normalise(signed sqrt(GAP(A_k * F)) for k = 1..M, flattened); logits W (100 f)."""
    features = hand.backbone(images, upto=hand.stage)[-1]  # (B, C, h, w)
    maps = hand.attentions(features)  # (B, M, h, w)
    f = (maps[:, :, None] * features[:, None]).mean((3, 4)).flatten(1)  # (B, M*C)
    f = f.sign() * (f.abs() + 1e-12).sqrt()
    f = f / f.norm(dim=1, keepdim=True).clamp(min=1e-12)  # an all-zero f (the erased image) stays 0
    return (100 * f) @ hand.fc.weight.T, f


def test_wsdan_step_by_hand():
    """Hu et al., Sec. 3: one update on CE(raw)/3 + CE(crop)/3 + CE(drop)/3 + L_A, the centre loss
    L_A = sum_i ||f_i - c_{y_i}||^2 / B on L2-normalised centres, which move by c_y += beta (f - c_y), beta = 0.05,
    once per image (a label twice in the batch: twice). Batch 1 with thresholds 0, whose crop is the whole image
    and whose drop erases it all; batch 2 with the paper's thresholds, the crop and drop images taken from the
    forward passes (their geometry is worked out in tests/test_wsdan.py)."""
    params = WSDANParams(attention_maps=4, stage=-2, crop_theta=(0.0, 0.0), drop_theta=(0.0, 0.0))
    model, hand, steps = pair(WSDAN(tiny_backbone(), CLASSES, params))
    sgd = HandSGD(hand)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    y = torch.tensor([0, 1, 1, 3])
    for seed in range(2):
        if seed == 1:
            model.params = model.params.model_copy(update={"crop_theta": (0.4, 0.6), "drop_theta": (0.2, 0.5)})
        x, _ = batch(seed=seed)
        seen.clear()
        losses = model.training_step(x, y, steps, torch.Generator().manual_seed(seed))
        raw, crop, drop = seen
        assert torch.equal(raw, x)
        if seed == 0:
            assert torch.equal(crop, x) and torch.equal(drop, torch.zeros_like(x))
        else:  # a region of the image, zoomed; the image with a region erased
            assert not torch.equal(crop, x) and 0 < (drop == 0).double().mean() < 1
        z_raw, f = wsdan_by_hand(hand, raw)
        ces = [ce(z_raw, y), ce(wsdan_by_hand(hand, crop)[0], y), ce(wsdan_by_hand(hand, drop)[0], y)]
        centres = hand.centers[y] / hand.centers[y].norm(dim=1, keepdim=True).clamp(min=1e-12)
        center = ((f - centres) ** 2).sum() / len(y)
        if seed == 0:
            assert float(center.detach()) == pytest.approx(1.0)  # zero centres: ||f||^2 = 1 per image
        with torch.no_grad():
            for i, label in enumerate(y.tolist()):
                hand.centers[label] += 0.05 * (f[i] - centres[i])
        total = sgd.step(sum(ces) / 3 + center)
        assert [losses[k] for k in ("loss/raw", "loss/crop", "loss/drop", "loss/center", "loss")] == pytest.approx(
            [*(float(c.detach()) for c in ces), float(center.detach()), total], rel=1e-10)
        assert_same_state(model, hand)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mksmt_step_by_hand(temperature):
    """Yu et al., Sec. 3.2-3.3, two-step training: update 1 on CE(S3) from S1..S3 alone; update 2 on
    lambda1 CE(S4) + lambda2 T^2 KL(softmax(z4 / T) || softmax(z3 / T)), batch mean, the S4 teacher detached,
    lambda1 = lambda2 = 1; PyTorch 1.x zero_grad, as the article ran (update 1 still moves S4 by momentum)."""
    model, hand, steps = pair(MKSMT(tiny_backbone(), CLASSES, MKSMTParams(opm_dim=16, temperature=temperature)))
    sgd = HandSGD(hand, zero_fill=True)
    t = temperature
    for seed in range(2):
        x, y = batch(seed=seed)
        losses = model.training_step(x, y, steps)
        step1 = sgd.step(ce(hand(x, upto="S3")["S3"][1], y))
        out = hand(x)
        z4, z3 = out["S4"][1], out["S3"][1]
        teacher = softmax(z4.detach() / t)
        log_student = z3 / t - (z3 / t).logsumexp(1, keepdim=True)
        kd = t * t * (teacher * (teacher.log() - log_student)).sum(1).mean()
        ce4 = ce(z4, y)
        step2 = sgd.step(1.0 * ce4 + 1.0 * kd)
        assert [losses[k] for k in ("loss/S3", "loss/last_step", "loss/S4", "loss/kd")] == pytest.approx(
            [step1, step2, float(ce4.detach()), float(kd.detach())], rel=1e-10)
        assert_same_state(model, hand)

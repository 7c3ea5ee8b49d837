"""The training steps of AAM, Residual Attention, RA-CNN and GAIN against their papers, by hand (tests/hand.py; the
method of these tests is in tests/test_step_by_hand.py): the losses written out in plain torch on a copy of the
method, PyTorch's SGD updates, the reported losses and every parameter and buffer after two batches."""

import pytest
import torch
import torch.nn.functional as F

from methods.aam import AAMNet, AAMParams
from methods.gain import GAIN, GAINParams
from methods.racnn import RACNN, RACNNParams
from tests.hand import HandSGD, assert_same_state, batch, ce, pair, softmax, tiny_backbone

CLASSES = 4


def test_aam_with_the_cross_channel_loss_by_hand():
    """L = CE + mu (L_dis - eta L_div), mu = 0.01 (the AAM article), in the mutual-channel form (Chang et al.): the
    last stage's C channels in one group of xi = C / classes per class; L_dis: a random half of each group's
    channels kept, the max across the group's channels, averaged over positions, as logits of a CE; L_div: each
    channel's softmax over positions, the max across the group, summed over positions, averaged (maximised)."""
    model, hand, steps = pair(AAMNet(tiny_backbone(), CLASSES, AAMParams(loss="cc", eta=2.0)))
    sgd = HandSGD(hand)
    g_model, g_hand = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for seed in range(2):
        x, y = batch(size=64, seed=seed)
        losses = model.training_step(x, y, steps, g_model)
        logits, features = hand(x)  # the last stage, refined by the modules: (B, 64, 2, 2) at 64 px
        b, c = features.shape[:2]
        xi = c // CLASSES
        groups = features[:, :xi * CLASSES].reshape(b, CLASSES, xi, -1)  # (B, classes, xi, positions)
        keep = torch.rand(CLASSES, xi, generator=g_hand).argsort(1) < (xi + 1) // 2  # half of each group
        l_dis = ce((groups * keep[None, :, :, None]).amax(2).mean(2), y)
        spread = (groups - groups.amax(3, keepdim=True)).exp()
        l_div = (spread / spread.sum(3, keepdim=True)).amax(2).sum(2).mean()
        loss_ce = ce(logits, y)
        total = sgd.step(loss_ce + 0.01 * (l_dis - 2.0 * l_div))
        assert [losses[k] for k in ("loss/ce", "loss/dis", "loss/div", "loss")] == pytest.approx(
            [float(loss_ce.detach()), float(l_dis.detach()), float(l_div.detach()), total], rel=1e-6)
        assert_same_state(model, hand, atol=1e-8)  # L_div's softmax runs in float32


def test_aam_with_the_center_loss_by_hand():
    """L = CE + lambda L_C, L_C = sum_i ||f_i - c_{y_i}||^2 / (2 B) on the pooled features (Wen et al., ECCV 2016),
    lambda = 0.01; after the step each centre moves by Wen et al.'s rule
    c_j <- c_j - alpha sum_{y_i = j} (c_j - f_i) / (1 + n_j), alpha = 0.5."""
    model, hand, steps = pair(AAMNet(tiny_backbone(), CLASSES, AAMParams(loss="center")))
    sgd = HandSGD(hand)
    y = torch.tensor([0, 1, 1, 3])  # class 1 twice: n_1 = 2
    for seed in range(2):
        x, _ = batch(seed=seed)
        losses = model.training_step(x, y, steps)
        logits, features = hand(x)
        f = features.mean((2, 3))
        centres = hand.centers[y]
        center = ((f - centres) ** 2).sum() / (2 * len(y))
        with torch.no_grad():
            new = hand.centers.clone()
            for j in range(CLASSES):
                members = (y == j).nonzero()[:, 0]
                new[j] -= 0.5 * (hand.centers[j] - f[members]).sum(0) / (1 + len(members))
            hand.centers.copy_(new)
        loss_ce = ce(logits, y)
        total = sgd.step(loss_ce + 0.01 * center)
        assert [losses[k] for k in ("loss/ce", "loss/center", "loss")] == pytest.approx(
            [float(loss_ce.detach()), float(center.detach()), total], rel=1e-10)
        assert_same_state(model, hand)


def test_residual_attention_by_hand():
    """Wang et al., CVPR 2017: each attention module outputs (1 + M(x)) * T(x) (attention residual learning, Eq. 3)
    between its p pre- and post-units, M in (0, 1); the network trains on plain cross-entropy."""
    model, hand, steps = pair(AAMNet(tiny_backbone(), CLASSES, AAMParams(module="resatt", loss="ce")))
    sgd = HandSGD(hand)
    for seed in range(2):
        x, y = batch(seed=seed)
        losses = model.training_step(x, y, steps)
        total = sgd.step(ce(hand(x)[0], y))
        assert losses["loss"] == pytest.approx(total, rel=1e-10) and losses["loss/ce"] == losses["loss"]
        assert_same_state(model, hand)
    module = hand.attention["1"].eval()  # stage 1 (8 channels here), 3 pools down to the last stage's size
    with torch.no_grad():
        inputs = torch.randn(2, 8, 8, 8, dtype=torch.float64)
        pre = module.pre(inputs)
        mask = module.mask(pre)
        assert 0 < mask.min() and mask.max() < 1
        assert torch.allclose(module(inputs), module.post((1 + mask) * module.trunk(pre)), atol=1e-12)


@pytest.mark.parametrize("scales,init_batches", [(3, 0), (2, 1)])
def test_racnn_alternating_steps_by_hand(scales, init_batches):
    """Fu et al., CVPR 2017: update 1, the classification networks with the APNs fixed, on
    sum_s CE(Y^(s)) + CE(fused) + CE(fused 1+2); update 2, the APNs with the classification networks fixed (their
    BatchNorm statistics too), on the ranking loss sum_s max(0, p_t^(s) - p_t^(s+1) + margin), batch mean,
    margin 0.05; p_t the true class's probability. While the APNs are initialised, update 2 regresses their square
    onto the highest response's, half a side of 0.25 (MSE) instead (two scales there: one APN, no fused 1+2)."""
    params = RACNNParams(scales=scales, apn_hidden=16, apn_pool=2, apn_init_batches=init_batches)
    model, hand, steps = pair(RACNN(tiny_backbone(), CLASSES, params))
    sgd = HandSGD(hand)
    apn = {n for n, _ in hand.named_parameters() if n.startswith(("apns.", "fusion"))}  # what update 2 may move
    for seed in range(2):
        x, y = batch(size=64, seed=seed)  # the last stage 2 x 2: a highest response to find
        losses = model.training_step(x, y, steps)
        out = hand(x, detach_boxes=True)
        cls = sum(ce(z, y) for z in out["logits"]) + ce(out["fused"], y) + (ce(out["fused12"], y) if scales == 3 else 0)
        step1 = sgd.step(cls)
        norms = [m for m in hand.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.eval()
        out = hand(x)
        if seed < init_batches:
            targets = []
            for features in out["features"][:-1]:
                where = features.detach().sum(1).flatten(1).argmax(1)
                h, w = features.shape[-2:]
                cx, cy = ((where % w + 0.5) / w).clamp(0.25, 0.75), ((where // w + 0.5) / h).clamp(0.25, 0.75)
                targets.append(torch.stack([cx, cy, torch.full_like(cx, 0.25)], 1))
            name, apn_loss = "loss/apn_init", sum(((b - t) ** 2).mean() for b, t in zip(out["boxes"], targets))
        else:
            p = [softmax(z).gather(1, y[:, None])[:, 0] for z in out["logits"]]
            name, apn_loss = "loss/rank", sum((p[s] - p[s + 1] + 0.05).clamp(min=0).mean() for s in range(scales - 1))
        step2 = sgd.step(apn_loss, only=apn)
        for m in norms:
            m.train()
        hand.batches_seen += 1
        assert losses["loss/cls"] == pytest.approx(step1, rel=1e-9)
        assert losses[name] == pytest.approx(step2, rel=1e-6)  # the APN's boxes run in float32
        assert_same_state(model, hand, atol=1e-8)  # the APN's boxes run in float32


@pytest.mark.parametrize("external", [False, True])
def test_gain_step_by_hand(external):
    """Li et al., CVPR 2018: A = ReLU(sum_k w_k f_k), w_k = GAP(d s^c / d f_k) of the true class (Eq. 1-2, no
    gradient through w), upsampled and min-max normalised; T(A) = sigmoid(omega (A - sigma)) (Eq. 4), sigma 0.5,
    omega 10; I* = I - T(A) I (Eq. 3) through the same network, its BatchNorm on running statistics; L_am = s^c(I*)
    (Eq. 5), the softmax probability; L = L_cl + alpha L_am, alpha = 1; GAIN_ext adds omega_e L_e, L_e the mean over
    pixels of (A - H)^2, H = 1 inside the image's boxes (Eq. 7), omega_e 10, here every image supervised. At 64 px:
    a 1 x 1 last stage (32 px) has a flat map, whose min-max normalisation is the float32 rounding noise's. The map
    and L_am are computed in float32, as the method computes them."""
    model, hand, steps = pair(GAIN(tiny_backbone(), CLASSES, GAINParams(external=external, ext_fraction=1.0)))
    sgd = HandSGD(hand)
    boxes = torch.tensor([[[8, 8, 40, 56]], [[0, 0, 32, 32]], [[16, 0, 64, 24]], [[-1, -1, -1, -1]]],
                         dtype=torch.float64)  # xyxy pixels; the last image has none (no L_e term)
    for seed in range(2):
        x, y = batch(size=64, seed=seed)
        losses = model.training_step(x, y, steps, torch.Generator(), **({"boxes": boxes} if external else {}))
        f = hand.backbone(x)[-1]
        logits = f.mean((2, 3)) @ hand.fc.weight.T + hand.fc.bias
        score = logits.gather(1, y[:, None])[:, 0]
        (grad,) = torch.autograd.grad(score.sum(), f, retain_graph=True)
        cam = (grad.mean((2, 3), keepdim=True) * f).sum(1, keepdim=True).clamp(min=0).float()  # as the method: fp32
        up = F.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)
        low, high = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
        attention = (up - low) / (high - low + 1e-8)
        mask = 1 / (1 + torch.exp(-10 * (attention - 0.5)))
        norms = [m for m in hand.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.eval()
        erased = hand.backbone(x - mask.double() * x)[-1].mean((2, 3)) @ hand.fc.weight.T + hand.fc.bias
        for m in norms:
            m.train()
        l_cl, l_am = ce(logits, y), softmax(erased.float()).gather(1, y[:, None]).mean()  # fp32, as the method
        loss, expected = l_cl + 1.0 * l_am, {"loss/cl": l_cl, "loss/am": l_am}
        if external:
            centres = torch.arange(64, dtype=torch.float64) + 0.5
            inside = [((centres[None, :] >= x0) & (centres[None, :] < x1) & (centres[:, None] >= y0)
                       & (centres[:, None] < y1)).float() if x0 >= 0 else None
                      for x0, y0, x1, y1 in boxes[:, 0].tolist()]  # H: pixel centres inside the box
            expected["loss/e"] = sum(((attention[i, 0] - h) ** 2).mean() for i, h in enumerate(inside)
                                     if h is not None) / len(y)
            loss = loss + 10.0 * expected["loss/e"]
        total = sgd.step(loss)
        assert [losses[k] for k in expected] + [losses["loss"]] == pytest.approx(
            [float(v.detach()) for v in expected.values()] + [total], rel=1e-6)  # fp32: one ulp
        assert_same_state(model, hand, atol=1e-7)  # ulps of the fp32 map through the second batch

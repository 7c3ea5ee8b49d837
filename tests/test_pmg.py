"""PMG against the paper and the authors' code: heads, parameter counts, S+1 steps, early exit."""

import copy

import pytest
import torch
import torch.nn.functional as F

from harness.plugin.backbones import BackboneConfig, build_backbone
from harness.engine.loop import build_optimizer
from harness.plugin.method import METHODS, OptimizerSteps
from harness.study.config import TrainConfig
from methods.pmg import PMG, PMGParams, jigsaw

C = 5


def make(stages=3, **kw):
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="resnet18"))
    return PMG(backbone, C, PMGParams(stages=stages, feature_size=16, stage_dim=32, **kw))


def head_params(cin, fs, sd, classes):
    conv_block = cin * fs + 2 * fs + fs * sd * 9 + 2 * sd  # 1x1 conv + BN, 3x3 conv + BN (convs without bias)
    clf = lambda d: 2 * d + d * fs + fs + 2 * fs + fs * classes + classes  # noqa: E731  BN, Linear, BN, Linear
    return conv_block, clf


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 5])
def test_heads_shapes_and_names(stages):
    model = make(stages).eval()
    with torch.no_grad():
        out = model.predict(torch.rand(2, 3, 64, 64))
    used = [f"stage{i}" for i in range(6 - stages, 6)]  # the last S of resnet18's 5 stages
    assert list(out) == ["combined", "concat"] + used == list(model.heads)  # the primary first
    assert all(v.shape == (2, C) for v in out.values())
    assert torch.allclose(out["combined"], sum(out[k] for k in used + ["concat"]))
    assert model.n_per_step == [2 ** (5 - i) for i in range(5 - stages, 5)][:stages]
    assert model.n_per_step[-1] == 2  # the deepest stage always gets n = 2


def test_default_n_for_paper_setting_is_8_4_2():
    assert make(3).n_per_step == [8, 4, 2]


def test_parameter_count_of_the_new_layers():
    model = make(3)
    fs, sd = 16, 32
    expected = 0
    for cin in (128, 256, 512):  # resnet18 layer2..layer4
        conv_block, clf = head_params(cin, fs, sd, C)
        expected += conv_block + clf(sd)
    _, clf = head_params(0, fs, sd, C)
    expected += clf(3 * sd)  # concat classifier on S * stage_dim
    new = sum(p.numel() for g in model.param_groups() if g["name"] == "new_layers" for p in g["params"])
    assert new == expected


def test_authors_sizes_for_resnet50():
    """The paper's S=3 on ResNet-50: 1x1 C_l->512, 3x3 512->1024, concat BN1d(3072)."""
    backbone = build_backbone(BackboneConfig(name="resnet50"))
    model = PMG(backbone, 200, PMGParams(stages=3))
    assert [b[0][0].in_channels for b in model.conv_blocks] == [512, 1024, 2048]
    assert model.concat_classifier[0].num_features == 3072
    assert model.classifiers[0][-1].out_features == 200


def test_two_learning_rates():
    model = make(3, backbone_lr_scale=0.1)
    opt = build_optimizer(model, TrainConfig(lr=0.002))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"new_layers": 0.002, "backbone": pytest.approx(0.0002)}


@pytest.mark.parametrize("stages", [1, 3, 5])
def test_s_plus_one_optimizer_steps_per_batch(stages):
    model = make(stages).train()
    opt = build_optimizer(model, TrainConfig(lr=0.01))
    steps = OptimizerSteps(opt)
    losses = model.training_step(torch.rand(4, 3, 64, 64), torch.arange(4) % C, steps, torch.Generator())
    assert steps.count == stages + 1
    assert set(losses) == {f"loss/stage{i}" for i in range(6 - stages, 6)} | {"loss/concat", "loss"}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_stage_steps_feed_jigsaw_and_the_last_step_the_original(monkeypatch):
    import methods.pmg as pmg
    model = make(3).train()
    seen = []
    monkeypatch.setattr(pmg, "jigsaw", lambda x, n, g=None, per_image=False: (seen.append(n), x)[1])
    model.training_step(torch.rand(2, 3, 64, 64), torch.arange(2),
                        OptimizerSteps(build_optimizer(model, TrainConfig())))
    assert seen == [8, 4, 2]
    seen.clear()
    model.params = model.params.model_copy(update={"jigsaw": False})
    model.training_step(torch.rand(2, 3, 64, 64), torch.arange(2),
                        OptimizerSteps(build_optimizer(model, TrainConfig())))
    assert seen == []


@pytest.mark.parametrize("step", [0, 1, 2])
def test_early_exit_gives_the_same_loss_and_gradients(step):
    full = make(3).train()
    early = copy.deepcopy(full)
    x, y = torch.rand(4, 3, 64, 64), torch.arange(4) % C
    loss_full = F.cross_entropy(full(x)[step], y)
    loss_early = F.cross_entropy(early(x, upto_step=step)[step], y)
    loss_full.backward()
    loss_early.backward()
    assert torch.allclose(loss_full, loss_early, rtol=0, atol=1e-6)
    for (name, a), (_, b) in zip(full.named_parameters(), early.named_parameters()):
        ga = torch.zeros_like(a) if a.grad is None else a.grad
        gb = torch.zeros_like(b) if b.grad is None else b.grad
        assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-6), name
    # The one documented difference: BN running statistics of the stages after the trained one.
    later_bn = full.backbone.body.layer4[0].bn1.running_mean, early.backbone.body.layer4[0].bn1.running_mean
    if step < 2:
        assert not torch.equal(*later_bn)
    assert torch.equal(full.backbone.body.layer2[0].bn1.running_mean, early.backbone.body.layer2[0].bn1.running_mean)


def test_idle_param_updates_reproduce_pytorch1_zero_grad():
    """With the authors' semantics, momentum keeps moving parameters a stage step does not reach."""
    for idle, moves in ((True, True), (False, False)):
        model = make(2, idle_param_updates=idle).train()
        opt = build_optimizer(model, TrainConfig(lr=0.1, weight_decay=0.0))
        steps = OptimizerSteps(opt, set_to_none=model.zero_grad_set_to_none)
        x, y = torch.rand(4, 3, 64, 64), torch.arange(4) % C
        model.training_step(x, y, steps)  # every parameter gets a gradient at the concat step
        concat_weight = model.concat_classifier[1].weight
        before = concat_weight.detach().clone()
        steps.step(F.cross_entropy(model(x)[0], y))  # a stage-4 step: the concat head is not in its graph
        assert (not torch.equal(before, concat_weight)) == moves


def test_registered_and_validates_stage_count():
    assert METHODS.get("pmg") is PMG
    with pytest.raises(ValueError, match="backbone has 3 stages"):
        PMG(build_backbone(BackboneConfig(name="resnet18", out_indices=[2, 3, 4])), C, PMGParams(stages=4))


def dataparallel(model, x, replicas=2):
    """torch.nn.DataParallel(model, device_ids=range(replicas)) emulated on one CPU, as the authors train: the batch
    scattered by torch.chunk, replica 0 the module itself (DataParallel keeps its parameters and buffers on
    device 0, so its BatchNorm statistics are the ones that survive), the others copies taken before the forward
    (dropped after it; their gradients are summed into the module's by `fold_gradients`). Outputs gathered."""
    parts = x.chunk(replicas)
    copies = [copy.deepcopy(model) for _ in parts[1:]]
    for replica in copies:
        for q in replica.parameters():
            q.grad = None
    outputs = [model(parts[0])] + [replica(part) for replica, part in zip(copies, parts[1:])]
    return [torch.cat(ys) for ys in zip(*outputs)], copies


def fold_gradients(model, copies):
    for replica in copies:
        for p, q in zip(model.parameters(), replica.parameters()):
            if q.grad is not None:
                p.grad = q.grad.clone() if p.grad is None else p.grad + q.grad


def test_per_replica_batchnorm_equals_two_replicas_of_the_module():
    from harness.plugin.replica_batchnorm import per_replica_batchnorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.BatchNorm1d(4 * 4 * 4), torch.nn.Linear(64, 3)).double()
    ghost = per_replica_batchnorm(copy.deepcopy(net), 2)
    assert ghost.state_dict().keys() == net.state_dict().keys()
    for batch in (8, 5):  # 5: DataParallel's chunks of 3 and 2
        x = torch.randn(batch, 3, 6, 6, dtype=torch.float64)
        net.zero_grad(), ghost.zero_grad()
        first, second = x.chunk(2)
        replica = copy.deepcopy(net)  # replica 1; replica 0 is `net` itself
        expected = torch.cat([net(first), replica(second)])
        expected.square().sum().backward()
        ours = ghost(x)
        ours.square().sum().backward()
        assert torch.allclose(ours, expected, atol=1e-12)
        for p, q, r in zip(ghost.parameters(), net.parameters(), replica.parameters()):
            assert torch.allclose(p.grad, q.grad + r.grad, atol=1e-12)  # the replicas' gradients summed
    for name, a in net.state_dict().items():  # running statistics of the first replica (two updates)
        assert torch.allclose(a.double(), ghost.state_dict()[name].double(), atol=1e-12), name
    ghost.eval(), net.eval()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    assert torch.equal(ghost(x), net(x))  # eval: the running statistics, nothing per replica


def test_bn_replicas_train_as_the_authors_dataparallel_on_two_gpus():
    """Two PMG batches (S+1 steps each, SGD with momentum and weight decay, PyTorch 1.x zero_grad) with
    bn_replicas: 2 against the authors' loop through DataParallel on two emulated GPUs: same losses, parameters,
    momentum and BatchNorm statistics (float64, to 1e-6)."""
    def narrow(**kw):  # a quarter-width ResNet-18: the same 5 stages and BatchNorms, a fraction of the time
        torch.manual_seed(0)
        quarter = {"channels": [8, 16, 32, 64], "stem_width": 8}
        backbone = build_backbone(BackboneConfig(name="resnet18", kwargs=quarter))
        return PMG(backbone, C, PMGParams(stages=3, feature_size=16, stage_dim=32, **kw)).double().train()

    ours, ref = narrow(bn_replicas=2), narrow()
    train = TrainConfig(lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = OptimizerSteps(build_optimizer(ours, train), set_to_none=False)
    ref_opt = build_optimizer(ref, train)
    g_ours, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for batch in range(2):
        x = torch.rand(8, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(batch))
        y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
        losses = ours.training_step(x, y, steps, g_ours)
        expected = []
        for k, n in enumerate([*ref.n_per_step, None]):  # the stage steps, then the concat step on the images
            inputs = jigsaw(x, n, g_ref) if n else x
            ref_opt.zero_grad(set_to_none=False)
            logits, copies = dataparallel(ref, inputs)
            loss = (1.0 if n else 2.0) * F.cross_entropy(logits[k if n else -1], y)
            loss.backward()
            fold_gradients(ref, copies)
            ref_opt.step()
            expected.append(float(loss.detach()))
        assert [v for k, v in losses.items() if k != "loss"] == pytest.approx(expected, abs=1e-6)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), atol=1e-6), name
    momentum = [s["momentum_buffer"] for s in steps.optimizer.state.values()]
    ref_momentum = [s["momentum_buffer"] for s in ref_opt.state.values()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(momentum, ref_momentum))
    # The knob matters: over the whole batch, the losses differ.
    whole = narrow()
    other = whole.training_step(x, y, OptimizerSteps(build_optimizer(whole, train), set_to_none=False),
                                torch.Generator().manual_seed(1))
    assert other["loss/concat"] != pytest.approx(losses["loss/concat"], abs=1e-6)


def test_bn_replicas_refuse_sync_bn():
    from harness.plugin.distributed import sync_batchnorm

    with pytest.raises(ValueError, match="train.sync_bn: false"):
        sync_batchnorm(make(1, bn_replicas=2))

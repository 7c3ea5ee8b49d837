"""Written-out pieces for the by-hand step tests (tests/test_step_by_hand*.py): the papers' losses in plain torch,
SGD as PyTorch defines it, and the small network they run on. Nothing here calls a method's loss code."""

import copy

import torch

from harness.plugin.backbones import BackboneConfig, build_backbone
from harness.engine.loop import build_optimizer
from harness.plugin.method import OptimizerSteps
from harness.study.config import TrainConfig

LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
TRAIN = TrainConfig(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def tiny_backbone(**kw):
    """A quarter-width ResNet-18 (8-64 channels, the same 5 stages and BatchNorms), seeded: two calls, one network."""
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(name="resnet18", kwargs={"channels": [8, 16, 32, 64], "stem_width": 8}, **kw))


def batch(n=4, size=32, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g, dtype=torch.float64), torch.arange(n) % classes


def ce(logits, labels):
    """Cross-entropy, batch mean: -log softmax(z)_y = logsumexp(z) - z_y."""
    return (logits.logsumexp(1) - logits.gather(1, labels[:, None])[:, 0]).mean()


def softmax(z):
    e = (z - z.amax(1, keepdim=True)).exp()
    return e / e.sum(1, keepdim=True)


def pair(model):
    """The method in float64 with its optimizer as the engine builds it, and a copy of it for the hand."""
    model = model.double().train()
    steps = OptimizerSteps(build_optimizer(model, TRAIN), set_to_none=model.zero_grad_set_to_none)
    return model, copy.deepcopy(model), steps


class HandSGD:
    """PyTorch's SGD written out (dampening 0, no Nesterov): d = g + wd p; the momentum buffer is d at a parameter's
    first update and mu buf + d after it; p <- p - lr buf. `zero_fill`: PyTorch 1.x zero_grad, so a parameter once
    updated keeps being updated (g = 0) by steps whose loss does not reach it. `lr_of(name)` gives each lr."""

    def __init__(self, model, lr_of=lambda name: LR, zero_fill=False):
        self.model, self.lr_of, self.zero_fill, self.buffers = model, lr_of, zero_fill, {}

    def step(self, loss, only=None):
        """One update on `loss`; `only`: the names of the parameters that may move (the others are frozen)."""
        named = [(n, p) for n, p in self.model.named_parameters() if only is None or n in only]
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        with torch.no_grad():
            for (name, p), g in zip(named, grads):
                if g is None:
                    if not (self.zero_fill and name in self.buffers):
                        continue  # no gradient: SGD skips the parameter
                    g = torch.zeros_like(p)
                d = g + WEIGHT_DECAY * p
                self.buffers[name] = d.clone() if name not in self.buffers else MOMENTUM * self.buffers[name] + d
                p -= self.lr_of(name) * self.buffers[name]
        return float(loss.detach())


def assert_same_state(model, hand, atol=1e-9):
    """Every parameter and buffer (BatchNorm statistics, centres) of the method equals the hand's."""
    theirs = hand.state_dict()
    for name, value in model.state_dict().items():
        assert torch.allclose(value.double(), theirs[name].double(), rtol=0, atol=atol), name

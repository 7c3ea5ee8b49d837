"""The method plugin API.

A method is an `nn.Module` built on a StagedBackbone. It declares its parameter schema (`Params`,
the ablation knobs with the paper's defaults), its parameter groups (e.g. the backbone at 0.1x
learning rate), `training_step` (it owns its optimizer steps: PMG takes S+1 per batch, MKSMT one to
three), and `predict` (a dict of named heads' logits, `primary_head` naming the one reported as
`test/acc`). The engine owns everything common: epochs, learning-rate schedule, devices, mixed
precision, evaluation, checkpoints and metrics. A method never touches Ray.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from harness.backbones import StagedBackbone
from harness.distributed import Collective
from harness.registry import Registry


class MethodParams(BaseModel):
    """Base of every method's parameter schema: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    name: str


class TrialDiverged(FloatingPointError):
    """A loss became NaN or infinite: the trial fails with this error instead of training on garbage."""


class OptimizerSteps:
    """What a method calls once per optimizer step: zero_grad -> backward -> average over the workers
    -> (clip) -> step. It is also the method's one handle on the other workers (`sum_over_workers`).

    `set_to_none=False` reproduces PyTorch 1.x's zero_grad, which the authors' code ran on: once a
    parameter has a gradient, later steps zero-fill it instead of dropping it, so SGD's momentum and
    weight decay keep moving parameters that a step's loss does not reach.

    With several workers (harness.distributed), the gradients of every worker are averaged between
    backward and the optimizer step, and the divergence check sees the loss of every worker, so all
    stop at the same step. With one process nothing is exchanged.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, set_to_none: bool = True, grad_clip: float | None = None,
                 collective: Collective | None = None):
        self.optimizer, self.set_to_none, self.grad_clip = optimizer, set_to_none, grad_clip
        self.collective = collective or Collective()
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.count = 0  # optimizer steps taken so far (tests read it: PMG takes S+1 per batch)

    def step(self, loss: torch.Tensor, name: str = "loss") -> float:
        """One update on `loss`; returns this worker's loss value."""
        value = float(loss.detach())
        distributed = self.collective.world_size > 1
        if not distributed:
            self._check(value, name)  # before backward: nothing is computed on garbage
        self.optimizer.zero_grad(set_to_none=self.set_to_none)
        loss.backward()
        if distributed:
            self._check(self.collective.average_gradients(self.params, loss), name)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], self.grad_clip)
        self.optimizer.step()
        self.count += 1
        return value

    def sum_over_workers(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: `tensor` summed over the workers (itself with one). For method state that a step
        updates with per-image sums, e.g. WS-DAN's feature centres: summing the workers' updates gives
        the update of one process on the global batch."""
        return self.collective.sum(tensor)

    def _check(self, value: float, name: str) -> None:
        if not math.isfinite(value):
            raise TrialDiverged(f"{name} became {value} at optimizer step {self.count}: the trial diverged; "
                                "lower train.lr, enable train.grad_clip, or disable train.amp")


class Method(nn.Module):
    Params: ClassVar[type[MethodParams]]
    registry_name: ClassVar[str]
    primary_head: ClassVar[str]
    # The head names `predict` returns, for result columns before any trial has run.
    heads: tuple[str, ...] = ()
    # False reproduces PyTorch 1.x zero_grad (see OptimizerSteps) for methods whose authors relied on it.
    zero_grad_set_to_none: bool = True

    def __init__(self, backbone: StagedBackbone, num_classes: int, params: MethodParams):
        super().__init__()
        type(self).validate_with(params, backbone.num_stages)  # the same checks the study loader runs
        self.backbone, self.num_classes, self.params = backbone, num_classes, params

    @classmethod
    def validate_with(cls, params: MethodParams, num_stages: int) -> None:
        """Checks that need the backbone (e.g. S <= number of stages); raise ValueError naming the fix."""

    def param_groups(self) -> list[dict]:
        """Optimizer groups: dicts with "params", "name" and "lr_scale" (x the study's train.lr).

        Default: the method's own layers (every submodule but the backbone, and modules it inserted
        into the backbone, which are also registered on the method) at 1x, the backbone at
        `params.backbone_lr_scale` (1 when the method has no such knob)."""
        new: dict[int, nn.Parameter] = {id(p): p for p in self.parameters(recurse=False)}
        for child in self.children():
            if child is not self.backbone:
                new.update((id(p), p) for p in child.parameters())
        body = [p for p in self.backbone.parameters() if id(p) not in new]
        return [{"name": "new_layers", "params": list(new.values()), "lr_scale": 1.0},
                {"name": "backbone", "params": body, "lr_scale": getattr(self.params, "backbone_lr_scale", 1.0)}]

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, steps: OptimizerSteps,
                      generator: torch.Generator | None = None) -> dict[str, float]:
        """Train on one batch, calling `steps.step(loss)` once per optimizer step; return losses to log."""
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every named head, (B, C) each; must include `primary_head`."""
        raise NotImplementedError

    def extra_metrics(self) -> dict[str, float]:
        """Method-specific numbers for the results row (e.g. the parameters an attention module adds)."""
        return {}


METHODS: Registry[Method] = Registry("method", Method, "methods", "fgvc_harness.methods")
register_method = METHODS.register

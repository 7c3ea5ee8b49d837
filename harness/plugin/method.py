"""The method plugin API: `Method` (its docstring is the contract), `MethodParams`, `OptimizerSteps`
and the registry. The smallest real plugin is methods/baseline.py.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from harness.plugin.backbones import StagedBackbone
from harness.plugin.distributed import Collective
from harness.core.registry import Registry
from harness.core.schema import ConfigModel


class MethodParams(ConfigModel):
    """Base of every method's parameter schema: unknown keys, inf/NaN and loosely typed ints or bools are errors
    (harness.core.schema). `name` is set by the registry (`@register_method("pmg")`: written once); `backbone_lr_scale`
    is every method's."""

    name: str = ""
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=1000.0, description="backbone lr = train.lr x this")


class TrialDiverged(FloatingPointError):
    """A loss became NaN or infinite: the trial fails with this error instead of training on garbage."""


class OptimizerSteps:
    """What a method calls once per optimizer step: zero_grad -> backward -> average over the workers
    -> (clip) -> step. It is also the method's one handle on the other workers (`sum_over_workers`).

    `set_to_none=False` reproduces PyTorch 1.x's zero_grad, which the authors' code ran on: once a
    parameter has a gradient, later steps zero-fill it instead of dropping it, so SGD's momentum and
    weight decay keep moving parameters that a step's loss does not reach.

    With several workers (harness.plugin.distributed), the gradients of every worker are averaged between
    backward and the optimizer step, and the divergence check sees the loss of every worker, so all
    stop at the same step. With one process nothing is exchanged.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, set_to_none: bool = True, grad_clip: float | None = None,
                 collective: Collective | None = None, scaler: torch.amp.GradScaler | None = None):
        self.optimizer, self.set_to_none, self.grad_clip, self.scaler = optimizer, set_to_none, grad_clip, scaler
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
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if distributed:  # the average of the scaled gradients is the scaled average
            self._check(self.collective.average_gradients(self.params, loss), name)
        if self.scaler:  # fp16: gradients back to their scale (an overflow skips the step and lowers the scale)
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], self.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
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
                                "lower train.lr, enable train.grad_clip, or use train.precision: fp32")


class Method(nn.Module):
    """A method plugin: one file in methods/, `@register_method("name")` on a subclass of this.

    Smallest example: methods/baseline.py. What a plugin declares, and who uses it:

    - `Params` (class): a MethodParams subclass, the method's knobs with the paper's defaults. The study
      loader validates every trial's `method:` section against it before anything starts (an unknown key
      or a bad value is an error naming the key); the engine builds `Params` from the trial's config.
    - `head_names(params, num_stages)` (classmethod): the names of the heads `predict` returns, the
      primary one first (its top-1 is `test/acc`). Known before any model is built: the engine sums
      evaluation counts over workers by these names, reports fill `test/acc/<head>` for each.
    - `validate_with(params, num_stages)` (classmethod, optional): checks that need the backbone's stage
      count (PMG's S <= stages); raise ValueError naming the fix. The study loader calls it for every
      trial; `__init__` calls it again.
    - `__init__(backbone, num_classes, params)`: called by the engine once per trial, on CPU, after
      seeding. `backbone` is a StagedBackbone: `backbone(images, upto=l)` returns the feature maps of
      stages 0..l, each (B, C_l, H_l, W_l), `backbone.channels` their C_l; stages are addressed from the
      last (timm's features_only stages: a ResNet's stem, layer1..layer4). Build every module here; call
      super().__init__ first (it sets self.backbone, self.num_classes, self.params, self.heads).
    - `param_groups()` (optional): optimizer groups, dicts with "params", "name" and "lr_scale". Default:
      the method's own layers at 1x, the backbone at `params.backbone_lr_scale`. The engine builds SGD on
      them once, and scales each group's lr by the schedule every epoch.
    - `training_step(images, labels, steps, generator)`: called by the engine for every training batch,
      in train mode, under autocast in the trial's precision (harness.engine.precision). `images` (B, 3, S, S)
      normalised floats on the trial's device, `labels` (B,) int64; with several workers, B is this worker's share
      of the global batch. Call `steps.step(loss)` once per optimizer step (it does zero_grad, backward, the average
      over workers, clipping and the step; PMG calls it S+1 times, MKSMT one to three); draw every
      random choice from `generator` (seeded per epoch: resumed and multi-worker trials stay exact).
      Return a dict of floats to log, with "loss". Method state updated with per-image sums outside the
      parameters (WS-DAN's centres) goes through `steps.sum_over_workers`.
      With `uses_boxes = True` the engine also passes `boxes=`: (B, K, 4) xyxy pixel boxes of the
      dataset's target regions in the augmented images (-1 where absent), e.g. GAIN's extra supervision.
    - `predict(images)`: called by the engine in eval mode under torch.no_grad for every test batch (and
      once on one image for the inference parameters and FLOPs): a dict head name -> logits (B, classes)
      for every name of `head_names`.
    - `extra_metrics()` (optional): numbers for the trial's results row (AAM: the attention's parameters).
    - Where the method looks (harness.engine.explain; the report's maps and the localisation score), optional:
      `explain_targets()`: Grad-CAM targets, (map name, backbone stage, head); the first is scored for
      localisation (default: the primary head on the last stage); `class_activation_map(images, labels)`:
      (B, h, w) CAM of a head on global average pooling, or None; `explanations(images)`: the method's own
      maps (B, h, w) and boxes (B, 4) xyxy in input pixels, by name (WS-DAN's attention maps and crop).
    - `relative_cost(params)` (classmethod, optional): a batch's cost in forward/backward passes (PMG: S+1),
      so the orchestrator can start a study's longest trials first.
    - `zero_grad_set_to_none` (attribute, optional): False reproduces PyTorch 1.x zero_grad for methods
      whose authors relied on it (see OptimizerSteps).
    - The state dict (parameters and buffers) is the checkpoint: everything that must survive a resume
      is a parameter or a registered buffer.

    A method never imports Ray; the engine owns epochs, schedules, devices, precision, evaluation,
    checkpoints and distribution.
    """

    Params: ClassVar[type[MethodParams]]
    registry_name: ClassVar[str]
    uses_boxes: bool = False  # an instance may set it from its params (GAIN: external supervision)
    zero_grad_set_to_none: bool = True

    def __init__(self, backbone: StagedBackbone, num_classes: int, params: MethodParams):
        super().__init__()
        type(self).validate_with(params, backbone.num_stages)  # the same checks the study loader runs
        self.backbone, self.num_classes, self.params = backbone, num_classes, params
        self.heads: tuple[str, ...] = type(self).head_names(params, backbone.num_stages)

    @classmethod
    def head_names(cls, params: MethodParams, num_stages: int) -> tuple[str, ...]:
        """The heads `predict` returns, the primary (reported as test/acc) first."""
        raise NotImplementedError

    @property
    def primary_head(self) -> str:
        return self.heads[0]

    @classmethod
    def validate_with(cls, params: MethodParams, num_stages: int) -> None:
        """Checks that need the backbone (e.g. S <= number of stages); raise ValueError naming the fix."""

    @classmethod
    def relative_cost(cls, params: MethodParams) -> float:
        """Training cost of one batch relative to one forward/backward/step of the network (PMG: S+1 steps).
        Only orders a study's trials (longest first, so the table is done soonest); never a result."""
        return 1.0

    def param_groups(self) -> list[dict]:
        """Optimizer groups: dicts with "params", "name" and "lr_scale" (x the study's train.lr).

        Default: the method's own layers (every submodule but the backbone, and modules it inserted
        into the backbone, which are also registered on the method) at 1x, the backbone at
        `params.backbone_lr_scale`."""
        new: dict[int, nn.Parameter] = {id(p): p for p in self.parameters(recurse=False)}
        for child in self.children():
            if child is not self.backbone:
                new.update((id(p), p) for p in child.parameters())
        body = [p for p in self.backbone.parameters() if id(p) not in new]
        return [{"name": "new_layers", "params": list(new.values()), "lr_scale": 1.0},
                {"name": "backbone", "params": body, "lr_scale": self.params.backbone_lr_scale}]

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, steps: OptimizerSteps,
                      generator: torch.Generator | None = None) -> dict[str, float]:
        """Train on one batch, calling `steps.step(loss)` once per optimizer step; return losses to log."""
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every head of `head_names`, (B, C) each."""
        raise NotImplementedError

    def extra_metrics(self) -> dict[str, float]:
        """Method-specific numbers for the results row (e.g. the parameters an attention module adds)."""
        return {}

    def explain_targets(self) -> list[tuple[str, int, str]]:
        """Grad-CAM targets (map name, backbone stage, head), the first scored for localisation."""
        return [("gradcam", -1, self.primary_head)]

    def class_activation_map(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """(B, h, w) CAM (Zhou et al.) of a head on global average pooling, for the true classes; None without one."""
        return None

    def explanations(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The method's own maps (B, h, w) and boxes (B, 4) xyxy in input pixels, by name."""
        return {}



def linear_cam(fc: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CAM (Zhou et al.): a linear head's weights of each image's true class over the (B, C, h, w) maps it
    sees through global average pooling, (B, h, w). For `Method.class_activation_map`."""
    return torch.einsum("bc,bchw->bhw", fc.weight[labels].to(features.dtype), features)

@contextmanager
def frozen_batchnorm(module: nn.Module):
    """Inside the block, the BatchNorm layers of `module` normalise with their running statistics and leave
    them as they are (a pass on inputs that are not the data's: GAIN's erased images, RA-CNN's APN step);
    gradients still flow."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


METHODS: Registry[Method] = Registry("method", Method, "methods", "fgvc_harness.methods")
register_method = METHODS.register

"""Baseline: the backbone's last stage, global average pooling, one linear classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.plugin.backbones import StagedBackbone
from harness.plugin.method import Method, MethodParams, OptimizerSteps, linear_cam, register_method


class BaselineParams(MethodParams):
    """No knobs of its own: the backbone's lr scale is every method's."""


@register_method("baseline")
class Baseline(Method):
    Params = BaselineParams

    @classmethod
    def head_names(cls, params: BaselineParams, num_stages: int) -> tuple[str, ...]:
        return ("linear",)

    def __init__(self, backbone: StagedBackbone, num_classes: int, params: BaselineParams):
        super().__init__(backbone, num_classes, params)
        self.fc = nn.Linear(backbone.channels[-1], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)[-1]  # (B, C, h, w)
        return self.fc(features.mean((2, 3)))

    def training_step(self, images, labels, steps: OptimizerSteps, generator=None) -> dict[str, float]:
        return {"loss": steps.step(F.cross_entropy(self(images), labels))}

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"linear": self(images)}

    def class_activation_map(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CAM: the linear layer's weights of the true class over the last stage's maps."""
        return linear_cam(self.fc, self.backbone(images)[-1], labels)

"""Baseline: the backbone's last stage, global average pooling, one linear classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harness.backbones import StagedBackbone
from harness.plugin import Method, MethodParams, OptimizerSteps, register_method


class BaselineParams(MethodParams):
    name: str = "baseline"
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=1000.0, description="backbone lr = train.lr x this")


@register_method("baseline")
class Baseline(Method):
    Params = BaselineParams
    primary_head = "linear"
    heads = ("linear",)

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

"""Attention modules as small reusable nn.Modules: SE, ECA, CBAM and AAM. Each keeps its input's shape.

- SE (Hu et al., 2018): squeeze (global average pool) -> Linear(C, C/r) -> ReLU -> Linear(C/r, C)
  -> sigmoid -> scale the channels. 2 C^2 / r + C/r + C parameters.
- ECA (Wang et al., 2020): global average pool -> 1-D conv over k neighbouring channels (no bias)
  -> sigmoid -> scale. k parameters.
- CBAM (Woo et al., 2018), in SEQUENCE: channel gate (a shared MLP Linear(C, C/r) -> ReLU ->
  Linear(C/r, C) on the average- and max-pooled vectors, summed, sigmoid), then a spatial gate on
  the channel-refined features ([max, mean] over channels -> 7x7 conv (no bias) -> BN -> sigmoid).
- AAM (seed 003), in PARALLEL from the same F: channel attention Mc = sigmoid(1-D conv over k
  neighbouring channels of the global MAX-pooled vector), spatial attention Ms = sigmoid(conv of
  [mean, max] over channels, 7x7 or 3x3). Interpretation of the fusion (a parameter):
  "sum": F' = F * Mc + F * Ms (default); "joint": F' = F * sigmoid(mc + ms) on the pre-sigmoid maps.
"""

from __future__ import annotations

import torch
from torch import nn


class SE(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def gate(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, 1, 1) in [0, 1]
        return torch.sigmoid(self.fc(x.mean((2, 3))))[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


def _channel_conv1d(k: int) -> nn.Conv1d:
    if k < 1 or k % 2 == 0:
        raise ValueError(f"the channel neighbourhood k must be odd and >= 1 (got {k})")
    return nn.Conv1d(1, 1, k, padding=k // 2, bias=False)


class ECA(nn.Module):
    def __init__(self, channels: int, k: int = 3):
        super().__init__()
        self.conv = _channel_conv1d(k)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.mean((2, 3))[:, None, :])  # (B, 1, C): 1-D conv across neighbouring channels
        return torch.sigmoid(y)[:, 0, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


def _mean_max(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2, H, W): channel-wise mean and max."""
    return torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)


class CBAM(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        self.spatial = nn.Sequential(nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False),
                                     nn.BatchNorm2d(1, eps=1e-5, momentum=0.01))

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3))))[:, :, None, None]

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.spatial(_mean_max(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel_gate(x)
        return x * self.spatial_gate(x)  # the spatial gate sees the channel-refined features


class AAM(nn.Module):
    def __init__(self, channels: int, k: int = 3, kernel_size: int = 7, fusion: str = "sum"):
        super().__init__()
        if fusion not in ("sum", "joint"):
            raise ValueError(f"AAM fusion must be sum or joint, got {fusion!r}")
        if kernel_size not in (3, 7):
            raise ValueError(f"AAM spatial kernel must be 3 or 7, got {kernel_size}")
        self.fusion = fusion
        self.channel = _channel_conv1d(k)
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def channel_logits(self, x: torch.Tensor) -> torch.Tensor:  # from global MAX pooling
        return self.channel(x.amax((2, 3))[:, None, :])[:, 0, :, None, None]  # (B, C, 1, 1)

    def spatial_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(_mean_max(x))  # (B, 1, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mc, ms = self.channel_logits(x), self.spatial_logits(x)  # both from the same F: parallel
        if self.fusion == "joint":
            return x * torch.sigmoid(mc + ms)
        return x * torch.sigmoid(mc) + x * torch.sigmoid(ms)


def build_attention(kind: str, channels: int, k: int = 3, reduction: int = 16, kernel_size: int = 7,
                    fusion: str = "sum") -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "se":
        return SE(channels, reduction)
    if kind == "eca":
        return ECA(channels, k)
    if kind == "cbam":
        return CBAM(channels, reduction, kernel_size)
    if kind == "aam":
        return AAM(channels, k, kernel_size, fusion)
    raise ValueError(f"unknown attention module {kind!r}: choose none, se, eca, cbam or aam")

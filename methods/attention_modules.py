"""Attention modules as small reusable nn.Modules: SE, ECA, CBAM, AAM and Residual Attention. Each keeps
its input's shape.

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
- Residual Attention (Wang et al., CVPR 2017), one attention module {p=1, t=2, r=1} of the paper, as the
  authors' Attention-56 prototxt builds it: p pre-activation residual units, then a trunk T (t units) and a
  soft mask M tapped from the same input, combined as (1 + M) * T (attention residual learning, "arl") or
  M * T (naive, "nal", the paper's ablation), then p units. The mask branch is bottom-up top-down with
  `pools` 3x3/2 max pools: after each pool but the last, r units; after the last, 2r units (the lowest
  resolution: res3_1, res3_2 in the prototxt's stage-1 module); then, going back up one scale at a time,
  bilinear upsampling to that scale plus a skip residual unit on the bottom-up map of that scale, then r
  units (no skip at the input scale: a module with P pools has P - 1 skips, 2 / 1 / 0 in the paper's three
  stages); a last upsampling to the input's size; then BN-ReLU-1x1 conv-BN-ReLU-1x1 conv (both without bias,
  as the prototxt's linear_1 and linear_2) and a sigmoid (the "mixed" activation). With 0 pools the mask is
  2r units at the input scale (the local-convolution variant of the paper's Table 4). Only the units the
  pools use are built, so every parameter takes part in every forward pass. Sizes come from the tensors,
  so any input size works. Units are pre-activation bottlenecks with the module's channel count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class ResidualUnit(nn.Module):
    """Pre-activation bottleneck, C -> C: x + conv1x1(relu(bn(conv3x3(relu(bn(conv1x1(relu(bn(x)))))))))."""

    def __init__(self, channels: int):
        super().__init__()
        mid = max(1, channels // 4)
        self.body = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, mid, 1, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True), nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True), nn.Conv2d(mid, channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _units(channels: int, n: int) -> nn.Sequential:
    return nn.Sequential(*(ResidualUnit(channels) for _ in range(n)))


def attention_residual(trunk: torch.Tensor, mask: torch.Tensor, learning: str = "arl") -> torch.Tensor:
    """(1 + M) * T, attention residual learning (M = 0 leaves the trunk as it is), or the naive M * T."""
    return (1 + mask) * trunk if learning == "arl" else mask * trunk


class ResidualAttention(nn.Module):
    def __init__(self, channels: int, learning: str = "arl", pools: int = 1, p: int = 1, t: int = 2, r: int = 1):
        super().__init__()
        if learning not in ("arl", "nal"):
            raise ValueError(f"residual attention learning must be arl or nal, got {learning!r}")
        if pools < 0:
            raise ValueError(f"residual attention pools must be >= 0, got {pools}")
        self.learning, self.pools = learning, pools
        self.pre, self.trunk, self.post = _units(channels, p), _units(channels, t), _units(channels, p)
        levels = max(pools - 1, 0)  # pooled scales above the lowest: r units down, a skip, r units up each
        self.down = nn.ModuleList(_units(channels, r) for _ in range(levels))
        self.skips = nn.ModuleList(ResidualUnit(channels) for _ in range(levels))
        self.up = nn.ModuleList(_units(channels, r) for _ in range(levels))
        self.bottom = _units(channels, 2 * r)  # the lowest resolution: 2r units
        self.head = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels, channels, 1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels, channels, 1, bias=False))

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The soft mask M(x) in (0, 1), shaped like x."""
        maps, y = [], x  # maps[j]: the bottom-up map after pool j + 1
        for level in range(self.pools):
            y = F.max_pool2d(y, 3, stride=2, padding=1)
            y = self.down[level](y) if level < self.pools - 1 else self.bottom(y)
            maps.append(y)
        if not self.pools:
            y = self.bottom(x)
        for level in range(self.pools - 2, -1, -1):  # back up to the first pooled scale, joining each skip
            y = F.interpolate(y, size=maps[level].shape[-2:], mode="bilinear", align_corners=False)
            y = self.up[level](y + self.skips[level](maps[level]))
        if self.pools:
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.head(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        return self.post(attention_residual(self.trunk(x), self.mask(x), self.learning))


def build_attention(kind: str, channels: int, k: int = 3, reduction: int = 16, kernel_size: int = 7,
                    fusion: str = "sum", learning: str = "arl", pools: int = 1) -> nn.Module:
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
    if kind == "resatt":
        return ResidualAttention(channels, learning, pools)
    raise ValueError(f"unknown attention module {kind!r}: choose none, se, eca, cbam, aam or resatt")

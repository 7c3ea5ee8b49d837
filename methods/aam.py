"""AAM plugin: a ResNet with an attention module after each residual stage, and its losses.

The chosen module (none, SE, ECA, CBAM, AAM, Residual Attention; methods/attention_modules.py) is inserted after the
residual stages named by `placement` (backbone stage indices). Default: every residual stage (layer1..layer4
of a timm ResNet) as the AAM article; for Residual Attention the paper's stages 1-3, every residual stage but
the last (Wang et al., Table 2: Attention x1 / x1 / x1 at 56, 28 and 14 px, none beside the last stage's 7 x 7).
Residual Attention's mask branch pools down to the last stage's resolution, log2(reduction of the last stage /
reduction of the module's stage) pools (`mask_pools` sets them per placed stage): 3, 2 and 1 for a ResNet's
stages 1-3, the paper's 56 -> 7, 28 -> 7, 14 -> 7 at 224 px. Interpretation: the paper states the rule as "the
smallest mask map is 7 x 7", which at its 224 px input is the final stage's map; at other input sizes we keep
its topology (every module has its down/up path, 2 / 1 / 0 skips) rather than the absolute 7 x 7, which below
224 px would leave the deeper modules without pooling. The pools do not depend on the input size, so a trial's
`attention/params` are the parameters its forward pass uses. Classification: global average pooling of the
last stage and a linear layer. Loss (`loss`):
- "ce": cross-entropy;
- "center": CE + center_weight * center loss (Wen et al., ECCV 2016): mean over the batch of
  ||f - c_y||^2 / 2 on the pooled features; the centres are not trained by SGD (no learning rate,
  no weight decay) but updated after each batch by Wen et al.'s rule
  c_j <- c_j - alpha * sum_{i: y_i = j} (c_j - f_i) / (1 + n_j), alpha = `center_alpha` = 0.5
  (sums and counts over every worker's images);
- "cc": CE + mu * (L_dis - eta * L_div), the cross-channel loss of the AAM article in the
  mutual-channel loss form (Chang et al., 2020), our interpretation: the last stage's channels are
  split into one group of xi = C // classes channels per class (the first xi * classes channels);
  L_dis: channel-wise attention (in training, a random half of each group's channels is zeroed;
  the mask is drawn from the trial's generator), cross-channel max pooling within each group,
  global average pooling -> (B, classes) logits -> CE; L_div: softmax over the spatial positions
  of each channel, cross-channel max pooling within each group, sum over positions, mean over
  classes (in [1, xi]: how spread out the group's channels attend) -> maximised. mu = 0.01, eta a
  dataset-dependent parameter.
ECA's kernel: `k` fixed, or with `k_adaptive` ECA's own psi(C) = |(log2 C + 1) / 2|_odd per stage
(Wang et al., 2020: gamma = 2, b = 1; 3 for 64 channels, 5 for 128 to 512, 7 for 2048).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harness.plugin.backbones import StagedBackbone
from harness.plugin.method import Method, MethodParams, OptimizerSteps, linear_cam, register_method
from methods.attention_modules import AAM, CBAM, ResidualAttention, build_attention


def mask_pools(reductions: list[int], stage: int) -> int:
    """Residual Attention's max pools at `stage`: down to the last stage's resolution, log2(r_last / r_stage)
    (ResNet reductions 4, 8, 16 vs 32: 3, 2, 1)."""
    return max(0, round(math.log2(reductions[-1] / reductions[stage])))


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA's adaptive kernel size psi(C) = |log2(C) / gamma + b / gamma|_odd (Wang et al., CVPR 2020)."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class AAMParams(MethodParams):
    module: Literal["none", "se", "eca", "cbam", "aam", "resatt"] = Field("aam", description="attention module to "
                                                                                      "insert")
    attention_learning: Literal["arl", "nal"] = Field("arl", description="Residual Attention: (1 + M) * T, or the "
                                                                         "naive M * T of the paper's ablation")
    k: int = Field(3, ge=1, le=9, description="channel neighbourhood of ECA and AAM (odd, <= 9)")
    fusion: Literal["sum", "joint"] = Field("sum", description="AAM: F*Mc + F*Ms, or F*sigmoid(mc + ms)")
    spatial_kernel: Literal[3, 7] = Field(7, description="spatial conv of CBAM and AAM")
    reduction: int = Field(16, ge=1, description="MLP reduction r of SE and CBAM")
    placement: list[int] | None = Field(None, description="backbone stages followed by the module (default: "
                                                          "every stage after the stem; resatt: all but the last)")
    mask_pools: list[int] | None = Field(None, description="Residual Attention: max pools of the mask branch per "
                                                           "placed stage (default: down to the last stage's size)")
    loss: Literal["ce", "center", "cc"] = Field("cc", description="CE, CE + center loss, or CE + cross-channel loss")
    mu: float = Field(0.01, ge=0.0, description="weight of the cross-channel loss")
    eta: float = Field(10.0, ge=0.0, description="weight of the diversity term (dataset-dependent)")
    center_weight: float = Field(0.01, ge=0.0, description="weight of the center loss")
    center_alpha: float = Field(0.5, gt=0.0, le=1.0, description="centre update rate alpha (Wen et al.)")
    k_adaptive: bool = Field(False, description="ECA: kernel size from the channel count, psi(C), instead of k")


def cross_channel_loss(features: torch.Tensor, labels: torch.Tensor, num_classes: int, eta: float,
                       generator: torch.Generator | None = None, training: bool = True) -> tuple[torch.Tensor, ...]:
    """(L_dis - eta * L_div, L_dis, L_div) on (B, C, H, W) features; see the module docstring."""
    b, c, h, w = features.shape
    xi = c // num_classes
    if xi < 1:
        raise ValueError(f"the cross-channel loss needs >= 1 channel per class: {c} channels for {num_classes} classes")
    grouped = features[:, :xi * num_classes].reshape(b, num_classes, xi, h * w)  # (B, classes, xi, HW)
    if training and xi > 1:  # channel-wise attention: keep a random half of each group's channels
        keep = torch.rand(num_classes, xi, generator=generator).argsort(1) < (xi + 1) // 2
        grouped_dis = grouped * keep.to(grouped.device, grouped.dtype)[None, :, :, None]
    else:
        grouped_dis = grouped
    logits = grouped_dis.amax(2).mean(2)  # cross-channel max pooling, then GAP -> (B, classes)
    l_dis = F.cross_entropy(logits, labels)
    attention = grouped.float().softmax(3)  # each channel's distribution over positions
    l_div = attention.amax(2).sum(2).mean()  # in [1, xi]
    return l_dis - eta * l_div, l_dis, l_div


@register_method("aam")
class AAMNet(Method):
    Params = AAMParams

    @classmethod
    def head_names(cls, params: AAMParams, num_stages: int) -> tuple[str, ...]:
        return ("linear",)

    def __init__(self, backbone: StagedBackbone, num_classes: int, params: AAMParams):
        super().__init__(backbone, num_classes, params)
        placement = self.placement(params, backbone.num_stages)
        pools = params.mask_pools or [mask_pools(backbone.reductions, s) for s in placement]
        names = [n for n in backbone.body.keys() if n in (backbone._return_layers or {})]
        self.attention = nn.ModuleDict()
        for stage, stage_pools in zip(placement, pools):  # wrap the stage's module: its output is refined
            k = eca_kernel_size(backbone.channels[stage]) if params.k_adaptive and params.module == "eca" else params.k
            module = build_attention(params.module, backbone.channels[stage], k, params.reduction,
                                     params.spatial_kernel, params.fusion, params.attention_learning, stage_pools)
            self.attention[str(stage)] = module
            backbone.body[names[stage]] = nn.Sequential(backbone.body[names[stage]], module)
        channels = backbone.channels[-1]
        self.fc = nn.Linear(channels, num_classes)
        if params.loss == "center":  # a buffer: Wen et al.'s update moves it, not the optimizer
            self.register_buffer("centers", torch.zeros(num_classes, channels))

    @staticmethod
    def placement(params: AAMParams, num_stages: int) -> list[int]:
        """The stages followed by a module: `placement`, else every stage after the stem (resatt: but the last)."""
        if params.placement is not None:
            return list(params.placement)
        return list(range(1, num_stages - 1 if params.module == "resatt" else num_stages))

    @classmethod
    def validate_with(cls, params: AAMParams, num_stages: int) -> None:
        if params.module in ("eca", "aam") and params.k % 2 == 0:
            raise ValueError(f"method.k={params.k}: the channel neighbourhood must be odd (1, 3, 5, 7 or 9)")
        bad = [s for s in params.placement or [] if not 0 <= s < num_stages]
        if bad:
            raise ValueError(f"method.placement {bad}: stages are 0..{num_stages - 1} for this backbone")
        if params.mask_pools is not None:
            placed = cls.placement(params, num_stages)
            if len(params.mask_pools) != len(placed) or any(p < 0 for p in params.mask_pools):
                raise ValueError(f"method.mask_pools {params.mask_pools}: one count >= 0 per placed stage "
                                 f"{placed}")

    def extra_metrics(self) -> dict[str, float]:
        return {"attention/params": float(sum(p.numel() for p in self.attention.parameters()))}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(images)[-1]  # (B, C, h, w), refined by the inserted modules
        return self.fc(features.mean((2, 3))), features

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, steps: OptimizerSteps,
                      generator: torch.Generator | None = None) -> dict[str, float]:
        p = self.params
        logits, features = self(images)
        ce = F.cross_entropy(logits, labels)
        losses = {"loss/ce": float(ce.detach())}
        loss = ce
        if p.loss == "center":
            center = self.center_loss(features.mean((2, 3)), labels, steps)
            losses["loss/center"] = float(center.detach())
            loss = loss + p.center_weight * center
        elif p.loss == "cc":
            cc, l_dis, l_div = cross_channel_loss(features, labels, self.num_classes, p.eta, generator)
            losses.update({"loss/dis": float(l_dis.detach()), "loss/div": float(l_div.detach())})
            loss = loss + p.mu * cc
        losses["loss"] = steps.step(loss)
        return losses

    def center_loss(self, features: torch.Tensor, labels: torch.Tensor, steps: OptimizerSteps | None = None
                    ) -> torch.Tensor:
        """||f - c_y||^2 / 2, batch mean; then Wen et al.'s centre update from this batch (of every worker)."""
        f = features.to(self.centers.dtype)
        centers = self.centers[labels]
        loss = ((f - centers) ** 2).sum(1).mean() / 2
        with torch.no_grad():
            classes = len(self.centers)
            sums = torch.zeros(classes, self.centers.shape[1] + 1, dtype=self.centers.dtype, device=f.device)
            sums.index_add_(0, labels, torch.cat([centers - f.detach(), torch.ones_like(f[:, :1])], 1))
            if steps is not None:
                sums = steps.sum_over_workers(sums)
            differences, counts = sums[:, :-1], sums[:, -1:]  # sum_{y_i = j} (c_j - f_i), n_j
            self.centers -= self.params.center_alpha * differences / (1 + counts)
        return loss

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"linear": self(images)[0]}

    def class_activation_map(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CAM: the linear layer's weights of the true class over the last stage's maps."""
        return linear_cam(self.fc, self(images)[1], labels)

    def explanations(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each inserted module's spatial attention (AAM's Ms, CBAM's spatial gate, Residual Attention's
        mask averaged over channels), per stage, from one forward pass."""
        maps: dict[str, torch.Tensor] = {}

        def spatial(stage: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
            if isinstance(module, AAM):
                return torch.sigmoid(module.spatial_logits(x))[:, 0]
            if isinstance(module, CBAM):
                return module.spatial_gate(x * module.channel_gate(x))[:, 0]
            if isinstance(module, ResidualAttention):
                return module.mask(module.pre(x)).mean(1)
            return None

        hooks = [m.register_forward_hook(lambda mod, args, out, s=s: maps.__setitem__(
                 f"spatial attention stage {s}", spatial(s, mod, args[0]))) for s, m in self.attention.items()]
        try:
            self(images)
        finally:
            for h in hooks:
                h.remove()
        return {k: v for k, v in maps.items() if v is not None}

"""RA-CNN: Recurrent Attention CNN (Fu, Zheng, Mei, CVPR 2017), "Look Closer to See Better".

From the paper as quoted and re-derived in METHODS-2.md section 1 (its full text could not be read):
- up to three scales, each with its own classification network (same architecture, separate weights,
  all initialised alike) and classifier p(X) = softmax(FC(features)), on the backbone's last stage;
- an attention proposal network (APN) on scales 1 and 2: two fully connected layers on the scale's
  features -> a square (t_x, t_y, t_l), centre and HALF side; t_l is at least a third of the
  previous scale's, and the square stays inside the image;
- the attended region: X_att = X * M, with the boxcar M(x, y) = [h(x - t_x + t_l) - h(x - t_x - t_l)]
  [h(y - t_y + t_l) - h(y - t_y - t_l)], h(z) = 1 / (1 + exp(-k z)) (k = 10 per pixel), zoomed by
  bilinear interpolation to the next scale's input size: differentiable in t_x, t_y, t_l, through
  the mask and through the sampling grid;
- losses: softmax cross-entropy at every scale, and the pairwise ranking loss
  L_rank = max(0, p_t(s) - p_t(s+1) + margin) on the true class's probability (margin 0.05);
- training alternates: the classification networks with the APNs fixed (CE of every scale and of the
  fusion layer), then the APNs with the classification networks fixed (the ranking loss);
- the APNs start from the square of half the image's side at the highest response of the last
  conv layer (the channel-summed map's argmax), learnt by regression before the ranking loss takes
  over;
- the prediction fuses the scales: each scale's pooled descriptor L2-normalised, concatenated, one
  fully connected layer with softmax. Heads: fused (1+2+3, the primary), fused12, scale1..3.

Interpretations (each a parameter with this default):
- `training: alternate` alternates at the finest grain, two optimizer steps per batch (classification,
  then APN); the paper alternates "until convergence" of each, over unknown lengths;
- the APN regresses the highest-response square with MSE for the first `apn_init_batches` batches
  (the paper pre-trains it; how long is not stated), then learns from the ranking loss;
- the APN's first FC sees the last stage average-pooled to `apn_pool` x `apn_pool` (a VGG conv5_4 of
  14 x 14 x 512 flattened, as the paper's, would need 100 M weights at 448 px);
- `zoom_size`: the attended region's input size (the paper: 224 for 448 inputs); default the input's;
- `classifier`: "linear" (global average pooling of the last stage and one linear layer, for backbones
  without fully connected layers, the default on the embedded data) or "vgg_fc", the paper's: each scale's
  VGG-19 goes on through pool5 and its own copy of the ImageNet fc6 and fc7 (dropout 0.5, as VGG), run
  as convolutions over the map and averaged (VGG's own dense evaluation: at the 224 px regions pool5 is
  7 x 7 and fc6 sees exactly what it was trained on; at the 448 px scale 1 it slides over 14 x 14), then a
  new fc8; the fused descriptors are the fc7 vectors. `fc_pretrained` takes fc6/fc7 from timm's pretrained
  model of the backbone's name and tag (the same weights file as the backbone's);
- `apn_pretrain`: "first" is the paper's step 2: the first `apn_init_batches` batches train only the APNs
  (the classification networks stay as initialised from ImageNet), then the alternation starts;
  "interleaved" (default, for the from-scratch embedded setting, where an untrained network's highest
  response means nothing) trains the classification networks from the first batch and regresses the
  APNs beside them. The paper gives no pre-training length; a PyTorch re-implementation
  (jeong-tae/RACNN-pytorch, trainer.py pretrainAPN) runs 20,000 iterations of batch 4 (80,000 images,
  about 13 epochs of CUB): the paper profile's 5,000 batches of 16.
Without the ranking loss (the ablation) the APNs keep their initialisation.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harness.plugin.backbones import StagedBackbone
from harness.plugin.method import Method, MethodParams, OptimizerSteps, frozen_batchnorm, register_method


class RACNNParams(MethodParams):
    scales: int = Field(3, ge=1, le=3, description="scales, each with its own network (APNs between them)")
    ranking: bool = Field(True, description="the pairwise ranking loss between consecutive scales")
    training: Literal["alternate", "joint"] = Field("alternate", description="alternate classification and APN "
                                                                              "updates, or one joint update")
    margin: float = Field(0.05, ge=0.0, description="ranking margin on the true class's probability (paper: 0.05)")
    k: float = Field(10.0, gt=0.0, description="steepness of the boxcar's logistic, per pixel")
    min_tl_ratio: float = Field(1 / 3, gt=0.0, le=1.0, description="t_l >= this x the previous scale's t_l")
    zoom_size: int | None = Field(None, ge=8, description="input size of scales 2 and 3 (default: the image's)")
    apn_hidden: int = Field(1024, ge=1, description="width of the APN's first fully connected layer")
    apn_pool: int = Field(4, ge=1, description="the APN sees the last stage pooled to this x this")
    apn_init_batches: int = Field(20, ge=0, description="batches the APN regresses the highest-response square")
    apn_pretrain: Literal["interleaved", "first"] = Field("interleaved", description="during those batches: also "
                                                           "train the classifiers, or the APNs only (paper)")
    classifier: Literal["linear", "vgg_fc"] = Field("linear", description="GAP + linear, or VGG's fc6/fc7 + a new "
                                                                          "fc8 (paper)")
    fc_pretrained: bool = Field(True, description="vgg_fc: fc6/fc7 from the backbone's pretrained weights")


def boxcar_mask(boxes: torch.Tensor, size: int, k: float) -> torch.Tensor:
    """(B, 3) boxes (t_x, t_y, t_l) as fractions of the side -> (B, 1, size, size) soft masks, ~1 inside."""
    coords = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5)  # pixel centres
    tx, ty, tl = (boxes[:, i, None] * size for i in range(3))  # (B, 1) in pixels

    def h(z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(k * z)

    mx = h(coords - (tx - tl)) - h(coords - (tx + tl))  # (B, size) along x
    my = h(coords - (ty - tl)) - h(coords - (ty + tl))
    return (my[:, :, None] * mx[:, None, :])[:, None]


def attend(images: torch.Tensor, boxes: torch.Tensor, k: float, out_size: int) -> torch.Tensor:
    """The attended region: the images masked by the boxcar, the box zoomed to out_size (bilinear)."""
    masked = images * boxcar_mask(boxes, images.shape[-1], k).to(images.dtype)
    tx, ty, tl = boxes[:, 0], boxes[:, 1], boxes[:, 2]
    zeros = torch.zeros_like(tx)
    theta = torch.stack([torch.stack([2 * tl, zeros, 2 * tx - 1], 1),  # output [-1, 1] -> the box
                         torch.stack([zeros, 2 * tl, 2 * ty - 1], 1)], 1).to(images.dtype)
    grid = F.affine_grid(theta, [len(images), images.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(masked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def ranking_loss(p_coarse: torch.Tensor, p_fine: torch.Tensor, margin: float) -> torch.Tensor:
    """max(0, p_t(s) - p_t(s+1) + margin), batch mean: the finer scale must be more confident."""
    return F.relu(p_coarse - p_fine + margin).mean()


def highest_response_square(features: torch.Tensor, half_side: float = 0.25) -> torch.Tensor:
    """(B, 3) squares of half side `half_side` (half the image's side: 0.25 of it) centred on the argmax of
    the channel-summed map, moved to lie inside the image: the APN's initial target."""
    b, _, h, w = features.shape
    flat = features.detach().float().sum(1).flatten(1).argmax(1)
    cy, cx = (flat // w + 0.5) / h, (flat % w + 0.5) / w
    centre = lambda c: c.clamp(half_side, 1 - half_side)  # noqa: E731
    return torch.stack([centre(cx), centre(cy), torch.full_like(cx, half_side)], 1)


class APN(nn.Module):
    """Two fully connected layers on the pooled features -> (t_x, t_y, t_l) as fractions of the input side,
    with t_l in [min_ratio, 1] x the previous scale's (a half side of 0.5: the whole input) and the box inside."""

    def __init__(self, channels: int, hidden: int, pool: int, min_ratio: float):
        super().__init__()
        self.min_ratio = min_ratio
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(channels * pool * pool, hidden),
                                 nn.Tanh(), nn.Linear(hidden, 3), nn.Sigmoid())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        raw = self.net(features).float()
        tl = 0.5 * (self.min_ratio + (1 - self.min_ratio) * raw[:, 2])
        tx = tl + (1 - 2 * tl) * raw[:, 0]
        ty = tl + (1 - 2 * tl) * raw[:, 1]
        return torch.stack([tx, ty, tl], 1)


def vgg_fc_layers(backbone: StagedBackbone, pretrained: bool = True) -> nn.Module:
    """VGG's fc6 and fc7 as timm holds them (ConvMlp: fc6 a 7 x 7 convolution, fc7 a 1 x 1 one, ReLU each,
    dropout 0.5 after fc6), from the same timm model as the backbone (its architecture and weights tag)."""
    import timm

    cfg = getattr(backbone.body, "pretrained_cfg", None) or {}
    arch, tag = cfg.get("architecture", ""), cfg.get("tag", "")
    if not arch.startswith("vgg"):
        raise ValueError(f"method.classifier: vgg_fc needs a VGG backbone (vgg19.tv_in1k as the paper), not "
                         f"{arch or type(backbone.body).__name__}; use classifier: linear")
    overlay = {"file": cfg["file"]} if cfg.get("file") else {}
    model = timm.create_model(f"{arch}.{tag}" if tag else arch, pretrained=pretrained, drop_rate=0.5,
                              **({"pretrained_cfg_overlay": overlay} if overlay else {}))
    return model.pre_logits


class DenseFC(nn.Module):
    """pool5 (when the backbone stops at conv5), fc6 and fc7 run densely, averaged: (B, C, h, w) -> (B, 4096)."""

    def __init__(self, fc: nn.Module, pool: bool):
        super().__init__()
        self.fc, self.pool = fc, pool

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(features, 2, 2) if self.pool else features  # VGG's pool5
        kernel = self.fc.fc1.kernel_size[0]
        if min(x.shape[-2:]) < kernel:
            raise ValueError(f"method.classifier: vgg_fc's fc6 reads {kernel} x {kernel} pool5 maps; this input "
                             f"gives {tuple(x.shape[-2:])} (VGG needs inputs of at least 224 px)")
        return self.fc(x).mean((2, 3))


@register_method("racnn")
class RACNN(Method):
    Params = RACNNParams

    @classmethod
    def relative_cost(cls, params: RACNNParams) -> float:
        return float(params.scales)  # one network per scale

    def __init__(self, backbone: StagedBackbone, num_classes: int, params: RACNNParams):
        super().__init__(backbone, num_classes, params)
        channels = width = backbone.channels[-1]  # the APNs read the last stage; the classifiers its descriptor
        # Scale 1 is the backbone; scales 2 and 3 copies of it: separate weights, the same initialisation.
        self.extra_nets = nn.ModuleList(copy.deepcopy(backbone) for _ in range(params.scales - 1))
        self.dense_fc = None
        if params.classifier == "vgg_fc":  # each scale its own fc6/fc7 from the same ImageNet weights
            fc = vgg_fc_layers(backbone, params.fc_pretrained)
            pool = not isinstance(backbone.stage_module(-1)[0], (nn.MaxPool2d, nn.AdaptiveMaxPool2d))
            self.dense_fc = nn.ModuleList(DenseFC(copy.deepcopy(fc), pool) for _ in range(params.scales))
            width = fc.fc2.out_channels  # fc7: 4096
        self.classifiers = nn.ModuleList(
            nn.Sequential(nn.Dropout(0.5), nn.Linear(width, num_classes)) if self.dense_fc is not None
            else nn.Linear(width, num_classes) for _ in range(params.scales))
        self.apns = nn.ModuleList(APN(channels, params.apn_hidden, params.apn_pool, params.min_tl_ratio)
                                  for _ in range(params.scales - 1))
        self.fusion = nn.Linear(width * params.scales, num_classes)
        self.fusion12 = nn.Linear(width * 2, num_classes) if params.scales == 3 else None
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))

    @classmethod
    def head_names(cls, params: RACNNParams, num_stages: int) -> tuple[str, ...]:
        fused12 = ("fused12",) if params.scales == 3 else ()
        return ("fused", *fused12, *(f"scale{s + 1}" for s in range(params.scales)))

    def nets(self) -> list[nn.Module]:
        return [self.backbone, *self.extra_nets]

    def param_groups(self) -> list[dict]:
        """The classification networks (and VGG's fc6/fc7) at backbone_lr_scale, classifiers, fusion and APNs at 1x."""
        nets = [p for net in self.nets() for p in net.parameters()]
        if self.dense_fc is not None:
            nets += list(self.dense_fc.parameters())
        own = [p for m in (self.classifiers, self.apns, self.fusion, self.fusion12) if m is not None
               for p in m.parameters()]
        return [{"name": "new_layers", "params": own, "lr_scale": 1.0},
                {"name": "backbone", "params": nets, "lr_scale": self.params.backbone_lr_scale}]

    def forward(self, images: torch.Tensor, detach_boxes: bool = False) -> dict:
        """Per scale: features (B, C, h, w), logits; the boxes (B, 3) between scales; fused logits."""
        p = self.params
        out = {"features": [], "logits": [], "boxes": []}
        x = images
        for s, net in enumerate(self.nets()):
            features = net(x)[-1]
            out["features"].append(features)
            descriptor = self.dense_fc[s](features) if self.dense_fc is not None else features.mean((2, 3))
            out.setdefault("descriptors", []).append(descriptor)
            out["logits"].append(self.classifiers[s](descriptor))
            if s + 1 < p.scales:
                boxes = self.apns[s](features)
                out["boxes"].append(boxes)
                x = attend(x, boxes.detach() if detach_boxes else boxes, p.k, p.zoom_size or images.shape[-1])
        descriptors = [F.normalize(d.float(), dim=1) for d in out.pop("descriptors")]
        out["fused"] = self.fusion(torch.cat(descriptors, 1).to(out["logits"][0].dtype))
        if self.fusion12 is not None:
            out["fused12"] = self.fusion12(torch.cat(descriptors[:2], 1).to(out["logits"][0].dtype))
        return out

    def _classification_loss(self, out: dict, labels: torch.Tensor) -> torch.Tensor:
        terms = [F.cross_entropy(y, labels) for y in out["logits"]] + [F.cross_entropy(out["fused"], labels)]
        if "fused12" in out:
            terms.append(F.cross_entropy(out["fused12"], labels))
        return sum(terms)

    def _apn_loss(self, out: dict, labels: torch.Tensor) -> tuple[torch.Tensor, str]:
        """The ranking loss, or (while the APNs are initialised) the regression to the highest-response square."""
        p = self.params
        if int(self.batches_seen) < p.apn_init_batches:
            targets = [highest_response_square(f) for f in out["features"][:-1]]
            return sum(F.mse_loss(b, t) for b, t in zip(out["boxes"], targets)), "loss/apn_init"
        probs = [y.float().softmax(1).gather(1, labels[:, None])[:, 0] for y in out["logits"]]
        return sum(ranking_loss(probs[s], probs[s + 1], p.margin) for s in range(p.scales - 1)), "loss/rank"

    def _apn_step(self, images: torch.Tensor, labels: torch.Tensor, steps: OptimizerSteps) -> tuple[str, float]:
        """One update of the APNs alone, the classification networks fixed (their BatchNorm statistics too)."""
        fixed = [q for m in (*self.nets(), self.classifiers, self.dense_fc) if m is not None for q in m.parameters()]
        for q in fixed:
            q.requires_grad_(False)
        try:
            with frozen_batchnorm(self):
                apn_loss, name = self._apn_loss(self(images), labels)
            return name, steps.step(apn_loss, name)
        finally:
            for q in fixed:
                q.requires_grad_(True)

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, steps: OptimizerSteps,
                      generator: torch.Generator | None = None) -> dict[str, float]:
        p, losses = self.params, {}
        pretraining = p.scales > 1 and int(self.batches_seen) < p.apn_init_batches
        train_apn = p.scales > 1 and (p.ranking or pretraining)
        if pretraining and p.apn_pretrain == "first":  # the paper's step 2: the APNs alone
            name, value = self._apn_step(images, labels, steps)
            self.batches_seen += 1
            return {name: value, "loss": value}
        if p.training == "joint":
            out = self(images)
            loss = self._classification_loss(out, labels)
            losses["loss/cls"] = float(loss.detach())
            if train_apn:
                apn_loss, name = self._apn_loss(out, labels)
                losses[name] = float(apn_loss.detach())
                loss = loss + apn_loss
            losses["loss"] = steps.step(loss)
        else:
            # 1: the classification networks, with the APNs fixed (their boxes carry no gradient).
            cls = self._classification_loss(self(images, detach_boxes=True), labels)
            losses["loss/cls"] = steps.step(cls, "loss/cls")
            losses["loss"] = losses["loss/cls"]
            if train_apn:  # 2: the APNs, with the classification networks fixed
                name, losses[name] = self._apn_step(images, labels, steps)
                losses["loss"] += losses[name]
        self.batches_seen += 1
        return losses

    def explanations(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The regions the APNs attend to, as boxes in the input image (scale 3's inside scale 2's)."""
        size = images.shape[-1]
        boxes, corner, side = {}, torch.zeros(len(images), 2), torch.ones(len(images))
        for s, box in enumerate(self(images)["boxes"]):
            box = box.float().cpu()
            low = corner + (box[:, :2] - box[:, 2:3]) * side[:, None]  # into the input's fractions
            side = 2 * box[:, 2] * side
            corner = low
            boxes[f"region scale{s + 2}"] = torch.cat([low, low + side[:, None]], 1) * size
        return boxes

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self(images)
        heads = {"fused": out["fused"], **({"fused12": out["fused12"]} if "fused12" in out else {})}
        heads.update((f"scale{s + 1}", y) for s, y in enumerate(out["logits"]))
        return heads

"""WS-DAN: Weakly Supervised Data Augmentation Network (Hu et al., arXiv 1901.09891).

Faithful to the paper and the authors' code (tau-yihouxiang/WS_DAN, TensorFlow; GuYuc/WS-DAN.PyTorch, a port),
which agree on all but the augmentation's pixel geometry and the map draw (below):
- M attention maps from a BasicConv2d 1x1 (conv without bias -> BN(eps 1e-3) -> ReLU) on one
  backbone stage (Inception-v3 Mixed_6e in the paper; `stage` counts from the last, the backbone
  is truncated after it);
- bilinear attention pooling: einsum('bmhw,bchw->bmc') / (H*W), flattened to M*C, signed square
  root sign(x) sqrt(|x| + 1e-12), L2-normalised as one vector; classifier Linear(M*C, classes,
  bias=False) on feature_matrix * 100;
- attention regularisation: per-class feature centres (zero-initialised buffer, saved in
  checkpoints), loss = sum of squared differences to the L2-normalised centre / batch size, centre
  update c[y] += beta (f - normalize(c[y])) with beta = 0.05, without gradient;
- attention-guided augmentation without gradient: per image, two maps drawn with probability
  proportional to sqrt of each map's spatial sum (L1-normalised), one for the crop and one for the
  drop, with replacement (the PyTorch port draws both in one `np.random.choice(M, 2, p=...)`,
  models/wsdan.py; the TF code, train_sample.py, draws each on its own and uniformly: its part weights
  are commented out, `map_choice: uniform`), so crop and drop may use the same map. Crop: threshold
  theta_c ~ U(0.4, 0.6) x max, bounding box of the mask padded by 10% of the image, bilinearly resized to
  the input size. Drop: theta_d ~ U(0.2, 0.5) x max, image x (map < theta_d). Where the map and the box
  fall on the pixel grid (`geometry`) is each code's own: `tf` follows the official TensorFlow code
  exactly (TF 1.x resize_bilinear of the maps, theta x the upsampled map's max, a box of fractions
  [min / H - p, max / H + p] sampled by crop_and_resize with zeros outside the image), `port` the PyTorch
  port exactly (align_corners=True for the maps and the crop, theta x the small map's max, the box
  [floor(min - pH), floor(max + pH))); `harness`, the default, is this harness's earlier mix of the two
  (half-pixel corners, the upsampled max, the box [min - floor(pH), max + 1 + floor(pH))), kept so that
  finished trials keep their numbers; methods/wsdan_geometry.py tabulates the three;
- one backward per batch: CE(raw)/3 + CE(crop)/3 + CE(drop)/3 + center loss;
- test: mean of the M maps, crop at 0.1 x max with 5% padding; prediction = mean of the raw and
  crop outputs. Heads: raw, refined (primary).

Interpretations, each a parameter with this default:
- `refine_average`: "probabilities" (the TF code averages softmax outputs) or "logits" (PyTorch);
- with crop or drop off, the CE terms that remain are averaged (CE(raw)/2 + CE(drop)/2, or CE(raw));
- centre updates of repeated labels in a batch accumulate (TF's scatter_sub); PyTorch's
  `centers[y] += ...` keeps one of them;
- `map_choice`: "sqrt_weighted" (the port's) or "uniform" (the TF code's);
  `map_replacement`: false draws the two maps without replacement while M allows (two different maps).

Input normalisation: the Inception-v3 weights the paper starts from (torchvision's
inception_v3_google, timm `inception_v3.tv_in1k`) expect (x - 0.5) / 0.5 inputs, as the TF code feeds
them (`train.normalize: half`); the PyTorch port feeds ImageNet mean/std, because its Mixed_6e feature
extractor skips the `transform_input` step that would convert them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from harness.plugin.backbones import StagedBackbone
from harness.plugin.method import Method, MethodParams, OptimizerSteps, register_method
from methods.wsdan_geometry import Geometry, attention_crop, attention_crop_boxes, attention_drop

__all__ = ["WSDAN", "WSDANParams", "attention_crop", "attention_crop_boxes", "attention_drop",
           "bilinear_attention_pooling", "choose_maps"]

EPSILON = 1e-12


class WSDANParams(MethodParams):
    attention_maps: int = Field(32, ge=1, le=512, description="M, the number of attention maps (paper: 32)")
    stage: int = Field(-2, description="backbone stage feeding the attention maps, from the last (-1 = last); "
                                       "Inception-v3 Mixed_6e is -2")
    crop: bool = Field(True, description="attention cropping in training")
    drop: bool = Field(True, description="attention dropping in training")
    crop_theta: tuple[float, float] = Field((0.4, 0.6), description="crop threshold range, x the map's max")
    drop_theta: tuple[float, float] = Field((0.2, 0.5), description="drop threshold range, x the map's max")
    crop_padding: float = Field(0.1, ge=0.0, lt=0.5, description="crop box padding, fraction of the image side")
    test_theta: float = Field(0.1, gt=0.0, le=1.0, description="test-time crop threshold on the mean map")
    test_padding: float = Field(0.05, ge=0.0, lt=0.5)
    refine: bool = Field(True, description="test-time refinement: average the raw and the crop outputs")
    refine_average: Literal["probabilities", "logits"] = "probabilities"
    map_choice: Literal["sqrt_weighted", "uniform"] = "sqrt_weighted"
    map_replacement: bool = Field(True, description="crop and drop maps drawn with replacement (both authors')")
    center_beta: float = Field(0.05, ge=0.0, le=1.0, description="centre update rate beta")
    center_weight: float = Field(1.0, ge=0.0, description="weight of the center loss")
    logit_scale: float = Field(100.0, gt=0.0, description="the classifier sees feature_matrix x this")
    geometry: Geometry = Field("harness", description="crop and drop on the pixel grid: tf (the official code's, "
                                                      "the paper profile), port (GuYuc/WS-DAN.PyTorch) or harness "
                                                      "(this harness's to MATH_VERSION 6, a mix of both)")

    @model_validator(mode="after")
    def _check_ranges(self) -> "WSDANParams":
        for name in ("crop_theta", "drop_theta"):
            low, high = getattr(self, name)
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"{name} must be [low, high] with 0 <= low <= high <= 1, got [{low}, {high}]")
        return self


def bilinear_attention_pooling(features: torch.Tensor, attention_maps: torch.Tensor) -> torch.Tensor:
    """BAP: (B, C, H, W) features, (B, M, H, W) maps -> (B, M*C) signed-sqrt, L2-normalised feature matrix."""
    b, c, h, w = features.shape
    matrix = torch.einsum("bmhw,bchw->bmc", attention_maps, features) / (h * w)  # (B, M, C): GAP of A_k * F
    matrix = matrix.reshape(b, -1)
    matrix = torch.sign(matrix) * torch.sqrt(matrix.abs() + EPSILON)
    return F.normalize(matrix, dim=1)


@torch.no_grad()
def choose_maps(attention_maps: torch.Tensor, count: int, weighted: bool = True,
                generator: torch.Generator | None = None, replacement: bool = True) -> torch.Tensor:
    """(B, count) map indices per image: drawn with p ~ sqrt(spatial sum), L1-normalised (or uniformly),
    with replacement (the authors'), or without while M allows."""
    b, m = attention_maps.shape[:2]
    weights = attention_maps.float().sum((2, 3)).clamp(min=0).sqrt() if weighted else torch.ones(b, m)
    weights = weights.cpu() + EPSILON  # all-zero maps (dead ReLUs) fall back to uniform
    probs = weights / weights.sum(1, keepdim=True)
    return torch.multinomial(probs, count, replacement=replacement or m < count,
                             generator=generator).to(attention_maps.device)


@register_method("wsdan")
class WSDAN(Method):
    Params = WSDANParams

    @classmethod
    def head_names(cls, params: WSDANParams, num_stages: int) -> tuple[str, ...]:
        return ("refined", "raw") if params.refine else ("raw",)

    @classmethod
    def relative_cost(cls, params: WSDANParams) -> float:
        return 1 + params.crop + params.drop  # raw, crop and drop passes in one step

    def __init__(self, backbone: StagedBackbone, num_classes: int, params: WSDANParams):
        super().__init__(backbone, num_classes, params)
        self.stage = params.stage % backbone.num_stages
        backbone.truncate(self.stage)  # the authors' network ends at the attention stage
        channels = backbone.channels[self.stage]
        m = params.attention_maps
        self.attentions = nn.Sequential(nn.Conv2d(channels, m, 1, bias=False), nn.BatchNorm2d(m, eps=1e-3), nn.ReLU())
        self.fc = nn.Linear(m * channels, num_classes, bias=False)
        self.register_buffer("centers", torch.zeros(num_classes, m * channels))

    @classmethod
    def validate_with(cls, params: WSDANParams, num_stages: int) -> None:
        if not -num_stages <= params.stage < num_stages:
            raise ValueError(f"method.stage={params.stage} but the backbone has {num_stages} stages; "
                             f"choose -{num_stages} <= stage <= {num_stages - 1} (-1 is the last)")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (B, classes), feature matrix (B, M*C), attention maps (B, M, h, w)."""
        features = self.backbone(images, upto=self.stage)[-1]
        maps = self.attentions(features)
        dtype = torch.promote_types(features.dtype, torch.float32)  # BAP in fp32 at least, even under bf16 autocast
        matrix = bilinear_attention_pooling(features.to(dtype), maps.to(dtype))
        return self.fc(matrix * self.params.logit_scale), matrix, maps

    def center_loss(self, matrix: torch.Tensor, labels: torch.Tensor,
                    steps: OptimizerSteps | None = None) -> torch.Tensor:
        """Sum of squared differences to the L2-normalised class centres / batch size; updates the centres.

        The update is a sum over the batch's images, so with several workers their updates are summed
        (`steps.sum_over_workers`): the centres move as in one process on the global batch."""
        centers = F.normalize(self.centers[labels], dim=-1)
        loss = ((matrix - centers) ** 2).sum() / len(labels)
        with torch.no_grad():
            update = torch.zeros_like(self.centers).index_add_(
                0, labels, self.params.center_beta * (matrix.detach().to(centers.dtype) - centers))
            self.centers += steps.sum_over_workers(update) if steps is not None else update
        return loss

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, steps: OptimizerSteps,
                      generator: torch.Generator | None = None) -> dict[str, float]:
        p = self.params
        logits, matrix, maps = self(images)
        ce_terms = {"raw": F.cross_entropy(logits, labels)}
        if p.crop or p.drop:
            chosen = choose_maps(maps, 2, p.map_choice == "sqrt_weighted", generator,
                                 p.map_replacement)  # (B, 2): crop, drop
            picked = maps.detach().gather(1, chosen[:, :, None, None].expand(-1, -1, *maps.shape[2:]))
            if p.crop:
                crops = attention_crop(images, picked[:, 0:1], p.crop_theta, p.crop_padding, generator,
                                       p.geometry)
                ce_terms["crop"] = F.cross_entropy(self(crops)[0], labels)
            if p.drop:
                drops = attention_drop(images, picked[:, 1:2], p.drop_theta, generator, p.geometry)
                ce_terms["drop"] = F.cross_entropy(self(drops)[0], labels)
        center = self.center_loss(matrix, labels, steps)
        # CE(raw)/3 + CE(crop)/3 + CE(drop)/3 + center loss: one backward, one optimizer step.
        loss = sum(ce_terms.values()) / len(ce_terms) + p.center_weight * center
        out = {f"loss/{k}": float(v.detach()) for k, v in ce_terms.items()}
        out["loss/center"] = float(center.detach())
        out["loss"] = steps.step(loss)
        return out

    def explain_targets(self) -> list[tuple[str, int, str]]:
        return [("gradcam", self.stage, self.primary_head)]

    def explanations(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The mean attention map and the two strongest maps, and the test-time crop box."""
        _, _, maps = self(images)
        strongest = maps.float().sum((2, 3)).argsort(1, descending=True)[:, :2]
        top = maps.gather(1, strongest[:, :, None, None].expand(-1, -1, *maps.shape[2:]))
        out = {"attention (mean)": maps.mean(1), "attention (strongest)": top[:, 0]}
        if maps.shape[1] > 1:
            out["attention (second)"] = top[:, 1]
        if self.params.refine:
            out["crop box"] = attention_crop_boxes(maps.mean(1, keepdim=True), tuple(images.shape[-2:]),
                                                   self.params.test_theta, self.params.test_padding,
                                                   geometry=self.params.geometry).float()
        return out

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self.params
        logits, _, maps = self(images)
        if not p.refine:
            return {"raw": logits}
        crops = attention_crop(images, maps.mean(1, keepdim=True), p.test_theta, p.test_padding, geometry=p.geometry)
        crop_logits = self(crops)[0]
        if p.refine_average == "probabilities":
            refined = (logits.softmax(1) + crop_logits.softmax(1)) / 2
        else:
            refined = (logits + crop_logits) / 2
        return {"refined": refined, "raw": logits}

"""GAIN: Guided Attention Inference Network (Li, Wu, Peng, Ernst, Fu, CVPR 2018), for single-label FGVC.

From the paper (METHODS-2.md section 3) and its public re-implementations:
- the classification stream S_cl: the backbone's last stage, global average pooling, a linear layer
  (the primary head; GAIN adds nothing at test time);
- inside every training step, the Grad-CAM attention map of the TRUE class c on the last stage f:
  w^c_k = GAP(ds^c / df_k), A^c = ReLU(sum_k w^c_k f_k) (Eqs. 1-2), min-max normalised per image to
  [0, 1] and bilinearly upsampled to the image;
- the soft mask T(A) = sigmoid(omega (A - sigma)) (Eq. 4) and the erased image I* = I - T(A) * I
  (Eq. 3), fed to the same network (the attention-mining stream S_am, shared weights);
- the attention-mining loss L_am = s^c(I*), the true class's score on the erased image (Eq. 5), so
  that the map must cover all the evidence; L = L_cl + alpha L_am, alpha = 1 in all the paper's runs;
- GAIN_ext (`external`): L_e = mean (A - H)^2 against a pixel-level mask H (Eq. 7), L += omega_e L_e
  with omega_e = 10; here H is 1 inside the dataset's target boxes (synthfg: the parts that tell the
  class apart; CUB: the bird's box), the paper's extra supervision on bounding boxes. Only a small share
  of the training images has that supervision in the paper (1-10%; its Tables 1-2: 1,464 pixel-labelled of
  the 10,582 training images, `ext_fraction` 0.138; Table 3 ablates 200 to 1,464): images outside it get
  no L_e. An image whose target boxes were all cropped away by the augmentation is left out of L_e too
  (its H would be empty, which is not what its label says). L_e sums over a batch's supervised images and
  divides by the batch size, so each supervised image weighs omega_e L_e against its own L_cl + alpha L_am,
  as in the paper's batch-of-one steps.

Interpretations (each a parameter with this default; the paper's arXiv v1 gives no sigma or omega):
- `sigma` 0.5 and `omega` 10 (most implementations);
- s^c is the softmax probability of the true class (single-label, n = 1), L_cl cross-entropy;
- `detach_weights`: w^c comes from a gradient pass that updates nothing, as the paper says: w is
  detached (L_am and L_e flow through f and the erased-image pass, not through the gradients);
- `freeze_bn_erased`: the erased-image pass runs the backbone's BatchNorm on its running statistics
  and does not update them (erased images are not the data distribution);
- `ext_fraction`: the paper's supervised images are a fixed set, but a plugin sees no image ids (the
  engine passes every image's boxes), so each batch draws its supervised share from the trial's method
  generator (each image independently with probability ext_fraction): the same expected share of L_e
  terms per step, though over the epochs every image is supervised at some steps.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harness.plugin.backbones import StagedBackbone
from harness.plugin.method import Method, MethodParams, OptimizerSteps, frozen_batchnorm, linear_cam, register_method


class GAINParams(MethodParams):
    alpha: float = Field(1.0, ge=0.0, description="weight of the attention-mining loss (paper: 1)")
    sigma: float = Field(0.5, ge=0.0, le=1.0, description="threshold of the soft mask T(A)")
    omega: float = Field(10.0, gt=0.0, description="sharpness of the soft mask T(A)")
    external: bool = Field(False, description="GAIN_ext: supervise the map with the dataset's target boxes")
    external_weight: float = Field(10.0, ge=0.0, description="omega_e, weight of the external loss (paper: 10)")
    ext_fraction: float = Field(0.138, gt=0.0, le=1.0, description="GAIN_ext: share of training images with box "
                                                                   "supervision (paper: 1,464 of 10,582)")
    detach_weights: bool = Field(True, description="Grad-CAM weights from a pass that updates nothing")
    freeze_bn_erased: bool = Field(True, description="BatchNorm on running statistics for the erased images")


def gradcam(features: torch.Tensor, scores: torch.Tensor, detach_weights: bool = True) -> torch.Tensor:
    """Grad-CAM of the given scores (B,) on features (B, C, h, w), keeping the graph: ReLU(sum_k w_k f_k),
    w_k = GAP(d score / d f_k). (B, 1, h, w), not normalised."""
    grads, = torch.autograd.grad(scores.sum(), features, retain_graph=True, create_graph=not detach_weights)
    weights = grads.mean((2, 3), keepdim=True)
    if detach_weights:
        weights = weights.detach()
    return F.relu((weights * features).sum(1, keepdim=True))


def normalise_map(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) maps upsampled to `size` (bilinear) and min-max normalised per image to [0, 1]."""
    up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    low = up.flatten(1).amin(1).view(-1, 1, 1, 1)
    high = up.flatten(1).amax(1).view(-1, 1, 1, 1)
    return (up - low) / (high - low + 1e-8)


def soft_mask(maps: torch.Tensor, sigma: float = 0.5, omega: float = 10.0) -> torch.Tensor:
    """T(A) = sigmoid(omega (A - sigma)): about 1 where the attention is above sigma, about 0 below."""
    return torch.sigmoid(omega * (maps - sigma))


def erase(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """I* = I - T(A) * I: the attended region removed."""
    return images - mask * images


def box_masks(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, K, 4) xyxy pixel boxes (-1: none) -> (B, 1, H, W) masks, 1 inside any of an image's boxes."""
    h, w = size
    ys = torch.arange(h, device=boxes.device).view(1, 1, h, 1) + 0.5
    xs = torch.arange(w, device=boxes.device).view(1, 1, 1, w) + 0.5
    b = boxes[..., None, None]  # (B, K, 4, 1, 1)
    inside = (xs >= b[:, :, 0]) & (xs < b[:, :, 2]) & (ys >= b[:, :, 1]) & (ys < b[:, :, 3]) & (b[:, :, 0] >= 0)
    return inside.any(1, keepdim=True).to(boxes.dtype)


def external_loss(attention: torch.Tensor, boxes: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """L_e of GAIN_ext (Eq. 7): per image the mean over pixels of (A - H)^2, H = 1 inside its boxes; summed over
    the `supervised` (B,) images that still have a box after augmentation, divided by the batch size B (0 when
    none). attention (B, 1, H, W) in [0, 1]; boxes (B, K, 4) xyxy pixels, -1 absent."""
    target = box_masks(boxes, tuple(attention.shape[-2:])).to(attention.dtype)
    per_image = ((attention - target) ** 2).flatten(1).mean(1)  # (B,)
    used = supervised & (boxes[..., 0] >= 0).any(1)  # a box cropped away everywhere: no target, no term
    return (per_image * used.to(per_image.dtype)).sum() / len(per_image)


@register_method("gain")
class GAIN(Method):
    Params = GAINParams

    def __init__(self, backbone: StagedBackbone, num_classes: int, params: GAINParams):
        super().__init__(backbone, num_classes, params)
        self.fc = nn.Linear(backbone.channels[-1], num_classes)
        self.uses_boxes = params.external

    @classmethod
    def head_names(cls, params: GAINParams, num_stages: int) -> tuple[str, ...]:
        return ("linear",)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, classes) and the last stage's features (B, C, h, w)."""
        features = self.backbone(images)[-1]
        return self.fc(features.mean((2, 3))), features

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, steps: OptimizerSteps,
                      generator: torch.Generator | None = None, boxes: torch.Tensor | None = None) -> dict[str, float]:
        p = self.params
        logits, features = self(images)
        loss_cl = F.cross_entropy(logits, labels)
        losses = {"loss/cl": float(loss_cl.detach())}
        loss = loss_cl
        if p.alpha or p.external:
            true = logits.gather(1, labels[:, None])[:, 0]
            attention = normalise_map(gradcam(features, true, p.detach_weights).float(), tuple(images.shape[-2:]))
            if p.alpha:
                erased = erase(images, soft_mask(attention, p.sigma, p.omega).to(images.dtype))
                with frozen_batchnorm(self.backbone) if p.freeze_bn_erased else nullcontext():
                    erased_logits, _ = self(erased)
                loss_am = erased_logits.float().softmax(1).gather(1, labels[:, None]).mean()
                losses["loss/am"] = float(loss_am.detach())
                loss = loss + p.alpha * loss_am
            if p.external:
                if boxes is None:
                    raise ValueError("gain with external: true needs the dataset's target boxes")
                supervised = torch.rand(len(images), generator=generator) < p.ext_fraction
                loss_e = external_loss(attention, boxes, supervised.to(boxes.device))
                losses["loss/e"] = float(loss_e.detach())
                loss = loss + p.external_weight * loss_e
        losses["loss"] = steps.step(loss)
        return losses

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"linear": self(images)[0]}

    def class_activation_map(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CAM: the linear layer's weights of the true class over the last stage's maps."""
        return linear_cam(self.fc, self(images)[1], labels)

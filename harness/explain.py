"""Where each method looks: maps on a fixed set of test images, and a localisation score on the whole test set.

Maps, for the trial's first `report.maps` test images (the same images for every trial of a study: the
test split's order is fixed), each (N, H, W) in [0, 1] at the input size:
- `gradcam ...`: Grad-CAM (pytorch-grad-cam's activation and gradient hooks) of every target the method names (`Method.explain_targets`:
  by default the primary head on the last stage; PMG every stage head, MKSMT S3 and S4);
- `cam`: the class activation map of a head on global average pooling (`Method.class_activation_map`);
- `guided gradcam`: guided backpropagation (pytorch-grad-cam's GuidedBackpropReLU) times Grad-CAM;
- `deconvnet`: Zeiler and Fergus's view: the class score's gradient at the input with every ReLU's
  backward replaced by a ReLU of the gradient (nn.ReLU modules; functional ReLUs keep theirs);
- the method's own (`Method.explanations`): WS-DAN's attention maps and crop box, the attention
  modules' spatial maps, RA-CNN's attended regions. A (N, 4) entry is a box xyxy in input pixels.
All targets are the true class.

Localisation (datasets with target boxes: synthfg's discriminative parts, CUB's bird box): over every
test image, the share of the primary head's Grad-CAM energy that falls inside the box(es), and the
pointing game (is the map's maximum inside?). A uniform map scores the boxes' share of the image on
both: `test/loc/chance`.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from torch import nn

from harness.plugin import Method


class _Head(nn.Module):
    """model(x) -> one head's logits: what pytorch-grad-cam needs."""

    def __init__(self, method: Method, head: str):
        super().__init__()
        self.method, self.head = method, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.predict(x)[self.head]


def gradcam(method: Method, images: torch.Tensor, labels: torch.Tensor, stage: int, head: str,
            normalise: bool = True) -> np.ndarray:
    """Grad-CAM (Selvaraju et al.) of `head` for the true classes on backbone stage `stage`, upsampled to the
    input size: ReLU(sum_k w_k A_k), w_k = GAP(d score / d A_k), activations and gradients captured by
    pytorch-grad-cam's hooks. (B, H, W), min-max normalised per image unless `normalise` is False (the raw
    map, whose energy the localisation score shares out: a 2 x 2 last stage loses a cell to normalisation)."""
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

    module, reshape = method.backbone.stage_module(stage)
    capture = ActivationsAndGradients(_Head(method, head), [module], reshape)
    try:
        scores = capture(images.detach())
        method.zero_grad(set_to_none=True)
        scores.float().gather(1, labels[:, None]).sum().backward()
        activations, gradients = capture.activations[0].float(), capture.gradients[0].float()
    finally:
        capture.release()
        method.zero_grad(set_to_none=True)
    cam = torch.relu((gradients.mean((2, 3), keepdim=True) * activations).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
    cam = cam[:, 0].cpu().numpy()
    return _unit(cam) if normalise else cam


class _DeconvReLU(torch.autograd.Function):
    """ReLU forward; backward passes ReLU(gradient), ignoring the forward's sign (Zeiler and Fergus)."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


class _DeconvReLUModule(nn.Module):
    def forward(self, x):
        return _DeconvReLU.apply(x)


def input_gradient(method: Method, images: torch.Tensor, labels: torch.Tensor, head: str, kind: str) -> np.ndarray:
    """|d score / d input| summed over channels, (B, H, W) in [0, 1], with every nn.ReLU's backward made
    guided (kind "guided") or deconvnet's ("deconv")."""
    from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUasModule
    from pytorch_grad_cam.utils.find_layers import replace_all_layer_type_recursive

    replacement = GuidedBackpropReLUasModule() if kind == "guided" else _DeconvReLUModule()
    replace_all_layer_type_recursive(method, nn.ReLU, replacement)
    try:
        x = images.detach().clone().requires_grad_(True)
        scores = method.predict(x)[head].gather(1, labels[:, None]).sum()
        grad, = torch.autograd.grad(scores, x)
    finally:
        replace_all_layer_type_recursive(method, type(replacement), nn.ReLU())
    return _unit(grad.abs().sum(1).float().cpu().numpy())


def _unit(maps: np.ndarray) -> np.ndarray:
    low = maps.reshape(len(maps), -1).min(1)[:, None, None]
    high = maps.reshape(len(maps), -1).max(1)[:, None, None]
    return ((maps - low) / (high - low + 1e-12)).astype(np.float32)


def _resized(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    up = torch.nn.functional.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)
    return _unit(up[:, 0].detach().cpu().numpy())


def method_maps(method: Method, images: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """Every map and box of the module docstring for these images (the method in eval mode; restored)."""
    was_training = method.training
    method.eval()
    size = tuple(images.shape[-2:])
    out: dict[str, np.ndarray] = {}
    try:
        primary = None
        for name, stage, head in method.explain_targets():
            out[name] = gradcam(method, images, labels, stage, head)
            primary = out[name] if primary is None else primary
        cam = method.class_activation_map(images, labels)
        if cam is not None:
            out["cam"] = _resized(cam, size)
        out["guided gradcam"] = _unit(input_gradient(method, images, labels, method.primary_head, "guided") * primary)
        out["deconvnet"] = input_gradient(method, images, labels, method.primary_head, "deconv")
        with torch.no_grad():
            for name, value in method.explanations(images).items():
                out[name] = value.float().cpu().numpy() if value.dim() == 2 else _resized(value, size)
    finally:
        method.train(was_training)
    return out


def pack_maps(images: np.ndarray, labels: np.ndarray, maps: dict[str, np.ndarray]) -> str:
    """uint8 images (N, 3, H, W), labels and the maps (float16) as one base64 npz (it travels in the trial's
    final result to the driver, which stores it as trials/<id>/maps.npz)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images, labels=labels,
                        **{f"map:{k}": v.astype(np.float16) for k, v in maps.items()})
    return base64.b64encode(buffer.getvalue()).decode()


# ----------------------------------------------------------------------------- localisation

def localisation(maps: np.ndarray, boxes: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: the share of the map's energy inside the boxes, whether its maximum is inside (pointing),
    and the boxes' share of the image (a uniform map's score on both). maps (N, H, W) >= 0; boxes (N, K, 4)
    xyxy pixels, -1 absent: images without a box get NaN. A map with no energy counts as uniform."""
    n, h, w = maps.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    inside = np.zeros((n, h, w), dtype=bool)
    for k in range(boxes.shape[1]):
        b = boxes[:, k, :, None, None]
        inside |= (b[:, 0] >= 0) & (xs >= b[:, 0]) & (xs < b[:, 2]) & (ys >= b[:, 1]) & (ys < b[:, 3])
    has_box = inside.any((1, 2))
    share = inside.mean((1, 2))
    total = maps.sum((1, 2))
    energy = np.where(total > 0, (maps * inside).sum((1, 2)) / np.where(total > 0, total, 1), share)
    peak = maps.reshape(n, -1).argmax(1)
    # A flat map points nowhere in particular: it scores what a random point would, the boxes' share.
    flat = maps.reshape(n, -1).max(1) <= maps.reshape(n, -1).min(1)
    pointing = np.where(flat, share, inside.reshape(n, -1)[np.arange(n), peak].astype(float))
    nan = np.full(n, np.nan)
    return {"energy": np.where(has_box, energy, nan), "pointing": np.where(has_box, pointing, nan),
            "chance": np.where(has_box, share, nan)}


def localisation_scores(method: Method, pipeline, collective=None) -> dict[str, float]:
    """The primary head's Grad-CAM localisation over every test image of a pipeline that carries boxes
    (summed over the workers' shares)."""
    _, stage, head = method.explain_targets()[0]
    sums = np.zeros(4)  # energy, pointing, chance, images with a box
    was_training = method.training
    method.eval()
    try:
        for images, labels, boxes in pipeline.batches():
            maps = gradcam(method, images, labels, stage, head, normalise=False)
            scores = localisation(maps, boxes.cpu().numpy())
            valid = ~np.isnan(scores["energy"])
            sums += [scores["energy"][valid].sum(), scores["pointing"][valid].sum(), scores["chance"][valid].sum(),
                     valid.sum()]
    finally:
        method.train(was_training)
    if collective is not None and collective.world_size > 1:
        sums = collective.sum(torch.tensor(sums, device=next(method.parameters()).device)).cpu().numpy()
    if not sums[3]:
        return {}
    return {"test/loc/energy": sums[0] / sums[3], "test/loc/pointing": sums[1] / sums[3],
            "test/loc/chance": sums[2] / sums[3]}

"""Where each method looks: maps on a fixed set of test images, and a localisation score on the whole test set.

Maps, for the trial's first `report.maps` test images (the same images for every trial of a study: the
test split's order is fixed), each (N, H, W) in [0, 1] at the input size:
- `gradcam ...`: Grad-CAM of every target the method names (`Method.explain_targets`: by default the primary head
  on the last stage; PMG every stage head, MKSMT S3 and S4), and the map the localisation scores (below) when it is
  not one of them (a forward hook and torch.autograd.grad, as pytorch-grad-cam's hooks: tests/test_explain.py
  checks them against it);
- `cam`: the class activation map of a head on global average pooling (`Method.class_activation_map`);
- `guided gradcam`: guided backpropagation (Springenberg et al.: pytorch-grad-cam's GuidedBackpropReLU) times
  Grad-CAM;
- `deconvnet`: Zeiler and Fergus's view: the class score's gradient at the input with every ReLU's
  backward replaced by a ReLU of the gradient (nn.ReLU modules; functional ReLUs keep theirs);
- the method's own (`Method.explanations`): WS-DAN's attention maps and crop box, the attention
  modules' spatial maps, RA-CNN's attended regions. A (N, 4) entry is a box xyxy in input pixels.
All targets are the true class.

Localisation (datasets with target boxes: synthfg's discriminative parts, CUB's bird box), over every test
image, scoring the Grad-CAM of the primary head on the deepest backbone stage whose map is at least
`MIN_MAP_SIDE` (7) cells across at the trial's input size: the last stage whenever it is that large (a
ResNet's layer4 at 224 px and up, the layer the literature and TorchRay score), an earlier one on small
inputs (at 64 px a ResNet's layer4 is 2 x 2 and cannot point at a part; layer2's 8 x 8 can). `loc/map`
names the map scored, `loc/map_side` its side. The literature's scores, under their names:
- `test/loc/pointing`: the pointing game (Zhang et al., "Top-down neural attention by excitation backprop",
  ECCV 2016; TorchRay's benchmark): a hit when the map's maximum lies within `POINTING_TOLERANCE` (15) px of
  a target pixel, the hit rate of each class averaged over the classes. The 15 px are set for images about
  `REFERENCE_SIDE` (500) px across (PASCAL VOC, COCO, and CUB's originals, scored at their own size); here
  they scale with the test image's stored side S (before its centre crop): 15 S / 500 px (16.5 px at 550,
  2.2 px at synthfg's 72);
- `test/loc/chance`: what a uniformly random point scores on the same game (the share of the image within
  the tolerance of a target), averaged over classes alike; `test/loc/center`: the image centre's score
  (the pointing game's "center" baseline);
- `test/loc/energy`: Score-CAM's energy-based pointing game (Wang et al., CVPR-W 2020): the share of the min-max
  normalised map's energy inside the boxes, averaged over the images. A uniform map scores
  `test/loc/box_share`, the boxes' share of the image.
Our variants, under their own names: `test/loc/energy_raw` (the share of the raw, un-normalised Grad-CAM's
energy), `test/loc/pointing_strict` (the maximum inside a box, no tolerance, averaged over images). A map with
no energy, or a flat one, counts as uniform (it scores chance, and the box share).
"""

from __future__ import annotations

import contextlib

import base64
import io

import numpy as np
import torch
from torch import nn

from harness.plugin.method import Method


def gradcam(method: Method, images: torch.Tensor, labels: torch.Tensor, stage: int, head: str,
            normalise: bool = True, autocast=None) -> np.ndarray:
    """Grad-CAM (Selvaraju et al.) of `head` for the true classes on backbone stage `stage`, upsampled to the
    input size: ReLU(sum_k w_k A_k), w_k = GAP(d score / d A_k). (B, H, W), min-max normalised per image unless
    `normalise` is False (the raw map, whose energy the localisation score shares out: a 2 x 2 last stage loses a
    cell to normalisation). The stage's output is captured by a forward hook (as pytorch-grad-cam's
    ActivationsAndGradients does, its reshape for token layouts included) and its gradient taken with
    torch.autograd.grad: no parameter gradient is computed or left behind, and nothing of pytorch-grad-cam (which
    imports scikit-learn) is loaded. `autocast`: the trial's precision context (None: as the model is)."""
    module, reshape = method.backbone.stage_module(stage)
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda mod, inputs, output: captured.append(output))
    try:
        with torch.enable_grad(), (autocast() if autocast else contextlib.nullcontext()):
            scores = method.predict(images.detach())[head]
        output = captured[0]  # the stage's first pass (a method may run it again, e.g. on a crop)
        (gradient,) = torch.autograd.grad(scores.float().gather(1, labels[:, None]).sum(), output)
    finally:
        handle.remove()
    activations, gradients = output.detach(), gradient
    if reshape is not None:
        activations, gradients = reshape(activations), reshape(gradients)
    activations, gradients = activations.float(), gradients.float()
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


class _GuidedReLU(torch.autograd.Function):
    """ReLU forward; backward passes the gradient only where both the input and the gradient are positive
    (guided backpropagation, Springenberg et al.; pytorch-grad-cam's GuidedBackpropReLU, which
    tests/test_explain.py checks this against)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0).to(grad.dtype) * (grad > 0).to(grad.dtype)


class _GuidedReLUModule(nn.Module):
    def forward(self, x):
        return _GuidedReLU.apply(x)


def _replace_modules(module: nn.Module, kind: type, make) -> None:
    """Every submodule of type `kind` replaced, in place, by `make()`."""
    for name, child in module.named_children():
        if isinstance(child, kind):
            setattr(module, name, make())
        else:
            _replace_modules(child, kind, make)


def input_gradient(method: Method, images: torch.Tensor, labels: torch.Tensor, head: str, kind: str) -> np.ndarray:
    """|d score / d input| summed over channels, (B, H, W) in [0, 1], with every nn.ReLU's backward made
    guided (kind "guided") or deconvnet's ("deconv")."""
    replacement = _GuidedReLUModule if kind == "guided" else _DeconvReLUModule
    _replace_modules(method, nn.ReLU, replacement)
    try:
        x = images.detach().clone().requires_grad_(True)
        scores = method.predict(x)[head].gather(1, labels[:, None]).sum()
        grad, = torch.autograd.grad(scores, x)
    finally:
        _replace_modules(method, replacement, nn.ReLU)
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
        name, stage, head, _ = localisation_target(method, size[-1])  # the map the localisation scores
        if name not in out:
            out[name] = gradcam(method, images, labels, stage, head)
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

MIN_MAP_SIDE = 7  # cells: Grad-CAM's 7 x 7 on a ResNet's last stage at 224 px
POINTING_TOLERANCE = 15  # px, Zhang et al. 2016 and TorchRay, on images about REFERENCE_SIDE px across
REFERENCE_SIDE = 500


def pointing_tolerance(stored_side: int) -> float:
    """The pointing game's 15 px, scaled from images about 500 px across to a stored side (the test image before
    its centre crop, which does not rescale it)."""
    return POINTING_TOLERANCE * stored_side / REFERENCE_SIDE


def localisation_target(method: Method, image_size: int) -> tuple[str, int, str, int]:
    """(map name, backbone stage, head, map side): the primary head's Grad-CAM on the deepest stage whose map is at
    least MIN_MAP_SIDE cells across at this input size (stage 0 when none is)."""
    reductions = method.backbone.reductions
    sides = [max(1, -(-image_size // r)) for r in reductions]  # ceil: padded convolutions and pools round up
    stage = max((i for i, side in enumerate(sides) if side >= MIN_MAP_SIDE), default=0)
    head = method.primary_head
    named = {(s % len(reductions), h): n for n, s, h in method.explain_targets()}
    name = named.get((stage, head), f"gradcam {head} stage{stage + 1}")
    return name, stage, head, sides[stage]


def _box_ranges(boxes: np.ndarray) -> tuple[np.ndarray, ...]:
    """Inclusive pixel index ranges (N, K) of the pixels whose centres lie in each xyxy box (x1, y1 exclusive)."""
    x_lo, x_hi = np.ceil(boxes[..., 0] - 0.5), np.ceil(boxes[..., 2] - 0.5) - 1
    y_lo, y_hi = np.ceil(boxes[..., 1] - 0.5), np.ceil(boxes[..., 3] - 0.5) - 1
    present = (boxes[..., 0] >= 0) & (x_hi >= x_lo) & (y_hi >= y_lo)
    return x_lo, x_hi, y_lo, y_hi, present


def _distance2(u: np.ndarray, v: np.ndarray, ranges: tuple[np.ndarray, ...]) -> np.ndarray:
    """Squared distance from points (u = column, v = row; (N, ...) broadcastable) to the nearest target pixel of
    each image, (N, ...); inf where an image has no target pixel."""
    x_lo, x_hi, y_lo, y_hi, present = ranges
    extra = (1,) * (np.ndim(u) - 1)
    shape = lambda a: a.reshape(a.shape + extra)  # noqa: E731  (N, K, 1, ...)
    dx = np.maximum(np.maximum(shape(x_lo) - u[:, None], 0), u[:, None] - shape(x_hi))
    dy = np.maximum(np.maximum(shape(y_lo) - v[:, None], 0), v[:, None] - shape(y_hi))
    d2 = np.where(shape(present), dx ** 2 + dy ** 2, np.inf)
    return d2.min(1)


def localisation(maps: np.ndarray, boxes: np.ndarray, tolerance: float = 0.0) -> dict[str, np.ndarray]:
    """Per image, on maps (N, H, W) >= 0 and boxes (N, K, 4) xyxy pixels (-1 absent; images without one get NaN):
    `pointing` (the maximum within `tolerance` px of a target pixel), `chance` (the share of pixels within it:
    a random point's score), `center` (the image centre's), `energy` (the min-max normalised map's share inside
    the boxes), `energy_raw` (the raw map's), `pointing_strict` (the maximum inside) and `box_share`. A flat map
    (no energy included) counts as uniform: it scores `chance` and `box_share`."""
    n, h, w = maps.shape
    ranges = _box_ranges(np.asarray(boxes, dtype=np.float64))
    has_box = ranges[-1].any(1)
    rows, cols = np.mgrid[0:h, 0:w]
    d2_all = _distance2(np.broadcast_to(cols, (n, h, w)).astype(float), np.broadcast_to(rows, (n, h, w)).astype(float),
                        ranges)  # (N, H, W)
    inside = d2_all == 0
    near = d2_all < tolerance ** 2 if tolerance > 0 else inside  # TorchRay: a hit when distance < tolerance
    box_share, chance = inside.mean((1, 2)), near.mean((1, 2))
    flat_maps = maps.reshape(n, -1)
    low, high = flat_maps.min(1), flat_maps.max(1)
    flat = high <= low
    peak = flat_maps.argmax(1)
    pointing = np.where(flat, chance, near.reshape(n, -1)[np.arange(n), peak])
    strict = np.where(flat, box_share, inside.reshape(n, -1)[np.arange(n), peak])
    centre = _distance2(np.full(n, (w - 1) / 2), np.full(n, (h - 1) / 2), ranges)
    center = (centre < tolerance ** 2) if tolerance > 0 else (centre == 0)
    unit = (maps - low[:, None, None]) / np.where(flat, 1, high - low)[:, None, None]  # Score-CAM's normalisation
    unit_total = unit.sum((1, 2))
    energy = np.where(flat | (unit_total <= 0), box_share, (unit * inside).sum((1, 2)) / np.where(flat, 1, unit_total))
    total = maps.sum((1, 2))
    energy_raw = np.where(total > 0, (maps * inside).sum((1, 2)) / np.where(total > 0, total, 1), box_share)
    scores = {"pointing": pointing, "chance": chance, "center": center, "energy": energy, "energy_raw": energy_raw,
              "pointing_strict": strict, "box_share": box_share}
    return {k: np.where(has_box, v.astype(float), np.nan) for k, v in scores.items()}


CLASS_MEANS = ("pointing", "chance", "center")  # the pointing game averages over classes
IMAGE_MEANS = ("energy", "energy_raw", "pointing_strict", "box_share")  # Score-CAM and ours over images


def localisation_scores(method: Method, pipeline, collective=None, autocast=None) -> dict:
    """The localisation scores of the module docstring over every test image of a pipeline that carries boxes
    (summed over the workers' shares), with the map they score (`loc/map`, `loc/map_side`)."""
    name, stage, head, side = localisation_target(method, pipeline.image_size)
    tolerance = pointing_tolerance(pipeline.images.shape[-1])
    classes = method.num_classes
    per_class = np.zeros((classes, len(CLASS_MEANS) + 1))  # sums, then images
    per_image = np.zeros(len(IMAGE_MEANS) + 1)
    was_training = method.training
    method.eval()
    try:
        for images, labels, boxes in pipeline.batches():
            maps = gradcam(method, images, labels, stage, head, normalise=False, autocast=autocast)
            scores = localisation(maps, boxes.cpu().numpy(), tolerance)
            valid = ~np.isnan(scores["pointing"])
            y = labels.cpu().numpy()[valid]
            for j, key in enumerate(CLASS_MEANS):
                np.add.at(per_class[:, j], y, scores[key][valid])
            np.add.at(per_class[:, -1], y, 1)
            per_image += [*(scores[k][valid].sum() for k in IMAGE_MEANS), valid.sum()]
    finally:
        method.train(was_training)
    if collective is not None and collective.world_size > 1:
        flat = np.concatenate([per_class.ravel(), per_image])
        flat = collective.sum(torch.tensor(flat, device=next(method.parameters()).device)).cpu().numpy()
        per_class, per_image = flat[:per_class.size].reshape(per_class.shape), flat[per_class.size:]
    if not per_image[-1]:
        return {}
    seen = per_class[:, -1] > 0
    out = {f"test/loc/{k}": float((per_class[seen, j] / per_class[seen, -1]).mean()) for j, k in enumerate(CLASS_MEANS)}
    out.update((f"test/loc/{k}", float(per_image[j] / per_image[-1])) for j, k in enumerate(IMAGE_MEANS))
    out.update({"loc/map": f"{name} ({side}x{side})", "loc/map_side": float(side),
                "loc/tolerance_px": float(tolerance)})
    return out

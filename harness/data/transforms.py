"""The papers' input pipelines as named presets, and colour jitter on uint8-derived float batches.

A preset fills the train section's input keys that the study leaves out (keys it sets win):
    pmg      resize 550, random crop 448 (padding 8), flip, inputs in [-1, 1]     (PMG authors' train.py)
    wsdan    resize 512, random crop 448, flip, ColorJitter(brightness=0.126, saturation=0.5), ImageNet
             mean/std                                                          (WS-DAN PyTorch port, utils.py)
    swin384  resize 440, random crop 384, flip                                 (Swin fine-tuning at 384)
    aam224   resize 256, random rescaling x[0.75, 1.25], random crop 224, flip (the AAM article: "randomly
             rescaled, cropped and flipped, then resized to 224"; the range is our interpretation)

Colour jitter applies brightness, contrast, saturation and hue in that fixed order; torchvision's
ColorJitter shuffles the order per image. For the WS-DAN preset (brightness and saturation only) the two
commute except where values clip at 0 or 255.
"""

from __future__ import annotations

import torch

PRESETS: dict[str, dict] = {
    "pmg": {"resize": 550, "image_size": 448, "crop_padding": 8, "hflip": True, "normalize": "half"},
    "wsdan": {"resize": 512, "image_size": 448, "hflip": True, "colour_jitter": [0.126, 0.0, 0.5, 0.0],
              "normalize": "imagenet"},
    "swin384": {"resize": 440, "image_size": 384, "hflip": True},
    "aam224": {"resize": 256, "image_size": 224, "hflip": True, "random_scale": [0.75, 1.25]},
}

_GRAY = (0.299, 0.587, 0.114)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0] * _GRAY[0] + x[:, 1] * _GRAY[1] + x[:, 2] * _GRAY[2])[:, None]  # (B, 1, H, W)


def draw_jitter(n: int, strength: list[float], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Per-image factors of brightness, contrast, saturation (in [1-s, 1+s]) and hue shifts (in [-h, h]),
    drawn in that order, each only when its strength is non-zero."""
    out = {}
    for name, s in zip(("brightness", "contrast", "saturation", "hue"), strength):
        if s:
            draw = (torch.rand(n, generator=generator) * 2 - 1) * s
            out[name] = draw if name == "hue" else 1 + draw
    return out


def apply_jitter(x: torch.Tensor, factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply `draw_jitter` factors to (B, 3, H, W) floats in [0, 255], in torchvision's order."""
    def per_image(name: str) -> torch.Tensor:
        return factors[name].to(x.device).view(-1, 1, 1, 1)

    if "brightness" in factors:
        x = (x * per_image("brightness")).clamp_(0, 255)
    if "contrast" in factors:
        mean = _gray(x).mean((2, 3), keepdim=True)
        x = ((x - mean) * per_image("contrast") + mean).clamp_(0, 255)
    if "saturation" in factors:
        gray = _gray(x)
        x = ((x - gray) * per_image("saturation") + gray).clamp_(0, 255)
    if "hue" in factors:
        from torchvision.transforms.v2.functional import adjust_hue
        x = torch.stack([adjust_hue(img / 255, h) * 255 for img, h in zip(x, factors["hue"].tolist())])
    return x


def colour_jitter(x: torch.Tensor, strength: list[float], generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image brightness, contrast, saturation (factors in [1-s, 1+s]) and hue (shift in [-h, h]), in
    that order, on (B, 3, H, W) floats in [0, 255], as torchvision's ColorJitter does per image."""
    return apply_jitter(x, draw_jitter(len(x), strength, generator))

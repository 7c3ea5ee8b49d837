"""WS-DAN's attention crop and drop in the geometry of each code (`WSDANParams.geometry`).

The two authors' codes and this harness's earlier geometry agree on everything but where the map and the crop
fall on the pixel grid. They differ in four places (h x w the map, H x W the image, p the padding fraction; min
and max the first and last row or column of the mask upsampled map >= theta x the reference):

                 tf: the official code               port: GuYuc/WS-DAN.PyTorch        harness (the default)
                 (tau-yihouxiang/WS_DAN, TF 1.x)
  map -> H x W   tf.image.resize_bilinear, TF 1.x    F.upsample_bilinear               F.interpolate, half-pixel
                 defaults: pixel i reads i h / H     (align_corners): i (h-1)/(H-1)    (i + 0.5) h / H - 0.5
  reference max  the upsampled map's                 the h x w map's                   the upsampled map's
  crop box       fractions [min/H - p, max/H + p],   pixels [floor(min - pH),          pixels [min - floor(pH),
                 not clipped                         floor(max + pH)), clipped         max + 1 + floor(pH)), clipped
  crop -> H x W  tf.image.crop_and_resize: sample j  the box's pixels,                 the box's pixels,
                 at y1 (H-1) + j (y2 - y1)(H-1) /    F.upsample_bilinear               F.interpolate, half-pixel
                 (H-1), 0 outside the image          (align_corners)

Drop keeps the pixels whose upsampled map is below theta x the same reference max as the crop's, in the same
upsampling.
`harness` is what this harness computed up to now (MATH_VERSION 6): the TF code's threshold reference with
PyTorch's half-pixel corners and an integer box, a mix of the two codes that stays the default so finished
trials keep their numbers; the paper profile runs `tf`. Where the port would fail (an empty mask: its
reference max is the small map's, which its upsampling need not reach; an empty box at p H < 1), the box
falls back to the upsampled maximum's pixel and to one pixel at least. Arithmetic follows each code's
precision: TF's kernels in float32, the port's box in Python floats.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Geometry = Literal["harness", "tf", "port"]


def tf_resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W) as TF 1.x `tf.image.resize_bilinear` with its defaults (align_corners=False,
    half_pixel_centers=False): output pixel i reads source position i * scale, scale = h / H in float32, between
    rows floor and ceil of it (the last clamped to h - 1); lerp top + (bottom - top) * frac as TF's kernel."""
    def axis(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(n_in, dtype=torch.float32) / n_out  # CalculateResizeScale: in_size / float(out_size)
        src = torch.arange(n_out, dtype=torch.float32) * scale
        low = src.floor()
        return low.long().clamp(min=0), src.ceil().long().clamp(max=n_in - 1), src - low

    x = x.float()
    y_lo, y_hi, y_lerp = (t.to(x.device) for t in axis(x.shape[-2], size[0]))
    x_lo, x_hi, x_lerp = (t.to(x.device) for t in axis(x.shape[-1], size[1]))
    top_rows, bottom_rows = x[..., y_lo, :], x[..., y_hi, :]  # (B, C, H, w)
    top = top_rows[..., x_lo] + (top_rows[..., x_hi] - top_rows[..., x_lo]) * x_lerp
    bottom = bottom_rows[..., x_lo] + (bottom_rows[..., x_hi] - bottom_rows[..., x_lo]) * x_lerp
    return top + (bottom - top) * y_lerp[:, None]


def tf_crop_and_resize(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF's `tf.image.crop_and_resize` (bilinear, extrapolation_value 0) with boxes (B, 4) in TF's order and units,
    (y1, x1, y2, x2) fractions of the image: output row j samples y1 (H - 1) + j (y2 - y1)(H - 1) / (crop_h - 1)
    in pixel-centre coordinates, and a sample outside [0, H - 1] is 0. Float32 as TF's CPU kernel."""
    b, c, h, w = images.shape
    boxes = boxes.float().to(images.device)

    def axis(lo: torch.Tensor, hi: torch.Tensor, n_image: int, n_crop: int):
        if n_crop > 1:
            scale = (hi - lo) * (n_image - 1) / (n_crop - 1)  # (B,)
            steps = torch.arange(n_crop, dtype=torch.float32, device=images.device)
            pos = lo[:, None] * (n_image - 1) + steps * scale[:, None]  # (B, n_crop)
        else:
            pos = (0.5 * (lo + hi) * (n_image - 1))[:, None]
        valid = (pos >= 0) & (pos <= n_image - 1)
        low = pos.floor()
        return (low.long().clamp(0, n_image - 1), pos.ceil().long().clamp(0, n_image - 1), pos - low, valid)

    y_lo, y_hi, y_lerp, y_ok = axis(boxes[:, 0], boxes[:, 2], h, size[0])
    x_lo, x_hi, x_lerp, x_ok = axis(boxes[:, 1], boxes[:, 3], w, size[1])
    source = images.float()
    batch = torch.arange(b, device=images.device)[:, None, None]

    def at(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # (B, crop_h, crop_w, C)
        return source[batch, :, rows[:, :, None], cols[:, None, :]]

    xl, yl = x_lerp[:, None, :, None], y_lerp[:, :, None, None]
    top = at(y_lo, x_lo) + (at(y_lo, x_hi) - at(y_lo, x_lo)) * xl
    bottom = at(y_hi, x_lo) + (at(y_hi, x_hi) - at(y_hi, x_lo)) * xl
    crops = top + (bottom - top) * yl
    crops = crops * (y_ok[:, :, None] & x_ok[:, None, :])[..., None]  # extrapolation value 0
    return crops.permute(0, 3, 1, 2).to(images.dtype)


def upsample_maps(attention_maps: torch.Tensor, size: tuple[int, int], geometry: Geometry = "harness") -> torch.Tensor:
    """(B, 1, h, w) or (B, h, w) maps -> (B, H, W) float32 at the image size, in the geometry's bilinear resize."""
    maps = (attention_maps if attention_maps.dim() == 4 else attention_maps[:, None]).float()
    if geometry == "tf":
        return tf_resize_bilinear(maps, size)[:, 0]
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=geometry == "port")[:, 0]


def _thresholds(theta: float | tuple[float, float], n: int, generator: torch.Generator | None,
                device: torch.device) -> torch.Tensor:
    if isinstance(theta, (tuple, list)):
        low, high = theta
        return (torch.rand(n, generator=generator) * (high - low) + low).to(device)
    return torch.full((n,), float(theta), device=device)


def _limits(attention_maps: torch.Tensor, size: tuple[int, int], theta: float | tuple[float, float],
            generator: torch.Generator | None, geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """The upsampled maps (B, H, W) and their thresholds (B, 1, 1): theta x the geometry's reference max."""
    maps = upsample_maps(attention_maps, size, geometry)
    reference = attention_maps.float().flatten(1) if geometry == "port" else maps.flatten(1)  # port: the h x w map
    return maps, (_thresholds(theta, len(maps), generator, maps.device) * reference.amax(1))[:, None, None]


def _extent(mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """First and last row and column of each (H, W) mask: (y_min, y_max, x_min, x_max), inclusive, (B,) each."""
    _, h, w = mask.shape
    rows, cols = mask.any(2), mask.any(1)
    ar_h, ar_w = torch.arange(h, device=mask.device), torch.arange(w, device=mask.device)
    return (torch.where(rows, ar_h, h).amin(1), torch.where(rows, ar_h, -1).amax(1),
            torch.where(cols, ar_w, w).amin(1), torch.where(cols, ar_w, -1).amax(1))


@torch.no_grad()
def tf_crop_boxes(attention_maps: torch.Tensor, size: tuple[int, int], theta: float | tuple[float, float] = (0.4, 0.6),
                  padding: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """The official code's boxes (B, 4) for `tf_crop_and_resize`: (y1, x1, y2, x2) = (y_min / H - p, x_min / W - p,
    y_max / H + p, x_max / W + p) in float64 (NumPy's), stored as float32 (np.asarray(..., np.float32))."""
    h, w = size
    maps, limit = _limits(attention_maps, size, theta, generator, "tf")
    mask = maps >= limit  # the arg-max pixel always passes
    y0, y1, x0, x1 = (v.double() for v in _extent(mask))
    return torch.stack([y0 / h - padding, x0 / w - padding, y1 / h + padding, x1 / w + padding], 1).float()


@torch.no_grad()
def attention_crop_boxes(attention_maps: torch.Tensor, size: tuple[int, int],
                         theta: float | tuple[float, float] = (0.4, 0.6), padding: float = 0.1,
                         generator: torch.Generator | None = None, geometry: Geometry = "harness") -> torch.Tensor:
    """(B, 4) boxes (x0, y0, x1, y1) in input pixels, x1/y1 exclusive, of the attention crop (table above):
    integers for harness and port; for tf the span of crop_and_resize's samples, [x1 (W - 1), x2 (W - 1)] in
    pixel centres, as pixel edges (+ 0.5) and not clipped (the crop reads zeros outside the image)."""
    h, w = size
    if geometry == "tf":
        y1, x1, y2, x2 = tf_crop_boxes(attention_maps, size, theta, padding, generator).double().unbind(1)
        return torch.stack([x1 * (w - 1) + 0.5, y1 * (h - 1) + 0.5, x2 * (w - 1) + 0.5, y2 * (h - 1) + 0.5], 1)
    maps, limit = _limits(attention_maps, size, theta, generator, geometry)
    mask = maps >= limit
    if geometry == "port":  # an empty mask (the port would fail): the upsampled maximum's pixel
        empty = ~mask.flatten(1).any(1)
        mask = mask | (empty[:, None, None] & (maps >= maps.flatten(1).amax(1)[:, None, None]))
    y0, y1, x0, x1 = _extent(mask)
    if geometry == "port":  # int(min - p H) and int(max + p H) on Python floats, clipped; the end exclusive
        y0, x0 = ((v.double() - padding * n).floor().long().clamp(min=0) for v, n in ((y0, h), (x0, w)))
        y1, x1 = ((v.double() + padding * n).floor().long().clamp(max=n) for v, n in ((y1, h), (x1, w)))
        return torch.stack([x0, y0, torch.maximum(x1, x0 + 1), torch.maximum(y1, y0 + 1)], 1)
    pad_h, pad_w = int(padding * h), int(padding * w)
    return torch.stack([(x0 - pad_w).clamp(min=0), (y0 - pad_h).clamp(min=0),
                        (x1 + 1 + pad_w).clamp(max=w), (y1 + 1 + pad_h).clamp(max=h)], 1)


@torch.no_grad()
def attention_crop(images: torch.Tensor, attention_maps: torch.Tensor, theta: float | tuple[float, float] = (0.4, 0.6),
                   padding: float = 0.1, generator: torch.Generator | None = None,
                   geometry: Geometry = "harness") -> torch.Tensor:
    """Each image cropped to its attention box (attention_crop_boxes) and resized back to its size, bilinearly."""
    size = tuple(images.shape[-2:])
    if geometry == "tf":
        return tf_crop_and_resize(images, tf_crop_boxes(attention_maps, size, theta, padding, generator), size)
    boxes = attention_crop_boxes(attention_maps, size, theta, padding, generator, geometry).tolist()
    return torch.cat([F.interpolate(images[i:i + 1, :, y0:y1, x0:x1], size=size, mode="bilinear",
                                    align_corners=geometry == "port") for i, (x0, y0, x1, y1) in enumerate(boxes)])


@torch.no_grad()
def attention_drop(images: torch.Tensor, attention_maps: torch.Tensor, theta: float | tuple[float, float] = (0.2, 0.5),
                   generator: torch.Generator | None = None, geometry: Geometry = "harness") -> torch.Tensor:
    """Zero the region where the upsampled map is >= theta x the geometry's reference max; keep everything else."""
    maps, limit = _limits(attention_maps, tuple(images.shape[-2:]), theta, generator, geometry)
    return images * (maps < limit).to(images.dtype)[:, None]

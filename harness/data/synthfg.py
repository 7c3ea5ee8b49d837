"""synthfg: the embedded, procedurally rendered fine-grained dataset.

Every image shows one "bird" assembled from parts (tail, body, wing, head, crown, eye ring, beak) on
a cluttered background. A class is a combination of attributes of the SMALL parts (eye-ring colour,
beak colour and length, wing pattern, crown colour, tail shape). Classes are taken in the order of a
mixed-radix Gray code over the attribute space, so class k and class k+1 differ in exactly one small
part: the inter-class difference is small and local. Everything else varies freely inside a class:
pose (rotation, facing), scale, position, body colour, colour jitter, background clutter drawn from
the same palette as the discriminative parts, and occluders. Ground-truth part boxes are kept so
attention and Grad-CAM maps can be scored against the truly discriminative part.

Two renderings, chosen by `render` (cached datasets and trial identities are keyed by it):
- 2: birds near the centre (origin offset at most 0.25 of the half-frame, scale 0.5-0.85, rotation +-30 degrees).
  The image centre then lies on a discriminative part in 68% of the PMG default's test images, 7.5x a random
  point's 9%: the pointing game's centre baseline beat every trained model.
- 3 (default): birds anywhere (offset up to 0.75: near an edge a part may leave the frame, about 5% of the target
  parts after the test crop), scale 0.45-0.9 log-uniform, rotation +-45 degrees, either facing. The centre
  baseline is then 1.2-1.6x chance on the default studies' test images (tests/test_synthfg.py measures it).
  Birds off the centre are much harder to learn from scratch (a quarter-width ResNet-18 at 64 px stays near
  chance for the default studies' budget): `backbone.pretrained: synthfg-in` (harness.plugin.pretrained) is the remedy,
  as ImageNet weights are for CUB.

Rendering is vectorised over images with torch (2x supersampled, then box-filtered), deterministic
from the seed, at any resolution; the result is cached on disk as uint8 arrays.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from harness.data import DatasetFamily, DatasetParams, register_dataset
from harness.data.imageset import ImageSet, Split

# The newest rendering (the default of `render`). A change to what a rendering draws adds a version and keeps the
# old one reachable, so results made under it stay comparable (cached datasets are keyed by `render`):
# 2: each class's discriminative parts are all the parts that separate it from a class one attribute away
# 3: birds anywhere in the frame, at several scales and headings; a coarser wing pattern
RENDER_VERSION = 3
RENDERINGS = (2, 3)

PART_NAMES = ("head", "beak", "eye", "wing", "tail", "crown")

# Attributes that define a class, in Gray-code digit order (the first one changes fastest).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "wing_pattern": ("plain", "bars", "spots"),
    "eye_ring": ("white", "yellow", "red", "blue"),
    "beak": ("black-short", "orange-short", "black-long", "orange-long"),
    "crown": ("none", "red", "yellow"),
    "tail": ("fan", "forked", "pointed"),
}
# Which part carries each attribute (for scoring maps against the discriminative part).
ATTRIBUTE_PART = {"wing_pattern": "wing", "eye_ring": "eye", "beak": "beak", "crown": "crown", "tail": "tail"}

PALETTE = {
    "white": (0.95, 0.95, 0.92), "yellow": (0.95, 0.85, 0.15), "red": (0.85, 0.12, 0.10),
    "blue": (0.15, 0.35, 0.90), "black": (0.08, 0.08, 0.08), "orange": (0.95, 0.50, 0.10),
}
BODY_COLOURS = ((0.45, 0.32, 0.20), (0.50, 0.50, 0.48), (0.40, 0.45, 0.25), (0.65, 0.55, 0.40), (0.30, 0.28, 0.30))


class SynthFGParams(DatasetParams):
    """Knobs of the embedded dataset. Defaults are the harness's default difficulty."""

    classes: int = Field(16, ge=2, le=432, description="number of classes (<= 432 attribute combinations)")
    train_per_class: int = Field(60, ge=1)
    test_per_class: int = Field(30, ge=1)
    clutter: int = Field(6, ge=0, le=64, description="background distractor shapes per image")
    occlusion: float = Field(0.25, ge=0.0, le=1.0, description="probability of an occluder per image")
    part_scale: float = Field(1.5, gt=0.2, le=3.0, description="size multiplier of the small discriminative parts")
    colour_jitter: float = Field(0.08, ge=0.0, le=0.5)
    seed: int = Field(0, description="dataset seed (independent of the trial seed)")
    # identity_default: trials made before the knob existed rendered 2, and their identities lack the key; a trial
    # at 2 keeps that identity (its stored results stay valid) while one at 3 gets a new one (harness.study.trials).
    render: int = Field(RENDER_VERSION, ge=min(RENDERINGS), le=max(RENDERINGS),
                        description="rendering version: 2 = birds near the centre (results before it existed); "
                                    "3 = anywhere in the frame at several scales and headings",
                        json_schema_extra={"identity_default": 2})
    class_offset: int = Field(0, ge=0, le=431, description="the first class is attribute combination number "
                              "class_offset of the Gray code (harness.plugin.pretrained's source domain starts past "
                              "every study's classes)")

    @model_validator(mode="after")
    def _combinations_suffice(self) -> "SynthFGParams":
        if self.class_offset + self.classes > 432:
            raise ValueError(f"classes + class_offset = {self.class_offset + self.classes}: synthfg has 432 "
                             "attribute combinations")
        return self


def gray_code(n: int, radices: list[int]) -> list[list[int]]:
    """The first n words of the reflected mixed-radix Gray code (digit 0 changes fastest).

    Consecutive words differ in exactly one digit: inside a block only digit 0 moves, and each
    block runs digit 0 in the opposite direction of the previous one (boustrophedon), so the block
    boundary keeps digit 0 and changes one higher digit.
    """
    words: list[list[int]] = [[]]
    for r in reversed(radices):  # build from the slowest digit up
        words = [[d] + w for j, w in enumerate(words)
                 for d in (range(r) if j % 2 == 0 else reversed(range(r)))]
    return words[:n]


def class_attributes(classes: int, offset: int = 0) -> np.ndarray:
    """(classes, len(ATTRIBUTES)) attribute indices of Gray-code words offset..offset+classes-1; rows k and k+1
    differ in exactly one column."""
    radices = [len(v) for v in ATTRIBUTES.values()]
    return np.asarray(gray_code(offset + classes, radices)[offset:], dtype=np.int64)


def discriminative_parts(attrs: np.ndarray) -> list[list[int]]:
    """Per class, the indices (in PART_NAMES) of the parts that tell it apart from the classes it can be taken for:
    every part whose attribute alone separates it from another class of the dataset (a class one attribute away;
    Gray-code neighbours k-1 and k+1 among them), in attribute order. All of a class's evidence lies in these
    parts: changing any other part's attribute gives no class of the dataset, and everything else in the image
    (pose, body colour, background, clutter, occluders) is drawn the same for every class."""
    keys = list(ATTRIBUTES)
    differs = attrs[:, None, :] != attrs[None, :, :]  # (C, C, A)
    one_away = differs.sum(2) == 1  # (C, C): minimal pairs
    out = []
    for k in range(len(attrs)):
        columns = sorted({int(np.flatnonzero(differs[k, j])[0]) for j in np.flatnonzero(one_away[k])})
        out.append([PART_NAMES.index(ATTRIBUTE_PART[keys[c]]) for c in columns])
    return out


def class_names(attrs: np.ndarray) -> list[str]:
    keys = list(ATTRIBUTES)
    return ["|".join(f"{keys[j]}={ATTRIBUTES[keys[j]][a]}" for j, a in enumerate(row)) for row in attrs]


def _ellipse(x: torch.Tensor, y: torch.Tensor, cx: float, cy: float, rx: float, ry: float) -> torch.Tensor:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def _triangle(x: torch.Tensor, y: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Inside test for triangles; pts (N, 3, 2) in object coordinates, x/y (N, H, W)."""
    def edge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ax, ay = a[:, 0, None, None], a[:, 1, None, None]
        bx, by = b[:, 0, None, None], b[:, 1, None, None]
        return (bx - ax) * (y - ay) - (by - ay) * (x - ax)
    e0, e1, e2 = edge(pts[:, 0], pts[:, 1]), edge(pts[:, 1], pts[:, 2]), edge(pts[:, 2], pts[:, 0])
    return ((e0 >= 0) & (e1 >= 0) & (e2 >= 0)) | ((e0 <= 0) & (e1 <= 0) & (e2 <= 0))


def _paint(canvas: torch.Tensor, mask: torch.Tensor, colour: torch.Tensor) -> None:
    """canvas (N,3,H,W) <- colour (N,3) where mask (N,H,W)."""
    canvas.copy_(torch.where(mask[:, None], colour[:, :, None, None], canvas))


def _jitter(base: torch.Tensor, amount: float, g: torch.Generator) -> torch.Tensor:
    noise = (torch.rand(base.shape, generator=g) * 2 - 1) * amount
    return (base + noise).clamp(0, 1)


def render(attrs: torch.Tensor, size: int, p: SynthFGParams, g: torch.Generator, supersample: int = 2,
           return_masks: bool = False) -> tuple[torch.Tensor, ...]:
    """Render one chunk. attrs (N, 5) -> images uint8 (N, 3, size, size), part boxes (N, P, 4) xyxy px (and with
    `return_masks` the part masks (N, P, size, size) the boxes bound: a pixel any of whose subsamples is in it)."""
    n, big = attrs.shape[0], size * supersample
    lin = (torch.arange(big, dtype=torch.float32) + 0.5) / big * 2 - 1
    ys, xs = torch.meshgrid(lin, lin, indexing="ij")  # image coords in [-1, 1], y down
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731

    # Background: muted colour with a random linear gradient, then clutter from the same palette.
    bg0, bg1 = u(n, 3) * 0.5 + 0.2, u(n, 3) * 0.5 + 0.2
    direction = u(n) * 2 * math.pi
    t = (xs[None] * torch.cos(direction)[:, None, None] + ys[None] * torch.sin(direction)[:, None, None] + 1.5) / 3
    canvas = bg0[:, :, None, None] * (1 - t[:, None]) + bg1[:, :, None, None] * t[:, None]
    palette = torch.tensor(list(PALETTE.values()) + list(BODY_COLOURS))
    for _ in range(p.clutter):
        cx, cy, r = u(n) * 2 - 1, u(n) * 2 - 1, u(n) * 0.12 + 0.03
        ar = u(n) * 2 + 0.5
        mask = _ellipse(xs[None], ys[None], cx[:, None, None], cy[:, None, None], (r * ar)[:, None, None],
                        (r / ar)[:, None, None])
        colour = palette[torch.randint(len(palette), (n,), generator=g)]
        _paint(canvas, mask, _jitter(colour, p.colour_jitter, g))

    # Pose: object coordinates (x forward to the beak, y down) from image coordinates.
    if p.render == 2:  # draws in this order, so that render 2 stays what it was
        theta = (u(n) * 2 - 1) * math.radians(30)
        scale = u(n) * 0.35 + 0.5
        tx, ty = (u(n) * 2 - 1) * 0.25, (u(n) * 2 - 1) * 0.25
        facing = torch.where(u(n) < 0.5, -1.0, 1.0)
    else:
        theta, scale, tx, ty, facing = _pose_anywhere(n, u)
    X = (xs[None] - tx[:, None, None]) / scale[:, None, None]
    Y = (ys[None] - ty[:, None, None]) / scale[:, None, None]
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    x, y = (c * X + s * Y) * facing[:, None, None], -s * X + c * Y

    ps = p.part_scale
    body_colour = torch.tensor(BODY_COLOURS)[torch.randint(len(BODY_COLOURS), (n,), generator=g)]
    body_colour = _jitter(body_colour, p.colour_jitter, g)
    head_colour = _jitter(body_colour * 0.85, p.colour_jitter, g)
    ones = torch.ones(n)
    masks: dict[str, torch.Tensor] = {}

    # Tail (class attribute: shape).
    tail = attrs[:, 4]
    tail_pts = torch.stack([
        torch.stack([-0.45 * ones, -0.06 * ones], 1),
        torch.stack([-0.95 * ones, torch.where(tail == 2, -0.04, -0.25)], 1),
        torch.stack([-0.95 * ones, torch.where(tail == 2, 0.10, 0.20)], 1),
    ], 1)
    tail_mask = _triangle(x, y, tail_pts)
    notch = _triangle(x, y, torch.stack([torch.stack([-0.72 * ones, -0.02 * ones], 1),
                                         torch.stack([-0.97 * ones, -0.12 * ones], 1),
                                         torch.stack([-0.97 * ones, 0.08 * ones], 1)], 1))
    tail_mask &= ~(notch & (tail == 1)[:, None, None])
    _paint(canvas, tail_mask, body_colour * 0.7)
    masks["tail"] = tail_mask

    # Body, then wing with its pattern (class attribute).
    _paint(canvas, _ellipse(x, y, 0.0, 0.0, 0.55, 0.32), body_colour)
    wing = _ellipse(x, y, -0.08, -0.02, 0.36, 0.17)
    _paint(canvas, wing, body_colour * 0.75)
    pattern_colour = _jitter(torch.tensor(PALETTE["white"]).expand(n, 3), p.colour_jitter, g)
    bars = (torch.sin(x * 28) > 0.55) & wing & (attrs[:, 0] == 1)[:, None, None]
    spots = ((torch.remainder(x, 0.16) - 0.08) ** 2 + (torch.remainder(y, 0.14) - 0.07) ** 2 < 0.035 ** 2)
    spots &= wing & (attrs[:, 0] == 2)[:, None, None]
    _paint(canvas, bars | spots, pattern_colour)
    masks["wing"] = wing

    # Head, crown patch (class attribute; "none" keeps the head colour).
    head = _ellipse(x, y, 0.55, -0.25, 0.2, 0.2)
    _paint(canvas, head, head_colour)
    masks["head"] = head
    crown_cols = torch.stack([head_colour, torch.tensor(PALETTE["red"]).expand(n, 3),
                              torch.tensor(PALETTE["yellow"]).expand(n, 3)], 1)
    crown_colour = _jitter(crown_cols[torch.arange(n), attrs[:, 3]], p.colour_jitter, g)
    crown = _ellipse(x, y, 0.55, -0.40, 0.11 * ps, 0.06 * ps) & head
    _paint(canvas, crown, crown_colour)
    masks["crown"] = crown

    # Eye ring (class attribute: colour) and pupil.
    ring_cols = torch.tensor([PALETTE[k] for k in ATTRIBUTES["eye_ring"]])
    eye = _ellipse(x, y, 0.62, -0.28, 0.075 * ps, 0.075 * ps)
    _paint(canvas, eye, _jitter(ring_cols[attrs[:, 1]], p.colour_jitter, g))
    _paint(canvas, _ellipse(x, y, 0.62, -0.28, 0.035 * ps, 0.035 * ps), torch.zeros(n, 3))
    masks["eye"] = eye

    # Beak (class attribute: colour x length).
    beak_attr = attrs[:, 2]
    length = torch.where(beak_attr >= 2, 0.30, 0.16) * ps
    beak_pts = torch.stack([torch.stack([0.70 * ones, -0.31 * ones], 1),
                            torch.stack([0.70 * ones, -0.19 * ones], 1),
                            torch.stack([0.70 + length, -0.25 * ones], 1)], 1)
    beak = _triangle(x, y, beak_pts)
    beak_cols = torch.tensor([PALETTE["black"], PALETTE["orange"]])
    _paint(canvas, beak, _jitter(beak_cols[beak_attr % 2], p.colour_jitter, g))
    masks["beak"] = beak

    # Occluder: a branch-like bar across the image, with probability p.occlusion.
    occluded = u(n) < p.occlusion
    ox, oy, angle = u(n) * 1.6 - 0.8, u(n) * 1.6 - 0.8, u(n) * math.pi
    dist = (xs[None] - ox[:, None, None]) * torch.sin(angle)[:, None, None] - \
           (ys[None] - oy[:, None, None]) * torch.cos(angle)[:, None, None]
    occ = (dist.abs() < 0.08) & occluded[:, None, None]
    _paint(canvas, occ, _jitter(torch.tensor(BODY_COLOURS[0]).expand(n, 3) * 0.8, p.colour_jitter, g))

    canvas = F.avg_pool2d(canvas, supersample) if supersample > 1 else canvas
    images = (canvas.clamp(0, 1) * 255).round().to(torch.uint8)
    pixel_masks = torch.stack([F.max_pool2d(masks[k][:, None].float(), supersample)[:, 0] > 0.5
                               for k in PART_NAMES], 1)  # (N, P, size, size)
    boxes = torch.stack([_box(pixel_masks[:, k]) for k in range(len(PART_NAMES))], 1)
    return (images, boxes, pixel_masks) if return_masks else (images, boxes)


# Render 3's pose: the bird's origin anywhere in the central SHIFT_ANYWHERE of the frame (half-widths; render 2:
# 0.25), so a bird near an edge may lose a part to the frame as photographed birds do; scale log-uniform (render 2:
# uniform 0.5-0.85); rotation +-ROTATION_ANYWHERE degrees (render 2: 30), either facing.
SHIFT_ANYWHERE = 0.75
SCALE_RANGE_ANYWHERE = (0.45, 0.9)
ROTATION_ANYWHERE = 45


def _pose_anywhere(n: int, u) -> tuple[torch.Tensor, ...]:
    """Render 3's pose (theta, scale, tx, ty, facing), each (n,). Why these ranges: the pointing game's centre
    baseline is what a fixed guess scores; with render 2's offsets of at most 0.25 the centre lay on a target part in
    68% of the default studies' test images (7.5x chance). Offsets up to 0.75 bring it to 1.2-1.6x
    (tests/test_synthfg.py measures it), while the birds keep about render 2's sizes: smaller ones (0.3-0.6) anywhere
    were not learnt at all in the default studies' budget, from scratch or fine-tuned. Birds off the centre are harder
    to learn from scratch whatever their size (harness.plugin.pretrained.SourceRecipe says what was measured)."""
    theta = (u(n) * 2 - 1) * math.radians(ROTATION_ANYWHERE)
    low, high = SCALE_RANGE_ANYWHERE
    scale = torch.exp(math.log(low) + u(n) * math.log(high / low))
    tx, ty = (u(n) * 2 - 1) * SHIFT_ANYWHERE, (u(n) * 2 - 1) * SHIFT_ANYWHERE
    facing = torch.where(u(n) < 0.5, -1.0, 1.0)
    return theta, scale, tx, ty, facing


def _box(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 4) float xyxy pixel box (x1, y1 exclusive); -1 where the part is outside the image."""
    rows, cols = mask.any(2), mask.any(1)
    h, w = mask.shape[1:]
    y0 = rows.float().argmax(1)
    y1 = h - rows.flip(1).float().argmax(1)
    x0 = cols.float().argmax(1)
    x1 = w - cols.flip(1).float().argmax(1)
    box = torch.stack([x0, y0, x1, y1], 1).float()
    return torch.where(rows.any(1)[:, None], box, torch.full_like(box, -1.0))


def generate(p: SynthFGParams, size: int, chunk: int = 256) -> ImageSet:
    """Render the whole dataset at `size` px. Deterministic in (p, size)."""
    attrs = class_attributes(p.classes, p.class_offset)
    if len(attrs) < p.classes:
        raise ValueError(f"synthfg has only {len(attrs)} attribute combinations; asked for {p.classes} classes")
    splits = {}
    for split_index, (split, per_class) in enumerate((("train", p.train_per_class), ("test", p.test_per_class))):
        g = torch.Generator().manual_seed(p.seed * 1_000_003 + split_index)
        labels = torch.arange(p.classes).repeat_interleave(per_class)
        labels = labels[torch.randperm(len(labels), generator=g)]
        imgs, boxes = [], []
        for start in range(0, len(labels), chunk):
            a = torch.as_tensor(attrs)[labels[start:start + chunk]]
            i, b = render(a, size, p, g)
            imgs.append(i)
            boxes.append(b)
        splits[split] = Split(images=torch.cat(imgs).numpy(), labels=labels.numpy(), boxes=torch.cat(boxes).numpy())
    return ImageSet(name="synthfg", num_classes=p.classes, class_names=class_names(attrs),
                    train=splits["train"], test=splits["test"], part_names=PART_NAMES,
                    meta={"attributes": attrs.tolist(), "attribute_names": list(ATTRIBUTES),
                          "discriminative_parts": discriminative_parts(attrs)})


@register_dataset("synthfg")
class SynthFG(DatasetFamily):
    """The embedded default: rendered in seconds, runs anywhere."""

    Params = SynthFGParams

    @classmethod
    def build(cls, params: SynthFGParams, size: int) -> ImageSet:
        return generate(params, size)

    @classmethod
    def fingerprint(cls, params: SynthFGParams) -> str:
        """Cached renderings are keyed by this too: a change to what is rendered or recorded renders them again."""
        return f"render {params.render}"

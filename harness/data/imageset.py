"""Decoded image sets and the per-batch tensor pipeline.

An ImageSet holds every image of a dataset decoded once and resized to one square size, as uint8
arrays (N, 3, R, R). They are shared read-only between trials (the node cache is memory-mapped: the same
memory to every trial on a node), so nothing here ever writes into them. Augmentation (random
crop with padding, horizontal flip) is done per batch on tensors, from a generator seeded by the
trial seed and the epoch, so a resumed trial sees exactly the batches it would have seen.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": ((0.5,) * 3, (0.5,) * 3)}


@dataclass
class Split:
    images: np.ndarray  # (N, 3, R, R) uint8
    labels: np.ndarray  # (N,) int64 in [0, C)
    boxes: np.ndarray | None = None  # (N, P, 4) float xyxy in pixels of the stored size, -1 if absent
    # The rows of `images` this split holds, in order (a validation split and the training images left beside it
    # share the training split's images without a copy); None: every row. labels and boxes are the split's own.
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


class TestSplitSealed(RuntimeError):
    """A search trial touched the test split."""


class SealedSplit:
    """The test split as a search trial holds it: any use of it (its images, labels, boxes, length) raises, so
    a search that would read it fails loudly instead of choosing a configuration on the test set."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise TestSplitSealed(f"a search trial read the test split ({name}): search trials see the training "
                              "split only, scored on its validation part")

    def __len__(self) -> int:
        raise TestSplitSealed("a search trial read the test split (its length)")


def validation_rows(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The training images held out for validation, stratified per class: the images of class c (in the training
    split's order) are permuted by numpy's default_rng([seed, c]) and the first round(fraction x n_c) held out,
    at least one and at most n_c - 1 of a class with two images or more (none of a class with one). Returns
    their sorted positions in the training split: a function of the labels, the fraction and the seed alone, so
    every method, trial and node holds out the same images."""
    labels = np.asarray(labels)
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue
        k = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        held.append(members[np.random.default_rng([seed, int(c)]).permutation(len(members))[:k]])
    return np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)


def _subset(split: Split, positions: np.ndarray) -> Split:
    rows = positions if split.rows is None else np.asarray(split.rows)[positions]
    return Split(images=split.images, labels=np.asarray(split.labels)[positions],
                 boxes=None if split.boxes is None else np.asarray(split.boxes)[positions], rows=rows)


def carve_validation(imageset: "ImageSet", fraction: float, seed: int) -> tuple["ImageSet", Split]:
    """A search trial's data: (the ImageSet with the rest of the training split as `train` and the test split
    sealed, the validation split). Both splits view the training images (no copy); the test split is never read,
    not even its labels."""
    held = validation_rows(imageset.train.labels, fraction, seed)
    keep = np.setdiff1d(np.arange(len(imageset.train)), held)
    rest = ImageSet(name=imageset.name, num_classes=imageset.num_classes, class_names=imageset.class_names,
                    train=_subset(imageset.train, keep), test=SealedSplit(), part_names=imageset.part_names,
                    meta=imageset.meta)
    return rest, _subset(imageset.train, held)


@dataclass
class ImageSet:
    name: str
    num_classes: int
    class_names: list[str]
    train: Split
    test: Split
    part_names: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)


def target_boxes(imageset: ImageSet, split: str) -> np.ndarray | None:
    """(N, K, 4) xyxy boxes in stored pixels of what tells each image's class apart, -1 where absent:
    synthfg's discriminative parts (the parts whose attribute differs from the neighbouring classes'),
    a real dataset's object box (CUB's bounding_boxes.txt); None when the dataset has no boxes."""
    s = getattr(imageset, split)
    if s.boxes is None:
        return None
    parts = imageset.meta.get("discriminative_parts")
    if parts is None:
        return np.asarray(s.boxes, dtype=np.float32)
    k = max(len(p) for p in parts)
    table = np.full((len(parts), k), -1, dtype=np.int64)  # class -> its parts, padded
    for c, p in enumerate(parts):
        table[c, :len(p)] = p
    chosen = table[np.asarray(s.labels)]  # (N, K)
    boxes = np.take_along_axis(np.asarray(s.boxes), np.clip(chosen, 0, None)[:, :, None], axis=1).astype(np.float32)
    boxes[chosen < 0] = -1
    return boxes


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor view of a (possibly read-only, object-store backed) array. Never write into it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(array)


class BatchPipeline:
    """Turns a Split into normalised float batches, for one worker of `world_size`.

    Train: shuffle, random crop of `image_size` from the stored image zero-padded by `padding`,
    horizontal flip with p = 0.5, optional colour jitter. Test: centre crop of `image_size`. Images
    are stored at `resize` (e.g. 550 for PMG's 448 crops), so the crop follows the papers'
    resize-then-crop pipelines.

    Several workers: `batch_size` is the GLOBAL training batch. Every worker draws the same epoch
    order and the augmentation of the whole global batch from the same generator, and keeps its
    slice (rank r of W: images [r B/W, (r+1) B/W) of each batch), so across the workers every image
    of the epoch is used exactly once, each with the crop, flip and jitter it gets in one process,
    and the generator advances identically everywhere. The test split is dealt round-robin
    (image i to rank i mod W) and evaluated in local batches of `batch_size`.

    On an accelerator the uint8 crops are assembled in pinned memory, copied without blocking and
    turned into floats there (4x fewer bytes over the bus); `channels_last` lays the batch out NHWC.
    """

    def __init__(self, split: Split, image_size: int, batch_size: int, train: bool, padding: int = 0,
                 hflip: bool = True, device: torch.device | str = "cpu",
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 drop_last: bool | None = None, colour_jitter: list[float] | None = None,
                 rank: int = 0, world_size: int = 1, channels_last: bool = False,
                 random_scale: list[float] | None = None, boxes: np.ndarray | None = None):
        self.images, self.labels = as_tensor(split.images), as_tensor(split.labels)
        self.rows = None if split.rows is None else torch.as_tensor(np.asarray(split.rows, dtype=np.int64))
        stored = self.images.shape[-1]
        if image_size > stored + 2 * padding:
            raise ValueError(f"image_size {image_size} is larger than the stored size {stored} (+2*padding {padding})")
        if train and batch_size % world_size:
            raise ValueError(f"train.batch_size {batch_size} does not divide by the {world_size} workers; "
                             f"choose a multiple of {world_size}")
        self.image_size, self.batch_size, self.train = image_size, batch_size, train
        self.padding, self.hflip, self.device = padding, hflip, torch.device(device)
        self.rank, self.world_size, self.channels_last = rank, world_size, channels_last
        self.drop_last = train if drop_last is None else drop_last
        self.colour_jitter = colour_jitter if train else None
        self.random_scale = random_scale if train else None
        # (N, K, 4) stored-pixel boxes to carry through the crop, flip and rescale (see `batches`)
        self.boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32)) if boxes is not None else None
        self.pin = self.device.type == "cuda"
        # x_uint8 * scale + bias == (x / 255 - mean) / std
        self.scale = [1.0 / (255.0 * s) for s in std]
        self.bias = [-m / s for m, s in zip(mean, std)]

    def _count(self) -> int:
        """Images this pipeline iterates over: all of the train split, this rank's share of the test split."""
        n = len(self.labels)
        return n if self.train else len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        n = self._count()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self, generator: torch.Generator | None = None,
                max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """(images, labels), or (images, labels, boxes) when the pipeline carries boxes: (B, K, 4) xyxy in
        pixels of the batch images (after padding, crop, rescale and flip), clipped to them, -1 where a box
        is absent or falls outside."""
        n = len(self.labels)
        order = torch.randperm(n, generator=generator) if self.train else torch.arange(self.rank, n, self.world_size)
        local = self.batch_size // self.world_size if self.train else self.batch_size
        for b in range(len(self) if max_batches is None else min(len(self), max_batches)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            augment = self._draw(len(idx), generator) if self.train else None
            if self.train and self.world_size > 1:  # this rank's slice of the global batch
                keep = slice(self.rank * local, (self.rank + 1) * local)
                idx, augment = idx[keep], {k: v[keep] for k, v in augment.items()}
            labels = self.labels[idx]
            if self.pin:
                labels = labels.pin_memory()
            images, placement = self._make(idx if self.rows is None else self.rows[idx], augment)
            labels = labels.to(self.device, non_blocking=True)
            if self.boxes is None:
                yield images, labels
            else:
                yield images, labels, self._place_boxes(self.boxes[idx], *placement).to(self.device)

    def _draw(self, n: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Random crop offsets, flips and jitter factors of n images, in the generator's fixed order."""
        span = self.images.shape[-1] + 2 * self.padding - self.image_size
        if self.random_scale:  # per image: a scale factor and where its (scaled) crop sits, as fractions
            low, high = self.random_scale
            out = {"scales": low + torch.rand(n, generator=generator) * (high - low),
                   "positions": torch.rand(n, 2, generator=generator)}
        else:
            out = {"offsets": torch.randint(0, span + 1, (n, 2), generator=generator)}
        out["flips"] = (torch.rand(n, generator=generator) < 0.5) if self.hflip else torch.zeros(n, dtype=torch.bool)
        if self.colour_jitter:
            from harness.data.transforms import draw_jitter
            out.update(draw_jitter(n, self.colour_jitter, generator))
        return out

    def _make(self, idx: torch.Tensor, augment: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, tuple]:
        """Crop (and flip) straight from the shared uint8 images into a float batch, then normalise
        in place: one uint8 read and three passes over the float output, no other copies. Also returns
        where each crop came from (corner offsets in the unpadded image, sides, flips) for `_place_boxes`."""
        size, stored = self.image_size, self.images.shape[-1]
        if augment is not None:
            source = self.images
            if self.padding:
                source = F.pad(self.images[idx], (self.padding,) * 4)
                idx = torch.arange(len(idx))
            flips = augment["flips"].tolist()
            if "scales" in augment:
                return self._make_rescaled(source, idx, augment, flips)
            offsets = [(oy - self.padding, ox - self.padding) for oy, ox in augment["offsets"].tolist()]
        else:
            source, o = self.images, (stored - size) // 2
            offsets, flips = [(o, o)] * len(idx), [False] * len(idx)
        # On an accelerator the uint8 crops travel (4x fewer bytes) and become floats there.
        on_cpu, dtype = self.device.type == "cpu", torch.get_default_dtype()
        out = torch.empty((len(idx), 3, size, size), dtype=dtype if on_cpu else torch.uint8, pin_memory=self.pin)
        pad = self.padding if augment is not None else 0
        for i, (j, (oy, ox), flip) in enumerate(zip(idx.tolist(), offsets, flips)):
            crop = source[j, :, oy + pad:oy + pad + size, ox + pad:ox + pad + size]
            out[i].copy_(crop.flip(-1) if flip else crop)  # uint8 -> float while copying on CPU
        return self._finish(out, augment), (offsets, [size] * len(idx), flips)

    def _make_rescaled(self, source: torch.Tensor, idx: torch.Tensor, augment: dict,
                       flips: list[bool]) -> tuple[torch.Tensor, tuple]:
        """Random rescaling: the crop side taken from the (padded) stored image is image_size / scale (at most
        the whole image), resized to image_size (bilinear, antialiased), and rounded back to uint8 levels like
        a decoded image."""
        size, full = self.image_size, source.shape[-1]
        placed = []
        on_cpu = self.device.type == "cpu"
        out = torch.empty((len(idx), 3, size, size), dtype=torch.get_default_dtype() if on_cpu else torch.uint8,
                          pin_memory=self.pin)
        for i, (j, scale, (fy, fx), flip) in enumerate(zip(idx.tolist(), augment["scales"].tolist(),
                                                           augment["positions"].tolist(), flips)):
            side = min(full, max(1, round(size / scale)))
            oy, ox = int(fy * (full - side + 1)), int(fx * (full - side + 1))
            placed.append((oy - self.padding, ox - self.padding, side))
            crop = source[j, :, oy:oy + side, ox:ox + side].float()[None]
            if side != size:
                crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            crop = crop[0].round_().clamp_(0, 255)
            out[i].copy_(crop.flip(-1) if flip else crop)
        return self._finish(out, augment), ([(oy, ox) for oy, ox, _ in placed], [s for *_, s in placed], flips)

    def _place_boxes(self, boxes: torch.Tensor, offsets: list, sides: list, flips: list) -> torch.Tensor:
        """Stored-pixel boxes (B, K, 4) into the batch's pixels: shift by each crop's corner (offsets relative
        to the unpadded image), scale by image_size / side, mirror the flipped ones, clip; -1 if gone."""
        size = self.image_size
        corner = torch.tensor([[ox, oy, ox, oy] for oy, ox in offsets], dtype=torch.float32)[:, None]
        scale = torch.tensor([size / side for side in sides], dtype=torch.float32)[:, None, None]
        out = ((boxes - corner) * scale).clamp(0, size)
        flip = torch.tensor(flips, dtype=torch.bool)
        out[flip] = torch.stack([size - out[flip][..., 2], out[flip][..., 1], size - out[flip][..., 0],
                                 out[flip][..., 3]], -1)
        gone = (boxes[..., 0] < 0) | (out[..., 2] <= out[..., 0]) | (out[..., 3] <= out[..., 1])
        out[gone] = -1
        return out

    def _finish(self, out: torch.Tensor, augment: dict | None) -> torch.Tensor:
        """To the device, to floats, jitter, normalise."""
        dtype = torch.get_default_dtype()
        out = out.to(self.device, non_blocking=True)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        out = out.to(dtype)
        if augment is not None and self.colour_jitter:
            from harness.data.transforms import apply_jitter
            out = apply_jitter(out, augment)
        for c in range(3):  # (x - mean) / std with per-channel scalars, in place
            out[:, c].mul_(self.scale[c]).add_(self.bias[c])
        return out

"""Decoded image sets and the per-batch tensor pipeline.

An ImageSet holds every image of a dataset decoded once and resized to one square size, as uint8
arrays (N, 3, R, R). They are shared read-only between trials (the Ray object store hands the same
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

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ImageSet:
    name: str
    num_classes: int
    class_names: list[str]
    train: Split
    test: Split
    part_names: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.train.images.shape[-1])


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor view of a (possibly read-only, object-store backed) array. Never write into it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(array)


class BatchPipeline:
    """Turns a Split into normalised float batches.

    Train: shuffle, random crop of `image_size` from the stored image zero-padded by `padding`,
    horizontal flip with p = 0.5. Test: centre crop of `image_size`. Images are stored at `resize`
    (e.g. 550 for PMG's 448 crops), so the crop follows the papers' resize-then-crop pipelines.
    """

    def __init__(self, split: Split, image_size: int, batch_size: int, train: bool, padding: int = 0,
                 hflip: bool = True, device: torch.device | str = "cpu",
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 drop_last: bool | None = None, colour_jitter: list[float] | None = None):
        self.images, self.labels = as_tensor(split.images), as_tensor(split.labels)
        stored = self.images.shape[-1]
        if image_size > stored + 2 * padding:
            raise ValueError(f"image_size {image_size} is larger than the stored size {stored} (+2*padding {padding})")
        self.image_size, self.batch_size, self.train = image_size, batch_size, train
        self.padding, self.hflip, self.device = padding, hflip, torch.device(device)
        self.drop_last = train if drop_last is None else drop_last
        self.colour_jitter = colour_jitter if train else None
        # x_uint8 * scale + bias == (x / 255 - mean) / std
        self.scale = [1.0 / (255.0 * s) for s in std]
        self.bias = [-m / s for m, s in zip(mean, std)]

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self, generator: torch.Generator | None = None,
                max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=generator) if self.train else torch.arange(n)
        for b in range(len(self) if max_batches is None else min(len(self), max_batches)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self._make(idx, generator), self.labels[idx].to(self.device, non_blocking=True)

    def _make(self, idx: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Crop (and flip) straight from the shared uint8 images into a float batch, then normalise
        in place: one uint8 read and three passes over the float output, no other copies."""
        size, stored = self.image_size, self.images.shape[-1]
        if self.train:
            source = self.images
            if self.padding:
                source = F.pad(self.images[idx], (self.padding,) * 4)
                idx = torch.arange(len(idx))
            span = source.shape[-1] - size
            offsets = torch.randint(0, span + 1, (len(idx), 2), generator=generator).tolist()
            flips = (torch.rand(len(idx), generator=generator) < 0.5).tolist() if self.hflip else [False] * len(idx)
        else:
            source, o = self.images, (stored - size) // 2
            offsets, flips = [(o, o)] * len(idx), [False] * len(idx)
        # On an accelerator the uint8 crops travel (4x fewer bytes) and become floats there.
        dtype = torch.uint8 if self.device.type != "cpu" else torch.float32
        out = torch.empty((len(idx), 3, size, size), dtype=dtype)
        for i, (j, (oy, ox), flip) in enumerate(zip(idx.tolist(), offsets, flips)):
            crop = source[j, :, oy:oy + size, ox:ox + size]
            out[i].copy_(crop.flip(-1) if flip else crop)  # uint8 -> float while copying on CPU
        out = out.to(self.device, non_blocking=True).float()
        if self.colour_jitter:
            from harness.data.transforms import colour_jitter
            out = colour_jitter(out, self.colour_jitter, generator)
        for c in range(3):  # (x - mean) / std with per-channel scalars, in place
            out[:, c].mul_(self.scale[c]).add_(self.bias[c])
        return out

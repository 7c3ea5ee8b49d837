"""Turning a listed dataset (paths, labels, split flags) into an ImageSet: shared by the real families."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.data._decode import DatasetError, decode_all
from harness.data.imageset import ImageSet, Split


def build_imageset(name: str, size: int, class_names: list[str], items: dict[str, list[tuple[Path, int]]],
                   boxes: dict[str, list[tuple[float, float, float, float] | None]] | None = None,
                   meta: dict | None = None, crop_bottom: int = 0) -> ImageSet:
    """items: split -> [(image path, 0-based label)]; boxes (optional): split -> xywh in original pixels."""
    splits = {}
    for split in ("train", "test"):
        listed = items[split]
        if not listed:
            raise DatasetError(f"{name}: the {split} split lists no images")
        images, originals = decode_all([p for p, _ in listed], size, name, crop_bottom)
        split_boxes = None
        if boxes is not None:
            split_boxes = np.full((len(listed), 1, 4), -1.0, dtype=np.float32)
            for k, box in enumerate(boxes[split]):
                if box is not None:
                    x, y, w, h = box
                    sx, sy = size / originals[k, 0], size / originals[k, 1]  # into the stored square frame
                    split_boxes[k, 0] = (x * sx, y * sy, (x + w) * sx, (y + h) * sy)
        splits[split] = Split(images=images, labels=np.array([c for _, c in listed], dtype=np.int64), boxes=split_boxes)
    return ImageSet(name=name, num_classes=len(class_names), class_names=class_names, train=splits["train"],
                    test=splits["test"], part_names=("object",) if boxes is not None else (), meta=meta or {})

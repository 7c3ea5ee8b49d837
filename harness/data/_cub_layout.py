"""The listing format CUB-200-2011 introduced and NABirds reuses, read once for both families.

    images.txt <image id> <relpath under images/>     image_class_labels.txt <image id> <class id>
    train_test_split.txt <image id> <1 = train | 0>    classes.txt <class id> <name, may hold spaces>
    bounding_boxes.txt <image id> <x> <y> <w> <h>      (optional)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.data._decode import DatasetError, read_table, require


@dataclass
class CubListing:
    root: Path
    paths: dict[str, str]  # image id -> path relative to images/
    class_of: dict[str, int]  # image id -> class id as written in the files
    is_train: dict[str, bool]
    class_names: dict[int, str]  # class id -> name
    boxes: dict[str, tuple[float, float, float, float]] | None  # image id -> x, y, w, h

    def split(self, label_of: dict[int, int]) -> tuple[dict, dict | None]:
        """Items (image path, 0-based label) and boxes per split; ids in numeric order where numeric."""
        order = sorted(self.paths, key=lambda i: (0, int(i), "") if i.isdigit() else (1, 0, i))
        items, boxes = {}, {}
        for split, flag in (("train", True), ("test", False)):
            ids = [i for i in order if self.is_train[i] == flag]
            items[split] = [(self.root / "images" / self.paths[i], label_of[self.class_of[i]]) for i in ids]
            boxes[split] = [self.boxes.get(i) for i in ids] if self.boxes is not None else None
        return items, (boxes if self.boxes is not None else None)


def read_cub_layout(root: Path, dataset: str) -> CubListing:
    files = {n: require(root, n, dataset) for n in
             ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")}
    require(root, "images", dataset)
    paths = dict(read_table(files["images.txt"]))
    class_of = {i: int(c) for i, c in read_table(files["image_class_labels.txt"])}
    is_train = {i: s == "1" for i, s in read_table(files["train_test_split.txt"])}
    names = {}
    for line in files["classes.txt"].read_text().splitlines():
        if line.strip():
            cid, name = line.strip().split(" ", 1)
            names[int(cid)] = name
    missing = sorted(set(paths) ^ set(class_of) | set(paths) ^ set(is_train))
    if missing:
        raise DatasetError(f"{dataset}: image ids {missing[:10]} are not listed in all of images.txt, "
                           f"image_class_labels.txt and train_test_split.txt under {root}")
    boxes_file = root / "bounding_boxes.txt"
    boxes = ({r[0]: tuple(float(v) for v in r[1:5]) for r in read_table(boxes_file)}
             if boxes_file.exists() else None)
    return CubListing(root, paths, class_of, is_train, names, boxes)

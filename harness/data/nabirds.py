"""NABirds from its distributed layout.

    <root>/images/<class dir>/<file>.jpg
    images.txt <image uuid> <relpath>      image_class_labels.txt <uuid> <class id>
    train_test_split.txt <uuid> <1|0>       classes.txt <class id> <name with spaces>
    bounding_boxes.txt <uuid> <x> <y> <w> <h> (optional)   hierarchy.txt <child> <parent>

Class ids are not contiguous (only the leaf classes that have images are used): they are remapped
to 0..C-1 in increasing id order.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from harness.data import DatasetFamily, register_dataset
from harness.data._decode import DatasetError, existing_root, read_table, require
from harness.data._split_builder import build_imageset
from harness.data.imageset import ImageSet


class NABirdsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["nabirds"] = "nabirds"
    root: str = Field(..., description="the nabirds folder")


@register_dataset("nabirds")
class NABirds(DatasetFamily):
    Params = NABirdsParams

    @classmethod
    def build(cls, params: NABirdsParams, size: int) -> ImageSet:
        root = existing_root(params.root, "nabirds", "your nabirds folder")
        files = {n: require(root, n, "nabirds") for n in
                 ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")}
        require(root, "images", "nabirds")
        paths = {i: p for i, p in read_table(files["images.txt"])}
        class_of = {i: int(c) for i, c in read_table(files["image_class_labels.txt"])}
        is_train = {i: s == "1" for i, s in read_table(files["train_test_split.txt"])}
        all_names = {}
        for line in files["classes.txt"].read_text().splitlines():
            if line.strip():
                cid, name = line.strip().split(" ", 1)
                all_names[int(cid)] = name
        used = sorted(set(class_of.values()))  # not contiguous: remap to 0..C-1
        remap = {cid: k for k, cid in enumerate(used)}
        missing = sorted(set(paths) - set(class_of) | set(paths) - set(is_train))
        if missing:
            raise DatasetError(f"nabirds: images {missing[:5]} lack a class or split line under {root}")
        boxes_file = root / "bounding_boxes.txt"
        boxes = {r[0]: tuple(float(v) for v in r[1:5]) for r in read_table(boxes_file)} if boxes_file.exists() else None
        items, split_boxes = {}, {}
        for split, flag in (("train", True), ("test", False)):
            ids = sorted(i for i in paths if is_train[i] == flag)
            items[split] = [(root / "images" / paths[i], remap[class_of[i]]) for i in ids]
            split_boxes[split] = [boxes.get(i) for i in ids] if boxes is not None else None
        return build_imageset("nabirds", size, [all_names.get(c, str(c)) for c in used], items,
                              split_boxes if boxes is not None else None,
                              meta={"root": str(root), "class_ids": used})

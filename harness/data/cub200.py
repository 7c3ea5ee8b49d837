"""CUB-200-2011 from its distributed layout.

    CUB_200_2011/
      images/NNN.Name/*.jpg
      images.txt               <image_id> <relative path>
      image_class_labels.txt   <image_id> <class_id>   (class ids are 1-based)
      train_test_split.txt     <image_id> <1 = train | 0 = test>
      classes.txt              <class_id> <name>
      bounding_boxes.txt       <image_id> <x> <y> <w> <h>   (optional here)

11,788 images: 5,994 train / 5,794 test, 200 classes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from harness.data import DatasetFamily, register_dataset
from harness.data._decode import DatasetError, existing_root, read_table, require
from harness.data._split_builder import build_imageset
from harness.data.imageset import ImageSet


class CUB200Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["cub200"] = "cub200"
    root: str = Field(..., description="the CUB_200_2011 folder")


@register_dataset("cub200")
class CUB200(DatasetFamily):
    Params = CUB200Params

    @classmethod
    def build(cls, params: CUB200Params, size: int) -> ImageSet:
        root = existing_root(params.root, "cub200", "your CUB_200_2011 folder")
        files = {name: require(root, name, "cub200") for name in
                 ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")}
        require(root, "images", "cub200")
        paths = {int(i): p for i, p in read_table(files["images.txt"])}
        labels = {int(i): int(c) - 1 for i, c in read_table(files["image_class_labels.txt"])}  # 1-based -> 0-based
        is_train = {int(i): s == "1" for i, s in read_table(files["train_test_split.txt"])}
        names = [name for _, name in sorted((int(c), n) for c, n in read_table(files["classes.txt"]))]
        missing = sorted(set(paths) ^ set(labels) | set(paths) ^ set(is_train))
        if missing:
            raise DatasetError(f"cub200: image ids {missing[:10]} are not listed in all of images.txt, "
                               f"image_class_labels.txt and train_test_split.txt under {root}")
        boxes_file = root / "bounding_boxes.txt"
        boxes = {int(r[0]): tuple(float(v) for v in r[1:5]) for r in read_table(boxes_file)} if boxes_file.exists() else None
        items, split_boxes = {}, {}
        for split, flag in (("train", True), ("test", False)):
            ids = sorted(i for i in paths if is_train[i] == flag)
            items[split] = [(root / "images" / paths[i], labels[i]) for i in ids]
            split_boxes[split] = [boxes.get(i) for i in ids] if boxes is not None else None
        return build_imageset("cub200", size, names, items, split_boxes if boxes is not None else None,
                              meta={"root": str(root)})

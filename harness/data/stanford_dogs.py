"""Stanford Dogs from its distributed layout.

    <root>/Images/n0xxxxxxx-Breed/*.jpg
    <root>/train_list.mat, test_list.mat    keys file_list (paths under Images/), labels (1-based)

12,000 train / 8,580 test images, 120 classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from harness.data import DatasetFamily, RootedParams, register_dataset
from harness.data._decode import DatasetError, existing_root, require
from harness.data._split_builder import build_imageset
from harness.data.imageset import ImageSet


class DogsParams(RootedParams):
    root: str = Field(..., description="the folder holding Images/, train_list.mat and test_list.mat")


def read_list(path: Path) -> list[tuple[str, int]]:
    from scipy.io import loadmat

    mat = loadmat(path, squeeze_me=True)
    if "file_list" not in mat or "labels" not in mat:
        raise DatasetError(f"stanford_dogs: {path} has no file_list/labels keys")
    # squeeze_me turns a one-element list into a scalar: atleast_1d brings the list back.
    files = [str(f) for f in np.atleast_1d(mat["file_list"]).ravel()]
    labels = [int(v) - 1 for v in np.atleast_1d(mat["labels"]).ravel()]  # 1-based -> 0-based
    return list(zip(files, labels))


@register_dataset("stanford_dogs")
class StanfordDogs(DatasetFamily):
    Params = DogsParams

    @classmethod
    def build(cls, params: DogsParams, size: int) -> ImageSet:
        root = existing_root(params.root, "stanford_dogs", "your Stanford Dogs folder")
        require(root, "Images", "stanford_dogs")
        lists = {split: read_list(require(root, f"{split}_list.mat", "stanford_dogs")) for split in ("train", "test")}
        names: dict[int, str] = {}
        for rel, label in lists["train"] + lists["test"]:
            names.setdefault(label, rel.split("/")[0].split("-", 1)[-1])  # n02085620-Chihuahua -> Chihuahua
        class_names = [names.get(i, str(i)) for i in range(max(names) + 1)]
        items = {split: [(root / "Images" / rel, label) for rel, label in rows] for split, rows in lists.items()}
        return build_imageset("stanford_dogs", size, class_names, items, meta={"root": str(root)})

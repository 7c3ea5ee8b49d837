"""Stanford Cars from either of its distributed layouts (found automatically).

Devkit layout:                                   Variant layout:
    <root>/devkit/cars_meta.mat  (class_names)       <root>/car_ims/*.jpg
    <root>/devkit/cars_train_annos.mat               <root>/cars_annos.mat: annotations with
    <root>/cars_test_annos_withlabels.mat              relative_im_path, bbox_x1..y2, class, test;
      (at the root as torchvision has it, or           and class_names
       inside devkit/)
    <root>/cars_train/, <root>/cars_test/
Annotation fields bbox_x1, bbox_y1, bbox_x2, bbox_y2, class (1-based), fname. 8,144 train / 8,041
test images, 196 classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from harness.data import DatasetFamily, RootedParams, register_dataset
from harness.data._decode import DatasetError, existing_root, require
from harness.data._split_builder import build_imageset
from harness.data.imageset import ImageSet


class CarsParams(RootedParams):
    root: str = Field(..., description="the folder holding devkit/ + cars_train/ + cars_test/, or car_ims/ + "
                                       "cars_annos.mat")


def _load(path: Path) -> dict:
    from scipy.io import loadmat
    return loadmat(path, squeeze_me=True)


def _box(ann) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(ann[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
    return x1, y1, x2 - x1, y2 - y1


def _class_names(mat: dict, path: Path) -> list[str]:
    if "class_names" not in mat:
        raise DatasetError(f"stanford_cars: {path} has no class_names")
    return [str(n) for n in np.atleast_1d(mat["class_names"]).ravel()]


@register_dataset("stanford_cars")
class StanfordCars(DatasetFamily):
    Params = CarsParams

    @classmethod
    def build(cls, params: CarsParams, size: int) -> ImageSet:
        root = existing_root(params.root, "stanford_cars", "your Stanford Cars folder")
        if (root / "cars_annos.mat").exists():
            return cls._variant(root, size)
        if not (root / "devkit").is_dir():
            raise DatasetError(f"stanford_cars: {root} holds neither devkit/ (devkit layout) nor cars_annos.mat "
                               "(car_ims layout)")
        return cls._devkit(root, size)

    @staticmethod
    def _variant(root: Path, size: int) -> ImageSet:
        path = root / "cars_annos.mat"
        mat = _load(path)
        names = _class_names(mat, path)
        require(root, "car_ims", "stanford_cars")
        items, boxes = {"train": [], "test": []}, {"train": [], "test": []}
        for ann in np.atleast_1d(mat["annotations"]).ravel():
            split = "test" if int(ann["test"]) else "train"
            items[split].append((root / str(ann["relative_im_path"]), int(ann["class"]) - 1))  # 1-based
            boxes[split].append(_box(ann))
        return build_imageset("stanford_cars", size, names, items, boxes, meta={"root": str(root), "layout": "car_ims"})

    @staticmethod
    def _devkit(root: Path, size: int) -> ImageSet:
        meta_path = require(root, "devkit/cars_meta.mat", "stanford_cars")
        names = _class_names(_load(meta_path), meta_path)
        test_annos = next((p for p in (root / "cars_test_annos_withlabels.mat",
                                       root / "devkit" / "cars_test_annos_withlabels.mat") if p.exists()), None)
        if test_annos is None:
            raise DatasetError(f"stanford_cars: expected cars_test_annos_withlabels.mat under {root} or "
                               f"{root / 'devkit'} (the test labels ship separately from the devkit)")
        sources = {"train": (require(root, "devkit/cars_train_annos.mat", "stanford_cars"), root / "cars_train"),
                   "test": (test_annos, root / "cars_test")}
        items, boxes = {}, {}
        for split, (annos, folder) in sources.items():
            require(root, folder.name, "stanford_cars")
            anns = np.atleast_1d(_load(annos)["annotations"]).ravel()
            items[split] = [(folder / str(a["fname"]), int(a["class"]) - 1) for a in anns]  # class ids are 1-based
            boxes[split] = [_box(a) for a in anns]
        return build_imageset("stanford_cars", size, names, items, boxes, meta={"root": str(root), "layout": "devkit"})

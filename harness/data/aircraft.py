"""FGVC-Aircraft (2013b) from its distributed layout, at variant, family or manufacturer level.

    fgvc-aircraft-2013b/data/
      images/<7-digit id>.jpg
      variants.txt | families.txt | manufacturers.txt            one class name per line
      images_<level>_<trainval|train|val|test>.txt               <id> <class name with spaces>

trainval 6,667 / test 3,333 images; 100 variants, 70 families, 41 manufacturers. The images carry a
20-px copyright banner at the bottom: `crop_banner` cuts it (off by default, as the papers).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from harness.data import DatasetFamily, RootedParams, register_dataset
from harness.data._decode import DatasetError, existing_root, require
from harness.data._split_builder import build_imageset
from harness.data.imageset import ImageSet

LEVEL_FILES = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}


class AircraftParams(RootedParams):
    root: str = Field(..., description="the fgvc-aircraft-2013b folder")
    level: Literal["variant", "family", "manufacturer"] = "variant"
    train_split: Literal["trainval", "train"] = "trainval"
    test_split: Literal["test", "val"] = "test"
    crop_banner: bool = Field(False, description="cut the 20-px copyright banner at the bottom")


@register_dataset("fgvc_aircraft")
class FGVCAircraft(DatasetFamily):
    Params = AircraftParams

    @classmethod
    def build(cls, params: AircraftParams, size: int) -> ImageSet:
        root = existing_root(params.root, "fgvc_aircraft", "your fgvc-aircraft-2013b folder")
        data = root / "data"
        names = [line.strip() for line in require(root, f"data/{LEVEL_FILES[params.level]}", "fgvc_aircraft")
                 .read_text().splitlines() if line.strip()]
        index = {n: i for i, n in enumerate(names)}
        items = {}
        for split, which in (("train", params.train_split), ("test", params.test_split)):
            listing = require(root, f"data/images_{params.level}_{which}.txt", "fgvc_aircraft")
            rows = []
            for line in listing.read_text().splitlines():
                if not line.strip():
                    continue
                image_id, label = line.strip().split(" ", 1)  # labels contain spaces: split on the first
                if label not in index:
                    raise DatasetError(f"fgvc_aircraft: {listing} lists class {label!r}, "
                                       f"which is not in data/{LEVEL_FILES[params.level]}")
                rows.append((data / "images" / f"{image_id}.jpg", index[label]))
            items[split] = rows
        return build_imageset("fgvc_aircraft", size, names, items, meta={"root": str(root), "level": params.level},
                              crop_bottom=20 if params.crop_banner else 0)

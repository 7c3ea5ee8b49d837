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


from pydantic import Field

from harness.data import DatasetFamily, RootedParams, register_dataset
from harness.data._cub_layout import read_cub_layout
from harness.data._decode import existing_root
from harness.data._split_builder import build_imageset
from harness.data.imageset import ImageSet


class CUB200Params(RootedParams):
    root: str = Field(..., description="the CUB_200_2011 folder")


@register_dataset("cub200")
class CUB200(DatasetFamily):
    Params = CUB200Params

    @classmethod
    def build(cls, params: CUB200Params, size: int) -> ImageSet:
        root = existing_root(params.root, "cub200", "your CUB_200_2011 folder")
        listing = read_cub_layout(root, "cub200")
        ids = sorted(listing.class_names)
        items, boxes = listing.split({cid: cid - 1 for cid in ids})  # class ids are 1-based
        return build_imageset("cub200", size, [listing.class_names[c] for c in ids], items, boxes,
                              meta={"root": str(root)})

"""NABirds from its distributed layout.

    <root>/images/<class dir>/<file>.jpg
    images.txt <image uuid> <relpath>      image_class_labels.txt <uuid> <class id>
    train_test_split.txt <uuid> <1|0>       classes.txt <class id> <name with spaces>
    bounding_boxes.txt <uuid> <x> <y> <w> <h> (optional)   hierarchy.txt <child> <parent>

Class ids are not contiguous (only the leaf classes that have images are used): they are remapped
to 0..C-1 in increasing id order.
"""

from __future__ import annotations


from pydantic import Field

from harness.data import DatasetFamily, RootedParams, register_dataset
from harness.data._cub_layout import read_cub_layout
from harness.data._decode import existing_root
from harness.data._split_builder import build_imageset
from harness.data.imageset import ImageSet


class NABirdsParams(RootedParams):
    root: str = Field(..., description="the nabirds folder")


@register_dataset("nabirds")
class NABirds(DatasetFamily):
    Params = NABirdsParams

    @classmethod
    def build(cls, params: NABirdsParams, size: int) -> ImageSet:
        root = existing_root(params.root, "nabirds", "your nabirds folder")
        listing = read_cub_layout(root, "nabirds")
        used = sorted(set(listing.class_of.values()))  # not contiguous: remap to 0..C-1
        items, boxes = listing.split({cid: k for k, cid in enumerate(used)})
        return build_imageset("nabirds", size, [listing.class_names.get(c, str(c)) for c in used], items, boxes,
                              meta={"root": str(root), "class_ids": used})

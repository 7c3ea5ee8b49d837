"""Any ImageFolder tree: <root>/<train_dir>/<class>/<image> and <root>/<test_dir>/<class>/<image>.

Classes are the sorted sub-folders of the train folder; the test folder may hold a subset of them.
"""

from __future__ import annotations


from pydantic import Field

from harness.data import DatasetFamily, RootedParams, register_dataset
from harness.data._decode import DatasetError, existing_root, require
from harness.data._split_builder import build_imageset
from harness.data.imageset import ImageSet

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


class ImageFolderParams(RootedParams):
    root: str = Field(..., description="the folder holding the split folders")
    train_dir: str = "train"
    test_dir: str = "test"


@register_dataset("imagefolder")
class ImageFolder(DatasetFamily):
    Params = ImageFolderParams

    @classmethod
    def build(cls, params: ImageFolderParams, size: int) -> ImageSet:
        root = existing_root(params.root, "imagefolder", "the dataset's folder")
        train_dir = require(root, params.train_dir, "imagefolder")
        test_dir = require(root, params.test_dir, "imagefolder")
        classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
        if not classes:
            raise DatasetError(f"imagefolder: {train_dir} has no class folders (expected {train_dir}/<class>/<image>)")
        index = {c: i for i, c in enumerate(classes)}
        items = {}
        for split, folder in (("train", train_dir), ("test", test_dir)):
            unknown = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in index)
            if unknown:
                raise DatasetError(f"imagefolder: {folder} has classes not in {train_dir}: {unknown[:5]}")
            items[split] = [(p, index[c]) for c in classes if (folder / c).is_dir()
                            for p in sorted((folder / c).iterdir()) if p.suffix.lower() in EXTENSIONS]
        return build_imageset("imagefolder", size, classes, items, meta={"root": str(root)})

"""Datasets: one file per family, registered by name, decoded once into a uint8 cache on disk.

`load_imageset(params, size)` returns the ImageSet of a validated dataset section at one stored
size, building it on the first call and reading the cache (keyed by family, parameters, size and a
fingerprint of the tree on disk) afterwards: both splits are decoded once, as uint8.

`python -m harness.data check NAME ROOT` checks a copy of a dataset before a long run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel

from harness.data.imageset import ImageSet, Split
from harness.registry import Registry

# Bump when a change alters the pixels a dataset family produces, so stale caches are not reused.
DATA_VERSION = 1


class DatasetFamily:
    """A dataset family: its parameter schema and how to build an ImageSet at a stored size."""

    Params: ClassVar[type[BaseModel]]
    registry_name: ClassVar[str]

    @classmethod
    def build(cls, params: BaseModel, size: int) -> ImageSet:
        raise NotImplementedError

    @classmethod
    def fingerprint(cls, params: BaseModel) -> str:
        """What the cache key must change with besides the parameters: for a tree on disk, the path,
        size and modification time of every file under its root, so an edited tree is decoded again."""
        root = getattr(params, "root", None)
        if root is None:
            return ""
        digest = hashlib.sha256()
        for dirpath, dirnames, filenames in os.walk(Path(root).expanduser()):
            dirnames.sort()
            for name in sorted(filenames):
                st = os.stat(os.path.join(dirpath, name))
                digest.update(f"{os.path.relpath(os.path.join(dirpath, name), root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return digest.hexdigest()


DATASETS: Registry[DatasetFamily] = Registry("dataset", DatasetFamily, "harness.data", "fgvc_harness.datasets")
register_dataset = DATASETS.register


def cache_dir() -> Path:
    return Path(os.environ.get("FGVC_HARNESS_CACHE", Path.home() / ".cache" / "fgvc_harness"))


def cache_key(params: BaseModel, size: int) -> str:
    source = DATASETS.get(params.name).fingerprint(params)
    blob = json.dumps({"params": params.model_dump(mode="json"), "size": size, "v": DATA_VERSION, "source": source},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_imageset(params: BaseModel, size: int, use_cache: bool = True) -> ImageSet:
    family = DATASETS.get(params.name)
    path = cache_dir() / f"{params.name}-{size}px-{cache_key(params, size)}"
    if use_cache and (path / "meta.json").exists():
        return _read(path)
    imageset = family.build(params, size)
    if use_cache:
        _write(imageset, path)
    return imageset


def _write(s: ImageSet, path: Path) -> None:
    """Write to a temporary sibling folder, then rename: a cache entry is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    try:
        for split_name in ("train", "test"):
            split: Split = getattr(s, split_name)
            np.save(tmp / f"{split_name}_images.npy", split.images)
            np.save(tmp / f"{split_name}_labels.npy", split.labels)
            if split.boxes is not None:
                np.save(tmp / f"{split_name}_boxes.npy", split.boxes)
        meta = {"name": s.name, "num_classes": s.num_classes, "class_names": s.class_names,
                "part_names": list(s.part_names), "meta": s.meta}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished the same entry first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read(path: Path) -> ImageSet:
    meta = json.loads((path / "meta.json").read_text())

    def split(name: str) -> Split:
        boxes = path / f"{name}_boxes.npy"
        return Split(images=np.load(path / f"{name}_images.npy"), labels=np.load(path / f"{name}_labels.npy"),
                     boxes=np.load(boxes) if boxes.exists() else None)

    return ImageSet(name=meta["name"], num_classes=meta["num_classes"], class_names=meta["class_names"],
                    train=split("train"), test=split("test"), part_names=tuple(meta["part_names"]), meta=meta["meta"])

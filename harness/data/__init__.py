"""Datasets: one file per family, registered by name, decoded once per node into a uint8 cache on disk.

`load_imageset(params, size)` returns the ImageSet of a validated dataset section at one stored
size. The first call on a node decodes both splits into that node's cache (keyed by family,
parameters, size and a fingerprint of the tree on disk) while holding a file lock, so trials that
start together on a node wait for one decode instead of each doing it; every later call, from any
process of the node, memory-maps the cached arrays read-only: the trials of a node share one copy
in the page cache, and nothing is copied into a process until it is read.

Where the source images come from: the dataset `root` must be readable at the same path on every
node that runs trials (a shared file system, or the same copy on each node); synthfg needs
nothing, each node renders it. The cache lives in `$FGVC_HARNESS_CACHE` (default
`~/.cache/fgvc_harness`), which should be node-local disk.

`python -m harness.data check NAME ROOT` checks a copy of a dataset before a long run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, Field

from harness.core.atomic import atomic_write
from harness.data.imageset import ImageSet, Split
from harness.core.registry import Registry
from harness.core.schema import ConfigModel

# Bump when a change alters the pixels a dataset family produces, so stale caches are not reused.
DATA_VERSION = 3  # 2: synthfg records each class's discriminative parts; 3: 16-bit greyscale images scaled, not clipped


class DatasetParams(ConfigModel):
    """Base of every dataset family's parameters: unknown keys, inf/NaN and loosely typed ints or bools are errors
    (harness.core.schema); `name` is set by the registry."""

    name: str = ""


class RootedParams(DatasetParams):
    """A dataset read from its distributed layout on disk."""

    root: str = Field(..., description="the dataset's folder as distributed")


class DatasetFamily:
    """A dataset family: one file in harness/data/, `@register_dataset("name")` on a subclass of this.

    Smallest examples: imagefolder.py (a tree on disk), synthfg.py (rendered). What a family declares:
    - `Params` (class): a DatasetParams subclass (RootedParams for a tree on disk), validated by the study
      loader for every trial's `dataset:` section before anything starts.
    - `build(params, size)` (classmethod): the whole dataset decoded at one square stored size, an
      ImageSet of uint8 (N, 3, size, size) arrays, labels (N,) in [0, classes) and optional part boxes
      (N, P, 4) xyxy in stored pixels. Called once per node and size by load_imageset (under a file
      lock), which caches the result on disk; every trial memory-maps that cache. A missing or malformed
      tree raises DatasetError naming the path searched and the file expected.
    - `fingerprint(params)` (optional): what the cache key must change with besides the parameters;
      default: path, size and modification time of every file under `root`.
    """

    Params: ClassVar[type[DatasetParams]]
    registry_name: ClassVar[str]

    @classmethod
    def build(cls, params: DatasetParams, size: int) -> ImageSet:
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
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except OSError:  # a dangling link: its decode names it (harness.data._decode)
                    st = os.lstat(os.path.join(dirpath, name))
                relative = os.path.relpath(os.path.join(dirpath, name), root)
                digest.update(f"{relative}|{st.st_size}|{st.st_mtime_ns}\n".encode())
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


def cache_path(params: BaseModel, size: int) -> Path:
    return cache_dir() / f"{params.name}-{size}px-{cache_key(params, size)}"


def load_imageset(params: BaseModel, size: int, use_cache: bool = True) -> ImageSet:
    """This node's copy of a dataset at one stored size: decoded on the first call on the node (under a
    file lock), memory-mapped read-only afterwards. `use_cache=False` decodes into memory, caching nothing.

    Every entry is verified before use (each file's size and CRC-32 against its meta.json, once per process):
    a truncated, emptied or edited entry is named, then rebuilt under the lock, never used."""
    family = DATASETS.get(params.name)
    if not use_cache:
        return family.build(params, size)
    path = cache_path(params, size)  # fingerprints the tree: an edited tree is decoded again
    problem, unreadable = verify_entry(path), False
    if problem is None:
        try:
            return _read(path)
        except CACHE_READ_ERRORS as e:
            problem, unreadable = f"cannot be read ({type(e).__name__}: {e})", True
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when this process ends, whatever happens to it
        again = verify_entry(path)  # another process may have built (or rebuilt) it while we waited
        if again is not None or unreadable:
            if path.exists():
                print(f"dataset cache entry {path} is broken: {again or problem}; rebuilding it", file=sys.stderr)
                _discard(path)
            _write(family.build(params, size), path)
    return _read(path)


ABSENT = "not built yet"
CACHE_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, TypeError)
_VERIFIED: set[tuple] = set()  # entries this process checked: (path, (name, size, mtime) of each file)


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def verify_entry(path: Path) -> str | None:
    """None when the cache entry at `path` is whole; ABSENT when there is none; else what is wrong with it."""
    meta_file = path / "meta.json"
    if not path.exists():
        return ABSENT
    try:
        meta = json.loads(meta_file.read_text())
        files = meta["files"]
        stamp = (str(path), tuple((name, os.stat(path / name).st_size, os.stat(path / name).st_mtime_ns)
                                  for name in sorted(files)))
    except FileNotFoundError as e:
        return f"{Path(e.filename).name if e.filename else 'a file'} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"meta.json is unreadable or has no file sizes and checksums ({type(e).__name__})"
    if stamp in _VERIFIED:
        return None
    for required in ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy"):
        if required not in files:
            return f"meta.json lists no {required}"
    for name, expected in sorted(files.items()):
        actual = os.stat(path / name).st_size
        if actual != expected.get("bytes"):
            return f"{name} has {actual:,} bytes, meta.json says {expected.get('bytes')}"
        if _crc32(path / name) != expected.get("crc32"):
            return f"{name} does not match its checksum in meta.json"
    _VERIFIED.add(stamp)
    return None


def _discard(path: Path) -> None:
    """Move a broken entry out of the way (one rename, then delete it)."""
    aside = path.with_name(f".{path.name}.broken-{os.getpid()}")
    try:
        os.rename(path, aside)
    except OSError:
        aside = path
    shutil.rmtree(aside, ignore_errors=True)


def _write(s: ImageSet, path: Path) -> None:
    """A cache entry is a folder written whole (its files' sizes and CRC-32 in meta.json), flushed to disk and
    renamed into place: never seen half-written."""
    def write(tmp: Path) -> None:
        for split_name in ("train", "test"):
            split: Split = getattr(s, split_name)
            np.save(tmp / f"{split_name}_images.npy", split.images)
            np.save(tmp / f"{split_name}_labels.npy", split.labels)
            if split.boxes is not None:
                np.save(tmp / f"{split_name}_boxes.npy", split.boxes)
        files = {f.name: {"bytes": f.stat().st_size, "crc32": _crc32(f)} for f in sorted(tmp.glob("*.npy"))}
        meta = {"name": s.name, "num_classes": s.num_classes, "class_names": s.class_names,
                "part_names": list(s.part_names), "meta": s.meta, "files": files}
        (tmp / "meta.json").write_text(json.dumps(meta))

    atomic_write(path, write, directory=True)


def _read(path: Path) -> ImageSet:
    meta = json.loads((path / "meta.json").read_text())

    def split(name: str) -> Split:
        boxes = path / f"{name}_boxes.npy"
        return Split(images=np.load(path / f"{name}_images.npy", mmap_mode="r"),
                     labels=np.load(path / f"{name}_labels.npy"),
                     boxes=np.load(boxes) if boxes.exists() else None)

    return ImageSet(name=meta["name"], num_classes=meta["num_classes"], class_names=meta["class_names"],
                    train=split("train"), test=split("test"), part_names=tuple(meta["part_names"]), meta=meta["meta"])

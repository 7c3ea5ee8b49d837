"""Decode-once helpers shared by the real dataset families."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


class DatasetError(FileNotFoundError):
    """A dataset tree that is missing, incomplete or holds images that cannot be decoded."""


def existing_root(root: str, dataset: str, what: str) -> Path:
    """The dataset folder, or an error saying which folder `dataset.root` should name."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"{dataset}: no folder at {path}; set dataset.root to {what}")
    return path


def require(root: Path, relative: str, dataset: str) -> Path:
    path = root / relative
    if not path.exists():
        raise DatasetError(f"{dataset}: expected {relative} under {root} (looked for {path}); "
                           f"point dataset.root at the folder of the dataset as distributed")
    return path


def read_table(path: Path) -> list[list[str]]:
    """Whitespace-separated lines; the last column may contain spaces only where the caller rejoins it."""
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def decode_one(path: Path, size: int, crop_bottom: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """(3, size, size) uint8 and the original (width, height). `crop_bottom` px are cut first
    (FGVC-Aircraft's copyright banner)."""
    with Image.open(path) as im:
        original = im.size
        im = im.convert("RGB")  # grayscale, CMYK, palette and RGBA all become RGB
        if crop_bottom:
            im = im.crop((0, 0, im.width, im.height - crop_bottom))
        im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1), original


def decode_all(paths: list[Path], size: int, dataset: str, crop_bottom: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, size, size) uint8 square-resized, and (N, 2) original (width, height).

    Every missing or undecodable path is listed in one error, not just the first.
    """
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    originals = np.zeros((len(paths), 2), dtype=np.int64)
    problems: list[str] = []

    def work(i: int) -> None:
        try:
            out[i], originals[i] = decode_one(paths[i], size, crop_bottom)
        except FileNotFoundError:
            problems.append(f"missing: {paths[i]}")
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a corrupt file
            problems.append(f"cannot decode: {paths[i]} ({type(e).__name__}: {e})")

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL decodes without the GIL
        list(pool.map(work, range(len(paths))))
    if problems:
        listing = "\n  ".join(sorted(problems))
        raise DatasetError(f"{dataset}: {len(problems)} listed images could not be loaded:\n  {listing}")
    return out, originals

"""Decode-once helpers shared by the real dataset families.

A dataset tree comes from elsewhere, so every listed image must be a regular file (a FIFO named x.png is never
opened: it would hang; a dangling link is named as missing), each decode has DECODE_TIMEOUT_S (a file on a stuck
mount is named, not waited for), and 16-bit greyscale images are scaled to 8 bits (PIL's convert("RGB") would clip
them: 50% grey decoded as white).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from harness.core.bounded import regular_file_problem
from harness.core.escape import printable

DECODE_TIMEOUT_S = 120.0  # one image; a 4k JPEG decodes in well under a second


class DatasetError(FileNotFoundError):
    """A dataset tree that is missing, incomplete or holds images that cannot be decoded."""


def existing_root(root: str, dataset: str, what: str) -> Path:
    """The dataset folder, or an error saying which folder `dataset.root` should name."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"{dataset}: no folder at {path}; set dataset.root to {what}")
    return path


def require(root: Path, relative: str, dataset: str) -> Path:
    """`root / relative`, which must exist; a file there (a listing, annotations) must be a regular file (a FIFO
    would hang the read: it is never opened)."""
    path = root / relative
    if not path.exists():
        raise DatasetError(f"{dataset}: expected {relative} under {root} (looked for {path}); "
                           f"point dataset.root at the folder of the dataset as distributed")
    problem = None if path.is_dir() else regular_file_problem(path)
    if problem:
        raise DatasetError(printable(f"{dataset}: {path} is {problem}; it must be the file of the dataset as "
                                     "distributed"))
    return path


def read_table(path: Path) -> list[list[str]]:
    """Whitespace-separated lines; the last column may contain spaces only where the caller rejoins it."""
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def decode_one(path: Path, size: int, crop_bottom: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """(3, size, size) uint8 and the original (width, height). `crop_bottom` px are cut first
    (FGVC-Aircraft's copyright banner)."""
    problem = regular_file_problem(path)
    if problem:
        raise (FileNotFoundError if problem.startswith("missing") else ValueError)(problem)
    with Image.open(path) as im:
        original = im.size
        im = _eight_bit(im).convert("RGB")  # grayscale, CMYK, palette and RGBA all become RGB
        if crop_bottom:
            im = im.crop((0, 0, im.width, im.height - crop_bottom))
        im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1), original


def _eight_bit(im: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) greyscale image scaled to 8 bits (0-65535 -> 0-255), not clipped at 255."""
    if im.mode.startswith("I;16") or (im.mode == "I" and im.getextrema()[1] > 255):
        values = np.asarray(im.convert("I") if im.mode != "I" else im, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    return im


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
        except FileNotFoundError as e:
            problems.append(f"missing: {paths[i]}" + (f" ({e})" if "link" in str(e) else ""))
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a corrupt file
            problems.append(f"cannot decode: {paths[i]} ({type(e).__name__}: {e})")

    stuck = _run_with_timeout(work, len(paths), os.cpu_count() or 1, DECODE_TIMEOUT_S)
    problems += [f"cannot decode: {paths[i]} (still reading it after {DECODE_TIMEOUT_S:g} s)" for i in stuck]
    if problems:
        listing = "\n  ".join(sorted(printable(p) for p in problems))  # file names may hold escape codes
        raise DatasetError(f"{dataset}: {len(problems)} listed images could not be loaded:\n  {listing}")
    return out, originals


def _run_with_timeout(work, n: int, threads: int, timeout_s: float) -> list[int]:
    """work(0..n-1) on `threads` daemon threads (PIL decodes without the GIL); returns the indexes still running
    after `timeout_s` each. Daemon threads: one stuck in a read does not keep the process from exiting."""
    todo: queue.Queue = queue.Queue()
    for i in range(n):
        todo.put(i)
    started: dict[int, float] = {}
    lock = threading.Lock()

    def loop() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            with lock:
                started[i] = time.monotonic()
            work(i)
            with lock:
                started.pop(i, None)

    pool = [threading.Thread(target=loop, daemon=True, name=f"decode-{k}") for k in range(max(1, min(threads, n)))]
    for t in pool:
        t.start()
    while True:
        alive = [t for t in pool if t.is_alive()]
        with lock:
            late = [i for i, t0 in started.items() if time.monotonic() - t0 > timeout_s]
        if not alive or (late and len(late) >= len(alive)):
            return sorted(late)
        alive[0].join(timeout=0.2)

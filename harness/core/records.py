"""What a results row records of a trial's test set: the per-image correctness of its primary head (one bit per image)
and the identity of the test images it was scored on.
"""

from __future__ import annotations
import base64
import hashlib
import numpy as np


def pack_correct(correct: np.ndarray) -> str:
    """(n,) bools -> "n:base64 of the packed bits"."""
    correct = np.asarray(correct, dtype=bool)
    return f"{len(correct)}:" + base64.b64encode(np.packbits(correct).tobytes()).decode()


def unpack_correct(packed: str) -> np.ndarray:
    n, data = packed.split(":", 1)
    return np.unpackbits(np.frombuffer(base64.b64decode(data), dtype=np.uint8))[:int(n)].astype(bool)


def split_hash(labels: np.ndarray, images: np.ndarray) -> str:
    """The identity of a test set, stored beside its per-image outcomes (`test/set_hash`): a hash of its
    labels and image bytes in test order (the stored images, memory-mapped: read once, not copied). Two trials
    with the same hash were scored on the same images in the same order, so their outcomes pair image by image."""
    h = hashlib.blake2b(digest_size=8)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    h.update(f"{labels.shape}:{np.asarray(images).shape}:".encode())
    h.update(memoryview(labels).cast("B"))
    images = np.asarray(images)
    for start in range(0, len(images), 256):  # in chunks: a large test set is never copied whole
        h.update(memoryview(np.ascontiguousarray(images[start:start + 256])).cast("B"))
    return h.hexdigest()

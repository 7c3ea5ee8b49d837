"""How trials on a node share a decoded dataset: the node cache memory-mapped (what the harness does)
against the Ray object store (ray.put once, ray.get zero-copy in each trial), side by side:

    python -m tests.benchmarks.bench_dataset_sharing [--mb 400] [--trials 2]

For each: the one-time cost of publishing the dataset on the node, the time until a trial holds it,
and one epoch of the batch pipeline (64 px crops of 72 px images, batch 32) in each of `trials`
concurrent actors. Both keep one copy per node (the page cache / the object store's shared memory).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "token")
import ray  # noqa: E402

from harness.data import _read, _write  # noqa: E402
from harness.data.imageset import ImageSet, Split  # noqa: E402


def epoch(imageset: ImageSet) -> float:
    import torch

    from harness.data.imageset import BatchPipeline

    torch.set_num_threads(1)
    pipe = BatchPipeline(imageset.train, 64, 32, train=True)
    t0 = time.perf_counter()
    for _ in pipe.batches(torch.Generator().manual_seed(0)):
        pass
    return time.perf_counter() - t0


@ray.remote(num_cpus=1)
class Trial:
    def from_cache(self, path: str) -> dict:
        t0 = time.perf_counter()
        imageset = _read(__import__("pathlib").Path(path))
        ready = time.perf_counter() - t0
        return {"ready_s": ready, "epoch_s": epoch(imageset)}

    def from_object_store(self, refs: list) -> dict:
        t0 = time.perf_counter()
        imageset = ray.get(refs[0])
        ready = time.perf_counter() - t0
        return {"ready_s": ready, "epoch_s": epoch(imageset)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=400)
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args()
    n = args.mb * 2**20 // (3 * 72 * 72)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, 3, 72, 72), dtype=np.uint8)
    imageset = ImageSet(name="bench", num_classes=10, class_names=[str(i) for i in range(10)],
                        train=Split(images, rng.integers(0, 10, n)), test=Split(images[:10], np.zeros(10, int)))
    ray.init(num_cpus=args.trials, include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "entry")
        t0 = time.perf_counter()
        _write(imageset, __import__("pathlib").Path(path))
        write_s = time.perf_counter() - t0
        os.system("sync")
        trials = [Trial.remote() for _ in range(args.trials)]
        ray.get([t.__ray_ready__.remote() for t in trials])
        cache = ray.get([t.from_cache.remote(path) for t in trials])
        t0 = time.perf_counter()
        refs = [ray.put(imageset)]
        put_s = time.perf_counter() - t0
        del imageset, images
        store = ray.get([t.from_object_store.remote(refs) for t in trials])
    print(f"{args.mb} MB of uint8 images ({n} at 72 px), {args.trials} trials on one node")
    print(f"{'':22s} {'publish':>8s} {'ready/trial':>12s} {'epoch/trial':>12s}")
    for name, publish, rows in (("node cache (mmap)", write_s, cache), ("object store", put_s, store)):
        ready = sum(r["ready_s"] for r in rows) / len(rows)
        ep = sum(r["epoch_s"] for r in rows) / len(rows)
        print(f"{name:22s} {publish:7.2f}s {ready:11.3f}s {ep:11.2f}s")
    ray.shutdown()


if __name__ == "__main__":
    main()

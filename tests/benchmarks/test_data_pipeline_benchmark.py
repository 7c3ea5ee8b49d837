"""Decode-once cache vs torchvision ImageFolder + PIL + DataLoader, same machine, same cores, side by side.

One epoch over 96 JPEGs of 500x375 (noise, so they do not compress away) at the papers' 448 px:
ours reads the uint8 cache decoded once at 512 px and random-crops 448 + flips per batch on tensors;
the baseline decodes, resizes to 512, crops 448 and flips every image every epoch with PIL in 2
DataLoader workers. images/s of each is in the benchmark's extra_info.
"""

import numpy as np
import pytest
import torch
from PIL import Image

N, BATCH, STORED, CROP = 96, 16, 512, 448


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_tree")
    rng = np.random.default_rng(0)
    for i in range(N):
        split = "train" if i < N - 8 else "test"
        path = root / split / f"class_{i % 4}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
    return root


@pytest.mark.benchmark(group="data pipeline 448 px")
def test_decoded_cache_pipeline(benchmark, tree, tmp_path, monkeypatch):
    from harness.data import DATASETS, load_imageset
    from harness.data.imageset import BatchPipeline

    monkeypatch.setenv("FGVC_HARNESS_CACHE", str(tmp_path))
    torch.set_num_threads(2)
    imageset = load_imageset(DATASETS.get("imagefolder").Params(root=str(tree)), STORED)  # decoded once
    pipe = BatchPipeline(imageset.train, CROP, BATCH, train=True)

    def epoch():
        return sum(len(x) for x, _ in pipe.batches(torch.Generator().manual_seed(0)))

    n = benchmark.pedantic(epoch, rounds=3, iterations=1)
    benchmark.extra_info["images_per_s"] = n / benchmark.stats.stats.mean


@pytest.mark.benchmark(group="data pipeline 448 px")
def test_imagefolder_pil_dataloader(benchmark, tree):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize((STORED, STORED)), transforms.RandomCrop(CROP),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(tree / "train", tf), batch_size=BATCH, shuffle=True,
                                         num_workers=2, drop_last=True, persistent_workers=True)

    def epoch():
        return sum(len(x) for x, _ in loader)

    epoch()  # start the workers outside the timing
    n = benchmark.pedantic(epoch, rounds=3, iterations=1)
    benchmark.extra_info["images_per_s"] = n / benchmark.stats.stats.mean

"""The jigsaw generator is memory-bound: hold it against one plain copy of the batch (the floor) and
the authors' block-swap loop, side by side, at the paper's size (batch 16, 448 px, n = 8).

    make bench    (or: pytest tests/benchmarks --benchmark-only -k jigsaw)
"""

import pytest
import torch

from methods.pmg import jigsaw
from tests.reference import authors_block_swap

B, SIZE, N = 16, 448, 8


@pytest.fixture(scope="module")
def images():
    torch.set_num_threads(2)
    return torch.rand(B, 3, SIZE, SIZE)


@pytest.mark.benchmark(group="jigsaw b16 448px n8")
def test_copy_floor(benchmark, images):
    benchmark(images.clone)


@pytest.mark.benchmark(group="jigsaw b16 448px n8")
def test_jigsaw_ours(benchmark, images):
    g = torch.Generator().manual_seed(0)
    out = benchmark(jigsaw, images, N, g)
    assert out.shape == images.shape


@pytest.mark.benchmark(group="jigsaw b16 448px n8")
def test_authors_block_swap(benchmark, images):
    order = torch.randperm(N * N).tolist()
    benchmark(authors_block_swap, images, N, order)

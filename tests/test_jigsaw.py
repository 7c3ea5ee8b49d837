"""The jigsaw generator P(d, n): a permutation of the n x n blocks, each exactly once, nothing else changed."""

import pytest
import torch

from methods.pmg import jigsaw, swap_chain_permutation
from tests.reference import authors_block_swap


def blocks_of(images: torch.Tensor, n: int) -> torch.Tensor:
    b, c, h, w = images.shape
    return images.reshape(b, c, n, h // n, n, w // n).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, -1)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("per_image", [False, True])
def test_output_is_a_permutation_of_blocks(n, per_image):
    g = torch.Generator().manual_seed(n)
    images = torch.rand(3, 3, 32, 32, generator=g)
    out = jigsaw(images, n, torch.Generator().manual_seed(1), per_image=per_image)
    assert out.shape == images.shape and out.dtype == images.dtype
    src, dst = blocks_of(images, n), blocks_of(out, n)
    for i in range(len(images)):
        # Every output block equals exactly one input block, and each input block is used exactly once.
        match = (dst[i][:, None, :] == src[i][None, :, :]).all(-1)  # (n*n out, n*n in)
        assert (match.sum(1) == 1).all() and (match.sum(0) == 1).all()
    # Nothing else changed: the same multiset of pixel values, exactly.
    assert torch.equal(out.flatten().sort().values, images.flatten().sort().values)


def test_matches_the_authors_loop_for_the_same_order():
    images = torch.rand(2, 3, 64, 64)
    for n in (2, 4, 8):
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        order = torch.randperm(n * n, generator=g2).tolist()
        assert torch.equal(jigsaw(images, n, g1), authors_block_swap(images, n, order))


def test_permutation_is_one_cycle_and_shuffles():
    for n in (2, 4, 8):
        src = swap_chain_permutation(torch.randperm(n * n, generator=torch.Generator().manual_seed(n)).tolist())
        assert sorted(src) == list(range(n * n))
        seen, p = set(), 0
        while p not in seen:
            seen.add(p)
            p = src[p]
        assert len(seen) == n * n  # the authors' swap chain always moves every block


def test_per_batch_vs_per_image_permutation():
    images = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(4, 1, 1, 1)  # identical images
    same = jigsaw(images, 4, torch.Generator().manual_seed(0))
    assert all(torch.equal(same[0], same[i]) for i in range(4))
    each = jigsaw(images, 4, torch.Generator().manual_seed(0), per_image=True)
    assert any(not torch.equal(each[0], each[i]) for i in range(1, 4))


def test_input_untouched_and_indivisible_size_rejected():
    images = torch.rand(2, 3, 32, 32)
    before = images.clone()
    jigsaw(images, 4)
    assert torch.equal(images, before)
    with pytest.raises(ValueError, match="not divisible by n=3"):
        jigsaw(images, 3)


def test_seeded_generator_is_deterministic():
    images = torch.rand(2, 3, 32, 32)
    a = jigsaw(images, 8, torch.Generator().manual_seed(3))
    b = jigsaw(images, 8, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)

"""Reference implementations from the authors' code, re-typed for comparison (not used by the harness)."""

import torch


def authors_block_swap(images: torch.Tensor, n: int, order: list[int]) -> torch.Tensor:
    """PMG's jigsaw_generator (PRIS-CV/PMG utils.py): n^2 swaps of cloned blocks with block (0, 0).

    `order` replaces their `random.shuffle(l)` so both implementations can be fed the same order.
    """
    block = images.shape[-1] // n
    positions = [[a, b] for a in range(n) for b in range(n)]
    jigsaws = images.clone()
    for i in order:
        x, y = positions[i]
        temp = jigsaws[..., 0:block, 0:block].clone()
        jigsaws[..., 0:block, 0:block] = jigsaws[..., x * block:(x + 1) * block, y * block:(y + 1) * block].clone()
        jigsaws[..., x * block:(x + 1) * block, y * block:(y + 1) * block] = temp
    return jigsaws

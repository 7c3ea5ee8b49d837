"""The papers' input pipelines as presets, and per-image colour jitter."""

import torch

from harness.data.transforms import colour_jitter
from harness.study import TrainConfig


def test_presets_fill_what_the_study_leaves_out():
    pmg = TrainConfig(pipeline="pmg")
    assert (pmg.resize, pmg.image_size, pmg.crop_padding, pmg.normalize) == (550, 448, 8, "half")
    wsdan = TrainConfig(pipeline="wsdan", image_size=384)  # the study's own key wins
    assert (wsdan.resize, wsdan.image_size, wsdan.colour_jitter) == (512, 384, [0.4, 0.4, 0.4, 0.1])
    assert (TrainConfig(pipeline="swin384").image_size, TrainConfig(pipeline="aam224").image_size) == (384, 224)


def test_colour_jitter_is_per_image_within_range_and_seeded():
    x = torch.rand(8, 3, 16, 16) * 130 + 20  # x 1.4 stays below 255: no clamping
    a = colour_jitter(x, [0.4, 0.4, 0.4, 0.1], torch.Generator().manual_seed(0))
    b = colour_jitter(x, [0.4, 0.4, 0.4, 0.1], torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 255
    bright = colour_jitter(x, [0.4, 0, 0, 0], torch.Generator().manual_seed(1))
    ratio = (bright / x).flatten(1)
    assert torch.allclose(ratio.min(1).values, ratio.max(1).values, atol=1e-4)  # one factor per image
    assert ratio[:, 0].min() >= 0.6 - 1e-6 and ratio[:, 0].max() <= 1.4 + 1e-6 and ratio[:, 0].std() > 0
    assert torch.equal(colour_jitter(x, [0, 0, 0, 0]), x)

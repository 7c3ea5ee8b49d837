"""The papers' input pipelines as presets, and per-image colour jitter."""

import torch

from harness.data.transforms import colour_jitter
from harness.study.config import TrainConfig


def test_presets_fill_what_the_study_leaves_out():
    pmg = TrainConfig(pipeline="pmg")
    assert (pmg.resize, pmg.image_size, pmg.crop_padding, pmg.normalize) == (550, 448, 8, "half")
    wsdan = TrainConfig(pipeline="wsdan", image_size=384)  # the study's own key wins
    assert (wsdan.resize, wsdan.image_size) == (512, 384)
    assert (TrainConfig(pipeline="swin384").image_size, TrainConfig(pipeline="aam224").image_size) == (384, 224)
    assert TrainConfig(pipeline="aam224").random_scale == [0.75, 1.25]


def test_wsdan_pipeline_draws_brightness_and_saturation_only():
    """The WS-DAN PyTorch port's ColorJitter(brightness=0.126, saturation=0.5): no contrast, no hue."""
    from harness.data.transforms import draw_jitter

    jitter = TrainConfig(pipeline="wsdan").colour_jitter
    factors = draw_jitter(1000, jitter, torch.Generator().manual_seed(0))
    assert set(factors) == {"brightness", "saturation"}
    assert 0.874 <= factors["brightness"].min() and factors["brightness"].max() <= 1.126
    assert 0.5 <= factors["saturation"].min() and factors["saturation"].max() <= 1.5
    x = torch.rand(4, 3, 8, 8) * 100 + 50
    gray = x.mean(1, keepdim=True).expand_as(x).clone()  # a gray image: saturation cannot change it
    out = colour_jitter(gray, jitter, torch.Generator().manual_seed(1))
    assert torch.allclose(out / gray, (out / gray)[:, :1, :1, :1].expand_as(out), atol=1e-5)  # brightness only


def test_random_rescaling_zooms_in_and_out_per_image():
    import numpy as np

    from harness.data.imageset import BatchPipeline, Split

    # Stored 32 px images made of 4 px squares; crops of 16 px after a scale in [0.5, 2]: the square size
    # seen in the crop is 4 * scale px, so the number of distinct columns changes from image to image.
    base = (np.indices((32, 32)).sum(0) // 4 % 2 * 255).astype(np.uint8)
    split = Split(images=np.broadcast_to(base, (64, 3, 32, 32)).copy(), labels=np.zeros(64, dtype=np.int64))
    pipe = BatchPipeline(split, 16, 64, train=True, hflip=False, random_scale=[0.5, 2.0], mean=(0, 0, 0),
                         std=(1 / 255, 1 / 255, 1 / 255))
    images, _ = next(pipe.batches(torch.Generator().manual_seed(0)))
    assert images.shape == (64, 3, 16, 16)
    transitions = (images[:, 0, 8, 1:] - images[:, 0, 8, :-1]).abs().gt(100).sum(1)
    assert transitions.min() <= 2 and transitions.max() >= 6  # zoomed in (few edges) and out (many)
    again, _ = next(pipe.batches(torch.Generator().manual_seed(0)))
    assert torch.equal(images, again)  # seeded


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


def test_boxes_follow_the_crop_flip_and_rescale():
    """A white square in the stored image, its box carried by the pipeline: in every augmented image the box
    still frames the white pixels."""
    import numpy as np

    from harness.data.imageset import BatchPipeline, Split

    images = np.zeros((32, 3, 40, 40), dtype=np.uint8)
    boxes = np.full((32, 2, 4), -1, dtype=np.float32)
    rng = np.random.default_rng(0)
    for i in range(32):
        x0, y0 = rng.integers(8, 24, 2)
        images[i, :, y0:y0 + 8, x0:x0 + 8] = 255
        boxes[i, 0] = (x0, y0, x0 + 8, y0 + 8)
    split = Split(images=images, labels=np.zeros(32, dtype=np.int64))
    unit = dict(mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))
    for kw in ({"padding": 4}, {"random_scale": [0.8, 1.25]}, {}):
        pipe = BatchPipeline(split, 32, 32, train=True, boxes=boxes, **unit, **kw)
        images_out, _, boxes_out = next(pipe.batches(torch.Generator().manual_seed(1)))
        assert (boxes_out[:, 1] == -1).all()  # an absent box stays absent
        for img, box in zip(images_out, boxes_out[:, 0]):
            white = (img[0] > 127).nonzero()
            if box[0] < 0:
                assert len(white) == 0 or kw  # cropped away (rescaling may keep a sliver)
                continue
            y0, x0 = white.min(0).values.tolist()
            y1, x1 = (white.max(0).values + 1).tolist()
            assert abs(x0 - box[0]) <= 1.5 and abs(y0 - box[1]) <= 1.5, (kw, box, (x0, y0, x1, y1))
            assert abs(x1 - box[2]) <= 1.5 and abs(y1 - box[3]) <= 1.5, (kw, box, (x0, y0, x1, y1))
    test = BatchPipeline(split, 32, 32, train=False, boxes=boxes, **unit)
    _, _, centred = next(test.batches())
    torch.testing.assert_close(centred[:, 0], torch.as_tensor(boxes[:, 0]) - 4)  # centre crop: 4 px off each side

"""The embedded dataset: deterministic, part based, neighbouring classes differ in one part, cached."""

import numpy as np
import pytest
import torch

from harness.data import cache_dir, load_imageset
from harness.data.synthfg import PART_NAMES, SynthFGParams, class_attributes, generate, gray_code

SMALL = SynthFGParams(classes=6, train_per_class=3, test_per_class=2)


def test_deterministic_from_seed_and_any_resolution():
    a, b = generate(SMALL, 32), generate(SMALL, 32)
    assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.test.labels, b.test.labels)
    c = generate(SMALL.model_copy(update={"seed": 1}), 32)
    assert not np.array_equal(a.train.images, c.train.images)
    big = generate(SMALL, 80)
    assert big.train.images.shape == (18, 3, 80, 80) and big.train.images.dtype == np.uint8
    assert a.test.images.shape == (12, 3, 32, 32)
    assert sorted(np.bincount(a.train.labels)) == [3] * 6


def test_neighbouring_classes_differ_in_exactly_one_part():
    attrs = class_attributes(432)
    assert len({tuple(r) for r in attrs}) == 432  # every combination once
    assert ((attrs[1:] != attrs[:-1]).sum(1) == 1).all()
    assert gray_code(4, [2, 2]) == [[0, 0], [1, 0], [1, 1], [0, 1]]


def test_part_boxes_are_inside_the_image():
    s = generate(SMALL, 48)
    boxes = s.train.boxes
    assert boxes.shape == (18, len(PART_NAMES), 4)
    present = boxes[..., 0] >= 0
    assert present.mean() > 0.8
    b = boxes[present]
    assert (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all()
    assert (b >= 0).all() and (b <= 48).all()


def test_intra_class_variation_is_large():
    s = generate(SynthFGParams(classes=2, train_per_class=8, test_per_class=1), 32)
    same = s.train.images[s.train.labels == 0].astype(float)
    assert np.abs(same[0] - same[1]).mean() > 20  # pose, colour and background differ within a class


def test_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("FGVC_HARNESS_CACHE", str(tmp_path))
    first = load_imageset(SMALL, 32)
    entries = [e for e in cache_dir().iterdir() if not e.name.startswith(".")]  # besides the lock files
    assert len(entries) == 1 and (entries[0] / "meta.json").exists()
    import harness.data.synthfg as synthfg
    monkeypatch.setattr(synthfg, "generate", lambda *a, **k: pytest.fail("regenerated instead of read from cache"))
    second = load_imageset(SMALL, 32)
    assert np.array_equal(first.train.images, second.train.images)
    assert isinstance(second.train.images, np.memmap) and not second.train.images.flags.writeable  # shared, read-only
    assert second.class_names == first.class_names and second.part_names == first.part_names


def test_target_boxes_are_the_parts_that_tell_a_class_apart():
    """A class's targets: every part whose attribute alone separates it from another class of the dataset (its
    Gray-code neighbours k - 1 and k + 1 among them); each image carries its class's part boxes, -1 padded."""
    from harness.data.imageset import target_boxes
    from harness.data.synthfg import ATTRIBUTE_PART, ATTRIBUTES, PART_NAMES, discriminative_parts

    attrs = class_attributes(6)
    parts = discriminative_parts(attrs)
    keys = list(ATTRIBUTES)
    for k, chosen in enumerate(parts):
        expected = set()
        for j in range(6):
            differ = np.flatnonzero(attrs[k] != attrs[j])
            if len(differ) == 1:
                expected.add(PART_NAMES.index(ATTRIBUTE_PART[keys[int(differ[0])]]))
        assert set(chosen) == expected and len(chosen) == len(expected)
        for j in (k - 1, k + 1):  # the Gray-code neighbours' part is always among them
            if 0 <= j < 6:
                (column,) = np.flatnonzero(attrs[k] != attrs[j])
                assert PART_NAMES.index(ATTRIBUTE_PART[keys[int(column)]]) in chosen
    # 6 classes: wing pattern x eye ring (3 x 2): every class is one wing and one eye-ring change from others.
    assert all(sorted(PART_NAMES[i] for i in p) == ["eye", "wing"] for p in parts)
    s = generate(SynthFGParams(classes=6, train_per_class=3, test_per_class=2), 48)
    boxes = target_boxes(s, "test")
    assert boxes.shape[0] == len(s.test) and boxes.shape[2] == 4
    for i, y in enumerate(s.test.labels):
        for k, part in enumerate(parts[y]):
            assert np.array_equal(boxes[i, k], s.test.boxes[i, part])
        assert (boxes[i, len(parts[y]):] == -1).all()


def test_masks_are_what_the_boxes_bound():
    from harness.data.synthfg import render

    p = SynthFGParams(classes=4)
    attrs = torch.as_tensor(class_attributes(4))[torch.arange(4).repeat(3)]
    images, boxes, masks = render(attrs, 40, p, torch.Generator().manual_seed(0), return_masks=True)
    again, again_boxes = render(attrs, 40, p, torch.Generator().manual_seed(0))
    assert torch.equal(images, again) and torch.equal(boxes, again_boxes)  # the masks change nothing drawn
    for i in range(len(attrs)):
        for k in range(len(PART_NAMES)):
            ys, xs = torch.nonzero(masks[i, k], as_tuple=True)
            if len(xs):
                assert boxes[i, k].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            else:
                assert (boxes[i, k] == -1).all()


def test_a_change_of_rendering_renders_the_cache_again():
    from harness.data import cache_key
    from harness.data import synthfg

    before = cache_key(SMALL, 32)
    synthfg.RENDER_VERSION += 1
    try:
        assert cache_key(SMALL, 32) != before
    finally:
        synthfg.RENDER_VERSION -= 1

"""The embedded dataset: deterministic, part based, neighbouring classes differ in one part, cached."""

import json
from pathlib import Path

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


def test_the_rendering_knob_keys_the_cache_and_changes_the_pixels():
    from harness.data import cache_key

    old = SMALL.model_copy(update={"render": 2})
    assert SMALL.render == 3 and cache_key(old, 32) != cache_key(SMALL, 32)
    a, b = generate(old, 32), generate(SMALL, 32)
    assert np.array_equal(a.train.labels, b.train.labels) and not np.array_equal(a.train.images, b.train.images)


FIXTURE = Path(__file__).with_name("fixtures") / "synthfg_render2.npz"


def test_render_2_draws_what_it_drew_before_the_knob():
    """tests/fixtures/synthfg_render2.npz was rendered by the harness before `render` existed (6 classes x 2 training
    images at 24 px, dataset seed 3). The same pixels and boxes; a last-bit difference of another CPU's sin/cos
    kernels may flip a rounded pixel or a box edge, so a handful are allowed."""
    want = np.load(FIXTURE)
    got = generate(SynthFGParams(classes=6, train_per_class=2, test_per_class=1, seed=3, render=2), 24).train
    assert np.array_equal(got.labels, want["labels"])
    assert (np.abs(got.images.astype(int) - want["images"]) > 1).mean() < 0.002
    assert (np.abs(got.boxes - want["boxes"]) > 1).mean() < 0.01 and (got.boxes == want["boxes"]).mean() > 0.97


def _config(dataset: dict) -> dict:
    from harness.study.config import TrainConfig

    return {"method": {"name": "baseline"}, "dataset": dataset, "backbone": {"name": "resnet18"},
            "train": TrainConfig().model_dump(mode="json"), "seed": 0}


def test_the_new_default_is_a_new_identity_and_render_2_keeps_the_old_one():
    """Results stored before the knob rendered 2 and their configs lack it: a trial at render 2 finds them, a trial
    at the new default (3) never does."""
    from harness.study.trials import trial_identity

    before = {k: v for k, v in SynthFGParams().model_dump().items() if k not in ("render", "class_offset")}
    old = trial_identity(_config(before))
    assert trial_identity(_config(SynthFGParams(render=2).model_dump())) == old
    assert trial_identity(_config(SynthFGParams().model_dump())) != old


def test_class_offset_takes_later_attribute_combinations():
    shifted = generate(SynthFGParams(classes=3, train_per_class=1, test_per_class=1, class_offset=200), 16)
    assert shifted.meta["attributes"] == class_attributes(203)[200:].tolist()
    with pytest.raises(ValueError, match="432"):
        SynthFGParams(classes=40, class_offset=400)


# ----------------------------------------------------------------------------- where a fixed guess looks

def pointing_baselines(params: SynthFGParams, stored: int, crop: int) -> dict[str, float]:
    """The pointing game's random-point chance and centre score (harness.engine.explain) on the test split's target boxes,
    after the test pipeline's centre crop, averaged over classes as test/loc/chance and test/loc/center are: what a
    trial would report with a map that points nowhere in particular. No training."""
    from harness.data.imageset import BatchPipeline, target_boxes
    from harness.engine.explain import localisation, pointing_tolerance

    s = generate(params.model_copy(update={"train_per_class": 1}), stored)  # the test split is drawn on its own
    pipe = BatchPipeline(s.test, crop, 512, train=False, boxes=target_boxes(s, "test"))
    scores: dict[str, list] = {"chance": [], "center": [], "label": []}
    for _, labels, boxes in pipe.batches():
        found = localisation(np.zeros((len(labels), crop, crop)), boxes.numpy(), pointing_tolerance(stored))
        scores["chance"].append(found["chance"]), scores["center"].append(found["center"])
        scores["label"].append(labels.numpy())
    y = np.concatenate(scores["label"])
    return {k: float(np.nanmean([np.nanmean(np.concatenate(scores[k])[y == c]) for c in np.unique(y)]))
            for k in ("chance", "center")}


def default_synthfg_datasets() -> dict[str, tuple[dict, int, int]]:
    """Every synthfg dataset section of the shipped studies' default profiles (the base and its grid's values),
    with the stored and crop sizes it is tested at, read from the files (no study is loaded or run)."""
    import yaml

    found = {}
    for path in sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.yaml")):
        study = yaml.safe_load(path.read_text())
        train = study.get("train", {})
        grids = [study.get("grid") or {}] + list((study.get("grids") or {}).values())
        gridded = [section for grid in grids for section in grid.get("dataset", [])]
        sections = gridded or [study.get("dataset", {"name": "synthfg"})]  # a dataset axis replaces the base's
        for section in sections:
            if section.get("name") == "synthfg" and section.get("render", 3) == 3:  # render 2 is kept as it was
                params = {k: v for k, v in section.items() if k not in ("name", "label", "train_per_class")}
                crop = train.get("image_size", 64)
                key = json.dumps([params, train.get("resize") or crop, crop], sort_keys=True)
                found.setdefault(key, (params, train.get("resize") or crop, crop))
    return found


def test_the_centre_is_no_better_a_guess_than_twice_a_random_point():
    """Issue 28's bar on the default studies' own test images: the centre baseline at most 2x chance. Measured
    (python -m pytest -q tests/test_synthfg.py -k centre -s): render 3 1.2-1.7x on the studies' 400-image test
    sets (1.3-1.4x on 1,600); render 2 7.6x (68% vs 9%) on the PMG default's."""
    datasets = default_synthfg_datasets()
    assert len(datasets) >= 2  # the ablations' shared default and methods_comparison's hard one (its easy is shared)
    for params, stored, crop in datasets.values():
        found = pointing_baselines(SynthFGParams(**params), stored, crop)
        print(f"render 3 {params} at {stored}->{crop} px: centre {found['center']:.3f}, chance {found['chance']:.3f} "
              f"({found['center'] / found['chance']:.2f}x)")
        assert found["center"] <= 2 * found["chance"], (params, found)
    old = pointing_baselines(SynthFGParams(classes=16, test_per_class=25, render=2), 72, 64)
    print(f"render 2 PMG default: centre {old['center']:.3f}, chance {old['chance']:.3f} "
          f"({old['center'] / old['chance']:.2f}x)")
    assert old["center"] > 5 * old["chance"]  # what render 3 fixes


def test_the_target_parts_stay_in_view():
    """Render 3's birds reach the edges: a part may leave the frame (as photographed birds' do), but nearly every
    target part stays in view, and each covers pixels at 64 px: every class keeps the evidence that tells it apart."""
    from harness.data.imageset import target_boxes

    s = generate(SynthFGParams(classes=16, train_per_class=1, test_per_class=10), 64)
    boxes = target_boxes(s, "test")
    present = boxes[..., 0] >= 0
    chosen = np.asarray([len(p) for p in s.meta["discriminative_parts"]])[s.test.labels]
    assert present.sum() >= 0.95 * chosen.sum() and present.any(1).mean() >= 0.99
    sides = np.minimum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])[present]
    assert (sides >= 1).all() and np.median(sides) >= 3

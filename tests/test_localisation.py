"""Localisation scores as the literature defines them, on constructed maps whose answers are known, and end to end:
boxes and Grad-CAM maps line up through synthfg's rendering, the stored size, the crop, flips and rescaling, so a
model built to look only at the part scores near 100%."""

import numpy as np
import pytest
import torch
from torch import nn

from harness.plugin.backbones import BackboneConfig, build_backbone
from harness.data.imageset import IMAGENET_MEAN, IMAGENET_STD, BatchPipeline, ImageSet, Split, target_boxes
from harness.data.synthfg import PART_NAMES, SynthFGParams, class_attributes, class_names, discriminative_parts, render
from harness.engine.explain import localisation, localisation_scores, localisation_target, pointing_tolerance
from harness.plugin.method import METHODS, Method, MethodParams

BOX = np.array([[[4.0, 4.0, 6.0, 6.0]]])  # pixels 4 and 5 in x and y of a 10 x 10 image


def peak_at(row, col, floor=0.0):
    maps = np.full((1, 10, 10), floor)
    maps[0, row, col] = 1.0
    return maps


def test_pointing_within_the_tolerance_is_a_hit():
    """TorchRay's rule: a hit when the maximum is closer than the tolerance to a target pixel."""
    one_px_right, diagonal, three_px = peak_at(4, 6), peak_at(6, 6), peak_at(4, 8)
    for maps, hit in ((peak_at(5, 5), 1), (one_px_right, 1), (diagonal, 1), (three_px, 0)):
        assert localisation(maps, BOX, tolerance=1.5)["pointing"][0] == hit
    assert localisation(one_px_right, BOX, tolerance=0.0)["pointing"][0] == 0  # no tolerance: a miss
    assert localisation(one_px_right, BOX, tolerance=1.5)["pointing_strict"][0] == 0  # ours: inside only
    assert localisation(diagonal, BOX, tolerance=1.4)["pointing"][0] == 0  # sqrt(2) is not < 1.4
    assert localisation(peak_at(4, 7), BOX, tolerance=2.0)["pointing"][0] == 0  # distance 2 is not < 2


def test_chance_is_the_share_within_the_tolerance_and_the_centre_baseline():
    """d^2 < 1.5^2 admits d^2 in {0, 1, 2}: the 2 x 2 box, 8 edge neighbours and 4 diagonal ones = 16 of 100."""
    scores = localisation(peak_at(0, 0), BOX, tolerance=1.5)
    assert scores["chance"][0] == pytest.approx(0.16) and scores["box_share"][0] == pytest.approx(0.04)
    assert scores["center"][0] == 1  # the centre (4.5, 4.5) lies inside
    far = np.array([[[0.0, 0.0, 2.0, 2.0]]])
    assert localisation(peak_at(0, 0), far, tolerance=1.5)["center"][0] == 0


def test_energy_is_scored_on_the_min_max_normalised_map():
    """Score-CAM's energy-based pointing game normalises first: a map with a positive floor puts all its normalised
    energy in the box, while its raw energy is mostly the floor's."""
    maps = np.full((1, 10, 10), 0.5)
    maps[0, 4:6, 4:6] = 1.0
    scores = localisation(maps, BOX)
    assert scores["energy"][0] == pytest.approx(1.0)
    assert scores["energy_raw"][0] == pytest.approx(4 / (4 + 96 * 0.5))
    flat = localisation(np.full((1, 10, 10), 0.3), BOX, tolerance=1.5)  # a flat map points nowhere: chance
    assert flat["energy"][0] == pytest.approx(0.04) and flat["pointing"][0] == pytest.approx(0.16)


def test_tolerance_scales_15_px_from_500_px_images():
    assert pointing_tolerance(500) == 15 and pointing_tolerance(550) == pytest.approx(16.5)
    assert pointing_tolerance(72) == pytest.approx(2.16)


def test_the_scored_map_is_the_deepest_stage_that_resolves_parts():
    """A ResNet-18 (strides 2..32): layer4 from 224 px on (7 x 7, the literature's layer); at 64 px layer2's 8 x 8."""
    cls = METHODS.get("baseline")
    method = cls(build_backbone(BackboneConfig(name="resnet18")), 4, cls.Params())
    assert localisation_target(method, 224) == ("gradcam", 4, "linear", 7)
    assert localisation_target(method, 448) == ("gradcam", 4, "linear", 14)
    assert localisation_target(method, 64) == ("gradcam linear stage3", 2, "linear", 8)
    pmg = METHODS.get("pmg")(build_backbone(BackboneConfig(name="resnet18")), 4, METHODS.get("pmg").Params())
    assert localisation_target(pmg, 448)[:3] == ("gradcam combined", 4, "combined")
    assert localisation_target(pmg, 64)[:3] == ("gradcam combined stage3", 2, "combined")


# ------------------------------------------------------------------ a model that looks only at the part

PART_COLOUR = (255, 0, 255)  # magenta: R + B - 2G = 2, where every other colour synthfg draws stays below 1.1


class PartDetector(nn.Module):
    """A staged backbone (the StagedBackbone interface Grad-CAM hooks) whose every stage is the magenta map: stage 0
    a fixed 1 x 1 detector of R + B - 2G > 1.5 on the normalised image, average pooled to stride 2, then halved by
    average pooling stage after stage."""

    def __init__(self, stages: int = 5):
        super().__init__()
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        detector = nn.Conv2d(3, 1, 1)
        with torch.no_grad():  # in raw units: v = x * std + mean
            detector.weight.copy_((torch.tensor([1.0, -2.0, 1.0]) * std).view(1, 3, 1, 1))
            detector.bias.fill_(float(mean[0] + mean[2] - 2 * mean[1]) - 1.5)
        self.body = nn.ModuleList([nn.Sequential(detector, nn.ReLU(), nn.AvgPool2d(2)),
                                   *(nn.AvgPool2d(2) for _ in range(stages - 1))])
        self.reductions = [2 ** (i + 1) for i in range(stages)]
        self.channels = [1] * stages

    @property
    def num_stages(self) -> int:
        return len(self.channels)

    def stage_module(self, stage: int):
        return self.body[stage % self.num_stages], None

    def forward(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        feats = []
        for module in self.body:
            x = module(x)
            feats.append(x)
        return feats


class PartOnly(Method):
    """Every class's score is the magenta evidence pooled over the last stage: the map can only be the part."""

    Params = MethodParams

    @classmethod
    def head_names(cls, params, num_stages):
        return ("linear",)

    def predict(self, images):
        evidence = self.backbone(images)[-1].mean((1, 2, 3))  # (B,)
        return {"linear": evidence[:, None] * torch.linspace(1.0, 2.0, self.num_classes)}


def painted_synthfg(stored: int, per_class: int = 6, classes: int = 16, seed: int = 0):
    """synthfg rendered at the stored size with each image's target parts (its discriminative parts) painted
    magenta, pixel by pixel from the masks its part boxes bound."""
    p = SynthFGParams(classes=classes, occlusion=0.0)
    attrs = class_attributes(classes)
    labels = torch.arange(classes).repeat_interleave(per_class)
    images, boxes, masks = render(torch.as_tensor(attrs)[labels], stored, p, torch.Generator().manual_seed(seed),
                                  return_masks=True)
    parts = discriminative_parts(attrs)
    images = images.clone()
    for i, y in enumerate(labels.tolist()):
        target = masks[i, parts[y]].any(0)  # (S, S)
        images[i][:, target] = torch.tensor(PART_COLOUR, dtype=torch.uint8)[:, None]
    split = Split(images=images.numpy(), labels=labels.numpy(), boxes=boxes.numpy())
    return ImageSet(name="synthfg", num_classes=classes, class_names=class_names(attrs), train=split, test=split,
                    part_names=PART_NAMES, meta={"discriminative_parts": parts})


def magenta(batch: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> (B, H, W) bool: pixels painted the part colour."""
    raw = batch * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return (raw[:, 0] + raw[:, 2] - 2 * raw[:, 1]) > 1.5


def inside_any(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(B, K, 4) boxes -> (B, size, size) bool: pixel centres inside any box."""
    c = torch.arange(size) + 0.5
    b = boxes[..., None, None]
    inside = (c.view(1, 1, 1, -1) >= b[:, :, 0]) & (c.view(1, 1, 1, -1) < b[:, :, 2]) & \
        (c.view(1, 1, -1, 1) >= b[:, :, 1]) & (c.view(1, 1, -1, 1) < b[:, :, 3]) & (b[:, :, 0] >= 0)
    return inside.any(1)


@pytest.mark.parametrize("stored,size,train,scale", [(72, 64, False, None), (96, 64, False, None),
                                                     (72, 64, True, None), (96, 64, True, [0.75, 1.25])])
def test_boxes_follow_the_parts_through_the_pipeline(stored, size, train, scale):
    """Through the centre crop (test) and the padded random crop, flip and rescaling (train), every part pixel of
    the batch lies inside its image's target boxes, and every box holds part pixels."""
    imageset = painted_synthfg(stored)
    pipe = BatchPipeline(imageset.test, size, 32, train=train, padding=4 if train else 0, random_scale=scale,
                         boxes=target_boxes(imageset, "test"))
    for images, labels, boxes in pipe.batches(torch.Generator().manual_seed(0)):
        part, inside = magenta(images), inside_any(boxes, size)
        if scale:  # bilinear rescaling smears the part's edge by a pixel
            inside = torch.nn.functional.max_pool2d(inside[:, None].float(), 3, 1, 1)[:, 0] > 0
        assert part.sum() > 0 and (part & ~inside).sum() == 0
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
        present = (boxes[..., 0] >= 0) & (area >= (4 if scale else 1))  # a part rescaled below 2 x 2 px may blur away
        # A box the crop cut (render 3's birds reach the frame's edge) is the clipped box of the whole part, not
        # the box of what is left of it: its corner there may hold no part pixel (a tail's triangle tip).
        present &= (boxes[..., :2] > 0).all(-1) & (boxes[..., 2:] < size).all(-1)
        for i, k in zip(*torch.nonzero(present, as_tuple=True)):
            x0, y0 = boxes[i, k, :2].floor().long()
            x1, y1 = boxes[i, k, 2:].ceil().long()
            assert part[i, y0:y1, x0:x1].any()


@pytest.mark.parametrize("stored", [72, 96])
def test_a_model_that_looks_only_at_the_part_points_at_it(stored):
    """End to end through localisation_scores: Grad-CAM of the primary head on the stage it picks (8 x 8 at 64 px),
    upsampled to the crop, against the boxes carried through the crop: near 100% on the pointing game, and about
    half the normalised energy inside (an 8 x 8 map spreads a part of a few pixels over its 8 x 8 px cell), five
    times the boxes' share."""
    imageset = painted_synthfg(stored)
    method = PartOnly(PartDetector(), imageset.num_classes, MethodParams())
    pipe = BatchPipeline(imageset.test, 64, 32, train=False, boxes=target_boxes(imageset, "test"))
    scores = localisation_scores(method, pipe)
    assert scores["loc/map"] == "gradcam linear stage3 (8x8)"
    assert scores["test/loc/pointing"] >= 0.95 and scores["test/loc/pointing_strict"] >= 0.9
    assert scores["test/loc/energy"] >= 5 * scores["test/loc/box_share"]
    assert scores["test/loc/pointing"] >= 4 * scores["test/loc/chance"]
    # The same model scored against boxes that miss the crop's offset (stored pixels) points elsewhere.
    shifted = target_boxes(imageset, "test").copy()
    shifted[shifted >= 0] += (stored - 64) // 2 + 8
    wrong = localisation_scores(method, BatchPipeline(imageset.test, 64, 32, train=False, boxes=shifted))
    assert wrong["test/loc/pointing"] < scores["test/loc/pointing"] - 0.3


def test_pointing_is_averaged_over_classes():
    """Class 0 has three images the model points right on, class 1 one it misses: the class mean is 1/2, where the
    image mean would say 3/4."""
    imageset = painted_synthfg(72, per_class=3, classes=2)
    labels = imageset.test.labels
    boxes = target_boxes(imageset, "test")
    keep = np.concatenate([np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)[:1]])
    boxes = boxes[keep]
    miss = labels[keep] == 1
    boxes[miss] = -1.0
    boxes[miss, 0] = [4.0, 4.0, 5.0, 5.0]  # stored pixels: the crop's corner pixel, far from the part
    split = Split(imageset.test.images[keep], labels[keep], None)
    method = PartOnly(PartDetector(), 2, MethodParams())
    scores = localisation_scores(method, BatchPipeline(split, 64, 8, train=False, boxes=boxes))
    assert scores["test/loc/pointing"] == pytest.approx(0.5)
    assert scores["test/loc/pointing_strict"] == pytest.approx(0.75)  # ours: over images

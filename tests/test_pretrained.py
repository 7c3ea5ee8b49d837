"""synthfg-in (harness.plugin.pretrained): a source domain of its own, built once per machine, cached, verified, and part
of every trial's identity through its content hash. The builds here use a tiny recipe on a tiny backbone."""

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from harness.plugin import pretrained
from harness.plugin.backbones import BackboneConfig, StagedBackbone
from harness.data.synthfg import class_attributes

TINY_KWARGS = {"channels": [8, 8, 16, 16], "stem_width": 8}
TINY = dataclasses.replace(pretrained.RECIPE, classes=4, train_per_class=4, test_per_class=1, stored=24, crop=20,
                           epochs=1, batch_size=8)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """An empty cache and the tiny recipe as the one every caller gets; counts the builds."""
    monkeypatch.setenv("FGVC_HARNESS_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrained, "RECIPE", TINY)
    builds = []
    real = pretrained.build

    def counted(*args, **kwargs):
        builds.append(args[:2])
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrained, "build", counted)
    return builds


def study_class_ranges() -> list[tuple[str, int, int]]:
    """(file, first, last + 1) Gray-code class range of every synthfg section in every shipped study: the base,
    every profile, every grid value."""
    found = []
    for path in sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.yaml")):
        study = yaml.safe_load(path.read_text())
        bodies = [study] + list((study.get("profiles") or {}).values())
        for body in bodies:
            sections = [body.get("dataset") or {}]
            for grid in [body.get("grid") or {}] + list((body.get("grids") or {}).values()):
                sections += grid.get("dataset", [])
            for section in sections:
                if section.get("name", "synthfg") == "synthfg":
                    first = section.get("class_offset", 0)
                    found.append((path.name, first, first + section.get("classes", 16)))
    return found


def test_the_source_classes_are_no_study_classes():
    recipe = pretrained.RECIPE
    source = {tuple(row) for row in class_attributes(recipe.classes, recipe.class_offset)}
    ranges = study_class_ranges()
    assert len(ranges) >= 10
    for name, first, last in ranges:
        assert last <= recipe.class_offset, name
        assert not source & {tuple(row) for row in class_attributes(last - first, first)}, name
    assert recipe.source_params().seed not in (0, 1)  # the studies' test birds (seed 0), the smoke backbone's (1)


def test_a_tiny_build_is_fast_and_the_cache_is_reused(tiny):
    start = time.perf_counter()
    path, digest = pretrained.ensure_source_weights("resnet18", TINY_KWARGS)
    assert time.perf_counter() - start < 10
    assert path.is_file() and len(digest) == pretrained.HASH_CHARS and tiny == [("resnet18", TINY_KWARGS)]
    assert pretrained.ensure_source_weights("resnet18", TINY_KWARGS) == (path, digest)
    assert len(tiny) == 1  # the second call built nothing
    other = pretrained.ensure_source_weights("resnet18", {**TINY_KWARGS, "stem_width": 16})
    assert other[0].parent != path.parent and len(tiny) == 2  # keyed by the backbone's kwargs


def test_a_build_is_deterministic_and_a_broken_entry_is_rebuilt(tiny, capsys):
    path, digest = pretrained.ensure_source_weights("resnet18", TINY_KWARGS)
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    again, digest_again = pretrained.ensure_source_weights("resnet18", TINY_KWARGS)
    assert len(tiny) == 2 and "is broken" in capsys.readouterr().err
    assert again == path and digest_again == digest  # the same recipe builds the same weights
    assert pretrained.verify(path.parent) is None


def test_the_study_pins_the_build_and_the_identity_follows_its_hash(tiny, monkeypatch):
    from harness.study.config import TrainConfig
    from harness.study.trials import trial_identity

    cfg = BackboneConfig(name="resnet18", pretrained="synthfg-in", kwargs=TINY_KWARGS, out_indices=[0, 1, 2, 3])
    digest = pretrained.ensure_source_weights("resnet18", TINY_KWARGS)[1]
    assert cfg.pretrained == f"synthfg-in@{digest}"
    assert BackboneConfig.model_validate(cfg.model_dump()).pretrained == cfg.pretrained  # a pin stays as it is

    def identity(backbone: dict) -> str:
        return trial_identity({"method": {"name": "baseline"}, "dataset": {"name": "synthfg"}, "backbone": backbone,
                               "train": TrainConfig().model_dump(mode="json"), "seed": 0})

    before = identity(cfg.model_dump(mode="json"))
    monkeypatch.setattr(pretrained, "content_hash", lambda state: "0123456789ab")  # another build's weights
    monkeypatch.setattr(pretrained, "RECIPE", dataclasses.replace(TINY, seed=1))
    rebuilt = BackboneConfig(name="resnet18", pretrained="synthfg-in", kwargs=TINY_KWARGS, out_indices=[0, 1, 2, 3])
    assert rebuilt.pretrained == "synthfg-in@0123456789ab"
    assert identity(rebuilt.model_dump(mode="json")) != before


def test_the_backbone_loads_the_build_and_refuses_another(tiny):
    path, _ = pretrained.ensure_source_weights("resnet18", TINY_KWARGS)
    saved = torch.load(path)
    backbone = StagedBackbone(BackboneConfig(name="resnet18", pretrained="synthfg-in", kwargs=TINY_KWARGS,
                                             out_indices=[0, 1, 2, 3]))  # the smoke study's stages
    state = backbone.body.state_dict()
    assert torch.equal(state["layer3.0.conv1.weight"], saved["layer3.0.conv1.weight"])
    assert not torch.equal(saved["conv1.weight"], torch.zeros_like(saved["conv1.weight"]))
    other = {**BackboneConfig().model_dump(), "name": "resnet18", "kwargs": TINY_KWARGS,
             "pretrained": "synthfg-in@0123456789ab"}  # another machine's build (a valid pin, not this one)
    with pytest.raises(pretrained.PretrainedError, match="content hash 0123456789ab"):
        StagedBackbone(BackboneConfig.model_construct(**other))
    with pytest.raises(ValueError, match="hex digits"):
        BackboneConfig(name="resnet18", pretrained="synthfg-in@latest")


def test_the_driver_finds_the_build_before_ray_starts(tiny):
    from harness.plugin.weights import ensure_weights

    pin = BackboneConfig(name="resnet18", pretrained="synthfg-in", kwargs=TINY_KWARGS).pretrained
    assert ensure_weights("resnet18", pin) == str(pretrained.ensure_source_weights("resnet18", TINY_KWARGS)[0])
    assert len(tiny) == 1


def test_the_trained_stages_differ_from_a_random_init(tiny):
    """The build trains the backbone, and puts the classifier back at timm's init for the default head."""
    import timm

    path, _ = pretrained.ensure_source_weights("resnet18", TINY_KWARGS)
    saved = torch.load(path)
    torch.manual_seed(TINY.seed)
    init = timm.create_model("resnet18", num_classes=TINY.classes, **TINY_KWARGS).state_dict()
    assert saved["fc.weight"].shape[0] == 1000
    assert not np.allclose(saved["layer1.0.conv1.weight"].numpy(), init["layer1.0.conv1.weight"].numpy())

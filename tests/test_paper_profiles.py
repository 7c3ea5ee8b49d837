"""Paper profiles that are the papers' protocols: tagged weights, the papers' pipelines, the reported epoch,
weights present before anything starts, and the protocol table that shows every difference."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.plugin.backbones import BackboneConfig, build_backbone
from harness.engine.loop import build_optimizer
from harness.plugin.method import OptimizerSteps
from harness.report.protocol import compare, describe, protocol_markdown
from harness.study.errors import StudyError
from harness.study.config import TrainConfig
from harness.study.load import load_study

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted((ROOT / "studies").glob("*.yaml"))


def paper(path: Path):
    env = {v: "/data/x" for v in ("CUB200_ROOT", "CARS_ROOT", "AIRCRAFT_ROOT", "DOGS_ROOT", "NABIRDS_ROOT")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return load_study(path, profile="paper")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_paper_profiles_name_their_weights(path):
    if "paper" not in load_study(path).study.profiles:
        pytest.skip("no paper profile")
    for trial in paper(path).trials:
        backbone = trial.config["backbone"]
        if backbone["pretrained"] is True:
            assert "." in backbone["name"], f"{path.name}: untagged pretrained weights {backbone['name']}"


PAPER_STUDIES = ("pmg", "wsdan", "mksmt", "aam", "racnn", "gain")


@pytest.mark.parametrize("name", PAPER_STUDIES)
def test_the_default_profiles_follow_their_papers_protocol(name):
    """Issue 28: each paper study's default runs two seeds or more (one marks nothing worse) and fine-tunes from
    synthfg-in at the paper profile's learning rates, AAM from scratch as its article trains."""
    default = load_study(ROOT / f"studies/{name}_ablation.yaml")
    assert len(default.study.seeds) >= 2
    config, reference = default.trials[0].config, paper(ROOT / f"studies/{name}_ablation.yaml").trials[0].config
    pretrained = config["backbone"]["pretrained"]
    if name == "aam":
        assert pretrained is False and reference["backbone"]["pretrained"] is False
        assert config["train"]["momentum"] == reference["train"]["momentum"] and config["train"]["schedule"] == "poly"
        return
    assert isinstance(pretrained, str) and pretrained.startswith("synthfg-in@")
    scale = config["train"]["batch_size"] / reference["train"]["batch_size"]
    assert config["train"]["lr"] == pytest.approx(reference["train"]["lr"] * scale)
    assert config["method"]["backbone_lr_scale"] == reference["method"]["backbone_lr_scale"]
    for knob in ("schedule", "normalize", "momentum", "weight_decay", "precision"):
        assert config["train"][knob] == reference["train"][knob], (name, knob)


def test_the_papers_weights_and_pipelines():
    pmg = paper(ROOT / "studies/pmg_ablation.yaml").trials[0].config
    assert pmg["backbone"]["name"] == "resnet50.tv_in1k" and pmg["backbone"]["stem_pooled"]
    assert (pmg["train"]["resize"], pmg["train"]["image_size"], pmg["train"]["crop_padding"]) == (550, 448, 8)
    wsdan = paper(ROOT / "studies/wsdan_ablation.yaml").trials[0].config
    assert wsdan["backbone"]["name"] == "inception_v3.tv_in1k"
    assert wsdan["train"]["colour_jitter"] == [0.126, 0.0, 0.5, 0.0] and wsdan["train"]["normalize"] == "half"
    assert (wsdan["train"]["resize"], wsdan["train"]["image_size"]) == (512, 448)
    mksmt = paper(ROOT / "studies/mksmt_ablation.yaml").trials[0].config
    assert mksmt["backbone"]["name"] == "swin_large_patch4_window12_384.ms_in22k" and mksmt["backbone"]["final_norm"]
    assert mksmt["method"]["idle_param_updates"] is True
    aam = paper(ROOT / "studies/aam_ablation.yaml").trials[0].config
    assert aam["train"]["random_scale"] == [0.75, 1.25] and aam["backbone"]["pretrained"] is False
    for name in ("pmg_ablation", "wsdan_ablation"):  # the papers report the best test epoch
        study = paper(ROOT / f"studies/{name}.yaml").study
        assert study.table.metric == "test/acc_best"


def test_the_authors_batch_statistics_epochs_and_crop_geometry():
    for profile in ("paper", "fast"):  # PMG: DataParallel's per-GPU BatchNorm, the epochs the authors test
        env = {"CUB200_ROOT": "/data/x"}
        os.environ.update(env)
        try:
            config = load_study(ROOT / "studies/pmg_ablation.yaml", profile=profile).trials[0].config
        finally:
            os.environ.pop("CUB200_ROOT")
        assert config["method"]["bn_replicas"] == 2
        assert config["train"]["eval_epochs"] == [[1, 5], [81, 200]]
    assert paper(ROOT / "studies/wsdan_ablation.yaml").trials[0].config["method"]["geometry"] == "tf"
    # The default profiles keep what their finished trials computed.
    assert load_study(ROOT / "studies/pmg_ablation.yaml").trials[0].config["method"]["bn_replicas"] == 1
    assert load_study(ROOT / "studies/wsdan_ablation.yaml").trials[0].config["method"]["geometry"] == "harness"


def test_untagged_pretrained_weights_are_refused_at_load(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nmethod: {name: baseline}\nbackbone: {name: resnet50, pretrained: true}\n")
    with pytest.raises(StudyError, match=r"s.yaml:3: .*untagged name 'resnet50'.*'resnet50.a1_in1k'"):
        load_study(path)


def test_a_profile_pipeline_replaces_the_base_input_settings(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nmethod: {name: baseline}\ntrain: {image_size: 64, resize: 72, hflip: false}\n"
                    "profiles:\n  paper:\n    train: {pipeline: pmg, hflip: false}\n")
    train = load_study(path, profile="paper").trials[0].config["train"]
    assert (train["resize"], train["image_size"], train["normalize"]) == (550, 448, "half")
    assert train["hflip"] is False  # what the profile itself sets still wins
    cli = load_study(path, overrides=["train.pipeline=pmg", "train.image_size=224"]).trials[0].config["train"]
    assert (cli["resize"], cli["image_size"]) == (550, 224)


def test_missing_weights_exit_2_before_ray_starts(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text("name: s\nmethod: {name: baseline}\nbackbone: {name: resnet18.tv_in1k, pretrained: true}\n"
                     "dataset: {name: synthfg, classes: 2, train_per_class: 4, test_per_class: 1}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "th")}
    out = subprocess.run([sys.executable, "-m", "harness.run", str(study), "--runs-dir", str(tmp_path / "runs")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "pretrained weights 'resnet18.tv_in1k'" in out.stderr and str(tmp_path / "hf") in out.stderr
    assert "backbone.pretrained: /path/to/weights" in out.stderr  # the fix
    assert "Ray" not in out.stdout  # nothing was started


@pytest.mark.integration
@pytest.mark.slow
def test_a_training_split_smaller_than_a_batch_is_an_error(tiny_study, tmp_path, capsys):
    from harness.run import main

    code = main([str(tiny_study), "--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "rep"),
                 "--set", "train.batch_size=64", "--set", "grid.method.stages=[1]", "--set", "grid.method.jigsaw=[true]"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nothing would be trained" in err and "has 32 images, fewer than one batch of train.batch_size=64" in err
    assert not (tmp_path / "runs" / "tiny" / "default" / "trials").exists()


def test_protocol_marks_every_difference():
    study = {"method": {"name": "pmg", "backbone_lr_scale": 0.1}, "backbone": {"name": "resnet50.tv_in1k",
             "pretrained": True, "stem_pooled": True},
             "train": {**TrainConfig(pipeline="pmg", lr=0.002, epochs=200, batch_size=16).model_dump(), "precision": "fp32"},
             "table": {"rows": "x", "metric": "test/acc_best"}}
    ours = describe(study)
    assert ours["lr"] == "0.002 new layers, 0.0002 backbone" and ours["input"] == "550 -> 448, padding 8"
    assert ours["reported"] == "best epoch" and ours["normalisation"] == "(x - 0.5) / 0.5"
    stated = {"source": "s", "lr": "0.002 new layers, 0.0002 backbone", "epochs": {"value": 300, "note": "text"},
              "batch": 16}
    rows = {r["knob"]: r for r in compare(stated, ours)}
    assert rows["lr"]["differs"] == "" and rows["batch"]["differs"] == ""
    assert rows["epochs"]["differs"] == "yes" and rows["epochs"]["note"] == "text" and "source" not in rows
    text = protocol_markdown({**study, "protocol": stated})
    assert "1 of 3 knobs differ" in text and "| epochs | 300 | 200 | **≠** | text |" in text


def test_mksmt_idle_param_updates_move_s4_in_step_one():
    """PyTorch 1.6 zero-filled gradients: step 1 (CE on S3) still moves S4 through SGD's momentum."""
    from methods.mksmt import MKSMT, MKSMTParams

    moved = {}
    for idle in (True, False):
        torch.manual_seed(0)
        model = MKSMT(build_backbone(BackboneConfig(name="resnet18")), 4, MKSMTParams(idle_param_updates=idle,
                                                                                  opm_dim=16))
        steps = OptimizerSteps(build_optimizer(model, TrainConfig(lr=0.1)), set_to_none=model.zero_grad_set_to_none)
        x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
        model.training_step(x, y, steps)  # both steps: S4 gets a gradient and momentum
        before = model.outputs["S4"].weight.detach().clone()
        steps.step(F.cross_entropy(model(x, upto="S3")["S3"][1], y))  # step 1 of the next batch alone
        moved[idle] = not torch.equal(model.outputs["S4"].weight, before)
    assert moved == {True: True, False: False}


def test_a_profile_naming_another_backbone_does_not_inherit_the_base_kwargs(monkeypatch):
    """The default profile's narrow ResNet-18 widths are arguments of that model: the paper's ResNet-50 gets its
    own (none), while the base's other backbone settings (the PMG authors' pooled stem) still apply."""
    monkeypatch.setenv("CUB200_ROOT", "/data/CUB_200_2011")
    base = load_study("studies/pmg_ablation.yaml").trials[0].config["backbone"]
    assert base["kwargs"] == {"channels": [16, 32, 64, 128], "stem_width": 16}
    for profile in ("paper", "fast"):
        backbone = load_study("studies/pmg_ablation.yaml", profile=profile).trials[0].config["backbone"]
        assert backbone["name"] == "resnet50.tv_in1k" and backbone["kwargs"] == {} and backbone["stem_pooled"] is True

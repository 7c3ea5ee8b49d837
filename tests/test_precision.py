"""Precision chosen per device (harness.engine.precision): auto is bf16 only where the device has bf16 units, the
deprecated `amp` maps onto it, fp16 trains with a gradient scaler, and every row says what ran."""

import warnings

import pytest
import torch

from harness.engine import precision
from harness.study.errors import StudyError
from harness.study.config import TrainConfig
from harness.study.load import load_study


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with or without bf16 units."""
    def set_cpu(bf16: bool, capability: str = "AVX2"):
        info = {"cpu_model": "AMD EPYC 7B13" if not bf16 else "Intel Xeon", "cpu_capability": capability,
                "cpu_bf16": bf16, "cpu_bf16_from": "cpuinfo"}
        monkeypatch.setattr(precision, "cpu_info", lambda: info)
    return set_cpu


def test_auto_is_fp32_on_a_cpu_without_bf16_units_and_bf16_with_them(cpu):
    cpu(bf16=False)
    assert precision.resolve("auto", "cpu") == "fp32"
    assert "no bf16 units" in precision.emulation_warning("bf16", "cpu")
    cpu(bf16=True, capability="AVX512")
    assert precision.resolve("auto", "cpu") == "bf16"
    assert precision.emulation_warning("bf16", "cpu") is None


def test_explicit_precisions_are_honoured_on_any_device(cpu):
    cpu(bf16=False)
    for p in ("fp32", "bf16", "fp16"):
        assert precision.resolve(p, "cpu") == p
    with pytest.raises(ValueError, match="not one of"):
        precision.resolve("int8", "cpu")


def test_this_cpu_is_described_from_torch_cpuinfo():
    info = precision.cpu_info()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    caps = torch.cpu.get_capabilities()
    assert info["cpu_bf16"] == bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    assert isinstance(info["cpu_model"], str) and info["cpu_model"]


def test_amp_is_a_deprecated_alias():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert TrainConfig(amp=True).precision == "bf16"
        assert TrainConfig(amp=False).precision == "fp32"
        assert TrainConfig(amp=True, precision="fp32").precision == "fp32"  # precision decides
    assert all("train.amp is deprecated" in str(w.message) for w in caught) and len(caught) == 3
    assert TrainConfig().precision == "auto"


def test_a_study_with_amp_loads_and_says_once_what_to_write(tiny_study, capsys):
    tiny_study.write_text(tiny_study.read_text().replace("precision: fp32", "amp: true"))
    trials = load_study(tiny_study).trials
    assert {t.config["train"]["precision"] for t in trials} == {"bf16"}
    err = capsys.readouterr().err
    assert err.count("train.amp is deprecated") == 1 and "train.precision: auto" in err and str(tiny_study) in err


def test_an_unknown_precision_names_the_choices(tiny_study):
    with pytest.raises(StudyError, match="precision") as e:
        load_study(tiny_study, overrides=["train.precision=half"])
    assert "train.precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16' (got 'half')" in str(e.value)


def _tiny_config(**train) -> dict:
    from harness.data import DATASETS

    data = DATASETS.get("synthfg").Params(classes=3, train_per_class=6, test_per_class=3).model_dump()
    return {"method": {"name": "baseline"}, "dataset": {"name": "synthfg", **data}, "backbone": {"name": "resnet18"},
            "train": {"epochs": 1, "batch_size": 6, "image_size": 32, "resize": 36, "lr": 0.01, **train}, "seed": 0}


@pytest.mark.parametrize("requested", ["fp32", "bf16", "fp16"])
def test_every_precision_trains_and_the_row_says_what_ran(requested):
    from harness.data import load_imageset
    from harness.engine.loop import run_trial
    from harness.study.trials import TrialConfig

    cfg = TrialConfig.parse(_tiny_config(precision=requested, max_train_batches=2))
    final = run_trial(cfg, load_imageset(cfg.dataset, cfg.stored_size), threads=1)
    assert final["precision"] == requested and final["precision_requested"] == requested
    assert final["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert final["threads"] == 1 and final["interop_threads"] >= 1
    assert torch.isfinite(torch.tensor(final["train/loss"]))


def test_auto_in_a_row_is_what_this_cpu_runs():
    from harness.data import load_imageset
    from harness.engine.loop import run_trial
    from harness.study.trials import TrialConfig

    cfg = TrialConfig.parse(_tiny_config(max_train_batches=1))
    final = run_trial(cfg, load_imageset(cfg.dataset, cfg.stored_size), threads=1)
    assert final["precision_requested"] == "auto"
    assert final["precision"] == ("bf16" if precision.cpu_info()["cpu_bf16"] else "fp32")


def test_fp16_steps_go_through_a_gradient_scaler():
    """The scaled step is the plain step on the same loss: the gradient is unscaled before SGD applies it."""
    from harness.plugin.method import OptimizerSteps

    torch.manual_seed(0)
    x = torch.randn(8, 4)
    nets = [torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)]
    nets[1].load_state_dict(nets[0].state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for net, with_scaler in zip(nets, (True, False)):
        steps = OptimizerSteps(torch.optim.SGD(net.parameters(), lr=0.1), scaler=scaler if with_scaler else None)
        steps.step(net(x).pow(2).mean())
    assert torch.allclose(nets[0].weight, nets[1].weight, atol=1e-6)
    assert scaler.get_scale() == 2.0 ** 10  # no overflow, no growth yet (that comes after 2000 good steps)


def test_a_process_kept_from_the_bf16_units_counts_as_without_them(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 (and ATEN_CPU_CAPABILITY=avx2) reproduce an AVX2 machine on one with bf16 units:
    auto is then fp32 there too."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    precision.cpu_info.cache_clear()
    try:
        assert precision.cpu_info()["cpu_bf16"] is False and precision.resolve("auto", "cpu") == "fp32"
    finally:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        precision.cpu_info.cache_clear()

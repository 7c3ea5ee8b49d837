"""The throughput measure the CI gate judges: a reference step interleaved with the training (harness.engine.reference).
A load that comes and goes slows the training and the reference step of the same moment alike and leaves the ratio;
a slower training step moves it; the reference steps' own time is not the training's."""

import pytest

from harness.engine import reference
from harness.engine.reference import ReferenceProbe


class _Clock:
    """The reference step's duration, set by the test (what a busy or idle machine would make of it)."""

    seconds = 0.1


@pytest.fixture
def fixed_reference(monkeypatch):
    monkeypatch.setattr(reference._Reference, "step", lambda self: _Clock.seconds)
    _Clock.seconds = 0.1
    return _Clock


def _ratio(batches: int, batch_seconds, load=lambda i: 1.0) -> dict:
    probe = ReferenceProbe("cpu", "fp32", batches)
    for i in range(batches):
        _Clock.seconds = 0.1 * load(i)  # a reference step after this batch sees the load of its moment
        probe.batch_done(16, batch_seconds * load(i))
    return probe.result()


def test_the_ratio_is_the_training_rate_over_the_reference_rate(fixed_reference):
    out = _ratio(60, 0.2)  # 80 images/s of training against 160 of the reference
    assert out["train/images_per_s_rel"] == pytest.approx(0.5)
    assert out["reference/images_per_s"] == pytest.approx(160)
    assert out["reference/windows"] == reference.WINDOWS  # 60 batches: a reference step every 5


def test_a_load_that_comes_and_goes_leaves_the_ratio_and_a_slower_step_halves_it(fixed_reference):
    bursty = _ratio(60, 0.2, load=lambda i: 3.0 if (i // 3) % 2 else 1.0)  # a third of the CPU half the time
    assert bursty["train/images_per_s_rel"] == pytest.approx(0.5, rel=0.25)  # median of 12 pairs: most unmixed
    slower = _ratio(60, 0.4, load=lambda i: 3.0 if (i // 3) % 2 else 1.0)  # a 2x slower step under the same load
    assert slower["train/images_per_s_rel"] == pytest.approx(0.5 * bursty["train/images_per_s_rel"])


def test_a_short_trial_closes_its_partial_window():
    probe = ReferenceProbe("cpu", "fp32", batches=3, windows=12)
    probe.batch_done(8, 0.05)
    out = probe.result()
    assert out["reference/windows"] == 1 and out["train/images_per_s_rel"] > 0 and probe.spent > 0


def test_the_engine_leaves_the_reference_steps_out_of_the_training_time():
    from harness.data import load_imageset
    from harness.data.synthfg import SynthFGParams
    from harness.engine.loop import run_trial

    data = SynthFGParams(classes=4, train_per_class=8, test_per_class=4)
    imageset = load_imageset(data, 36)
    config = {"method": {"name": "baseline"}, "dataset": data.model_dump(), "backbone": {"name": "resnet18"},
              "train": {"epochs": 2, "batch_size": 8, "image_size": 32, "resize": 36, "lr": 0.05,
                        "reference_workload": True, "precision": "fp32"}, "seed": 0}
    out = run_trial(config, imageset, threads=1)
    assert out["reference/windows"] >= 4 and out["train/images_per_s_rel"] > 0
    assert out["train/cpu_s_per_image"] > 0
    # 8 batches of 8 images at 32 px and about as many reference steps of 16 at 64 px: the reference takes most of
    # the loop's time, and none of it is the training's
    assert out["reference/time_s"] > 0.5 * out["train/time_s"]
    assert out["train/time_s"] + out["reference/time_s"] < out["wall_time_s"]
    assert sum(h["train/epoch_time_s"] for h in out["history"]) == pytest.approx(out["train/time_s"])
    plain = run_trial({**config, "train": {**config["train"], "reference_workload": False}}, imageset, threads=1)
    assert {k: v for k, v in plain.items() if k.startswith("test/acc")} == \
        {k: v for k, v in out.items() if k.startswith("test/acc")}  # the probe changes no number of the trial

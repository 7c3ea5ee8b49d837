"""The training engine: determinism, resume from the epoch checkpoint, divergence."""

import pytest

from harness.data import load_imageset
from harness.data.synthfg import SynthFGParams
from harness.engine.loop import LocalCheckpoints, lr_factor, run_trial
from harness.plugin.method import TrialDiverged
from harness.study.config import TrainConfig

DATA = SynthFGParams(classes=4, train_per_class=8, test_per_class=4)


def config(**train):
    return {"method": {"name": "pmg", "stages": 2, "feature_size": 16, "stage_dim": 32, "backbone_lr_scale": 1.0},
            "dataset": DATA.model_dump(), "backbone": {"name": "resnet18"},
            "train": {"epochs": 2, "batch_size": 8, "image_size": 32, "resize": 36, "lr": 0.05, **train}, "seed": 3}


@pytest.fixture(scope="module")
def imageset():
    return load_imageset(DATA, 36)


def comparable(metrics):
    return {k: v for k, v in metrics.items() if k.startswith(("test/", "train/loss")) or k == "optimizer_steps"}


def test_same_trial_twice_gives_the_same_metrics(imageset):
    a = run_trial(config(), imageset, threads=1)
    b = run_trial(config(), imageset, threads=1)
    assert comparable(a) == comparable(b)
    assert a["optimizer_steps"] == 2 * (32 // 8) * 3  # epochs x batches x (S+1)
    assert [h["epoch"] for h in a["history"]] == [1, 2]
    c = run_trial({**config(), "seed": 4}, imageset, threads=1)
    assert comparable(c) != comparable(a)


def test_resume_from_checkpoint_equals_an_uninterrupted_run(imageset, tmp_path):
    uninterrupted = run_trial(config(), imageset, threads=1)

    class Stop(Exception):
        pass

    def stop_after_first_epoch(metrics):
        raise Stop

    with pytest.raises(Stop):
        run_trial(config(), imageset, LocalCheckpoints(tmp_path, on_report=stop_after_first_epoch), threads=1)
    assert (tmp_path / "checkpoint.pt").exists()
    resumed = run_trial(config(), imageset, LocalCheckpoints(tmp_path), threads=1)
    assert resumed["resumed_from_epoch"] == 1
    assert comparable(resumed) == comparable(uninterrupted)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]


def test_non_finite_loss_raises_trial_diverged(imageset):
    with pytest.raises(TrialDiverged, match="diverged; lower train.lr"):
        run_trial(config(lr=1e30, epochs=1), imageset, threads=1)


def test_schedules_are_the_authors():
    # PMG: lr / 2 * (cos(pi * t / T) + 1): full at epoch 0, half at T/2.
    assert lr_factor(TrainConfig(epochs=10), 0) == 1.0
    assert lr_factor(TrainConfig(epochs=10), 5) == pytest.approx(0.5)
    # WS-DAN: lr x 0.9 every 2 epochs.
    step = TrainConfig(schedule="step", step_size=2, gamma=0.9)
    assert [lr_factor(step, t) for t in range(5)] == pytest.approx([1, 1, 0.9, 0.9, 0.81])
    assert lr_factor(TrainConfig(schedule="constant"), 7) == 1.0
    # AAM: poly from 1e-4 towards 1e-6.
    poly = TrainConfig(schedule="poly", lr=1e-4, end_lr=1e-6, poly_power=0.9, epochs=200)
    assert lr_factor(poly, 0) == pytest.approx(1.0)
    assert 1e-4 * lr_factor(poly, 199) == pytest.approx(1e-6 + (1e-4 - 1e-6) * (1 / 200) ** 0.9)


def test_best_epoch_of_a_made_up_history():
    from harness.engine.loop import best_epochs

    history = [{"epoch": 1, "test/acc": 0.2, "test/acc/a": 0.3, "test/acc/b": 0.1},
               {"epoch": 2, "train/loss": 1.0},  # not evaluated (eval_every)
               {"epoch": 3, "test/acc": 0.5, "test/acc/a": 0.3, "test/acc/b": 0.4},
               {"epoch": 4, "test/acc": 0.4, "test/acc/a": 0.2, "test/acc/b": 0.6}]
    # Every head at the primary head's best epoch (3); each head's own best apart (a's tie: the earliest epoch).
    assert best_epochs(history) == {"test/acc_best": 0.5, "best_epoch": 3,
                                    "test/acc_best/a": 0.3, "best_epoch/a": 3,
                                    "test/acc_best/b": 0.4, "best_epoch/b": 3,
                                    "test/acc_best_own/a": 0.3, "best_epoch_own/a": 1,
                                    "test/acc_best_own/b": 0.6, "best_epoch_own/b": 4}
    assert best_epochs([]) == {}


def test_trial_rows_carry_the_best_epoch(imageset):
    final = run_trial(config(epochs=3), imageset, threads=1)
    accs = [h["test/acc"] for h in final["history"]]
    assert final["test/acc"] == accs[-1] and final["test/acc_best"] == max(accs)
    assert final["history"][int(final["best_epoch"]) - 1]["test/acc"] == final["test/acc_best"]
    assert {"test/acc_best/combined", "best_epoch/concat"} <= set(final)


def test_eval_epochs_test_only_the_epochs_named_and_the_last():
    authors = TrainConfig(epochs=200, eval_epochs=[[1, 5], [81, 200]])  # PMG's: their epochs 0-4 and 80-199
    assert [e for e in range(1, 201) if authors.evaluates(e)] == [*range(1, 6), *range(81, 201)]
    assert [e for e in range(1, 7) if TrainConfig(eval_every=2).evaluates(e)] == [2, 4, 6]  # the default rule
    with pytest.raises(ValueError, match="1 <= first <= last"):
        TrainConfig(eval_epochs=[[5, 1]])
    with pytest.raises(ValueError, match="give one"):
        TrainConfig(eval_epochs=[[1, 2]], eval_every=2)


def test_the_best_epoch_is_chosen_among_the_tested_ones(imageset):
    final = run_trial(config(epochs=3, eval_epochs=[[1, 1]]), imageset, threads=1)
    tested = [h["epoch"] for h in final["history"] if "test/acc" in h]
    assert tested == [1, 3]  # epoch 1 as asked, epoch 3 as the last
    assert final["best_epoch"] in tested

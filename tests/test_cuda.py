"""CUDA paths: pinned uint8 batches copied without blocking, bf16 autocast, channels_last, torch.compile,
and a 2-GPU data-parallel trial (nccl). Skipped without CUDA; run them on a GPU machine:

    python -m pytest -m gpu tests/test_cuda.py
"""

import numpy as np
import pytest
import torch

from harness.data import load_imageset
from harness.data.imageset import BatchPipeline, Split
from harness.data.synthfg import SynthFGParams
from harness.engine.loop import TrialIO, run_trial

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DATA = SynthFGParams(classes=4, train_per_class=8, test_per_class=4)


def config(**train) -> dict:
    return {"method": {"name": "pmg", "stages": 2, "feature_size": 16, "stage_dim": 32, "backbone_lr_scale": 1.0},
            "dataset": DATA.model_dump(), "backbone": {"name": "resnet18"},
            "train": {"epochs": 1, "batch_size": 8, "image_size": 32, "resize": 36, "lr": 0.05, "device": "cuda",
                      **train}, "seed": 1}


class LastState(TrialIO):
    state = None

    def report(self, metrics, state=None):
        self.state = state


def test_batches_travel_as_pinned_uint8_and_match_the_cpu_pipeline(monkeypatch):
    rng = np.random.default_rng(0)
    split = Split(images=rng.integers(0, 255, (16, 3, 12, 12), dtype=np.uint8), labels=np.arange(16))
    staged = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        if self.dtype == torch.uint8 and self.dim() == 4:
            staged.append((self.is_pinned(), kwargs.get("non_blocking")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    gpu = list(BatchPipeline(split, 8, 8, train=True, padding=1, device="cuda")
               .batches(torch.Generator().manual_seed(0)))
    monkeypatch.setattr(torch.Tensor, "to", original)
    cpu = list(BatchPipeline(split, 8, 8, train=True, padding=1).batches(torch.Generator().manual_seed(0)))
    assert staged and all(pinned and non_blocking for pinned, non_blocking in staged)
    for (gi, gl), (ci, cl) in zip(gpu, cpu):
        assert gi.is_cuda and gi.dtype == torch.float32 and gl.is_cuda
        torch.testing.assert_close(gi.cpu(), ci)
        assert torch.equal(gl.cpu(), cl)


def test_bf16_autocast_trial_on_cuda_names_the_gpu():
    final = run_trial(config(precision="bf16"), load_imageset(DATA, 36))
    assert final["device"] == "cuda" and final["device_name"] == torch.cuda.get_device_name()
    assert np.isfinite(final["train/loss"]) and 0 <= final["test/acc"] <= 1
    # Where the model looks, computed on the GPU and brought back: the stored maps and the localisation score.
    assert final["maps"] and 0 <= final["test/loc/energy"] <= 1


def test_channels_last_lays_out_the_model_and_its_input():
    io = LastState()
    run_trial(config(channels_last=True, precision="bf16"), load_imageset(DATA, 36), io)
    conv = io.state["model"]["backbone.body.conv1.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    pipe = BatchPipeline(load_imageset(DATA, 36).train, 32, 8, train=True, device="cuda", channels_last=True)
    images, _ = next(pipe.batches(torch.Generator().manual_seed(0)))
    assert images.is_contiguous(memory_format=torch.channels_last)


def test_compiled_trial_trains_like_the_eager_one():
    eager = run_trial(config(), load_imageset(DATA, 36))
    compiled = run_trial(config(compile=True), load_imageset(DATA, 36))
    assert compiled["train/loss"] == pytest.approx(eager["train/loss"], rel=1e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_workers_with_nccl_match_one_gpu():
    from tests.test_distributed import PMG, assert_same_model, run_workers
    from tests.test_distributed import config as small_config

    cfg = small_config(PMG, device="cuda")
    io = LastState()
    single = run_trial(cfg, load_imageset(DATA, 36), io)
    ranks = run_workers(cfg, backend="nccl")
    assert ranks[0]["final"]["world_size"] == 2 and ranks[0]["final"]["device"] == "cuda"
    assert ranks[0]["final"]["optimizer_steps"] == single["optimizer_steps"]
    cpu = lambda state: {k: v.cpu() for k, v in state.items()}  # noqa: E731
    assert_same_model(cpu(ranks[0]["state"]), cpu(io.state["model"]), rtol=1e-3, atol=1e-3)

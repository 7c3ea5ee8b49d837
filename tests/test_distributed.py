"""Data-parallel trials on CPU workers (gloo): a 2-worker trial equals its 1-worker twin, data sharding,
synchronised BatchNorm, gradients of parameters that some step leaves without one."""

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.data import load_imageset
from harness.data.imageset import BatchPipeline, Split
from harness.data.synthfg import SynthFGParams
from harness.plugin.distributed import Collective, GlooSyncBatchNorm, ProcessGroupCollective, _buckets, sync_batchnorm
from harness.engine.loop import TrialIO, run_trial

DATA = SynthFGParams(classes=4, train_per_class=8, test_per_class=4)


def config(method: dict, **train) -> dict:
    return {"method": method, "dataset": DATA.model_dump(), "backbone": {"name": "resnet18"},
            "train": {"epochs": 2, "batch_size": 8, "image_size": 32, "resize": 36, "lr": 0.05, "precision": "fp32",
                      "max_train_batches": 2, **train}, "seed": 5}


PMG = {"name": "pmg", "stages": 2, "feature_size": 16, "stage_dim": 32, "backbone_lr_scale": 1.0, "early_exit": True}
# One attention map and fixed thresholds: WS-DAN's per-image random choices (which map, which threshold)
# cannot depend on how the batch is split, so the two runs must agree to float tolerance.
WSDAN = {"name": "wsdan", "attention_maps": 1, "stage": -3, "crop_theta": [0.5, 0.5], "drop_theta": [0.3, 0.3],
         "logit_scale": 10.0}


class Capture(TrialIO):
    def __init__(self):
        self.states, self.metrics = [], []

    def report(self, metrics, state=None):
        self.metrics.append(metrics)
        if state is not None:
            self.states.append(state)


def _worker(rank: int, world: int, init_file: str, cfg: dict, out: str, dtype: torch.dtype = torch.float32,
            backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(dtype)
    if backend == "nccl":
        torch.cuda.set_device(rank)  # as Ray Train does by giving each worker its own visible GPU
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        io = Capture()
        final = run_trial(cfg, load_imageset(DATA, 36), io, ProcessGroupCollective())
        torch.save({"final": {k: v for k, v in final.items() if k != "history"}, "metrics": io.metrics,
                    "state": io.states[-1]["model"] if io.states else None}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def run_workers(cfg: dict, world: int = 2, dtype: torch.dtype = torch.float32, backend: str = "gloo") -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), cfg, out, dtype, backend), nprocs=world, join=True)
        return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


def assert_same_model(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.fixture
def float64():
    """The comparison runs in float64: from-scratch training on tiny batches amplifies float32 rounding
    (a 1e-7 change of the inputs moves PMG's classifier BN biases by their own size within 12 steps),
    while in float64 a 2-worker trial that computes the same math stays within 1e-11 of its twin."""
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("method", [PMG, WSDAN], ids=["pmg-early-exit", "wsdan"])
def test_two_workers_equal_one_worker(method, float64):
    """Same global batch and seed: the same parameters, BN statistics and WS-DAN centres after 2 epochs
    x 2 batches (PMG: x (S+1) = 12 optimizer steps), the same losses and accuracies."""
    cfg = config(method)
    torch.set_num_threads(1)
    one = Capture()
    single = run_trial(cfg, load_imageset(DATA, 36), one)
    ranks = run_workers(cfg, dtype=float64)
    assert ranks[1]["state"] is None  # only rank 0 hands over checkpoints
    assert_same_model(ranks[0]["state"], one.states[-1]["model"], rtol=1e-9, atol=1e-10)
    if method is WSDAN:
        assert ranks[0]["state"]["centers"].abs().sum() > 0  # the centres moved, and moved alike
    for rank in ranks:
        final = rank["final"]
        assert final["world_size"] == 2 and single["world_size"] == 1
        assert final["optimizer_steps"] == single["optimizer_steps"]
        for key in ("test/acc", "train/loss"):
            assert final[key] == pytest.approx(single[key], rel=1e-9), key
        for epoch_two, epoch_one in zip(rank["metrics"], one.metrics):
            assert {k: v for k, v in epoch_two.items() if "/acc" in k} == \
                {k: v for k, v in epoch_one.items() if "/acc" in k}


@pytest.mark.slow
def test_two_workers_in_float32_stay_within_rounding_of_one_worker():
    """The same in float32, after one batch (S+1 = 3 PMG steps), before rounding has been amplified."""
    cfg = config(PMG, epochs=1, max_train_batches=1)
    torch.set_num_threads(1)
    one = Capture()
    run_trial(cfg, load_imageset(DATA, 36), one)
    assert_same_model(run_workers(cfg)[0]["state"], one.states[-1]["model"], rtol=1e-4, atol=1e-4)


def test_training_images_are_used_once_per_epoch_across_workers():
    """Each image of the epoch goes to exactly one worker, with the crop/flip/jitter it gets in one process."""
    n, batch = 40, 8
    rng = np.random.default_rng(0)
    split = Split(images=rng.integers(0, 255, (n, 3, 12, 12), dtype=np.uint8), labels=np.arange(n))
    kw = dict(image_size=8, batch_size=batch, train=True, padding=2, colour_jitter=[0.4, 0.4, 0.4, 0.1])
    one = list(BatchPipeline(split, **kw).batches(torch.Generator().manual_seed(3)))
    for world in (2, 4):
        shards = [list(BatchPipeline(split, rank=r, world_size=world, **kw).batches(torch.Generator().manual_seed(3)))
                  for r in range(world)]
        seen = torch.cat([labels for shard in shards for _, labels in shard])
        assert sorted(seen.tolist()) == list(range(n))  # every image once (40 = 5 global batches of 8)
        for b, (images, labels) in enumerate(one):
            torch.testing.assert_close(torch.cat([shards[r][b][0] for r in range(world)]), images)
            assert torch.equal(torch.cat([shards[r][b][1] for r in range(world)]), labels)
    with pytest.raises(ValueError, match="does not divide by the 3 workers"):
        BatchPipeline(split, rank=0, world_size=3, **kw)


def test_test_split_is_dealt_round_robin():
    split = Split(images=np.zeros((11, 3, 8, 8), dtype=np.uint8), labels=np.arange(11))
    shards = [torch.cat([lab for _, lab in BatchPipeline(split, 8, 4, train=False, rank=r, world_size=3).batches()])
              for r in range(3)]
    assert [s.tolist() for s in shards] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]


def _sync_bn_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        x = torch.randn(8, 3, 5, 5, dtype=torch.float64) * 4 + 10  # the global batch; this rank keeps its half
        bn = sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.3, dtype=torch.float64)))
        assert type(bn[0]) is GlooSyncBatchNorm
        bn[0].weight.data = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
        local = x[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
        y = bn(local)
        (y * torch.arange(75., dtype=torch.float64).view(3, 5, 5)).sum().backward()
        torch.save({"y": y.detach(), "grad": local.grad, "w": bn[0].weight.grad, "rm": bn[0].running_mean,
                    "rv": bn[0].running_var}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_cpu_sync_batchnorm_equals_batchnorm_on_the_global_batch():
    """Outputs, input and weight gradients, running statistics: those of one BatchNorm on the whole batch
    (in float64, so the comparison is of the math, not of float32 rounding)."""
    torch.manual_seed(0)
    x = (torch.randn(8, 3, 5, 5, dtype=torch.float64) * 4 + 10).requires_grad_(True)
    bn = torch.nn.BatchNorm2d(3, momentum=0.3, dtype=torch.float64)
    bn.weight.data = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    y = bn(x)
    (y * torch.arange(75., dtype=torch.float64).view(3, 5, 5)).sum().backward()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        mp.spawn(_sync_bn_worker, args=(2, os.path.join(tmp, "init"), out), nprocs=2, join=True)
        ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach())
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), x.grad)  # input gradients through the stats
    torch.testing.assert_close(ranks[0]["w"] + ranks[1]["w"], bn.weight.grad)  # summed here, averaged by the engine
    for r in ranks:
        torch.testing.assert_close(r["rm"], bn.running_mean)
        torch.testing.assert_close(r["rv"], bn.running_var)


def _grad_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        a, b, c, d, e = (torch.nn.Parameter(torch.zeros(3)) for _ in range(5))
        a.grad = torch.full((3,), float(rank + 1))  # 1 and 2: mean 1.5
        if rank == 0:
            b.grad = torch.ones(3) * 4  # only rank 0 has one: (4 + 0) / 2
        d.grad = torch.zeros(3)  # zero-filled everywhere (PyTorch 1.x zero_grad): stays zero, nothing sent
        e.grad = torch.zeros(3) if rank == 0 else torch.full((3,), 6.0)  # zero on one rank only: averaged
        loss = torch.tensor(float("nan") if rank == 1 else 1.0)
        mean_loss = ProcessGroupCollective(bucket_bytes=8).average_gradients([a, b, c, d, e], loss)
        torch.save({"a": a.grad, "b": b.grad, "c": c.grad, "d": d.grad, "e": e.grad, "loss": mean_loss},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gradient_average_treats_missing_gradients_alike_and_sees_every_loss():
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        mp.spawn(_grad_worker, args=(2, os.path.join(tmp, "init"), out), nprocs=2, join=True)
        ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for r in ranks:
        assert torch.equal(r["a"], torch.full((3,), 1.5)) and torch.equal(r["b"], torch.full((3,), 2.0))
        assert r["c"] is None  # no rank had one: SGD skips it everywhere
        assert torch.equal(r["d"], torch.zeros(3)) and torch.equal(r["e"], torch.full((3,), 3.0))
        assert r["loss"] != r["loss"]  # NaN on one rank is NaN for all: every rank stops at the same step


def test_buckets_keep_order_dtype_and_size_limit():
    ts = [torch.zeros(4), torch.zeros(4), torch.zeros(2, dtype=torch.float64), torch.zeros(100), torch.zeros(1)]
    buckets = _buckets(ts, limit=32)
    assert [[t.numel() for t in b] for b in buckets] == [[4, 4], [2], [100], [1]]
    assert [t for b in buckets for t in b] == ts


def test_one_process_collective_is_the_identity():
    c = Collective()
    t = torch.ones(3)
    assert c.sum(t) is t and c.world_size == 1 and c.is_primary
    assert c.average_gradients([], torch.tensor(2.5)) == 2.5

"""The training engine: one trial from its resolved config to its metrics.

It owns everything methods share: seeding, devices, mixed precision, the optimizer and its
learning-rate schedule, epochs, evaluation of every head, a checkpoint per epoch (resumed from
when present), and per-epoch metrics handed to a `report` callback (the orchestrator forwards them
to Ray Tune; the engine itself never imports Ray).

Determinism: the seed fixes initialisation; data order, augmentation and jigsaw permutations come
from a generator seeded by (seed, epoch), so a trial resumed from its epoch-k checkpoint sees the
same batches as an uninterrupted one, and the same trial twice on CPU gives the same metrics.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from harness.backbones import BackboneConfig, build_backbone
from harness.complexity import inference_complexity
from harness.data.imageset import NORMALIZATIONS, BatchPipeline, ImageSet
from harness.plugin import METHODS, Method, OptimizerSteps
from harness.study import TrainConfig

Report = Callable[[dict], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def lr_factor(train: TrainConfig, epoch: int) -> float:
    """Per-epoch multiplier of each group's base lr. Cosine as the PMG authors: (cos(pi*t/T) + 1) / 2;
    step as WS-DAN's: gamma^(t // step_size); poly as AAM's: lr -> end_lr with (1 - t/T)^power."""
    if train.schedule == "cosine":
        return (math.cos(math.pi * epoch / train.epochs) + 1) / 2
    if train.schedule == "step":
        return train.gamma ** (epoch // train.step_size)
    if train.schedule == "poly":  # AAM: from lr down to end_lr, (1 - t/T)^power
        return ((1 - epoch / train.epochs) ** train.poly_power * (train.lr - train.end_lr) + train.end_lr) / train.lr
    return 1.0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is visible to this trial; "
                           "set resources.gpu > 0 or train.device: auto")
    return torch.device(name)


def build_method(config: dict, num_classes: int) -> Method:
    method_cls = METHODS.get(config["method"]["name"])
    params = method_cls.Params.model_validate(config["method"])
    backbone = build_backbone(BackboneConfig.model_validate(config["backbone"]))
    return method_cls(backbone, num_classes, params)


def build_optimizer(method: Method, train: TrainConfig) -> torch.optim.SGD:
    groups = []
    for g in method.param_groups():
        params = [p for p in g["params"] if p.requires_grad]
        if params:
            lr = train.lr * g.get("lr_scale", 1.0)
            groups.append({"params": params, "lr": lr, "base_lr": lr, "name": g.get("name", "")})
    return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay,
                           nesterov=train.nesterov)


@torch.no_grad()
def evaluate(method: Method, pipeline: BatchPipeline, autocast, flip: int | None = None,
             prefix: str = "test") -> dict[str, float]:
    """Top-1 of every head (`<prefix>/acc/<head>`) and of the primary head (`<prefix>/acc`).
    `flip`: test on images flipped along dim -1 (horizontal) or -2 (vertical), the MKSMT robustness test."""
    method.eval()
    correct: dict[str, int] = {}
    total = 0
    for images, labels in pipeline.batches():
        if flip is not None:
            images = images.flip(flip)
        with autocast():
            heads = method.predict(images)
        for name, logits in heads.items():
            correct[name] = correct.get(name, 0) + int((logits.argmax(1) == labels).sum())
        total += len(labels)
    metrics = {f"{prefix}/acc/{name}": c / total for name, c in correct.items()}
    metrics[f"{prefix}/acc"] = metrics[f"{prefix}/acc/{method.primary_head}"]
    return metrics


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def run_trial(config: dict, imageset: ImageSet, report: Report | None = None,
              checkpoint_dir: str | os.PathLike | None = None, threads: int | None = None) -> dict:
    """Train and evaluate one trial; returns the final metrics (last epoch's, totals, and `history`: per epoch)."""
    wall_start = time.perf_counter()
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    train = TrainConfig.model_validate(config["train"])
    seed = int(config["seed"])
    device = pick_device(train.device)
    seed_everything(seed)
    method = build_method(config, imageset.num_classes).to(device)
    optimizer = build_optimizer(method, train)
    # bf16 autocast: on CUDA, and on CPUs with bf16 units (AVX512-BF16/AMX: ~1.7x for ResNet-18 here).
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if train.amp else nullcontext
    steps = OptimizerSteps(optimizer, None, set_to_none=method.zero_grad_set_to_none, grad_clip=train.grad_clip)

    mean, std = NORMALIZATIONS[train.normalize]
    train_pipe = BatchPipeline(imageset.train, train.image_size, train.batch_size, train=True,
                               padding=train.crop_padding, hflip=train.hflip, device=device, mean=mean, std=std,
                               colour_jitter=train.colour_jitter)
    test_pipe = BatchPipeline(imageset.test, train.image_size, train.eval_batch_size or 2 * train.batch_size,
                              train=False, device=device, mean=mean, std=std)

    ckpt_path = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir else None
    start_epoch, history, train_time, images_seen = 0, [], 0.0, 0
    if ckpt_path is not None and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        train_time, images_seen, steps.count = state["train_time"], state["images_seen"], state["steps"]
        # With PyTorch 1.x zero_grad semantics a parameter that once had a gradient keeps a zero-filled
        # one, and SGD keeps applying momentum to it: restore that, or the resumed run would differ.
        for i, p in enumerate(method.parameters()):
            if i in state["params_with_grad"]:
                p.grad = torch.zeros_like(p)

    n_params = sum(p.numel() for p in method.parameters())
    metrics: dict = history[-1] if history else {}
    for epoch in range(start_epoch, train.epochs):
        factor = lr_factor(train, epoch)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        method.train()
        generator = epoch_generator(seed, epoch)
        sums: dict[str, float] = {}
        batches, epoch_images, t0 = 0, 0, time.perf_counter()
        for images, labels in train_pipe.batches(generator, train.max_train_batches):
            with autocast():
                losses = method.training_step(images, labels, steps, generator)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            batches += 1
            epoch_images += len(labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        images_seen += epoch_images
        metrics = {"epoch": epoch + 1, **{f"train/{k}": v / max(batches, 1) for k, v in sums.items()},
                   "lr": optimizer.param_groups[0]["lr"], "train/images_per_s": epoch_images / max(epoch_time, 1e-9),
                   "train/epoch_time_s": epoch_time}
        if (epoch + 1) % train.eval_every == 0 or epoch + 1 == train.epochs:
            metrics.update(evaluate(method, test_pipe, autocast))
        history.append(metrics)
        if ckpt_path is not None:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            _save_atomic({"model": method.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                          "history": history, "train_time": train_time, "images_seen": images_seen,
                          "steps": steps.count,
                          "params_with_grad": {i for i, p in enumerate(method.parameters()) if p.grad is not None}},
                         ckpt_path)
        if report is not None:
            report(dict(metrics))

    final = dict(metrics)
    if train.eval_flips:
        final.update(evaluate(method, test_pipe, autocast, flip=-1, prefix="test_hflip"))
        final.update(evaluate(method, test_pipe, autocast, flip=-2, prefix="test_vflip"))
    final.update(inference_complexity(method, train.image_size, device))
    final.update(method.extra_metrics())
    final.update({"train/images_per_s": images_seen / max(train_time, 1e-9), "train/time_s": train_time,
                  "wall_time_s": time.perf_counter() - wall_start, "optimizer_steps": steps.count,
                  "params": n_params, "device": str(device), "num_classes": imageset.num_classes,
                  "resumed_from_epoch": start_epoch, "history": history})
    return final

"""The training engine: one trial from its resolved config to its metrics, on one or several workers.

It owns everything methods share: seeding, devices, mixed precision, the memory layout, the
optimizer and its learning-rate schedule, epochs, evaluation of every head, a checkpoint per epoch
(resumed from when present), and per-epoch metrics. Where metrics and checkpoints go is a `TrialIO`:
the orchestrator gives one that reports to Ray Tune or Ray Train; `LocalCheckpoints` keeps a file.
The engine itself never imports Ray.

Several workers (a `Collective` of harness.plugin.distributed): each trains on its slice of every global
batch, gradients are averaged inside `OptimizerSteps.step`, BatchNorm can be synchronised
(`train.sync_bn`), evaluation counts are summed over the workers, epoch losses averaged, and only
rank 0 hands a checkpoint to its TrialIO (every rank reports, which Ray Train needs as a barrier).

Determinism: the seed fixes initialisation; data order and augmentation come from one generator
seeded by (seed, epoch), the method's own random choices (jigsaw permutations, attention-map
choices) from a second one, so the data a trial sees does not depend on what the method draws; a
trial resumed from its epoch-k checkpoint sees the same batches as an uninterrupted one, the same
trial twice on CPU gives the same metrics, and a W-worker trial sees the same global batches as its
one-worker twin. Per-image draws of a method come from the same generator state on every worker
(so PMG's per-batch jigsaw permutation is exactly the one-worker one); per-image draws (WS-DAN's
thresholds) of the k-th image of each worker's slice therefore coincide across workers.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from harness.engine import precision as precisions
from harness.core.atomic import atomic_write
from harness.plugin.backbones import build_backbone
from harness.engine.complexity import inference_complexity
from harness.data.imageset import NORMALIZATIONS, BatchPipeline, ImageSet, carve_validation, target_boxes
from harness.plugin.distributed import Collective, sync_batchnorm
from harness.engine.explain import localisation_scores, method_maps, pack_maps
from harness.plugin.method import METHODS, Method, OptimizerSteps
from harness.engine.reference import ReferenceProbe
from harness.core.records import pack_correct, split_hash
from harness.study.config import TrainConfig
from harness.study.trials import TrialConfig

Report = Callable[[dict], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


DATA_STREAM, METHOD_STREAM = 0, 1


def epoch_generator(seed: int, epoch: int, stream: int = DATA_STREAM) -> torch.Generator:
    """The generator of one epoch: stream 0 draws the data order and augmentation, stream 1 the method's choices."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch + stream * 1_000_000_007)


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


def build_method(config: TrialConfig | dict, num_classes: int) -> Method:
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.parse(config)
    return METHODS.get(cfg.method.name)(build_backbone(cfg.backbone), num_classes, cfg.method)


def build_optimizer(method: Method, train: TrainConfig) -> torch.optim.SGD:
    groups = []
    for g in method.param_groups():
        params = [p for p in g["params"] if p.requires_grad]
        if params:
            lr = train.lr * g.get("lr_scale", 1.0)
            groups.append({"params": params, "lr": lr, "base_lr": lr, "name": g.get("name", "")})
    return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay,
                           nesterov=train.nesterov)


class TrialIO:
    """Where a trial's per-epoch metrics and checkpoints go, and where a resumed trial finds its state.

    `restore()` returns the state of the last checkpoint, or None to start from scratch.
    `report(metrics, state)` is called by every worker after every epoch; `state` (a checkpoint,
    loadable with `torch.load(weights_only=True)`) is given on rank 0 only, None elsewhere.
    This default keeps nothing."""

    def restore(self) -> dict | None:
        return None

    def report(self, metrics: dict, state: dict | None = None) -> None:
        pass


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    """Read a checkpoint without unpickling code: tensors, numbers, strings and containers only."""
    return torch.load(path, map_location=device, weights_only=True)


class LocalCheckpoints(TrialIO):
    """Checkpoints in one local file (`<directory>/checkpoint.pt`), metrics to an optional callback."""

    def __init__(self, directory: str | os.PathLike, on_report: Report | None = None):
        self.path = Path(directory) / "checkpoint.pt"
        self.on_report = on_report

    def restore(self) -> dict | None:
        return load_checkpoint(self.path) if self.path.exists() else None

    def report(self, metrics: dict, state: dict | None = None) -> None:
        if state is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(state, self.path)
        if self.on_report is not None:
            self.on_report(metrics)


@torch.no_grad()
def evaluate(method: Method, pipeline: BatchPipeline, autocast, flip: int | None = None,
             prefix: str = "test", collective: Collective | None = None,
             per_image: bool = False) -> dict[str, float] | tuple[dict[str, float], torch.Tensor]:
    """Top-1 of every head (`<prefix>/acc/<head>`) and of the primary head (`<prefix>/acc`), counted
    over the whole test set (each worker's share, summed). `flip`: test on images flipped along dim -1
    (horizontal) or -2 (vertical), the MKSMT robustness test. With `per_image`, also the primary head's
    correctness on every test image, in test-set order (the tables' McNemar test over images uses it)."""
    method.eval()
    correct: dict[str, int] = {}
    hits: list[torch.Tensor] = []
    total = 0
    for images, labels, *_ in pipeline.batches():
        if flip is not None:
            images = images.flip(flip)
        with autocast():
            heads = method.predict(images)
        for name, logits in heads.items():
            right = logits.argmax(1) == labels
            correct[name] = correct.get(name, 0) + int(right.sum())
            if per_image and name == method.primary_head:
                hits.append(right.cpu())
        total += len(labels)
    distributed = collective is not None and collective.world_size > 1
    if distributed:
        names = sorted(set(correct) | set(method.heads))  # the same keys on every worker, even one with no images
        counts = torch.tensor([correct.get(n, 0) for n in names] + [total], dtype=torch.float64,
                              device=next(method.parameters()).device)
        counts = collective.sum(counts).tolist()
        correct, total = dict(zip(names, counts[:-1])), counts[-1]
    metrics = {f"{prefix}/acc/{name}": c / total for name, c in correct.items()}
    metrics[f"{prefix}/acc"] = metrics[f"{prefix}/acc/{method.primary_head}"]
    if not per_image:
        return metrics
    n = len(pipeline.labels)  # this worker saw images rank, rank + W, ...: put them in their places
    full = torch.zeros(n, dtype=torch.float64, device=next(method.parameters()).device)
    if hits:
        full[torch.arange(pipeline.rank, n, pipeline.world_size)] = torch.cat(hits).to(full)
    if distributed:
        full = collective.sum(full)
    return metrics, full.bool().cpu()


def set_threads(threads: int) -> None:
    """torch's intra-op and inter-op threads = the CPUs reserved for this process, so trials packed on a node
    never oversubscribe it. The inter-op pool can be sized once per process (before its first parallel work):
    a reused worker process that already has another size keeps it, and says so."""
    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:
            print(f"warning: torch's inter-op threads stay {torch.get_num_interop_threads()} in this process "
                  f"(set before this trial; asked for {threads})", flush=True)


def run_environment() -> dict:
    """What a row records of the machine it trained on: the CPU (model, torch's kernel capability, bf16 units),
    the threads torch used and the process's priority (niceness: Ray's default of 15 loses the CPU to any other
    process; a local run starts its workers at the driver's)."""
    info = precisions.cpu_info()
    return {"cpu_model": info["cpu_model"], "cpu_capability": info["cpu_capability"], "cpu_bf16": info["cpu_bf16"],
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "niceness": os.nice(0)}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_trial(config: TrialConfig | dict, imageset: ImageSet, io: TrialIO | None = None,
              collective: Collective | None = None, threads: int | None = None) -> dict:
    """Train and evaluate one trial on this worker; returns the final metrics (last epoch's, totals,
    and `history`: per epoch). Every worker of a trial calls it with the same config."""
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    io = io or TrialIO()
    collective = collective or Collective()
    world = collective.world_size
    if threads:
        set_threads(threads)
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.parse(config)
    train, seed = cfg.train, cfg.seed
    held_out = None
    if cfg.validation is not None:  # a search trial: the rest of the training split, scored on its held-out part
        imageset, held_out = carve_validation(imageset, cfg.validation.fraction, cfg.validation.seed)  # test sealed
    scored, prefix = (held_out, "val") if held_out is not None else (imageset.test, "test")
    device = pick_device(train.device)
    precision = precisions.resolve(train.precision, device)
    warning = precisions.emulation_warning(precision, device)
    if warning and collective.is_primary:
        print(f"warning: {warning}", flush=True)
    seed_everything(seed)
    method = build_method(cfg, imageset.num_classes)
    if world > 1 and train.sync_bn:
        method = sync_batchnorm(method)
    method = method.to(device, memory_format=torch.channels_last if train.channels_last else torch.contiguous_format)
    optimizer = build_optimizer(method, train)
    # Autocast in the precision chosen for this device (harness.engine.precision): bf16 where it is native, fp32
    # elsewhere unless the study says otherwise; fp16 needs a gradient scaler, bf16 does not.
    def autocast():
        return precisions.autocast(device.type, precision)

    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    steps = OptimizerSteps(optimizer, set_to_none=method.zero_grad_set_to_none, grad_clip=train.grad_clip,
                           collective=collective, scaler=scaler)

    mean, std = NORMALIZATIONS[train.normalize]
    shard = {"rank": collective.rank, "world_size": world, "device": device, "mean": mean, "std": std,
             "channels_last": train.channels_last}
    boxes = None
    if method.uses_boxes:
        boxes = target_boxes(imageset, "train")
        if boxes is None:
            raise ValueError(f"method {cfg.method.name} trains on the dataset's target boxes, and "
                             f"{cfg.dataset.name} has none (synthfg's parts, CUB's bounding boxes); turn the "
                             "option that needs them off or use such a dataset")
    train_pipe = BatchPipeline(imageset.train, train.image_size, train.batch_size, train=True,
                               padding=train.crop_padding, hflip=train.hflip, colour_jitter=train.colour_jitter,
                               random_scale=train.random_scale, boxes=boxes, **shard)
    eval_batch = train.eval_batch_size or 2 * train.batch_size
    test_pipe = BatchPipeline(scored, train.image_size, max(1, eval_batch // world), train=False, **shard)
    if len(train_pipe) == 0:
        raise ValueError(f"the training split has {len(imageset.train)} images, fewer than one batch of "
                         f"train.batch_size={train.batch_size}: nothing would be trained; lower train.batch_size")

    start_epoch, history, train_time, images_seen, train_cpu = 0, [], 0.0, 0, 0.0
    # A search trial says in every epoch's report which validation images scored it, and that the test split was
    # sealed: a trial its scheduler stops early has no final record (not kept in `history`: it is per trial).
    split_record = validation_record(held_out, len(imageset.train) + len(held_out)) if held_out is not None else {}
    last_correct = None
    state = io.restore()
    if state is not None:
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        train_time, images_seen, steps.count = state["train_time"], state["images_seen"], state["steps"]
        train_cpu = state.get("train_cpu", 0.0)
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        # With PyTorch 1.x zero_grad semantics a parameter that once had a gradient keeps a zero-filled
        # one, and SGD keeps applying momentum to it: restore that, or the resumed run would differ.
        with_grad = set(state["params_with_grad"])
        for i, p in enumerate(method.parameters()):
            if i in with_grad:
                p.grad = torch.zeros_like(p)
    if train.compile:
        method.compile()  # in place: state-dict keys and the checkpoint format stay as they are

    per_epoch = len(train_pipe) if train.max_train_batches is None else min(len(train_pipe), train.max_train_batches)
    probe = ReferenceProbe(device, precision, per_epoch * (train.epochs - start_epoch)) \
        if train.reference_workload and start_epoch < train.epochs else None
    n_params = sum(p.numel() for p in method.parameters())
    metrics: dict = history[-1] if history else {}
    start_time, eval_time = time.perf_counter() - wall_start, 0.0  # what the trial spends before its first batch
    for epoch in range(start_epoch, train.epochs):
        factor = lr_factor(train, epoch)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        method.train()
        data_generator = epoch_generator(seed, epoch, DATA_STREAM)
        method_generator = epoch_generator(seed, epoch, METHOD_STREAM)
        sums: dict[str, float] = {}
        batches, t0 = 0, time.perf_counter()
        probe_spent, mark, cpu_mark = (probe.spent if probe else 0.0), t0, time.process_time()
        for images, labels, *rest in train_pipe.batches(data_generator, train.max_train_batches):
            with autocast():
                losses = method.training_step(images, labels, steps, method_generator,
                                              **({"boxes": rest[0]} if rest else {}))
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            batches += 1
            now, cpu_now = time.perf_counter(), time.process_time()
            train_cpu += cpu_now - cpu_mark
            if probe:  # a reference step every few batches, timed between them (harness.engine.reference)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    now = time.perf_counter()
                probe.batch_done(train.batch_size, now - mark)
                now, cpu_now = time.perf_counter(), time.process_time()
            mark, cpu_mark = now, cpu_now
        if world > 1:
            sums = _average(sums, collective, device)
            collective.average_buffers(method)  # BatchNorm statistics, centres: one model on every rank
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_time = time.perf_counter() - t0 - ((probe.spent - probe_spent) if probe else 0.0)
        epoch_images = batches * train.batch_size  # global: every worker trains on its slice of each batch
        train_time += epoch_time
        images_seen += epoch_images
        metrics = {"epoch": epoch + 1, **{f"train/{k}": v / max(batches, 1) for k, v in sums.items()},
                   "lr": optimizer.param_groups[0]["lr"], "train/images_per_s": epoch_images / max(epoch_time, 1e-9),
                   "train/epoch_time_s": epoch_time}
        if held_out is not None:  # a search trial ASHA may stop after any epoch: its cost so far, in every epoch
            metrics.update({"cpu_time_s": time.process_time() - cpu_start,
                            "wall_time_s": time.perf_counter() - wall_start})
        t0 = time.perf_counter()
        if epoch + 1 == train.epochs and held_out is None:  # the last test also keeps each test image's outcome
            scores, last_correct = evaluate(method, test_pipe, autocast, collective=collective, per_image=True)
            metrics.update(scores)
        elif train.evaluates(epoch + 1) or held_out is not None:  # ASHA reads every search epoch
            metrics.update(evaluate(method, test_pipe, autocast, prefix=prefix, collective=collective))
        eval_time += time.perf_counter() - t0
        history.append(metrics)
        checkpoint = None
        if collective.is_primary:
            checkpoint = {"model": method.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                          "history": history, "train_time": train_time, "images_seen": images_seen,
                          "train_cpu": train_cpu,
                          "steps": steps.count,
                          "params_with_grad": [i for i, p in enumerate(method.parameters()) if p.grad is not None],
                          **({"scaler": scaler.state_dict()} if scaler else {})}
        io.report({**metrics, **split_record}, checkpoint)

    final = dict(metrics)
    t0 = time.perf_counter()
    if held_out is not None:  # a search trial: its validation scores and which images those were; no test
        if "val/acc" not in final:  # resumed after the last epoch
            final.update(evaluate(method, test_pipe, autocast, prefix="val", collective=collective))
        final.update(best_epochs(history, prefix="val"))
        final.update(split_record)
    else:
        final.update(_test_record(method, imageset, cfg, test_pipe, autocast, collective, last_correct, history,
                                  shard, device, mean, std))
    record_time = time.perf_counter() - t0  # the test record: flips, localisation, maps (each also on its own)
    final.update(inference_complexity(method, train.image_size, device))
    final.update(method.extra_metrics())
    if probe:  # interleaved with the training: a load that comes and goes weighs on both alike
        final.update(probe.result())
    final.update({"train/images_per_s": images_seen / max(train_time, 1e-9), "train/time_s": train_time,
                  # CPU seconds per training image (this process's threads, the training batches only): what the
                  # work costs, which another process's load moves little (a sleep, though, does not show in it)
                  "train/cpu_s_per_image": train_cpu / max(images_seen, 1),
                  "wall_time_s": time.perf_counter() - wall_start, "optimizer_steps": steps.count,
                  # where the trial's time went (this run of it; a resumed trial's earlier epochs are not in it):
                  # before the first batch, training, the epochs' evaluations, the final test record
                  "time/start_s": start_time, "time/train_s": sum(h["train/epoch_time_s"] for h in history
                                                                   if h["epoch"] > start_epoch),
                  "time/eval_s": eval_time, "time/record_s": record_time,
                  # CPU seconds of this process (all its threads): the trial's cost, whatever else loads the machine
                  "cpu_time_s": time.process_time() - cpu_start,
                  "params": n_params, "device": device.type, "device_name": device_name(device),
                  "precision": precision, "precision_requested": train.precision, **run_environment(),
                  "world_size": world, "num_classes": imageset.num_classes, "heads": ",".join(method.heads),
                  "resumed_from_epoch": start_epoch, "history": history})
    return final


def _test_record(method: Method, imageset: ImageSet, cfg: TrialConfig, test_pipe: BatchPipeline, autocast,
                 collective: Collective, last_correct, history: list[dict], shard: dict, device: torch.device,
                 mean: tuple, std: tuple) -> dict:
    """What a table cell records of the test split: each image's outcome, the set's hash, flips, best epochs,
    localisation and the report's maps."""
    train, world = cfg.train, collective.world_size
    eval_batch = train.eval_batch_size or 2 * train.batch_size
    final: dict = {}
    if last_correct is None:  # resumed after the last epoch: evaluate it again for the per-image outcome
        final.update((scores := evaluate(method, test_pipe, autocast, collective=collective, per_image=True))[0])
        last_correct = scores[1]
    final["test/correct"] = pack_correct(last_correct.numpy())
    final["test/set_hash"] = split_hash(imageset.test.labels, imageset.test.images)  # which images those are
    if train.eval_flips:
        final.update(evaluate(method, test_pipe, autocast, flip=-1, prefix="test_hflip", collective=collective))
        final.update(evaluate(method, test_pipe, autocast, flip=-2, prefix="test_vflip", collective=collective))
    final.update(best_epochs(history))
    test_boxes = target_boxes(imageset, "test")
    if test_boxes is not None:  # where the primary head looks, against the true discriminative region
        located = BatchPipeline(imageset.test, train.image_size, max(1, eval_batch // world), train=False,
                                boxes=test_boxes, **shard)
        t0 = time.perf_counter()
        final.update(localisation_scores(method, located, collective, autocast))  # in the trial's precision
        final["time/localisation_s"] = time.perf_counter() - t0
    if cfg.report.maps and collective.is_primary:
        t0 = time.perf_counter()
        final["maps"] = fixed_image_maps(method, imageset, train.image_size, cfg.report.maps, device, mean, std)
        final["time/maps_s"] = time.perf_counter() - t0
    return final


def validation_record(held_out, train_size: int) -> dict:
    """How a search trial's validation split was made and which images it holds (harness.data.imageset
    validation_rows): its size, the hash of its labels and images, and the held-out positions in the training
    split as a bitmask (harness.core.records.pack_correct), so the split can be checked against any other trial's."""
    members = np.zeros(train_size, dtype=bool)
    members[np.asarray(held_out.rows)] = True
    images = np.asarray(held_out.images)[np.asarray(held_out.rows)] if len(held_out) else held_out.images[:0]
    return {"val/images": len(held_out), "val/set_hash": split_hash(held_out.labels, images),
            "val/members": pack_correct(members), "test_split": "sealed"}


def fixed_image_maps(method: Method, imageset: ImageSet, size: int, count: int, device: torch.device,
                     mean: tuple, std: tuple) -> str:
    """The maps of harness.engine.explain on the first `count` test images (centre crops: the same for every trial
    of a study), packed for the trial's final result."""
    pipe = BatchPipeline(imageset.test, size, count, train=False, device=device, mean=mean, std=std)
    images, labels = next(pipe.batches(max_batches=1))[:2]
    o = (imageset.test.images.shape[-1] - size) // 2  # the centre crop the test pipeline takes
    shown = np.asarray(imageset.test.images[:len(labels), :, o:o + size, o:o + size])
    return pack_maps(shown, labels.cpu().numpy(), method_maps(method, images, labels))


def best_epochs(history: list[dict], prefix: str = "test") -> dict[str, float]:
    """The best evaluated epoch of the primary head (`best_epoch`, its accuracy `test/acc_best`) and every head's
    accuracy at that same epoch (`test/acc_best/<head>`, `best_epoch/<head>` = `best_epoch`), so one row's head
    columns all come from one model, as the PMG and WS-DAN authors report theirs (`test/acc` stays the last
    epoch's). Each head's own best over the epochs is kept apart: `test/acc_best_own/<head>` and
    `best_epoch_own/<head>`. Ties go to the earliest epoch. `prefix="val"`: the same of a search trial's validation
    scores."""
    evaluated = [h for h in history if f"{prefix}/acc" in h]
    if not evaluated:
        return {}
    best = max(evaluated, key=lambda h: (h[f"{prefix}/acc"], -h["epoch"]))
    out: dict[str, float] = {f"{prefix}/acc_best": best[f"{prefix}/acc"], "best_epoch": best["epoch"]}
    heads = sorted({k.removeprefix(f"{prefix}/acc/") for h in evaluated for k in h if k.startswith(f"{prefix}/acc/")})
    for head in heads:
        key = f"{prefix}/acc/{head}"
        if key in best:
            out[f"{prefix}/acc_best/{head}"], out[f"best_epoch/{head}"] = best[key], best["epoch"]
        own = max((h for h in evaluated if key in h), key=lambda h: (h[key], -h["epoch"]))
        out[f"{prefix}/acc_best_own/{head}"], out[f"best_epoch_own/{head}"] = own[key], own["epoch"]
    return out


def _average(values: dict[str, float], collective: Collective, device: torch.device) -> dict[str, float]:
    """The mean over the workers of each value (same keys on every worker)."""
    keys = sorted(values)
    totals = collective.sum(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)).tolist()
    return {k: v / collective.world_size for k, v in zip(keys, totals)}

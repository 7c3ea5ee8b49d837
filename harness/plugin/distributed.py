"""Data-parallel training for methods that own their optimizer steps, with torch.distributed only.

Methods call their own `self(...)` and take several optimizer steps per batch (PMG S+1, MKSMT one
to three), so wrapping them in DistributedDataParallel does not fit (DDP arms its gradient hooks
once per forward). Instead every update already passes through `OptimizerSteps.step`, and that is
where the workers meet: after backward and before the optimizer step, `average_gradients` averages
the gradients of all workers in a few flat buckets (not one collective per tensor). With one
process, `Collective()` does nothing and costs nothing.

What makes a W-worker trial equal to its one-worker twin (same global batch, same seed):
- each worker holds batch/W images of the global batch and averages gradients of its batch-mean
  losses: the mean of W local means is the global mean, so the update is the one-process update;
- `sync_batchnorm` makes BatchNorm use the statistics of the global batch (torch's SyncBatchNorm
  on CUDA; on CPU workers (gloo), where torch's refuses to run, the same math with one
  differentiable all-reduce of per-channel counts, sums and squared deviations per layer);
- a parameter that got no gradient on a step (PMG's early exit stops before the later stages) is
  treated identically everywhere: one small collective first tells every rank which parameters
  have a gradient on ANY rank; those get one (zero-filled where missing) and are averaged, the
  others keep none, so SGD skips them on every rank alike. Gradients that are all zero on every
  rank (zero-filled by PyTorch 1.x zero_grad semantics) are not sent: their average is zero;
- the loss enters that small collective too, so a divergence (NaN/inf) is seen by every rank at the
  same step and all of them stop, instead of one rank raising while the others wait forever;
- method state outside the parameters that a training step changes with per-image sums (WS-DAN's
  feature centres) is updated with `sum` over workers (`OptimizerSteps.sum_over_workers`), and
  every floating buffer (BatchNorm running statistics, centres) is averaged at the end of each
  epoch, so all ranks evaluate and checkpoint the same model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from harness.plugin.replica_batchnorm import replica_count

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size: few collectives, bounded extra memory


class Collective:
    """One process: every operation is the identity."""

    rank, world_size = 0, 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    def average_gradients(self, params: list[nn.Parameter], loss: torch.Tensor) -> float:
        """Average every parameter's gradient over the workers; returns the mean loss over them."""
        return float(loss.detach())

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the element-wise sum of `tensor` over the workers."""
        return tensor

    def average_buffers(self, module: nn.Module) -> None:
        """In place: every floating buffer of `module` becomes its mean over the workers."""


class ProcessGroupCollective(Collective):
    """The default torch.distributed process group (gloo on CPU, nccl on GPU), already initialised
    (Ray Train's TorchTrainer does that for its workers)."""

    def __init__(self, bucket_bytes: int = BUCKET_BYTES):
        if not dist.is_initialized():
            raise RuntimeError("ProcessGroupCollective needs torch.distributed.init_process_group first")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.bucket_bytes = bucket_bytes

    def average_gradients(self, params: list[nn.Parameter], loss: torch.Tensor) -> float:
        device = params[0].device
        n = len(params)
        # One small collective: per parameter, on how many ranks it has a gradient and on how many that
        # gradient is not all zero (PyTorch 1.x zero_grad semantics zero-fill the parameters a step does
        # not reach, e.g. the stages after PMG's early exit), and the loss.
        has = [p.grad is not None for p in params]
        nonzero = torch.stack([p.grad.detach().ne(0).any() if h else torch.zeros((), dtype=torch.bool, device=device)
                               for p, h in zip(params, has)]) if n else torch.zeros(0, dtype=torch.bool)
        flags = torch.cat([torch.tensor(has, dtype=torch.float64, device=device), nonzero.to(torch.float64),
                           loss.detach().reshape(1).to(device=device, dtype=torch.float64)])
        dist.all_reduce(flags)
        flags = flags.tolist()
        grads = []
        for p, on_any, nonzero_on_any in zip(params, flags[:n], flags[n:2 * n]):
            if on_any:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if nonzero_on_any:  # all zero everywhere: the average is zero, nothing to send
                    grads.append(p.grad)
        self._average_in_place(grads)
        return flags[-1] / self.world_size

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    def average_buffers(self, module: nn.Module) -> None:
        self._average_in_place([b for b in module.buffers() if b.is_floating_point()])

    def _average_in_place(self, tensors: list[torch.Tensor]) -> None:
        """Every tensor replaced by its mean over the workers: one collective per bucket of flattened tensors."""
        for bucket in _buckets(tensors, self.bucket_bytes):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat)
            flat.div_(self.world_size)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def _buckets(tensors: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of same-dtype tensors of at most `limit` bytes each (a bigger tensor alone)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if not buckets or buckets[-1][0].dtype != t.dtype or size + nbytes > limit:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += nbytes
    return buckets


# ----------------------------------------------------------------------------- synchronised BatchNorm

class _AllReduceSum(torch.autograd.Function):
    """y = sum over the workers of x; the gradient of each worker's x is the sum of the workers' dy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        dx = dy.clone()
        dist.all_reduce(dx, group=ctx.group)
        return dx, None


class GlooSyncBatchNorm(nn.SyncBatchNorm):
    """torch's SyncBatchNorm, plus the same math for CPU workers (gloo), which torch's refuses.

    On CPU, in training with several workers, each layer all-reduces (count, count x mean,
    squared deviations + count x mean^2) per channel in float64, once, through a differentiable
    all-reduce: its backward sums the gradients of the global statistics
    over the workers, which is exactly the one-process gradient split over them.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        sync = (self.training and input.device.type == "cpu" and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group or dist.group.WORLD) > 1)
        if not sync:
            return super().forward(input)
        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        c = input.size(1)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, c] + [1] * (input.dim() - 2)
        x = input if input.dtype == torch.float64 else input.float()  # bf16/fp16 under autocast: fp32 statistics
        n = x.numel() / c
        mean = x.mean(dims)  # (C,) local; squared deviations from the LOCAL mean keep precision
        m2 = ((x - mean.view(shape)) ** 2).sum(dims).double()
        mean64 = mean.double()
        local = torch.cat([n * mean64, m2 + n * mean64 * mean64, mean64.new_full((1,), n)])
        total = _AllReduceSum.apply(local, self.process_group or dist.group.WORLD)
        count = total[-1]
        global_mean = total[:c] / count
        var = (total[c:2 * c] / count - global_mean * global_mean).clamp(min=0)  # biased, as BN normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.mul_(1 - momentum).add_(momentum * global_mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - momentum).add_(
                    momentum * (var * count / (count - 1)).to(self.running_var.dtype))
        out = (x - global_mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def __getattr__(name: str):
    """GlooSyncBatchNormAct is made on first use (it subclasses timm's class, and importing timm costs seconds that
    a study's validation and a rerun do not need); once made it is an ordinary module attribute, found by name
    (pickle included)."""
    if name == "GlooSyncBatchNormAct":
        from timm.layers import SyncBatchNormAct

        cls = type("GlooSyncBatchNormAct", (SyncBatchNormAct, GlooSyncBatchNorm), {
            "__doc__": "timm's BatchNormAct2d, synchronised (MRO: timm's act/drop after GlooSyncBatchNorm's "
                       "normalisation).", "__module__": __name__, "__qualname__": "GlooSyncBatchNormAct"})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm (and timm BatchNormAct) of `module` becomes synchronised over the workers,
    keeping its parameters and running statistics (timm's conversion, then the CPU-capable classes)."""
    if replica_count(module) > 1:
        raise ValueError("BatchNorm per replica (PMG's method.bn_replicas) emulates per-GPU statistics in one "
                         "process, and train.sync_bn would make them global: with several workers set "
                         "train.sync_bn: false, or bn_replicas: 1")
    from timm.layers import SyncBatchNormAct, convert_sync_batchnorm

    module = convert_sync_batchnorm(module)
    for m in module.modules():
        if type(m) is SyncBatchNormAct:
            m.__class__ = __getattr__("GlooSyncBatchNormAct")
        elif type(m) is nn.SyncBatchNorm:
            m.__class__ = GlooSyncBatchNorm
    return module

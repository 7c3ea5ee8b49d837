"""BatchNorm as `torch.nn.DataParallel` over R GPUs computes it, in one process.

DataParallel scatters each batch into R slices (`torch.chunk`: ceil(B / R) images each, the last fewer), runs a
replica of the module on each, and gathers the outputs. Every BatchNorm in training mode therefore normalises
over its own slice ("ghost batches"), and only replica 0's running statistics survive the step: it works on the
module's own buffers (the broadcast leaves them in place on the first device), the others on copies that are
dropped. The gradients of the replicas are summed into the module's, which is what autograd gives for the
gathered outputs. So a network whose only cross-image operations are its BatchNorms computes, on one device,
exactly what DataParallel on R GPUs computes, when each BatchNorm normalises the R slices of its input apart
and updates its running statistics from the first slice alone. That is `per_replica_batchnorm`; in eval mode,
where BatchNorm uses its running statistics, nothing changes.

The PMG authors train through `DataParallel(net, device_ids=[0, 1])` with batch 16: BatchNorm over 8 images
per GPU (`methods/pmg.py`'s `bn_replicas: 2`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _PerReplica:
    """Mixed in before a BatchNorm class: training-mode forward over `replicas` slices of the batch."""

    replicas: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.replicas < 2:
            return super().forward(x)
        first, *rest = x.chunk(self.replicas)  # DataParallel's scatter
        out = [super().forward(first)]  # replica 0: the module's own running statistics
        tracked, self.track_running_stats = self.track_running_stats, False
        try:  # the other replicas normalise over their slices; their statistics would be dropped
            for part in rest:
                out.append(super().forward(part))
        finally:
            self.track_running_stats = tracked
        return torch.cat(out)


_CLASSES: dict[type, type] = {}


def _per_replica_class(cls: type) -> type:
    """The per-replica subclass of a BatchNorm class, made once and named in this module (so pickle finds it)."""
    if cls not in _CLASSES:
        name = f"PerReplica{cls.__name__}"
        _CLASSES[cls] = globals()[name] = type(name, (_PerReplica, cls), {"__module__": __name__, "__qualname__": name})
    return _CLASSES[cls]


for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):  # torch's, importable before any conversion
    _per_replica_class(_cls)


def per_replica_batchnorm(module: nn.Module, replicas: int) -> nn.Module:
    """In place: every BatchNorm of `module` (torch's and timm's BatchNormAct) normalises each of `replicas`
    slices of its training batch apart and keeps the first slice's running statistics. Parameters, buffers and
    state-dict keys stay as they are. Returns `module`."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    for m in module.modules():
        if isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            if not isinstance(m, _PerReplica):
                m.__class__ = _per_replica_class(type(m))
            m.replicas = replicas
    return module


def replica_count(module: nn.Module) -> int:
    """The largest `replicas` of the module's per-replica BatchNorms (1 when it has none)."""
    return max((m.replicas for m in module.modules() if isinstance(m, _PerReplica)), default=1)

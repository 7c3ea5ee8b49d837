"""Complexity of a method's inference model: the parameters `predict` touches and its FLOPs per image.

Training-only modules (e.g. a head used only for distillation) are not counted: parameters are
those of the modules that run during one `predict` call, found with forward hooks; FLOPs come from
torch's own FlopCounterMode (2 per multiply-accumulate of convolutions and matrix products; it does
not count element-wise work such as an attention gate's multiply) on one image at the test size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from harness.plugin.method import Method


@torch.no_grad()
def inference_complexity(method: Method, image_size: int, device: torch.device | str = "cpu") -> dict[str, float]:
    was_training = method.training
    method.eval()
    used: set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, args, out: used.add(id(mod))) for m in method.modules()]
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    try:
        with FlopCounterMode(display=False) as counter:
            method.predict(x)
    finally:
        for h in hooks:
            h.remove()
        method.train(was_training)
    params: dict[int, nn.Parameter] = {}
    for module in method.modules():
        # The method object's own direct parameters (not in a submodule) are training state, such
        # as learned class centres; what predict runs lives in submodules.
        if id(module) in used and module is not method:
            for p in module.parameters(recurse=False):
                params[id(p)] = p
    return {"inference/params": float(sum(p.numel() for p in params.values())),
            "inference/gflops": counter.get_total_flops() / 1e9}

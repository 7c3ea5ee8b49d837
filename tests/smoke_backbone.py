"""The smoke study's shared warm start: a backbone trained once on other images of the smoke study's classes.

    python -m tests.smoke_backbone [--out baselines/ci_smoke_backbone.v1.pth] [--epochs 8]

Why: from scratch, a few epochs leave some methods' cells on the steep part of their learning curves, where one
seed lags another by 10-30 points; a gate whose tolerance must cover that spread cannot see a 10-point regression.
Every smoke trial instead starts from this backbone (backbone.pretrained: the file), so each cell converges in a
few epochs to nearly the same accuracy whatever its seed, and the methods' own layers (heads, attention, APNs)
still train from their random init: a regression in any of them, or in the engine, still shows.

What it is: the smoke study's backbone (ResNet-18 at a quarter width, its stem to layer3) under the plain `baseline`
method (global pooling, one linear layer), trained in fp32 on synthfg with the smoke study's classes and image
settings but another dataset seed (`dataset.seed: 1`: other birds, other poses; the smoke study tests on seed 0's
test images, which this never sees). Saved as the state dict of the whole timm model (the pruned layer4 and the
classifier at their random init), the form `backbone.pretrained: PATH` loads. Deterministic: the same command gives
the same file on the same CPU kernels. Bump the file's version (and the study's path) when it changes: the path is
part of every smoke trial's identity.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

from harness.data import load_imageset
from harness.engine.loop import run_trial, set_threads
from harness.study.load import load_study
from harness.study.trials import TrialConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "baselines" / "ci_smoke_backbone.v1.pth"


def warm_start_config(epochs: int, per_class: int) -> dict:
    """The smoke study's baseline trial, on other images (dataset seed 1), with no warm start of its own."""
    smoke = load_study(ROOT / "studies" / "ci_smoke.yaml").study
    return {"method": {"name": "baseline"},
            "dataset": {**smoke.dataset.model_dump(), "seed": 1, "train_per_class": per_class, "test_per_class": 25},
            "backbone": {**smoke.backbone.model_dump(mode="json"), "pretrained": False},
            "train": {**smoke.train.model_dump(mode="json"), "epochs": epochs, "precision": "fp32",
                      "reference_workload": False, "timeout_s": None, "eval_every": 1},
            "seed": 0, "report": {"maps": 0}}


class _Keep:
    """A TrialIO that keeps the last epoch's state (the engine hands it the model's state dict)."""

    state: dict | None = None

    def restore(self):
        return None

    def report(self, metrics, state=None):
        if state is not None:
            self.state = state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.smoke_backbone", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--per-class", type=int, default=300, help="training images per class (dataset seed 1)")
    args = p.parse_args(argv)
    set_threads(torch.get_num_threads())
    cfg = TrialConfig.parse(warm_start_config(args.epochs, args.per_class))
    io = _Keep()
    final = run_trial(cfg, load_imageset(cfg.dataset, cfg.stored_size), io)
    print(f"warm start: {cfg.train.epochs} epochs on {args.per_class} images per class (dataset seed 1), "
          f"test/acc on its own test images {100 * final['test/acc']:.1f}%")
    body = {k.removeprefix("backbone.body."): v for k, v in io.state["model"].items() if k.startswith("backbone.body.")}
    full = timm.create_model(cfg.backbone.name, pretrained=False, **cfg.backbone.kwargs).state_dict()
    missing = [k for k in body if k not in full]
    if missing:
        raise SystemExit(f"backbone keys not in timm's {cfg.backbone.name}: {missing[:5]}")
    full.update(body)  # the stages the smoke study uses; layer4 and fc stay at timm's init (pruned there)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(full, args.out)
    print(f"wrote {args.out} ({len(body)} trained tensors of {len(full)}, {args.out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

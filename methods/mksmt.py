"""MKSMT: Multi-level Knowledge Self-distillation with Multi-step Training (Yu et al., 2023).

From the article (seeds/002; its figures and tables were lost, its text survives):
- a 4-stage backbone S1..S4 (Swin-L in the paper; any timm backbone: S1..S4 are its last 4 stages);
- an OPM (output processing module) per used stage maps its features to a K-dim vector, and an
  output layer maps K to the classes. Interpretation (the figure is lost): LayerNorm over channels
  -> global average pool -> Linear(C, K) -> BatchNorm1d(K) -> ELU; output layer Linear(K, classes);
- two-step training (default), per batch: step 1 runs S1..S3 only, CE on the S3 output, update;
  step 2 runs the whole network, loss = lambda1 CE(S4) + lambda2 KD(S3 <- S4) (no CE on S3), update;
- decision distillation (default): KD = T^2 KL(softmax(z4/T) || softmax(z3/T)), the deep head the
  teacher; feature distillation: MSE between the OPM outputs (ablation);
- ablations: single-step (one update on CE(S3) + lambda1 CE(S4) + lambda2 KD), three-step (update on
  CE(S2), then CE(S3), then lambda1 CE(S4) + lambda2 (KD(S2 <- S4) + KD(S3 <- S4))), sync/async
  step 2 (CE(S4) and KD in one backward, or as two updates, each on a fresh forward pass).

Interpretations, each a parameter with this default: the teacher is detached (`detach_teacher`);
K = 512 (`opm_dim`); the OPM form above. Heads: S4 (primary), S3, and S2 for three-step training.
`idle_param_updates`: the article ran PyTorch 1.6, whose zero_grad zero-fills gradients, so SGD's
momentum and weight decay also move the parameters a step does not reach (step 1 never reaches S4):
true reproduces that, as PMG's option does; false is PyTorch 2's set_to_none.

The backbone's last stage passes its own final norm (`backbone.final_norm`, on by default): timm's
features_only Swin drops the pretrained LayerNorm, and both the baseline and S4 would otherwise see
un-normalised stage-4 features.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from harness.plugin.backbones import StagedBackbone
from harness.plugin.method import Method, MethodParams, OptimizerSteps, register_method


class MKSMTParams(MethodParams):
    steps: Literal[1, 2, 3] = Field(2, description="optimizer updates per batch: single-, two- or three-step")
    distillation: Literal["decision", "feature", "none"] = Field("decision", description="what S4 teaches")
    temperature: float = Field(1.0, gt=0.0, description="distillation temperature T (paper's best: 1)")
    execution: Literal["sync", "async"] = Field("sync", description="step 2: CE(S4) and KD in one backward or two")
    lambda1: float = Field(1.0, ge=0.0, description="weight of CE(S4) in the last step")
    lambda2: float = Field(1.0, ge=0.0, description="weight of the distillation loss")
    detach_teacher: bool = Field(True, description="no gradient through the teacher (deep) head")
    opm_dim: int = Field(512, ge=1, description="K, the OPM output width")
    idle_param_updates: bool = Field(True, description="PyTorch 1.x zero_grad semantics, as the article ran (1.6)")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                      kind: str = "decision", detach_teacher: bool = True) -> torch.Tensor:
    """Decision: T^2 KL(softmax(teacher/T) || softmax(student/T)), batch mean. Feature: MSE(student, teacher)."""
    if detach_teacher:
        teacher = teacher.detach()
    if kind == "feature":
        return F.mse_loss(student, teacher)
    if kind != "decision":
        raise ValueError(f"distillation kind must be decision or feature, got {kind!r}")
    t = temperature
    log_p_student = F.log_softmax(student / t, dim=1)
    log_p_teacher = F.log_softmax(teacher / t, dim=1)
    return t * t * F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


class OPM(nn.Module):
    """LayerNorm (channels) -> global average pool -> Linear(C, K) -> BatchNorm1d(K) -> ELU."""

    def __init__(self, channels: int, k: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.proj = nn.Sequential(nn.Linear(channels, k), nn.BatchNorm1d(k), nn.ELU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K)
        return self.proj(self.norm(x.permute(0, 2, 3, 1)).mean((1, 2)))


@register_method("mksmt")
class MKSMT(Method):
    Params = MKSMTParams

    @classmethod
    def head_names(cls, params: MKSMTParams, num_stages: int) -> tuple[str, ...]:
        return ("S4", "S3", "S2") if params.steps == 3 else ("S4", "S3")

    @classmethod
    def relative_cost(cls, params: MKSMTParams) -> float:
        return float(params.steps)  # one to three updates per batch

    def __init__(self, backbone: StagedBackbone, num_classes: int, params: MKSMTParams):
        super().__init__(backbone, num_classes, params)
        last = backbone.num_stages - 1
        # Paper stage name -> backbone stage index: S4 is the last stage, S3 the one before, ...
        names = ["S2", "S3", "S4"] if params.steps == 3 else ["S3", "S4"]
        self.stage_of = {name: last - (4 - int(name[1])) for name in names}
        self.opms = nn.ModuleDict({n: OPM(backbone.channels[i], params.opm_dim) for n, i in self.stage_of.items()})
        self.outputs = nn.ModuleDict({n: nn.Linear(params.opm_dim, num_classes) for n in names})
        self.zero_grad_set_to_none = not params.idle_param_updates

    @classmethod
    def validate_with(cls, params: MKSMTParams, num_stages: int) -> None:
        if num_stages < 4:
            raise ValueError(f"MKSMT needs a backbone with 4 stages (S1..S4); this one has {num_stages}")

    def forward(self, images: torch.Tensor, upto: str = "S4") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{head: (OPM vector, logits)} for the heads up to `upto`; the backbone stops at that stage."""
        feats = self.backbone(images, upto=self.stage_of[upto])
        out = {}
        for name, stage in self.stage_of.items():
            if stage <= self.stage_of[upto]:
                vector = self.opms[name](feats[stage])
                out[name] = (vector, self.outputs[name](vector))
        return out

    def _kd(self, student: tuple[torch.Tensor, torch.Tensor],
            teacher: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        p = self.params
        index = 0 if p.distillation == "feature" else 1  # OPM vectors or logits
        return distillation_loss(student[index], teacher[index], p.temperature, p.distillation, p.detach_teacher)

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, steps: OptimizerSteps,
                      generator: torch.Generator | None = None) -> dict[str, float]:
        p, losses = self.params, {}
        students = [n for n in self.stage_of if n != "S4"]
        if p.steps >= 2:
            # Shallow steps first: each trains the network up to its stage on that stage's CE alone.
            for name in students:
                logits = self(images, upto=name)[name][1]
                losses[f"loss/{name}"] = steps.step(F.cross_entropy(logits, labels))
        out = self(images)
        ce4 = p.lambda1 * F.cross_entropy(out["S4"][1], labels)
        kd = sum(self._kd(out[n], out["S4"]) for n in students) if p.distillation != "none" else None
        if p.steps == 1:
            ce_students = sum(F.cross_entropy(out[n][1], labels) for n in students)
            losses["loss/S3"] = float(ce_students.detach())
            total = ce4 + ce_students + (p.lambda2 * kd if kd is not None else 0)
            losses["loss/last_step"] = steps.step(total)
        elif kd is None or p.execution == "sync":
            losses["loss/last_step"] = steps.step(ce4 + (p.lambda2 * kd if kd is not None else 0))
        else:  # async: CE(S4) update, then a fresh forward for the distillation update
            losses["loss/last_step"] = steps.step(ce4)
            out = self(images)
            kd = sum(self._kd(out[n], out["S4"]) for n in students)
            losses["loss/kd_step"] = steps.step(p.lambda2 * kd)
        losses["loss/S4"] = float(ce4.detach()) / max(p.lambda1, 1e-12)
        if kd is not None:
            losses["loss/kd"] = float(kd.detach())
        losses["loss"] = sum(v for k, v in losses.items() if k in ("loss/last_step", "loss/kd_step")
                             or (k.startswith("loss/S") and k != "loss/S4" and p.steps >= 2))
        return losses

    def explain_targets(self) -> list[tuple[str, int, str]]:
        return [(f"gradcam {name}", self.stage_of[name], name) for name in self.heads]

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self(images)
        return {name: out[name][1] for name in self.heads}

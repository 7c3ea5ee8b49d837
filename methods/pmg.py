"""PMG: Progressive Multi-Granularity training of jigsaw patches (Du et al., ECCV 2020).

Faithful to the paper and the authors' code (PRIS-CV/PMG-Progressive-Multi-Granularity-Training):
- on each of the last S backbone stages, a conv block (BasicConv 1x1 C_l -> feature_size, BasicConv
  3x3 feature_size -> stage_dim; BasicConv = Conv(bias=False) -> BN(eps 1e-5, momentum 0.01) ->
  ReLU), global max pooling (adaptive: the authors hard-code the kernel for 448 px), and a
  classifier BN1d -> Linear(stage_dim, feature_size) -> BN1d -> ELU -> Linear(feature_size, C);
  a concat classifier of the same form on the S pooled vectors;
- per batch S+1 optimizer steps, each zero_grad/forward/backward/step: step k (shallowest used
  stage first) feeds jigsaw(images, n_k), n = 2^(L-l+1) for stage l, and takes alpha * CE on that
  stage's classifier; the last step feeds the original images and takes beta * CE on the concat
  classifier. Without jigsaw every step feeds the original images;
- SGD with the backbone at 0.1x the new layers' learning rate (the engine applies the cosine
  schedule to both groups);
- two accuracies at test time: the concat head (C1) and "combined", the argmax of the sum of the
  S stage logits and the concat logits (C2, the primary head).

Interpretations, each a parameter with the authors' behaviour as default:
- `idle_param_updates`: the authors ran PyTorch 1.x, whose zero_grad zero-fills gradients; so
  at every step SGD's momentum and weight decay also move the parameters the step's loss does not
  reach. True reproduces that; False skips them (PyTorch 2 default, set_to_none).
- `early_exit`: a step that trains stage l runs the backbone only up to stage l (and the heads of
  stages up to l). Its loss and every gradient are exactly those of the full pass (the deeper
  layers do not influence a shallower stage's output); the one difference is that BatchNorm
  running statistics of the stages after l, of their heads and of the concat head are not updated
  on that step's jigsaw input. Off in the paper profile.
- `bn_replicas`: the authors train through `DataParallel(net, device_ids=[0, 1])` with batch 16, so
  every BatchNorm (backbone and heads) normalises over the 8 images of its GPU, and the running
  statistics are those of the first GPU's 8 (harness/replica_batchnorm.py). `bn_replicas: 2` computes
  that on one device: each BatchNorm normalises the two halves of its batch apart and keeps the first
  half's statistics; the gradients are the two replicas' summed, as DataParallel's. Default 1: BatchNorm
  over the whole batch. On in the paper profile. (With two workers, `train.sync_bn: false` and
  `bn_replicas: 1` normalise per worker too, but the workers' running statistics are averaged.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from harness.plugin.backbones import StagedBackbone
from harness.plugin.method import Method, MethodParams, OptimizerSteps, register_method
from harness.plugin.replica_batchnorm import per_replica_batchnorm


class PMGParams(MethodParams):
    stages: int = Field(3, ge=1, le=5, description="S: number of last backbone stages trained progressively")
    jigsaw: bool = Field(True, description="feed jigsaw-shuffled images to the stage steps")
    jigsaw_n: list[int] | None = Field(None, description="n per stage step, shallowest first "
                                                         "(default 2^(L-l+1): 8, 4, 2 for S=3 of L=5)")
    per_image_permutation: bool = Field(False, description="one permutation per image instead of per batch")
    alpha: float = Field(1.0, ge=0.0, description="weight of each stage step's CE")
    beta: float = Field(2.0, ge=0.0, description="weight of the concat step's CE")
    feature_size: int = Field(512, ge=1, description="conv block mid width and classifier hidden width")
    stage_dim: int = Field(1024, ge=1, description="conv block output width (authors: 2048 // 2)")
    backbone_lr_scale: float = Field(0.1, gt=0.0, le=1000.0, description="backbone lr = train.lr x this "
                                                                        "(the authors': 0.1)")
    early_exit: bool = Field(False, description="run the backbone only up to the trained stage in stage steps")
    idle_param_updates: bool = Field(True, description="PyTorch 1.x zero_grad semantics, as the authors ran")
    bn_replicas: int = Field(1, ge=1, le=64, description="BatchNorm over this many slices of each batch, running "
                                                         "statistics from the first (the authors' 2 GPUs: 2)")

    @model_validator(mode="after")
    def _check_n(self) -> "PMGParams":
        if self.jigsaw_n is not None:
            if len(self.jigsaw_n) != self.stages:
                raise ValueError(f"jigsaw_n needs one n per stage step: {self.stages} values for stages={self.stages}, "
                                 f"got {len(self.jigsaw_n)}")
            if any(n < 1 for n in self.jigsaw_n):
                raise ValueError("jigsaw_n values must be >= 1")
        return self


def swap_chain_permutation(order: list[int]) -> list[int]:
    """The block permutation the authors' loop produces from a shuffled block order.

    Their loop swaps block 0 with block order[i] for i = 0..n^2-1, in place. Returns src with
    output block p = input block src[p] (block index = row * n + col). The result is one n^2-cycle.
    """
    src = list(range(len(order)))
    for p in order:
        src[0], src[p] = src[p], src[0]
    return src


def jigsaw(images: torch.Tensor, n: int, generator: torch.Generator | None = None,
           per_image: bool = False) -> torch.Tensor:
    """P(d, n): split each image into n x n equal blocks and shuffle them.

    Draws a random block order like the authors' `random.shuffle` and applies the permutation their
    block-swap loop would produce, writing each output block once straight from its source block
    (one read and one write of the batch, the floor of a memory-bound op) instead of n^2 swaps of
    cloned blocks. One permutation per call (the authors'), or one per image with `per_image`.
    Returns a new tensor; the input is not modified.
    """
    b, c, h, w = images.shape
    if h % n or w % n:
        raise ValueError(f"jigsaw: image size {h}x{w} is not divisible by n={n}; choose image_size a multiple of {n}")
    bh, bw, k = h // n, w // n, n * n
    if per_image:
        src = torch.tensor([swap_chain_permutation(torch.randperm(k, generator=generator).tolist())
                            for _ in range(b)], device=images.device)  # (B, n*n)
        blocks = images.reshape(b, c, n, bh, n, bw).permute(0, 2, 4, 1, 3, 5).reshape(b, k, c, bh, bw)
        shuffled = blocks[torch.arange(b, device=images.device)[:, None], src]  # (B, n*n, C, bh, bw)
        return shuffled.reshape(b, n, n, c, bh, bw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    src = swap_chain_permutation(torch.randperm(k, generator=generator).tolist())
    out = torch.empty_like(images)
    for dst, s in enumerate(src):  # n^2 strided copies of (B, C, bh, bw)
        (di, dj), (si, sj) = divmod(dst, n), divmod(s, n)
        out[:, :, di * bh:(di + 1) * bh, dj * bw:(dj + 1) * bw] = images[:, :, si * bh:(si + 1) * bh,
                                                                         sj * bw:(sj + 1) * bw]
    return out


class BasicConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, padding: int = 0):
        super().__init__(nn.Conv2d(cin, cout, kernel, padding=padding, bias=False),
                         nn.BatchNorm2d(cout, eps=1e-5, momentum=0.01, affine=True), nn.ReLU())


def classifier(cin: int, hidden: int, classes: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm1d(cin), nn.Linear(cin, hidden), nn.BatchNorm1d(hidden), nn.ELU(inplace=True),
                         nn.Linear(hidden, classes))


@register_method("pmg")
class PMG(Method):
    Params = PMGParams

    @classmethod
    def head_names(cls, params: PMGParams, num_stages: int) -> tuple[str, ...]:
        """combined (C2, the primary), concat (C1), and each used stage's classifier."""
        used = range(num_stages - params.stages, num_stages)
        return ("combined", "concat", *(f"stage{i + 1}" for i in used))

    def __init__(self, backbone: StagedBackbone, num_classes: int, params: PMGParams):
        super().__init__(backbone, num_classes, params)
        L, S = backbone.num_stages, params.stages
        self.used = list(range(L - S, L))  # 0-based backbone stages, shallowest first
        self.n_per_step = params.jigsaw_n or [2 ** (L - i) for i in self.used]  # 2^(L-l+1) with l = i + 1
        fs, sd = params.feature_size, params.stage_dim
        self.conv_blocks = nn.ModuleList(
            nn.Sequential(BasicConv(backbone.channels[i], fs, 1), BasicConv(fs, sd, 3, padding=1),
                          nn.AdaptiveMaxPool2d(1), nn.Flatten()) for i in self.used)
        self.classifiers = nn.ModuleList(classifier(sd, fs, num_classes) for _ in self.used)
        self.concat_classifier = classifier(S * sd, fs, num_classes)
        self.zero_grad_set_to_none = not params.idle_param_updates
        if params.bn_replicas > 1:  # every BatchNorm, the backbone's and the heads', as DataParallel's replicas
            per_replica_batchnorm(self, params.bn_replicas)

    @classmethod
    def validate_with(cls, params: PMGParams, num_stages: int) -> None:
        if params.stages > num_stages:
            raise ValueError(f"method.stages={params.stages} but the backbone has {num_stages} stages; "
                             f"choose 1 <= stages <= {num_stages}")

    @classmethod
    def relative_cost(cls, params: PMGParams) -> float:
        return params.stages + 1  # S stage steps + the concat step (early exit makes the stage steps cheaper)

    def forward(self, images: torch.Tensor, upto_step: int | None = None) -> list[torch.Tensor]:
        """Logits [y_1, ..., y_S, y_concat]. With `upto_step=k` (early exit) only y_1..y_k are computed."""
        k = len(self.used) if upto_step is None else upto_step + 1
        feats = self.backbone(images, upto=self.used[k - 1] if upto_step is not None else None)
        vectors = [self.conv_blocks[j](feats[i]) for j, i in enumerate(self.used[:k])]  # S x (B, stage_dim)
        logits = [self.classifiers[j](v) for j, v in enumerate(vectors)]
        if upto_step is None:
            logits.append(self.concat_classifier(torch.cat(vectors, 1)))
        return logits

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, steps: OptimizerSteps,
                      generator: torch.Generator | None = None) -> dict[str, float]:
        p, losses = self.params, {}
        # S stage steps + 1 concat step = S+1 forward/backward/step cycles per batch.
        for k, n in enumerate(self.n_per_step):
            x = jigsaw(images, n, generator, p.per_image_permutation) if p.jigsaw else images
            logits = self(x, upto_step=k if p.early_exit else None)[k]
            losses[f"loss/stage{self.used[k] + 1}"] = steps.step(p.alpha * F.cross_entropy(logits, labels))
        concat = self(images)[-1]
        losses["loss/concat"] = steps.step(p.beta * F.cross_entropy(concat, labels))
        losses["loss"] = sum(losses.values())
        return losses

    def explain_targets(self) -> list[tuple[str, int, str]]:
        """Grad-CAM of the combined prediction on the last stage, then of every stage's own head on its stage."""
        return [("gradcam combined", -1, "combined"), *((f"gradcam stage{i + 1}", i, f"stage{i + 1}")
                                                       for i in self.used)]

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self(images)  # [y_1, ..., y_S, y_concat]
        out = {"combined": torch.stack(logits).sum(0), "concat": logits[-1]}
        out.update((f"stage{i + 1}", y) for i, y in zip(self.used, logits))
        return out

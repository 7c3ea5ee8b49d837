"""Backbones: timm models with multi-stage feature maps, and early exit.

Every method depends on one contract: `StagedBackbone(images, upto=l)` returns the feature maps of
stages 0..l (timm's `features_only=True` stages, e.g. for a ResNet: stem, layer1..layer4), and
`channels` gives their channel counts. Methods address stages by index from the last.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field, model_validator
from torch import nn

from harness.core.schema import ConfigModel


class BackboneConfig(ConfigModel):
    """Strict (harness.core.schema): unknown keys, inf/NaN and loosely typed ints or bools are errors."""

    name: str = Field("resnet18", description="any timm model that supports features_only; with pretrained "
                                              "weights, name them: resnet50.tv_in1k, not resnet50")
    pretrained: bool | str = Field(False, description="false: random init; true: the hub weights of the tagged "
                                                       "name; synthfg-in: trained on synthfg's source domain, "
                                                       "built once per machine (harness.plugin.pretrained); a path: "
                                                       "weights from that local file")
    out_indices: list[int] | None = Field(None, description="timm feature stages to expose (default: all)")
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    stem_pooled: bool = Field(False, description="the first stage is the stem after its max pool (stride 4, "
                                                 "the PMG authors' ResNet stage 1) instead of timm's before it")
    final_norm: bool = Field(True, description="the last stage passes the model's own final norm (a Swin's "
                                               "LayerNorm, which timm's features_only drops)")
    kwargs: dict = Field(default_factory=dict, description="extra timm.create_model arguments, e.g. "
                                                           "{img_size: 64, window_size: 2} for a small Swin")

    @model_validator(mode="after")
    def _weights_are_named(self) -> "BackboneConfig":
        from harness.plugin.pretrained import is_named_source, resolve_pin

        if is_named_source(self.pretrained):  # pinned to this machine's build: its hash enters trial identities
            self.pretrained = resolve_pin(self.name, self.kwargs, self.pretrained)
        if self.pretrained is True:
            from harness.plugin.weights import untagged_weights_error

            problem = untagged_weights_error(self.name)
            if problem:
                raise ValueError(problem)
        return self


def _final_norm(model: nn.Module) -> bool:
    """Whether a timm model has a final norm that its intermediate-feature API can apply to the last stage."""
    norm = getattr(model, "norm", None)
    return hasattr(model, "forward_intermediates") and isinstance(norm, nn.Module) and \
        any(True for _ in norm.parameters())


class StagedBackbone(nn.Module):
    """A timm `features_only` network that can stop after any stage (early exit).

    Early exit runs the modules in order and returns as soon as the requested stage's output is
    taken, so the stages after it cost nothing: forward output and gradients are identical to the
    full pass for everything computed, but the later stages' BatchNorm running statistics are not
    updated on that pass.

    A model with a final norm after its last stage (Swin, ViT-like: timm's features_only prunes it)
    is wrapped with timm's FeatureGetterNet(norm=True) when `final_norm` is on, so the last stage is
    what the pretrained network's head saw (as timm's `forward_features`); such models have no early exit.
    """

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        import timm  # here, not at the top: a study's validation and a rerun need no timm

        kwargs: dict = {}
        if cfg.drop_path_rate:
            kwargs["drop_path_rate"] = cfg.drop_path_rate
        kwargs.update(cfg.kwargs)
        pretrained = cfg.pretrained
        from harness.plugin.pretrained import is_named_source, weights_file

        if is_named_source(pretrained):  # built on this node if it lacks it; refused if its build differs
            kwargs["pretrained_cfg_overlay"] = {"file": str(weights_file(cfg.name, cfg.kwargs, pretrained))}
            pretrained = True
        elif isinstance(pretrained, str):
            path = Path(pretrained).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"backbone.pretrained: no weights file at {path}; give a path to a "
                                        f".pth/.safetensors state dict of timm '{cfg.name}', true for the hub, "
                                        "or false for random init")
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
            pretrained = True
        if cfg.name.split(".")[0] not in timm.list_models():  # "name.pretrained_tag" is allowed
            from harness.core.registry import did_you_mean

            raise ValueError(f"backbone.name: timm has no model '{cfg.name}'; "
                             f"{did_you_mean(cfg.name, timm.list_models(), n=3)}".rstrip("; "))
        out_indices = {"out_indices": tuple(cfg.out_indices)} if cfg.out_indices is not None else {}
        with torch.device("meta"):  # which kind of model: free, no weights
            probe = timm.create_model(cfg.name, pretrained=False, **kwargs)
        if cfg.final_norm and _final_norm(probe):
            from timm.models._features import FeatureGetterNet  # what timm uses for its own getter features

            model = timm.create_model(cfg.name, pretrained=bool(pretrained), **kwargs)
            indices = out_indices.get("out_indices", len(model.feature_info))
            self.body = FeatureGetterNet(model, out_indices=indices, norm=True, output_fmt="NCHW")
        else:
            self.body = timm.create_model(cfg.name, pretrained=bool(pretrained), features_only=True, **out_indices,
                                          **kwargs)
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.reductions: list[int] = list(self.body.feature_info.reduction())
        # Iterable feature nets (FeatureListNet/FeatureDictNet) expose return_layers: module name -> stage.
        self._return_layers: dict[str, str] | None = getattr(self.body, "return_layers", None)
        self.supports_early_exit = self._return_layers is not None and isinstance(self.body, nn.ModuleDict)
        # Transformers (Swin) give channels-last maps; every method gets (B, C, H, W).
        self.channels_last_output = getattr(getattr(self.body, "output_fmt", None), "value", "NCHW") == "NHWC"
        if cfg.stem_pooled:
            self._pool_the_stem(cfg.name)

    def _pool_the_stem(self, name: str) -> None:
        """Take the first stage after the max pool that follows it (the PMG authors' ResNet `x1`)."""
        names = list(self.body.keys()) if self.supports_early_exit else []
        first = next((n for n in names if n in self._return_layers), None)
        after = names[names.index(first) + 1] if first and names.index(first) + 1 < len(names) else None
        if after is None or not isinstance(self.body[after], (nn.MaxPool2d, nn.AvgPool2d)):
            raise ValueError(f"backbone.stem_pooled: {name} has no pooling layer right after its first feature "
                             "stage (it applies to ResNet-like stems); set backbone.stem_pooled: false")
        self._return_layers[after] = self._return_layers.pop(first)
        stride = self.body[after].stride
        self.reductions[0] *= stride if isinstance(stride, int) else stride[0]

    def truncate(self, last: int) -> None:
        """Drop every module after stage `last` (e.g. Inception-v3 after Mixed_6e for WS-DAN)."""
        last = last % self.num_stages
        if last == self.num_stages - 1 or not self.supports_early_exit:
            return
        names = list(self.body.keys())
        stage_names = [n for n in names if n in self._return_layers]
        for name in names[names.index(stage_names[last]) + 1:]:
            del self.body[name]
            self._return_layers.pop(name, None)
        self.channels, self.reductions = self.channels[:last + 1], self.reductions[:last + 1]

    def stage_module(self, stage: int):
        """(module whose output is stage `stage`'s map, a reshape to (B, C, H, W) for channels-last outputs):
        the target layer Grad-CAM hooks (harness.engine.explain)."""
        stage %= self.num_stages
        to_nchw = (lambda t: t.permute(0, 3, 1, 2))  # noqa: E731
        if self._return_layers is not None:
            name = [n for n in self.body.keys() if n in self._return_layers][stage]
            return self.body[name], (to_nchw if self.channels_last_output else None)
        model = getattr(self.body, "model", None)  # timm's FeatureGetterNet: the model's own stages
        if model is not None and hasattr(model, "layers"):
            last = stage == self.num_stages - 1 and not isinstance(getattr(model, "norm", None),
                                                                   (nn.Identity, type(None)))
            nhwc = getattr(getattr(model, "output_fmt", None), "value", "NCHW") == "NHWC"
            return (model.norm if last else model.layers[stage]), (to_nchw if nhwc else None)
        raise ValueError(f"no module of {type(self.body).__name__} gives stage {stage}: Grad-CAM cannot hook it")

    @property
    def num_stages(self) -> int:
        return len(self.channels)

    def forward(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Feature maps of stages 0..upto (all when None); stops computing after stage `upto`."""
        last = self.num_stages - 1 if upto is None else upto % self.num_stages
        if last == self.num_stages - 1 or not self.supports_early_exit:
            feats = list(self.body(x))[:last + 1]
        else:
            feats = []
            for name, module in self.body.items():
                x = module(x)
                if name in self._return_layers:
                    feats.append(x)
                    if len(feats) == last + 1:
                        break
        return [f.permute(0, 3, 1, 2) for f in feats] if self.channels_last_output else feats


def build_backbone(cfg: BackboneConfig) -> StagedBackbone:
    return StagedBackbone(cfg)

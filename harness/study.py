"""Study files: load, merge a profile and --set overrides, validate strictly, expand into trials.

Nothing is started before the whole study validates: every trial's method, dataset, backbone and
train sections are checked here. Any invalid input raises StudyError (a ValueError) whose message
names the file, the key (with its line where the file has it), what is allowed, and the closest
valid key for a typo.
"""

from __future__ import annotations

import copy
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from harness.backbones import BackboneConfig
from harness.registry import RegistryError, did_you_mean
from harness.study_errors import Where, format_errors, line_map

SECTIONS_IN_GRID = ("method", "dataset", "backbone", "train")


class StudyError(ValueError):
    """An invalid study file, profile or override. Nothing has been started."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainConfig(Strict):
    pipeline: Literal["pmg", "wsdan", "swin384", "aam224"] | None = Field(
        None, description="a paper's input pipeline; fills resize, image_size, padding, flip, normalisation "
                          "and jitter unless the study sets them")
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int | None = Field(None, ge=1, description="default: 2 x batch_size")
    image_size: int = Field(64, ge=8, description="crop size fed to the network")
    resize: int | None = Field(None, ge=8, description="stored (decoded) size; crops are taken from it")
    crop_padding: int = Field(0, ge=0, description="zero padding before the random crop")
    hflip: bool = True
    colour_jitter: list[float] | None = Field(None, min_length=4, max_length=4, description=(
        "[brightness, contrast, saturation, hue] per-image jitter in training, e.g. the WS-DAN PyTorch port's "
        "[0.126, 0, 0.5, 0]"))
    random_scale: list[float] | None = Field(None, min_length=2, max_length=2, description=(
        "[low, high]: per training image, rescale by a factor in that range before the crop (the crop side "
        "taken from the stored image is image_size / factor, resized to image_size), e.g. AAM's [0.75, 1.25]"))
    normalize: Literal["imagenet", "half"] = Field("imagenet", description="imagenet mean/std, or "
                                                   "half: (x - 0.5) / 0.5 as the PMG authors")
    lr: float = Field(0.002, gt=0.0, description="base learning rate (x each parameter group's lr_scale)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    nesterov: bool = False
    schedule: Literal["cosine", "step", "poly", "constant"] = Field(
        "cosine", description="cosine: lr/2*(cos(pi*epoch/epochs)+1); step: lr*gamma^(epoch//step_size); "
                              "poly: end_lr + (lr - end_lr)*(1 - epoch/epochs)^poly_power")
    poly_power: float = Field(0.9, gt=0.0)
    end_lr: float = Field(1e-6, ge=0.0, description="final lr of the poly schedule")
    step_size: int = Field(2, ge=1, description="epochs per decay of the step schedule")
    gamma: float = Field(0.9, gt=0.0, le=1.0, description="decay factor of the step schedule")
    grad_clip: float | None = Field(None, gt=0.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast where the trial's device computes bf16 natively (CUDA with bf16, "
                            "a CPU with AVX512-BF16/AMX), else fp32; fp32; bf16 or fp16 autocast on any device "
                            "(harness.precision; the row records what the device made of it)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_train_batches: int | None = Field(None, ge=1, description="cap on batches per epoch (smoke runs)")
    eval_every: int = Field(1, ge=1)
    eval_flips: bool = Field(False, description="at the end, also test on horizontally and vertically "
                                                "flipped test images (test_hflip/acc, test_vflip/acc)")
    sync_bn: bool = Field(True, description="with several workers, BatchNorm uses the statistics of the global "
                                            "batch (SyncBatchNorm), as one process would")
    channels_last: bool = Field(False, description="NHWC memory layout of the model and its input (faster convolutions "
                                                   "on tensor-core GPUs)")
    compile: bool = Field(False, description="torch.compile the method (first steps pay the compilation)")
    reference_workload: bool = Field(False, description="time a fixed reference network in the trial's process "
                                     "before training: train/images_per_s_rel = throughput / its (harness.gate "
                                     "compares that across machines); not part of the trial's identity")
    timeout_s: float | None = Field(None, gt=0.0, description="stop a trial still running after this many "
                                    "seconds (hung or too slow) and record it failed with the reason; not part "
                                    "of the trial's identity")

    @model_validator(mode="before")
    @classmethod
    def _amp_is_precision(cls, data: Any) -> Any:
        """`amp` (deprecated): true was bf16 autocast, false fp32."""
        if isinstance(data, dict) and "amp" in data:
            data = dict(data)
            amp = data.pop("amp")
            if not isinstance(amp, bool):
                raise ValueError(f"amp: give true or false (got {amp!r}); better, train.precision: auto")
            if "precision" in data:  # e.g. a profile or --set gives precision over a base that still says amp
                warnings.warn(f"train.amp is deprecated and ignored here: train.precision={data['precision']} "
                              "decides; remove amp", FutureWarning, stacklevel=2)
                return data
            data["precision"] = "bf16" if amp else "fp32"
            warnings.warn(f"train.amp is deprecated: amp: {str(amp).lower()} now means train.precision: "
                          f"{data['precision']}; write train.precision: auto (bf16 where the device has bf16 units, "
                          "fp32 elsewhere: emulated bf16 is ~30x slower on CPUs without them)", FutureWarning,
                          stacklevel=2)
        return data

    @model_validator(mode="before")
    @classmethod
    def _apply_pipeline(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("pipeline"):
            from harness.data.transforms import PRESETS
            preset = PRESETS.get(data["pipeline"], {})
            data = {**preset, **data}  # what the study sets wins over the preset
        return data


class Resources(Strict):
    workers: int = Field(1, ge=1, description="processes training one trial together (data parallel); cpu and gpu "
                                              "are per worker, train.batch_size is the global batch")
    cpu: float = Field(1.0, gt=0.0, description="CPUs per worker")
    gpu: float = Field(0.0, ge=0.0, description="GPUs per worker; a fraction packs single-process trials on one GPU")

    @model_validator(mode="after")
    def _whole_gpus_for_several_workers(self) -> "Resources":
        if self.workers > 1 and 0 < self.gpu < 1:
            raise ValueError(f"workers={self.workers} with gpu={self.gpu}: several workers of one trial need a whole "
                             "GPU each (NCCL refuses two ranks on one GPU); use gpu: 1, or workers: 1 to pack trials")
        return self


class ReportConfig(Strict):
    maps: int = Field(4, ge=0, le=32, description="test images whose maps every trial stores for the report "
                                                  "(Grad-CAM, CAM, guided Grad-CAM, deconvnet, the method's "
                                                  "own); 0 stores none")


class ReferenceCell(Strict):
    row: str = Field(..., description="the table row (the axis value as printed)")
    column: str = Field(..., description="the column label as printed, e.g. test/acc/S3 or jigsaw=True")
    setting: str = Field(..., description="the `setting` of a row of the reference CSV")


class Reference(Strict):
    file: str = Field(..., description="a CSV of paper numbers (studies/references/<paper>.csv)")
    cells: list[ReferenceCell] = Field(default_factory=list)


class TableSpec(Strict):
    rows: str = Field(..., description="a grid axis (dotted path) for the table's rows")
    columns: str | list[str] | None = Field(None, description="a grid axis, or several, for the columns")
    metric: str | list[str] = Field("test/acc", description="a metric column of results.parquet; a list "
                                                            "puts one column per metric (e.g. every head)")
    grid: str | None = Field(None, description="with `grids:`, the named grid whose trials the table shows")
    reference: Reference | None = Field(None, description="paper numbers to print beside ours")


class MethodSection(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str


class Study(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    method: MethodSection
    dataset: MethodSection = Field(default_factory=lambda: MethodSection(name="synthfg"))
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    grids: dict[str, dict[str, list[Any]]] = Field(default_factory=dict, description=(
        "named grids whose trials are pooled (one-factor ablations around the base); a trial in "
        "several grids runs once"))
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    resources: Resources = Field(default_factory=Resources)
    report: ReportConfig = Field(default_factory=ReportConfig)
    table: TableSpec | None = None
    tables: dict[str, TableSpec] = Field(default_factory=dict, description="several named tables")
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    protocol: dict[str, Any] = Field(default_factory=dict, description=(
        "the paper's protocol, knob -> value or {value, note}, and its source; the report and --dry-run put the "
        "profile's own beside it (harness.protocol)"))

    # Set by load_study, not by the file.
    path: str = ""
    profile: str = "default"


def _deep_merge(base: dict, override: dict) -> dict:
    """Profile overrides merged into the base. A method or dataset section that names a different
    plugin replaces the base section whole: its parameters belong to the other plugin."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        renamed = (key in ("method", "dataset") and isinstance(value, dict) and isinstance(out.get(key), dict)
                   and value.get("name", out[key].get("name")) != out[key].get("name"))
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("grid", "grids") and not renamed:
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _yield_to_pipeline(study: dict, train_override: Any) -> dict:
    """A profile (or --set) that names a paper's input pipeline gets all of it: the base's values of the keys
    the pipeline sets (e.g. the default profile's 64 px image_size) give way, unless the profile sets them too."""
    if not isinstance(train_override, dict) or not train_override.get("pipeline"):
        return study
    from harness.data.transforms import PRESETS

    preset = PRESETS.get(train_override["pipeline"], {})
    base_train = study.get("train")
    if not isinstance(base_train, dict):
        return study
    kept = {k: v for k, v in base_train.items() if k not in preset or k in train_override}
    return {**study, "train": kept}


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _interpolate(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{where}.{k}" if where else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(1) not in os.environ:
                raise StudyError(f"{where}: environment variable {m.group(1)} is not set; export it "
                                 f"(e.g. export {m.group(1)}=/data/...) or override with --set {where}=VALUE")
            return os.environ[m.group(1)]
        return _ENV.sub(sub, value)
    return value


def set_dotted(config: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict. `grid.<axis>` keeps the dotted axis name as one key."""
    if dotted.startswith("grid."):
        config.setdefault("grid", {})[dotted[len("grid."):]] = value
        return
    keys = dotted.split(".")
    if len(keys) == 2 and keys[0] in ("method", "dataset") and keys[1] == "name" and \
            isinstance(config.get(keys[0]), dict) and config[keys[0]].get("name") != value:
        config[keys[0]] = {"name": value}  # another plugin: the old one's parameters do not apply
        return
    node = config
    for key in keys[:-1]:
        if not isinstance(node.get(key, {}), dict):
            raise StudyError(f"--set {dotted}: '{key}' is not a section")
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def get_dotted(config: dict, dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        node = node[key]
    return node


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise StudyError(f"--set {text!r}: expected dotted.key=value, e.g. --set train.epochs=2")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise StudyError(f"--set {text!r}: the value is not valid YAML: {e}") from None


# ----------------------------------------------------------------------------- loading

def load_study(path: str | os.PathLike, profile: str | None = None, overrides: tuple[str, ...] | list[str] = ()):
    """Load and fully validate a study. Returns a ResolvedStudy with its trials; raises StudyError."""
    from harness.trials import resolve  # trials depend on the study schema, not the other way round

    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file not found: {path} (studies live in studies/, e.g. studies/pmg_ablation.yaml)")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
        lines = line_map(text)
    except yaml.YAMLError as e:
        raise StudyError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a study file must be a mapping with at least 'name' and 'method'")

    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise StudyError(f"{path}: 'profiles' must map profile names to overrides")
    selected = profile or "default"
    if profile not in (None, "default") and profile not in profiles:
        hint = did_you_mean(profile, profiles)
        raise StudyError(f"{path}: no profile '{profile}': {hint}(profiles: default, {', '.join(profiles) or 'none'})")
    merged = {k: v for k, v in raw.items() if k != "profiles"}
    if selected in profiles:
        if not isinstance(profiles[selected], dict):
            raise StudyError(f"{path}: profile '{selected}' must be a mapping of overrides")
        merged = _deep_merge(_yield_to_pipeline(merged, profiles[selected].get("train")), profiles[selected])
    for text_override in overrides:
        key, value = parse_override(text_override)
        if key == "train.pipeline":
            later = {k.removeprefix("train.") for k, _ in map(parse_override, overrides) if k.startswith("train.")}
            merged = _yield_to_pipeline(merged, {**{k: None for k in later}, "pipeline": value})
        set_dotted(merged, key, value)
    merged = _interpolate(merged, "")
    where = Where(str(path), lines, selected if selected in profiles else None)
    with warnings.catch_warnings(record=True) as caught:  # deprecations, said once per study with its file
        warnings.simplefilter("always", FutureWarning)
        try:
            study = Study.model_validate({**merged, "profiles": profiles})
        except ValidationError as e:
            raise StudyError(format_errors(e, Study, (), where)) from None
        study.path, study.profile = str(path), selected
        try:
            resolved = resolve(study, where)
        except RegistryError as e:
            raise StudyError(f"{path}: {e}") from None
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, FutureWarning)):
        print(f"{path}: {message}", file=sys.stderr)
    return resolved

"""Study files: load, merge a profile and --set overrides, validate strictly, expand into trials.

Nothing is started before the whole study validates: every trial's method, dataset, backbone and
train sections are checked here. Any invalid input raises StudyError (a ValueError) whose message
names the file, the key (with its line where the file has it), what is allowed, and the closest
valid key for a typo.
"""

from __future__ import annotations

import warnings
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from harness.plugin.backbones import BackboneConfig
from harness.study.findings import Finding
from harness.core.schema import ConfigModel, distinct_seeds
from harness.study.search_space import SearchConfig

SECTIONS_IN_GRID = ("method", "dataset", "backbone", "train")
# A grid bigger than this is refused before it is expanded (--max-trials raises it): 10,000 trials take ~20 s
# just to validate, and a typo such as 1000 values instead of 10 should not start a week of training.
MAX_TRIALS = 10_000
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit


class Strict(ConfigModel):
    """Unknown keys, inf/NaN, and ints or bools written as something else are errors (harness.core.schema)."""


class TrainConfig(Strict):
    pipeline: Literal["pmg", "wsdan", "swin384", "aam224"] | None = Field(
        None, description="a paper's input pipeline; fills resize, image_size, padding, flip, normalisation "
                          "and jitter unless the study sets them")
    epochs: int = Field(8, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=65_536)
    eval_batch_size: int | None = Field(None, ge=1, le=65_536, description="default: 2 x batch_size")
    image_size: int = Field(64, ge=8, le=1024, description="crop size fed to the network")
    resize: int | None = Field(None, ge=8, le=2048, description="stored (decoded) size; crops are taken from it")
    crop_padding: int = Field(0, ge=0, le=512, description="zero padding before the random crop")
    hflip: bool = True
    colour_jitter: list[Annotated[float, Field(ge=0.0, le=10.0)]] | None = Field(
        None, min_length=4, max_length=4, description=(
        "[brightness, contrast, saturation, hue] per-image jitter in training, e.g. the WS-DAN PyTorch port's "
        "[0.126, 0, 0.5, 0]"))
    random_scale: list[Annotated[float, Field(gt=0.0, le=100.0)]] | None = Field(
        None, min_length=2, max_length=2, description=(
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
    step_size: int = Field(2, ge=1, le=10_000, description="epochs per decay of the step schedule")
    gamma: float = Field(0.9, gt=0.0, le=1.0, description="decay factor of the step schedule")
    grad_clip: float | None = Field(None, gt=0.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast where the trial's device computes bf16 natively (CUDA with bf16, "
                            "a CPU with AVX512-BF16/AMX), else fp32; fp32; bf16 or fp16 autocast on any device "
                            "(harness.engine.precision; the row records what the device made of it)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_train_batches: int | None = Field(None, ge=1, description="cap on batches per epoch (smoke runs)")
    eval_every: int = Field(1, ge=1, le=10_000)
    eval_epochs: list[tuple[int, int]] | None = Field(None, description=(
        "test only after the epochs in these [first, last] ranges (1-based, inclusive, as rows count epochs), "
        "e.g. the PMG authors' [[1, 5], [81, 200]], so the best epoch is chosen among them; the last epoch is "
        "always tested. Default: every eval_every-th epoch"))
    eval_flips: bool = Field(False, description="at the end, also test on horizontally and vertically "
                                                "flipped test images (test_hflip/acc, test_vflip/acc)")
    sync_bn: bool = Field(True, description="with several workers, BatchNorm uses the statistics of the global "
                                            "batch (SyncBatchNorm), as one process would")
    channels_last: bool = Field(False, description="NHWC memory layout of the model and its input (faster convolutions "
                                                   "on tensor-core GPUs)")
    compile: bool = Field(False, description="torch.compile the method (first steps pay the compilation)")
    reference_workload: bool = Field(False, description="time a fixed reference network in the trial's process "
                                     "before training: train/images_per_s_rel = throughput / its (harness.gate.cli "
                                     "compares that across machines); not part of the trial's identity")
    timeout_s: float | None = Field(None, gt=0.0, le=1e7, description="stop a trial still running after this many "
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

    @model_validator(mode="after")
    def _sizes_and_ranges(self) -> "TrainConfig":
        if self.random_scale and self.random_scale[0] > self.random_scale[1]:
            raise ValueError(f"random_scale {self.random_scale}: give [low, high] with 0 < low <= high, "
                             "e.g. [0.75, 1.25]")
        for first, last in self.eval_epochs or []:
            if not 1 <= first <= last:
                raise ValueError(f"eval_epochs range [{first}, {last}]: give [first, last] with 1 <= first <= last "
                                 "(epochs count from 1), e.g. [[1, 5], [81, 200]]")
        if self.eval_epochs is not None and self.eval_every != 1:
            raise ValueError(f"eval_epochs and eval_every={self.eval_every} both say when to test: give one")
        if self.resize and self.image_size > self.resize + 2 * self.crop_padding:
            raise ValueError(f"image_size {self.image_size} is larger than resize {self.resize} "
                             f"(+ 2 x crop_padding {self.crop_padding}): the crop is taken from the stored image")
        return self

    def evaluates(self, epoch: int) -> bool:
        """Whether the test split is scored after training epoch `epoch` (1-based; the engine also scores the
        last epoch, always)."""
        if self.eval_epochs is not None:
            return any(first <= epoch <= last for first, last in self.eval_epochs)
        return epoch % self.eval_every == 0


class Resources(Strict):
    workers: int = Field(1, ge=1, le=4096,
                         description="processes training one trial together (data parallel); cpu and gpu "
                                     "are per worker, train.batch_size is the global batch")
    cpu: float = Field(1.0, gt=0.0, le=4096.0, description="CPUs per worker")
    gpu: float = Field(0.0, ge=0.0, le=64.0,
                       description="GPUs per worker; a fraction packs single-process trials on one GPU")

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


# A metric is a column of results.parquet (test/acc, test/acc/S3, train/loss): it also names plot files.
Metric = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.@/-]{1,200}$")]


class TableSpec(Strict):
    rows: str = Field(..., description="a grid axis (dotted path) for the table's rows")
    columns: str | list[str] | None = Field(None, description="a grid axis, or several, for the columns")
    metric: Metric | Annotated[list[Metric], Field(min_length=1)] = Field(
        "test/acc", description="a metric column of results.parquet; a list "
                                "puts one column per metric (e.g. every head)")
    grid: str | None = Field(None, description="with `grids:`, the named grid whose trials the table shows")
    reference: Reference | None = Field(None, description="paper numbers to print beside ours")
    model_comparison: bool = Field(False, description=(
        "also compare the trained models of one-seed cells by an exact McNemar test on their per-image outcomes "
        "(mark †): a statement about two networks, not two settings (harness.report.stats.compare_models)"))


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
    seeds: Annotated[list[Annotated[int, Field(ge=0, le=MAX_SEED)]], AfterValidator(distinct_seeds)] = Field(
        default_factory=lambda: [0], min_length=1, max_length=MAX_TRIALS, description="each listed once")
    resources: Resources = Field(default_factory=Resources)
    report: ReportConfig = Field(default_factory=ReportConfig)
    table: TableSpec | None = None
    tables: dict[str, TableSpec] = Field(default_factory=dict, description="several named tables")
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    protocol: dict[str, Any] = Field(default_factory=dict, description=(
        "the paper's protocol, knob -> value or {value, note}, and its source; the report and --dry-run put the "
        "profile's own beside it (harness.report.protocol)"))
    findings: list[Finding] = Field(default_factory=list, max_length=200, description=(
        "the paper's ablation claims as data, each evaluated on the run in its report (harness.report.findings)"))
    search: SearchConfig | None = Field(None, description=(
        "tune every grid cell with the same budget on a validation split, then retrain each one's best "
        "configuration for the seeds: those are the table's cells (harness.study.search)"))

    @model_validator(mode="after")
    def _findings_name_the_grid(self) -> "Study":
        from harness.study.findings import problems

        found = problems(self.findings, self.grid, self.grids)
        if found:
            raise ValueError("; ".join(found[:3]))
        return self

    # Set by load_study, not by the file.
    path: str = ""
    profile: str = "default"


# ----------------------------------------------------------------------------- loading


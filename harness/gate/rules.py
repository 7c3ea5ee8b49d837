"""The regression gate's decision: a baseline's recorded noise against what a run shows, cell by cell.

Pure functions of numbers (no files), so that tests/benchmarks/bench_gate.py can drive exactly the rule
that CI applies with simulated runs. harness.gate.cli reads runs and baselines and calls `judge`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, model_validator

MIN_BASELINE_SEEDS = 3  # the spread of fewer seeds is mostly luck (with one it is 0)
BASELINE_FORMAT = 3  # 3: throughput_measure recorded; 2 (before it) held the before-and-after measure
OLD_MEASURE = "before-after"  # the relative throughput of format-2 baselines (harness.engine.reference's docstring)


class GateInputError(ValueError):
    """Input the gate cannot judge: exit 2 with this message."""


class BaselineCell(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN or Infinity would switch a check off
    accuracy: float = Field(..., ge=0.0, le=1.0, description="mean top-1 over the baseline's seeds")
    accuracy_std: float = Field(..., ge=0.0, description="its sample standard deviation over seeds")
    seeds: int = Field(..., ge=MIN_BASELINE_SEEDS)
    test_images: int = Field(..., ge=1)
    test_set_hash: str = Field(..., min_length=1, description="test/set_hash: which test images, in which order")
    chance: float = Field(..., gt=0.0, lt=1.0, description="1 / classes: what a guess scores on a balanced test set")
    config_hash: str = Field(..., min_length=1, description="the cell's identity config (no seed) and math version")
    throughput_rel: float | None = Field(None, gt=0.0, description="train/images_per_s_rel, mean over seeds")
    throughput_log_std: float | None = Field(None, ge=0.0, description="sd of log(throughput_rel) over seeds")
    train_loss: float = Field(..., description="train/loss of the last epoch, mean over seeds")
    train_loss_std: float = Field(..., ge=0.0, description="its sample standard deviation over seeds")
    images_per_s: float | None = Field(None, gt=0.0, description="raw images/s where it was written (information)")

    @model_validator(mode="after")
    def _possible(self):
        """A spread the recorded values cannot have: the sample sd of n values in [0, 1] with mean m is at most
        sqrt(m (1 - m) n / (n - 1)) (Bhatia-Davis), so at most 0.5 sqrt(n / (n - 1)) whatever the mean."""
        bound = math.sqrt(self.accuracy * (1 - self.accuracy) * self.seeds / (self.seeds - 1))
        if self.accuracy_std > bound + 1e-9:
            raise ValueError(f"accuracy_std {self.accuracy_std:g} is impossible for {self.seeds} accuracies in [0, 1] "
                             f"with mean {self.accuracy:g} (at most {bound:.3g})")
        if (self.throughput_rel is None) != (self.throughput_log_std is None):
            raise ValueError("throughput_rel and throughput_log_std go together")
        return self


class Baseline(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    format: int = Field(BASELINE_FORMAT, ge=2, le=BASELINE_FORMAT)
    throughput_measure: str = Field(OLD_MEASURE, description="what its throughput_rel values are "
                                                             "(harness.engine.reference.MEASURE when written)")
    study: str
    profile: str
    precision: str = Field(..., min_length=1, description="what the trials trained in (the row's `precision`)")
    config_hash: str = Field(..., min_length=1, description="the study's: a hash of every cell's config_hash")
    seeds: list[int] = Field(..., min_length=MIN_BASELINE_SEEDS)
    written: str = ""
    git_commit: str = ""
    machine: str = ""
    cpu: str = Field("", description="the trials' CPU: 'model (torch capability)'; throughput ratios are judged "
                                     "strictly only on the same")
    cells: dict[str, BaselineCell] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _seeds(self):
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} list a seed twice")
        more = [n for n, c in self.cells.items() if c.seeds > len(self.seeds)]
        if more:
            raise ValueError(f"cell {more[0]} counts {self.cells[more[0]].seeds} seeds; the baseline lists "
                             f"{len(self.seeds)}")
        return self


@dataclass(frozen=True)
class Rules:
    k: float = 4.5  # standard errors of the difference of two means (tests/benchmarks/bench_gate.py: <= 1% alarms)
    chance_margin: float = 0.1  # accuracy must stay this far above chance ...
    keep_share: float = 0.25  # ... and keep this share of the baseline's gain over chance (a seed can lag)
    loss_tol: float = 0.1  # the last epoch's training loss may always rise by this fraction
    max_slowdown: float = 0.3  # relative throughput may always fall to 0.7x
    throughput: bool = True  # judge throughput at all (--no-throughput: no reference workload)
    # On another CPU than the baseline's (model or torch kernel capability), a trial's speed relative to the
    # reference network is not the same ratio (ops speed up unevenly across CPUs): only a fall below this share
    # of the baseline's is a regression there.
    other_cpu_slowdown: float = 0.5

    def __post_init__(self):
        """Settings that would switch a check off (NaN compares false) or fail an unchanged run (k <= 0)."""
        checks = {"k": (self.k, 0.0, math.inf, False), "chance_margin": (self.chance_margin, 0.0, 1.0, True),
                  "keep_share": (self.keep_share, 0.0, 1.0, True), "loss_tol": (self.loss_tol, 0.0, math.inf, True),
                  "max_slowdown": (self.max_slowdown, 0.0, 1.0, True),
                  "other_cpu_slowdown": (self.other_cpu_slowdown, 0.0, 1.0, True)}
        for name, (value, low, high, closed) in checks.items():
            ok = isinstance(value, (int, float)) and math.isfinite(value) and (low <= value if closed else low < value)
            if not ok or not value < high:
                low_text = f">= {low:g}" if closed else f"> {low:g}"
                high_text = "" if math.isinf(high) else f" and < {high:g}"
                raise GateInputError(f"--{name.replace('_', '-')} {value!r}: "
                                     f"give a finite number {low_text}{high_text}")


@dataclass
class CellRun:
    """What one cell of a run shows: its finished trials' values (one per seed) and what identifies it."""

    name: str
    seeds: int  # finished trials
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    config_hash: str = ""
    seed_list: list[int] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    throughputs: list[float] = field(default_factory=list)
    images_per_s: float | None = None
    chance: float | None = None
    test_images: list[int] = field(default_factory=list)  # the distinct test-set sizes of its trials
    test_set_hashes: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return _mean(self.accuracies)

    @property
    def loss(self) -> float:
        return _mean(self.losses)

    @property
    def throughput(self) -> float:
        """Geometric mean (throughput is judged as a ratio, on the log scale)."""
        x = self.throughputs
        if not x or any(not v > 0 for v in x):  # NaN, 0, negative: not a throughput
            return float("nan")
        return math.exp(_mean([math.log(v) for v in x]))

    def input_errors(self, rules: Rules) -> list[str]:
        """What makes this cell's finished trials unjudgeable (exit 2)."""
        out = []
        if self.seeds and (not self.accuracies or any(not _finite(v) for v in self.accuracies)):
            out.append("test/acc is NaN or missing in a finished trial")
        elif any(not 0.0 <= v <= 1.0 for v in self.accuracies):
            bad = next(v for v in self.accuracies if not 0.0 <= v <= 1.0)
            out.append(f"test/acc {bad:g} is not a top-1 accuracy in [0, 1] (a percentage? another harness?)")
        twice = sorted({s for s in self.seed_list if self.seed_list.count(s) > 1})
        if twice:
            out.append(f"seed {', '.join(map(str, twice))} finished more than once: one cell runs each seed once (a "
                       "duplicated or copied row would count as another seed)")
        if self.seeds and (not self.losses or any(not _finite(v) for v in self.losses)):
            out.append("train/loss is NaN or missing in a finished trial")
        if rules.throughput and self.seeds and (not self.throughputs or any(not (_finite(v) and v > 0)
                                                                            for v in self.throughputs)):
            out.append("train/images_per_s_rel is missing, NaN or 0 (run with train.reference_workload: true, "
                       "or gate with --no-throughput)")
        if self.seeds and (len(self.test_images) != 1 or len(self.test_set_hashes) != 1):
            out.append("no single test set in its per-image outcomes (test/correct, test/set_hash)")
        if self.seeds and self.chance is None:
            out.append("no num_classes: the chance level is unknown")
        return out

    def baseline_problems(self, rules: Rules, no_throughput: bool) -> list[str]:
        """Why this cell cannot be recorded as a baseline (none: it can)."""
        out = []
        if self.failed:
            out.append(f"{self.failed} trial(s) failed")
        if len(set(self.seed_list)) < MIN_BASELINE_SEEDS:
            out.append(f"{len(set(self.seed_list))} distinct finished seed(s): a baseline needs at least "
                       f"{MIN_BASELINE_SEEDS} "
                       "(--set \"seeds=[0,1,2]\"), or its spread is luck")
        out += self.input_errors(Rules(**{**rules.__dict__, "throughput": not no_throughput}))
        if not out:
            floor = max(2 * self.chance, self.chance + rules.chance_margin)
            if self.accuracy < floor:
                out.append(f"accuracy {100 * self.accuracy:.1f}% is below {100 * floor:.1f}% (2x chance, and chance + "
                           "the margin): a cell near chance catches crashes, not learning regressions; make the "
                           "study learn")
        return out

    def to_baseline_cell(self) -> BaselineCell:
        logs = [math.log(v) for v in self.throughputs if v > 0]
        return BaselineCell(
            accuracy=self.accuracy, accuracy_std=_std(self.accuracies), seeds=self.seeds,
            test_images=self.test_images[0], test_set_hash=self.test_set_hashes[0], chance=self.chance,
            config_hash=self.config_hash, throughput_rel=self.throughput if logs else None,
            throughput_log_std=_std(logs) if logs else None, train_loss=self.loss, train_loss_std=_std(self.losses),
            images_per_s=self.images_per_s)


@dataclass(frozen=True)
class Pooled:
    """The typical spread of a cell: each cell has only a few seeds, whose spread alone can be small by luck (a sample
    sd of 3 seeds has 2 degrees of freedom), so each cell's tolerance uses the larger of its own spread and this one:
    the pooled sd over the cells (the root of their mean variance, sum(n - 1) degrees of freedom: 28 for 7 cells of
    5 seeds). An unstable cell widens every cell's tolerance a little (conservative: fewer false alarms, less power);
    the median of the sds used before it left the per-run false-alarm rate at 5% with 3 seeds (bench_gate).
    """

    accuracy_sd: float
    loss_cv: float  # the loss's sd over its scale (loss_scale): losses differ in size across methods
    throughput_log_sd: float


def loss_scale(base: BaselineCell) -> float:
    """What a training loss is measured against: its own size, or ln(classes) (a uniform guess's cross-entropy)
    where it is smaller (a loss near or below zero, e.g. AAM's cross-channel term, has no relative size)."""
    return max(abs(base.train_loss), math.log(1 / base.chance))


def pooled_noise(baseline: Baseline) -> Pooled:
    cells = list(baseline.cells.values())

    def pool(sds: list[float | None]) -> float:  # weighted by degrees of freedom: a cell of more seeds counts more
        pairs = [(max(1, c.seeds - 1), sd) for c, sd in zip(cells, sds) if sd is not None]
        return math.sqrt(sum(d * sd * sd for d, sd in pairs) / sum(d for d, _ in pairs)) if pairs else 0.0

    return Pooled(accuracy_sd=pool([c.accuracy_std for c in cells]),
                  loss_cv=pool([c.train_loss_std / loss_scale(c) for c in cells]),
                  throughput_log_sd=pool([c.throughput_log_std for c in cells]))


def accuracy_sd(base: BaselineCell, pooled: Pooled) -> float:
    """The sd of one seed's accuracy on the baseline's (fixed, hash-checked) test images: the larger of the cell's
    spread and the typical spread (Pooled), at least one test image's worth. Not the binomial error of a fresh test set:
    two runs scored on the same images differ only where they disagree, which is what the seeds measured."""
    return max(base.accuracy_std, pooled.accuracy_sd, 1.0 / base.test_images)


def loss_sd(base: BaselineCell, pooled: Pooled) -> float:
    return max(base.train_loss_std, pooled.loss_cv * loss_scale(base))


def throughput_log_sd(base: BaselineCell, pooled: Pooled) -> float:
    return max(base.throughput_log_std or 0.0, pooled.throughput_log_sd)


def judge_cell(base: BaselineCell, now: CellRun, rules: Rules, pooled: Pooled) -> dict:
    """One verdict row: `errors` (input that cannot be judged: exit 2), `problems` (regressions: exit 1)."""
    row = {"cell": now.name, "acc_base": base.accuracy, "errors": [], "problems": []}
    if now.config_hash != base.config_hash:
        row["errors"].append(f"its config differs from the baseline's (hash {now.config_hash} vs {base.config_hash}): "
                             "record a new baseline when a change is meant to move the study")
    if now.seeds == 0:
        why = f" ({now.errors[0][:200]})" if now.errors else ""
        row["problems"].append(f"failed: all {now.failed} trial(s){why}")
        return _verdict(row)
    row["errors"] += now.input_errors(rules)
    if now.test_images and now.test_images[0] != base.test_images:
        row["errors"].append(f"tested on {now.test_images[0]} images, the baseline on {base.test_images}")
    elif now.test_set_hashes and now.test_set_hashes[0] != base.test_set_hash:
        row["errors"].append(f"tested on other images (test set {now.test_set_hashes[0]}, the baseline's "
                             f"{base.test_set_hash})")
    if now.chance is not None and abs(now.chance - base.chance) > 1e-9:
        row["errors"].append(f"chance level {now.chance:.3f}, the baseline's {base.chance:.3f}")
    if row["errors"]:
        return _verdict(row)
    if now.failed:
        row["problems"].append(f"{now.failed} of {now.failed + now.seeds} trials failed"
                               + (f" ({now.errors[0][:200]})" if now.errors else ""))
    scale = math.sqrt(1 / base.seeds + 1 / now.seeds)  # se of a difference of two means, per unit sd
    acc = now.accuracy
    tol = rules.k * accuracy_sd(base, pooled) * scale
    floor = max(base.chance + rules.chance_margin, base.chance + rules.keep_share * (base.accuracy - base.chance))
    row.update(acc_now=acc, acc_diff=acc - base.accuracy, acc_tol=tol, acc_floor=floor)
    if acc < base.accuracy - tol:
        row["problems"].append(f"accuracy {100 * acc:.1f}% < baseline {100 * base.accuracy:.1f}% - {100 * tol:.1f} "
                               f"points ({rules.k} se)")
    if acc < floor:
        row["problems"].append(f"accuracy {100 * acc:.1f}% < floor {100 * floor:.1f}% "
                               f"(chance {100 * base.chance:.1f}%)")
    allowed = max(rules.loss_tol * loss_scale(base), rules.k * loss_sd(base, pooled) * scale)
    row.update(loss_base=base.train_loss, loss_now=now.loss)
    if now.loss > base.train_loss + allowed:
        row["problems"].append(f"training loss {now.loss:.3f} > baseline {base.train_loss:.3f} + {allowed:.3f}")
    if rules.throughput:
        if base.throughput_rel is None:
            row["errors"].append("the baseline has no relative throughput (gate with --no-throughput, or record one "
                                 "with train.reference_workload: true)")
            return _verdict(row)
        thr_floor = min(1 - rules.max_slowdown, math.exp(-rules.k * throughput_log_sd(base, pooled) * scale))
        ratio = now.throughput / base.throughput_rel
        row.update(thr_base=base.throughput_rel, thr_now=now.throughput, thr_ratio=ratio, thr_floor=thr_floor)
        if ratio < thr_floor:
            row["problems"].append(f"relative throughput {ratio:.2f}x the baseline's "
                                   f"(allowed down to {thr_floor:.2f}x)")
    return _verdict(row)


def judge(baseline: Baseline, cells: dict[str, CellRun], rules: Rules, pooled: Pooled | None = None) -> list[dict]:
    """One verdict per baseline cell, and per cell the run has and the baseline does not (new: not judged, but
    an error when it failed)."""
    pooled = pooled or pooled_noise(baseline)
    rows = []
    for name, base in baseline.cells.items():
        if name not in cells:
            rows.append(_verdict({"cell": name, "acc_base": base.accuracy, "problems": [],
                                  "errors": ["missing from the run (the study's grid changed?)"]}))
            continue
        rows.append(judge_cell(base, cells[name], rules, pooled))
    for name in sorted(set(cells) - set(baseline.cells)):
        new = cells[name]
        row = {"cell": name, "acc_now": new.accuracy if new.accuracies else None, "problems": [], "errors": []}
        if new.failed:
            row["errors"].append(f"new (not in the baseline) and {new.failed} trial(s) failed"
                                 + (f" ({new.errors[0][:200]})" if new.errors else ""))
        elif not new.seeds:
            row["errors"].append("new (not in the baseline) and no finished trial")
        else:
            row["errors"] += [f"new (not in the baseline): {e}" for e in new.input_errors(rules)[:1]
                              if e.startswith(("test/acc", "seed"))]
        rows.append(_verdict(row, new=True))
    return rows


def _verdict(row: dict, new: bool = False) -> dict:
    row["verdict"] = "ERROR" if row["errors"] else "REGRESSED" if row["problems"] else "new" if new else "ok"
    return row


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _mean(x: list[float]) -> float:
    return sum(x) / len(x) if x else float("nan")


def _std(x: list[float]) -> float:
    if len(x) < 2:
        return 0.0
    m = _mean(x)
    return math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))



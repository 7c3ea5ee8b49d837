"""A study's `search:` section as data: the distributions of its knobs (uniform, loguniform, randint, choice), the
budget, the scheduler and the validation split. The plan that tunes each grid cell with them is
harness.study.search.
"""

from __future__ import annotations
import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal
import yaml
from pydantic import AfterValidator, Field, model_validator
from harness.study import reader as study_yaml
from harness.core.schema import ConfigModel


SEARCH_SECTIONS = ("method", "train", "backbone")  # what a knob may tune (the dataset is what is compared on)


# Not knobs: the scheduler's time axis, and settings that change how a trial runs, not what it computes.
NOT_KNOBS = {"train.epochs": "train.epochs is the search's time axis (ASHA's max_t); tune the other knobs",
             "train.timeout_s": "train.timeout_s changes how a trial runs, not what it computes",
             "train.reference_workload": "train.reference_workload changes how a trial runs, not what it computes",
             "train.device": "train.device changes where a trial runs, not what it computes"}


FORMS = "uniform(low, high), loguniform(low, high), randint(low, high) (both ends included) or choice([a, b, ...])"


@dataclass(frozen=True)
class Distribution:
    """One knob's search distribution: uniform/loguniform over [low, high], randint over low..high (both
    included), or choice over values."""

    kind: Literal["uniform", "loguniform", "randint", "choice"]
    low: float | int | None = None
    high: float | int | None = None
    values: tuple = ()

    def corners(self) -> list:
        """The values that bound the distribution: if these validate, every value it draws does."""
        return list(self.values) if self.kind == "choice" else [self.low, self.high]

    def __str__(self) -> str:
        if self.kind == "choice":
            return f"choice({json.dumps(list(self.values))})"
        return f"{self.kind}({self.low!r}, {self.high!r})"


def _number(text: str, integer: bool) -> float | int:
    text = text.strip()
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not {'a whole number' if integer else 'a number'}") from None
    if not math.isfinite(value):
        raise ValueError("give finite bounds (infinity and NaN are not allowed)")
    return value


def parse_distribution(spec: Any) -> Distribution:
    """A knob's distribution from its study text: 'loguniform(1e-3, 1e-1)', 'choice([2, 3])', or a list (a choice).
    Raises ValueError naming the forms allowed."""
    if isinstance(spec, list):
        return _choice(spec)
    if not isinstance(spec, str) or "(" not in spec or not spec.strip().endswith(")"):
        raise ValueError(f"give a distribution: {FORMS} (got {spec!r})")
    name, _, inner = spec.strip()[:-1].partition("(")
    name = name.strip()
    if name == "choice":
        try:  # the study loader's bounds: a search space nested 3,000 deep is an error, not a RecursionError
            args = study_yaml.load(f"[{inner}]", "choice(...)")[0]
        except study_yaml.StudyFileError as e:
            raise ValueError(str(e)) from None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or e
            raise ValueError(f"choice(...): cannot read its values ({problem})") from None
        if not isinstance(args, list) or len(args) != 1 or not isinstance(args[0], list):
            raise ValueError(f"write choice([a, b, ...]) with the values in brackets (got {spec!r})")
        return _choice(args[0])
    if name not in ("uniform", "loguniform", "randint"):
        raise ValueError(f"unknown distribution {name!r}: give {FORMS}")
    parts = inner.split(",")
    if len(parts) != 2:
        raise ValueError(f"{name}(low, high) takes two bounds (got {spec!r})")
    low, high = (_number(p, integer=name == "randint") for p in parts)
    if not low < high:
        raise ValueError(f"{name}({low}, {high}): low must be below high")
    if name == "loguniform" and low <= 0:
        raise ValueError(f"loguniform({low}, {high}): the bounds must be positive")
    return Distribution(name, low, high)


def _choice(values: list) -> Distribution:
    if not values:
        raise ValueError("choice([...]) needs at least one value")
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("choice: infinity and NaN are not allowed")
        if not isinstance(v, (bool, int, float, str)) and v is not None:
            raise ValueError(f"choice: give plain values (numbers, text, true/false), not {type(v).__name__}s "
                             "(TPE draws categories of plain values)")
    dumped = [json.dumps(v, sort_keys=True) for v in values]
    if len(set(dumped)) != len(dumped):
        raise ValueError(f"choice({values}): repeated values; list each once")
    return Distribution("choice", values=tuple(values))


def _check_distribution(spec: Any) -> Any:
    parse_distribution(spec)
    return spec


Knob = Annotated[str | list[Any], AfterValidator(_check_distribution)]


class Budget(ConfigModel):
    trials: int | None = Field(None, ge=1, le=10_000, description="search trials per method (and grid cell)")
    device_hours: float | None = Field(None, gt=0.0, le=1e6, description=(
        "device-hours per method (and grid cell): GPU-hours when resources.gpu > 0, else CPU-hours (each trial's "
        "wall time x the devices it holds); no new search trial starts once they are spent"))

    @model_validator(mode="after")
    def _some_budget(self) -> "Budget":
        if self.trials is None and self.device_hours is None:
            raise ValueError("give trials: N, device_hours: H, or both (the search stops at the first reached)")
        return self

    def describe(self, kind: str = "device-hours") -> str:
        parts = ([f"{self.trials} trials"] if self.trials else []) + \
                ([f"{self.device_hours:g} {kind}"] if self.device_hours else [])
        return " or ".join(parts)


class SchedulerConfig(ConfigModel):
    name: Literal["asha", "fifo"] = Field("asha", description="asha: Tune's ASHA stops the weaker trials at "
                                          "grace_period x reduction_factor^k epochs; fifo: every trial trains "
                                          "to the end")
    grace_period: int = Field(1, ge=1, le=10_000, description="epochs every trial trains before ASHA may stop it")
    reduction_factor: float = Field(2.0, gt=1.0, le=100.0, description="ASHA keeps the best 1 / this at each rung")

    @model_validator(mode="before")
    @classmethod
    def _a_name_alone(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class ValidationConfig(ConfigModel):
    fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of each class's training images held out")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="which images are held out (the same for every method)")


class MethodSearch(ConfigModel):
    space: dict[str, Knob] = Field(default_factory=dict, description="knobs this method tunes besides (or instead "
                                   "of) search.space's")
    budget: Budget | None = Field(None, description="this method's own budget (default: search.budget)")


class SearchConfig(ConfigModel):
    space: dict[str, Knob] = Field(default_factory=dict, description="knob (dotted path) -> distribution, the same "
                                   "for every method")
    methods: dict[str, MethodSearch] = Field(default_factory=dict, description="per method, by its grid label or "
                                             "name: more knobs or its own budget")
    budget: Budget = Field(..., description="per method (and grid cell)")
    searcher: Literal["tpe", "random"] = Field("tpe", description="tpe: Optuna's TPE through Tune (pip install -e "
                                               "'.[tune]'); random: Tune's sampling of each distribution")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    metric: str = Field("val/acc", pattern=r"^val/acc(/[A-Za-z0-9_.-]{1,100})?$", description=(
        "maximised, on the validation split: val/acc (the primary head) or val/acc/<head>"))
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    seed: int = Field(0, ge=0, le=2**32 - 1, description="the searchers' seed")
    startup_trials: int | None = Field(None, ge=1, le=1_000, description=(
        "tpe: random trials before TPE models the results (default: a third of the trial budget, 2 to 10)"))

    def describe(self, kind: str = "device-hours") -> str:
        """'tuned (budget 6 trials, searcher tpe, scheduler asha)': what the table says."""
        budgets = {self.budget.describe(kind)} | {m.budget.describe(kind) for m in self.methods.values() if m.budget}
        budget = " / ".join(sorted(budgets)) + (" per method" if len(budgets) == 1 else " (per method, see search)")
        scheduler = self.scheduler.name + (f" (grace {self.scheduler.grace_period}, "
                                           f"reduction {self.scheduler.reduction_factor:g})"
                                           if self.scheduler.name == "asha" else "")
        return f"tuned (budget {budget}, searcher {self.searcher}, scheduler {scheduler})"

"""Fair comparisons: the `search:` section of a study, its search spaces, and the plan of a search.

A study with `search:` does not train its grid cells with one hand-picked recipe. For every cell (a method
on a dataset, ...) it searches the knobs of `search.space`, the same space and the same budget for every
method unless `search.methods.<method>` says otherwise, on a validation split carved from the training
split (harness.data.imageset.carve_validation: never the test split); the best configuration of each cell
is then retrained on the whole training split for the study's seeds and tested, and those final cells are
the table's. harness.orchestrate runs it through Ray Tune (a searcher per cell, ASHA per cell); this module
is plain data and Python, no Ray.

    search:
      space:                                  # dotted paths into method, train or backbone
        train.lr: loguniform(0.01, 0.3)       # uniform(a, b), loguniform(a, b), randint(a, b), choice([...])
        train.weight_decay: loguniform(1.0e-5, 1.0e-3)
      methods:                                # per method (its grid label or name): more knobs, its own budget
        pmg:
          space: {method.stages: [2, 3]}      # a list is a choice (in a {...} mapping, quote "choice([2, 3])")
      budget: {trials: 8}                     # per method and grid cell; or device_hours (GPU- or CPU-hours)
      searcher: tpe                           # tpe (Optuna's, through Tune; the `tune` extra) or random
      scheduler: {name: asha, grace_period: 1, reduction_factor: 2}   # or fifo: every trial trains to the end
      metric: val/acc                         # maximised; val/acc/<head> for another head
      validation: {fraction: 0.2, seed: 0}    # per class, see carve_validation
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field


from harness.study.search_space import (NOT_KNOBS, SEARCH_SECTIONS, Budget, Distribution, MethodSearch, SearchConfig,
                                          parse_distribution)


# ----------------------------------------------------------------------------- distributions


# ----------------------------------------------------------------------------- the section's schema


# ----------------------------------------------------------------------------- the plan

@dataclass
class SearchUnit:
    """One grid cell's search: its base config (the cell's resolved sections, no seed), its knobs and budget."""

    unit_id: str
    label: str
    axes: dict
    base: dict
    knobs: dict[str, Distribution]
    budget: Budget
    seeds: list[int]
    validation: dict
    epochs: int
    devices: float  # GPUs (or CPUs) one trial holds: device-hours = wall time x this

    @property
    def sampler_seed(self) -> int:
        return int(self.unit_id[:8], 16)

    def _config(self, values: dict, seed: int) -> dict:
        from harness.study.overrides import set_dotted

        config = json.loads(json.dumps(self.base))
        for path, value in values.items():
            set_dotted(config, path, value)
        return {**config, "seed": seed}

    def search_config(self, values: dict) -> dict:
        """A search trial: the cell with these knob values, trained with the study's first seed on the training
        split minus the validation split, scored on the validation split."""
        return _validated({**self._config(values, self.seeds[0]), "validation": dict(self.validation)})

    def final_config(self, values: dict, seed: int) -> dict:
        """A final cell: the chosen values, the whole training split, the test split."""
        return _validated(self._config(values, seed))


def _validated(config: dict) -> dict:
    """Sections in their resolved JSON form (defaults filled in), as the grid's trials are."""
    from harness.study.trials import _section_models

    out = {s: json.loads(json.dumps(model.model_validate(config[s]).model_dump(mode="json")))
           for s, model in _section_models(config).items()}
    return {**config, **out}


@dataclass
class SearchPlan:
    config: SearchConfig
    units: list[SearchUnit] = field(default_factory=list)
    device_kind: str = "CPU-hours"

    def describe(self) -> str:
        return self.config.describe(self.device_kind)

    def max_search_trials(self) -> int | None:
        budgets = [u.budget.trials for u in self.units]
        return None if any(b is None for b in budgets) else sum(budgets)


class _AtKnob:
    """A Where that points every message at one knob's line."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def at(self, loc) -> str:
        return self.prefix

    def in_grid(self) -> "_AtKnob":
        return self


def plan_search(study, resolved, where, max_trials: int | None = None) -> SearchPlan:
    """The units of a study's search, every knob checked against every method it applies to (its path, and the
    distribution's corners validated as that method's config would be); raises StudyError with the file line."""
    from harness.core.registry import did_you_mean
    from harness.study.errors import StudyError
    from harness.core.versions import MATH_VERSION
    from harness.study.overrides import set_dotted
    from harness.study.trials import _section_models, _validate_sections, all_axes, identity_config

    search: SearchConfig = study.search
    if study.grids:
        raise StudyError(f"{where.at(('search',))}search: tunes the cells of one grid: (not named grids:)")
    gpu = study.resources.gpu > 0
    plan = SearchPlan(search, device_kind="GPU-hours" if gpu else "CPU-hours")
    devices = study.resources.workers * (study.resources.gpu if gpu else study.resources.cpu)
    axes = all_axes(study)
    cells: dict[str, list] = {}
    for spec in resolved.trials:  # grid cells x seeds: a unit per cell
        cells.setdefault(json.dumps(spec.axes, sort_keys=True, default=str), []).append(spec)
    labels = {str(spec.axes.get("method") or spec.config["method"]["name"]) for s in cells.values() for spec in s}
    names = {spec.config["method"]["name"] for specs in cells.values() for spec in specs}
    for key in search.methods:
        if key not in labels | names:
            raise StudyError(f"{where.at(('search', 'methods', key))}search.methods.{key}: no method of the study "
                             f"has that label or name: {did_you_mean(key, sorted(labels | names))}"
                             f"(methods: {', '.join(sorted(labels | names))})")
    for specs in cells.values():
        first = specs[0]
        method_name = first.config["method"]["name"]
        label = first.axes.get("method") if "method" in first.axes else method_name
        own = search.methods.get(str(label)) or search.methods.get(method_name) or MethodSearch()
        knobs = {**search.space, **own.space}
        if not knobs:
            raise StudyError(f"{where.at(('search', 'space'))}search.space: no knob to tune for {label}; "
                             "give at least one, e.g. train.lr: loguniform(0.01, 0.3)")
        base = {k: v for k, v in first.config.items() if k != "seed"}
        models = _section_models(first.config)
        parsed = {}
        for path, spec in knobs.items():
            loc = ("search", "methods", str(label) if str(label) in search.methods else method_name, "space", path) \
                if path in own.space else ("search", "space", path)
            at = where.at(loc)
            section, _, key = path.partition(".")
            if path in NOT_KNOBS:
                raise StudyError(f"{at}search knob {path}: {NOT_KNOBS[path]}")
            if section not in SEARCH_SECTIONS or not key or "." in key:
                raise StudyError(f"{at}search knob {path!r}: give a dotted path into one of "
                                 f"{', '.join(SEARCH_SECTIONS)}, e.g. train.lr")
            fields = [f for f in models[section].model_fields if f != "name"]
            if key not in fields:
                raise StudyError(f"{at}search knob {path!r}: {section} of {label} has no key '{key}': "
                                 f"{did_you_mean(key, fields, prefix=section + '.')}"
                                 f"(valid keys: {', '.join(sorted(fields))}); a method's own knob goes under "
                                 f"search.methods.<method>.space")
            if path in axes:
                raise StudyError(f"{at}search knob {path} is also a grid axis: tune it or grid it, not both")
            dist = parse_distribution(spec)
            for corner in dist.corners():
                config = json.loads(json.dumps(first.config))
                set_dotted(config, path, corner)
                _validate_sections(config, _AtKnob(at), f"\n  (search knob {path} = {corner!r} of {dist}, for {label})")
            parsed[path] = dist
        budget = own.budget or search.budget
        identity = identity_config({**first.config, "seed": 0})
        identity.pop("seed")
        blob = {"cell": identity, "knobs": {p: str(d) for p, d in sorted(parsed.items())},
                "searcher": search.searcher, "scheduler": search.scheduler.model_dump(mode="json"),
                "metric": search.metric, "validation": search.validation.model_dump(mode="json"), "seed": search.seed,
                "startup_trials": search.startup_trials, "first_seed": study.seeds[0]}
        unit_id = hashlib.sha256(json.dumps({**blob, "math_version": MATH_VERSION}, sort_keys=True,
                                            default=str).encode()).hexdigest()[:12]
        text = ", ".join(f"{a}={v}" for a, v in first.axes.items()) or method_name
        plan.units.append(SearchUnit(unit_id=unit_id, label=text, axes=dict(first.axes), base=base, knobs=parsed,
                                     budget=budget, seeds=list(dict.fromkeys(study.seeds)),
                                     validation=search.validation.model_dump(mode="json"),
                                     epochs=first.config["train"]["epochs"], devices=devices))
        _check_metric(search.metric, first.config, where)
    total = plan.max_search_trials()
    if max_trials is not None and total is not None and total > max_trials:
        raise StudyError(f"{where.at(('search', 'budget'))}the search runs up to {total:,} trials ({len(plan.units)} "
                         f"cells x their budgets), more than the limit of {max_trials:,}; lower search.budget.trials, "
                         "or raise the limit with --max-trials N if you mean it")
    return plan


def _check_metric(metric: str, config: dict, where) -> None:
    """val/acc/<head>: a head every searched method has."""
    from harness.plugin.method import METHODS
    from harness.study.errors import StudyError
    from harness.study.trials import backbone_num_stages

    head = metric.removeprefix("val/acc").removeprefix("/")
    if not head:
        return
    cls = METHODS.get(config["method"]["name"])
    heads = cls.head_names(cls.Params.model_validate(config["method"]),
                           backbone_num_stages(json.dumps(config["backbone"], sort_keys=True)))
    if head not in heads:
        raise StudyError(f"{where.at(('search', 'metric'))}search.metric {metric}: {config['method']['name']} has no "
                         f"head {head!r} (its heads: {', '.join(heads)}); val/acc is each method's primary head")


# ----------------------------------------------------------------------------- the choice

def choose_best(outcomes: list[dict], epochs: int) -> dict | None:
    """The search trial whose configuration the final cells retrain: among the trials that trained every epoch
    (ASHA stops the others early, before their schedule ended), the highest last-epoch validation score; ties
    go to the earlier trial. Without such a trial (a device-hour budget spent mid-training), the furthest
    trained, then the highest score. `outcomes`: {"index", "value", "epochs", "ok"} each; None if none is ok."""
    usable = [o for o in outcomes if o.get("ok") and o.get("value") is not None and math.isfinite(o["value"])]
    if not usable:
        return None
    complete = [o for o in usable if o["epochs"] >= epochs]
    pool = complete or usable
    return max(pool, key=lambda o: (o["epochs"] if not complete else 0, o["value"], -o["index"]))

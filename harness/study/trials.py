"""Expansion of a validated study into trials (grid x seeds), each with a stable identity.

A trial's identity is a hash of its fully resolved config (method and its parameters with defaults
filled in, dataset, backbone, train, seed) and the harness's MATH_VERSION. Re-running a study skips
identities that already have a finished result; changing one knob reruns only the trials it touches.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from harness.core.versions import MATH_VERSION
from harness.plugin.backbones import BackboneConfig
from harness.data import DATASETS, DatasetParams
from harness.plugin.method import METHODS, MethodParams
from harness.core.registry import did_you_mean
from harness.study.search_space import ValidationConfig
from harness.study.config import MAX_TRIALS, SECTIONS_IN_GRID, ReportConfig, Study, TrainConfig
from harness.study.errors import StudyError
from harness.study.overrides import get_dotted, set_dotted
from harness.study.errors import Where, format_errors


@dataclass(frozen=True)
class TrialSpec:
    trial_id: str
    study: str
    profile: str
    config: dict  # {"method", "dataset", "backbone", "train", "seed"}: plain JSON data
    axes: dict[str, Any] = field(default_factory=dict)  # grid axis (dotted) -> value
    grids: list[str] = field(default_factory=list)  # the named grids this trial belongs to
    kind: str = "final"  # "final": a table cell; "search": a trial of a study's search (harness.study.search)
    title: str = ""  # a label of its own (a search trial's: its cell and its number in the search)

    @property
    def label(self) -> str:
        if self.title:
            return self.title
        parts = [f"{k}={v}" for k, v in self.axes.items()] + [f"seed={self.config['seed']}"]
        return ",".join(parts)


@dataclass(frozen=True)
class TrialConfig:
    """A trial's config validated once into its typed sections: what the engine and the trial runner use."""

    method: MethodParams
    dataset: DatasetParams
    backbone: BackboneConfig
    train: TrainConfig
    seed: int
    report: ReportConfig = field(default_factory=ReportConfig)  # what the trial stores for the report
    # A search trial's validation split (harness.study.search): it trains on the rest of the training split, is scored
    # on this, and never sees the test split. None: a table cell (the whole training split, the test split).
    validation: ValidationConfig | None = None

    @classmethod
    def parse(cls, config: dict) -> "TrialConfig":
        sections = {s: model.model_validate(config[s]) for s, model in _section_models(config).items()}
        validation = ValidationConfig.model_validate(config["validation"]) if config.get("validation") else None
        return cls(**sections, seed=int(config["seed"]), report=ReportConfig.model_validate(config.get("report", {})),
                   validation=validation)

    @property
    def stored_size(self) -> int:
        """The size the dataset is decoded at: train.resize, else the crop size."""
        return stored_size(self.train.model_dump())


def stored_size(config_or_train: dict) -> int:
    train = config_or_train.get("train", config_or_train)
    return train["resize"] or train["image_size"]


@dataclass
class ResolvedStudy:
    study: Study
    trials: list[TrialSpec]  # with `search:`, the untuned cells (their search units: `search`)
    search: Any = None  # harness.study.search.SearchPlan of a study with `search:`

    @property
    def name(self) -> str:
        return self.study.name

    @property
    def profile(self) -> str:
        return self.study.profile


def all_axes(study: Study) -> list[str]:
    """Every grid axis of the study, in order of first appearance."""
    grids = [study.grid] + list(study.grids.values())
    return list(dict.fromkeys(axis for grid in grids for axis in grid))


# How a trial is run, not what it computes: changing these never reruns a finished trial.
IDENTITY_NEUTRAL = {"train": {"timeout_s", "reference_workload"}}


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@functools.lru_cache(maxsize=None)
def schema_defaults(model: type[BaseModel]) -> dict[str, str]:
    """Each optional field's default, as JSON (what a resolved config holds when the study leaves it out). A field
    added with a default that computes something new names, as `identity_default` in its json_schema_extra, the
    value configs meant before it existed: that value stays out of identities (old results stay valid under it)
    and the new default enters them (synthfg's `render`: 2 before, 3 now)."""
    def default(f) -> Any:
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        return extra["identity_default"] if "identity_default" in extra else f.get_default(call_default_factory=True)

    return {name: _json(default(f)) for name, f in model.model_fields.items() if not f.is_required()}


def identity_config(config: dict) -> dict:
    """What a trial's identity is made of: every setting that differs from its schema default (plus the
    plugin names and the seed). A field added later with a default is absent from it, so upgrading the
    harness keeps the identities (and results) of finished trials; changing a DEFAULT therefore changes
    what old identities compute, and must come with a MATH_VERSION bump (tests/test_identity.py guards it)."""
    out: dict = {"seed": config["seed"]}
    for section, model in _section_models(config).items():
        out[section] = dict(_identity_section(section, model, config[section]))
    if config.get("validation"):  # a search trial computes something else than the cell with the same settings
        out["validation"] = dict(config["validation"])
    return out


_IDENTITY_SECTIONS: dict[tuple, dict] = {}


def _identity_section(section: str, model: type[BaseModel], values: dict) -> dict:
    """The non-default settings of one section, remembered by its JSON (a grid's trials share most sections)."""
    key = (section, model, _json(values))
    found = _IDENTITY_SECTIONS.get(key)
    if found is None:
        defaults, neutral = schema_defaults(model), IDENTITY_NEUTRAL.get(section, set())
        found = {k: v for k, v in values.items()
                 if k == "name" or (k not in neutral and (k not in defaults or _json(v) != defaults[k]))}
        if len(_IDENTITY_SECTIONS) > 50_000:
            _IDENTITY_SECTIONS.clear()
        _IDENTITY_SECTIONS[key] = found
    return found


def trial_identity(config: dict) -> str:
    """A short hash of the trial's identity config and the harness's MATH_VERSION."""
    if set(config) >= {"method", "dataset", "backbone", "train", "seed"}:
        config = identity_config(config)
    blob = json.dumps({**config, "math_version": MATH_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=32)
def backbone_num_stages(backbone_json: str) -> int:
    """Stage count of a backbone, built on the meta device (no memory, no weights), remembered on this machine per
    timm version (the node cache's backbone_stages.json), so a rerun or a --dry-run need not import timm."""
    import importlib.metadata

    from harness.core.atomic import atomic_write_bytes
    from harness.core.bounded import BoundedReadError, read_json
    from harness.data import cache_dir

    key = f"timm {importlib.metadata.version('timm')}: {backbone_json}"
    path = cache_dir() / "backbone_stages.json"
    try:
        known = read_json(path, 1 << 20, "the backbone stage cache") if path.exists() else {}
    except (BoundedReadError, OSError, ValueError):
        known = {}  # unreadable: counted again, and rewritten
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), int) and known[key] > 0:
        return known[key]
    stages = _count_stages(backbone_json)
    known = {k: v for k, v in list(known.items())[-255:]}  # bounded: the newest 256 backbones
    known[key] = stages
    try:
        atomic_write_bytes(path, json.dumps(known, indent=0).encode())
    except OSError:
        pass  # a read-only cache costs a rebuild next time, nothing else
    return stages


def _count_stages(backbone_json: str) -> int:
    import timm
    import torch

    cfg = BackboneConfig.model_validate_json(backbone_json)
    kwargs = {"features_only": True, **cfg.kwargs}
    if cfg.out_indices is not None:
        kwargs["out_indices"] = tuple(cfg.out_indices)
    with torch.device("meta"):
        return len(timm.create_model(cfg.name, pretrained=False, **kwargs).feature_info.channels())


def estimated_cost(config: dict) -> float:
    """A trial's training cost in arbitrary units (epochs x pixels per image x the method's passes per batch):
    only for ordering trials longest first, which finishes a study's table soonest on a few slots."""
    train = config["train"]
    method = METHODS.get(config["method"]["name"])
    params = method.Params.model_validate(config["method"])
    return float(train["epochs"]) * train["image_size"] ** 2 * method.relative_cost(params)


def _section_models(config: dict) -> dict[str, type[BaseModel]]:
    return {"method": METHODS.get(config["method"]["name"]).Params,
            "dataset": DATASETS.get(config["dataset"]["name"]).Params,
            "backbone": BackboneConfig, "train": TrainConfig}


def _check_axis(axis: str, values: Any, models: dict[str, type[BaseModel]], where: Where) -> None:
    at = where.at(("grid", axis))
    section, _, key = axis.partition(".")
    if axis in WHOLE_SECTIONS:  # a whole plugin section per value, e.g. each method with its own settings
        if not isinstance(values, list) or not values or not all(isinstance(v, dict) and "name" in v for v in values):
            raise StudyError(f"{at}grid axis '{axis}': give a list of {axis} sections, each with a name "
                             f"(and an optional label), e.g. [{{name: pmg, stages: 3}}, {{name: baseline}}]")
        labels = [section_label(v) for v in values]
        if len(set(labels)) != len(labels):
            raise StudyError(f"{at}grid axis '{axis}': two values share the label {labels}; "
                             "add label: to tell them apart")
        return
    if section not in SECTIONS_IN_GRID or not key:
        raise StudyError(f"{at}grid axis '{axis}': must be a dotted path into one of {', '.join(SECTIONS_IN_GRID)}, "
                         "e.g. method.stages")
    fields = [f for f in models[section].model_fields if f != "name" or section != "method"]
    if key not in models[section].model_fields:
        hint = did_you_mean(key, fields, prefix=f"{section}.")
        raise StudyError(f"{at}grid axis '{axis}': {section} has no key '{key}': {hint}"
                         f"(valid keys: {', '.join(sorted(fields))})")
    if not isinstance(values, list) or not values:
        raise StudyError(f"{at}grid axis '{axis}': give a non-empty list of values, e.g. [1, 2, 3]")
    dumped = [json.dumps(v, sort_keys=True, default=str) for v in values]
    if len(set(dumped)) != len(dumped):
        raise StudyError(f"{at}grid axis '{axis}': repeated values {values}; list each value once")


WHOLE_SECTIONS = ("method", "dataset")


def section_label(value: dict) -> str:
    """How a whole-section grid value is named in tables: its label, else its plugin name."""
    return str(value.get("label") or value["name"])


def _validate_sections(config: dict, where: Where, context: str, seen: dict | None = None) -> dict:
    """Each section validated into its resolved JSON form. `seen` remembers sections already validated (a grid's
    trials share most of theirs): a 10,000-trial grid validates each distinct section once."""
    seen = {} if seen is None else seen
    out = {}
    models = _section_models(config)
    for section, model in models.items():
        key = (section, model, _json(config[section]))
        if key not in seen:
            try:
                seen[key] = json.dumps(model.model_validate(config[section]).model_dump(mode="json"))
            except ValidationError as e:
                raise StudyError(format_errors(e, model, (section,), where) + context) from None
        out[section] = json.loads(seen[key])  # a fresh copy per trial
    key = ("validate_with", _json(out["method"]), _json(out["backbone"]))
    if key not in seen:
        method_cls = METHODS.get(out["method"]["name"])
        try:
            stages = backbone_num_stages(json.dumps(out["backbone"], sort_keys=True))
        except Exception as e:  # noqa: BLE001 - timm raises what it likes (RuntimeError, TypeError, IndexError)
            raise StudyError(f"{where.at(('backbone',))}backbone {out['backbone']['name']!r}: timm cannot build it "
                             f"with these settings ({type(e).__name__}: {e}){context}") from None
        try:
            method_cls.validate_with(method_cls.Params.model_validate(out["method"]), stages)
        except ValueError as e:
            raise StudyError(f"{where.at(('method',))}{e}{context}") from None
        seen[key] = True
    return out


def _axis_value(config: dict, axis: str) -> Any:
    """A trial's value on an axis, read from its resolved config (so pooled grids fill every axis)."""
    try:
        return get_dotted(config, axis)
    except (KeyError, TypeError):
        return None


def count_trials(study: Study) -> int:
    """Trials the study expands to at most (grid cells x seeds, summed over named grids), without expanding it."""
    named = dict(study.grids) or {"": study.grid}
    return sum(math.prod(len(v) if isinstance(v, list) else 1 for v in grid.values()) for grid in named.values()) \
        * len(set(study.seeds))


def _check_reference(table, at: str, study: Study) -> None:
    """A table's paper numbers are read when the report is written, after training: check them now."""
    import pandas as pd

    from harness.core.bounded import read_reference_csv

    path = Path(table.reference.file)
    if not path.is_absolute():
        path = Path(study.path).parent / "references" / path
    try:
        paper = read_reference_csv(path)  # a regular file, size-capped (harness.core.bounded)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise StudyError(f"{at}reference file {path}: cannot read it as CSV ({type(e).__name__}: {e})") from None
    missing = [c for c in ("setting", "value") if c not in paper.columns]
    if missing:
        raise StudyError(f"{at}reference file {path}: no column {', '.join(missing)} (it needs setting, value)")
    settings = set(paper["setting"].astype(str))
    for cell in table.reference.cells:
        if cell.setting not in settings:
            raise StudyError(f"{at}reference file {path}: no row with setting {cell.setting!r}")
    values = pd.to_numeric(paper["value"], errors="coerce")
    if not values.map(math.isfinite).all():
        raise StudyError(f"{at}reference file {path}: every value must be a finite number")


def resolve(study: Study, where: Where, max_trials: int = MAX_TRIALS, on_count=None) -> ResolvedStudy:
    base = {
        "method": study.method.model_dump(),
        "dataset": study.dataset.model_dump(),
        "backbone": study.backbone.model_dump(mode="json"),
        "train": study.train.model_dump(mode="json"),
    }
    _validate_sections(base, where, "")
    models = _section_models(base)
    if study.grid and study.grids:
        raise StudyError(f"{where.at(('grids',))}give either grid: (one grid) or grids: (several named grids), "
                         "not both")
    named = dict(study.grids) or {"": study.grid}
    for name, grid in named.items():
        for axis, values in grid.items():
            _check_axis(axis, values, models, where)
    axes = all_axes(study)
    tables = dict(study.tables) or ({"": study.table} if study.table else {})
    for tname, table in tables.items():
        at = ("tables", tname) if tname else ("table",)
        if study.grids and table.grid not in study.grids:
            raise StudyError(f"{where.at(at)}table {tname or ''} needs grid: one of {', '.join(study.grids)}")
        table_axes = study.grids[table.grid] if study.grids else study.grid
        for role in ("rows", "columns"):
            value = getattr(table, role)
            for axis in ([value] if isinstance(value, str) else value or []):
                if axis not in table_axes and axis != "seed":
                    raise StudyError(f"{where.at(at + (role,))}table.{role} '{axis}' is not a grid axis "
                                     f"(grid axes: {', '.join(table_axes) or 'none'})")
        if table.reference:
            _check_reference(table, where.at(at + ("reference",)), study)
    count = count_trials(study)
    if count > max_trials:
        raise StudyError(f"{where.at(('grids',) if study.grids else ('grid',))}the grid expands to {count:,} trials "
                         f"(grid cells x {len(set(study.seeds))} seeds), more than the limit of {max_trials:,}; "
                         "narrow the grid, or raise the limit with --max-trials N if you mean it")
    if on_count is not None:
        on_count(count)

    trials: list[TrialSpec] = []
    by_id: dict[str, TrialSpec] = {}
    seen: dict = {}
    for name, grid in named.items():
        grid_axes = list(grid)
        for combo in itertools.product(*(grid[a] for a in grid_axes)):
            # An axis sets one key of a section, or a whole section: a copy of each section is enough.
            config = {section: dict(values) for section, values in base.items()}
            labels = {}
            for axis, value in zip(grid_axes, combo):
                if axis in WHOLE_SECTIONS:
                    labels[axis] = section_label(value)
                    value = {k: v for k, v in value.items() if k != "label"}
                set_dotted(config, axis, value)
            context = (f"\n  (in the trial with {', '.join(f'{a}={v!r}' for a, v in zip(grid_axes, combo))})"
                       if grid_axes else "")
            resolved = _validate_sections(config, where.in_grid(), context, seen)
            workers, batch = study.resources.workers, resolved["train"]["batch_size"]
            if batch % workers:
                raise StudyError(f"{where.at(('train', 'batch_size'))}train.batch_size={batch} does not divide by "
                                 f"resources.workers={workers}: the batch is the global batch, split evenly over the "
                                 f"workers; choose a multiple of {workers} (e.g. {batch + workers - batch % workers})"
                                 + context)
            for seed in study.seeds:
                full = {**resolved, "seed": seed, "report": study.report.model_dump()}
                trial_id = trial_identity(full)  # made of the four sections and the seed: not of `report`
                if trial_id in by_id:  # the same trial in another named grid: run it once
                    if name and name not in by_id[trial_id].grids:
                        by_id[trial_id].grids.append(name)
                    continue
                values = {axis: labels.get(axis) or (section_label(full[axis]) if axis in WHOLE_SECTIONS
                                                     else _axis_value(full, axis)) for axis in axes}
                spec = TrialSpec(trial_id=trial_id, study=study.name, profile=study.profile, config=full,
                                 axes=values, grids=[name] if name else [])
                by_id[trial_id] = spec
                trials.append(spec)
    return ResolvedStudy(study=study, trials=trials)

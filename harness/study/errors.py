"""Where a study file says what: the YAML line of every key path, and validation errors turned into
messages that name the file and line, what is allowed, and the closest valid key for a typo."""

from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from harness.core.registry import did_you_mean


class StudyError(ValueError):
    """An invalid study file, profile or override. Nothing has been started."""


def line_map(text: str) -> dict[tuple, int]:
    """Dotted key path (as a tuple) -> 1-based line, read within harness.study.reader's bounds."""
    from harness.study import reader as study_yaml

    return study_yaml.load(text)[1]


def _allowed(model: type[BaseModel], field: str) -> str:
    info = model.model_fields.get(field)
    if info is None:
        return ""
    bounds = []
    for meta in info.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{sym} {getattr(meta, attr)}")
    parts = []
    if bounds:
        parts.append(f"allowed: {field} " + " and ".join(bounds))
    annotation = str(info.annotation).replace("typing.", "")
    if "Literal" in annotation:
        parts.append(f"allowed: {annotation}")
    if info.description:
        parts.append(info.description)
    return "; ".join(parts)


def _section_model(model: type[BaseModel], loc: tuple) -> Any:
    """The model a validation error's location points into: through optional sections (`table: TableSpec |
    None`) and named ones (`tables: dict[str, TableSpec]`, where a location part is the name)."""
    section: Any = model
    for part in loc:
        if isinstance(section, type) and issubclass(section, BaseModel):
            f = section.model_fields.get(str(part))
            section = f.annotation if f is not None else None
        elif get_origin(section) in (dict, list):
            section = get_args(section)[-1]  # this part is the entry's name or index
        else:
            return None
        if get_origin(section) in (Union, types.UnionType):
            models = [a for a in get_args(section) if a is not type(None)]
            section = models[0] if len(models) == 1 else None
    return section


def format_errors(err: ValidationError, model: type[BaseModel], prefix: tuple, where: "Where") -> str:
    messages = []
    for e in err.errors():
        if not e["loc"]:  # a model-level check (a validator over several fields): say it at the section
            at = where.at(prefix)
            messages.append(f"{at}{'.'.join(map(str, prefix)) or 'study'}: {e['msg'].removeprefix('Value error, ')}")
            continue
        loc = prefix + tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        at = where.at(loc)
        if e["type"] == "extra_forbidden":
            # Walk the model to the section the unknown key sits in, to list its valid keys.
            section = _section_model(model, e["loc"][:-1])
            valid = sorted(getattr(section, "model_fields", {}) or [])
            valid = [k for k in valid if k not in ("path", "profile")]
            hint = did_you_mean(str(e["loc"][-1]), valid)
            messages.append(f"{at}unknown key '{dotted}': {hint}(valid keys: {', '.join(valid)})")
        else:
            field_model = _section_model(model, e["loc"][:-1])
            allowed = _allowed(field_model, str(e["loc"][-1])) if isinstance(field_model, type) and \
                issubclass(field_model, BaseModel) else ""
            got = f" (got {e['input']!r})" if e["type"] != "missing" else ""
            msg = e["msg"].removeprefix("Value error, ")
            messages.append(f"{at}{dotted}: {msg}{got}" + (f"; {allowed}" if allowed else ""))
    return "\n".join(messages)


class Where:
    """Finds the file line of a key path, looking in the selected profile first."""

    def __init__(self, path: str, lines: dict[tuple, int], profile: str | None, grid: bool = False):
        self.path, self.lines, self.profile, self.grid = path, lines, profile, grid

    def in_grid(self) -> "Where":
        """The same, but a key that is a grid axis points at its line under `grid:`."""
        return Where(self.path, self.lines, self.profile, grid=True)

    def at(self, loc: tuple) -> str:
        loc = tuple(loc)
        axis = ".".join(str(p) for p in loc)
        if self.grid:
            for grid_key in ((("profiles", self.profile, "grid", axis)) if self.profile else None, ("grid", axis)):
                if grid_key in self.lines:
                    return f"{self.path}:{self.lines[grid_key]}: "
        for candidate in ((("profiles", self.profile) + loc) if self.profile else None, loc):
            while candidate:
                if candidate in self.lines:
                    return f"{self.path}:{self.lines[candidate]}: "
                candidate = candidate[:-1]
        return f"{self.path}: "

"""The base of every config section (study sections, method and dataset parameters, the backbone): strict.

Pydantic's lax mode reads `epochs: true` as 1, `jigsaw: "yes"` or `jigsaw: 1` as true, `epochs: 2.5e1` as 25
and `lr: .inf` as infinity; a study file is shared like code, so these are errors here:

- unknown keys are errors (`extra="forbid"`);
- no infinity or NaN in any float (`allow_inf_nan=False`), nested lists included;
- an int field takes a whole number (not true/false, not 2.0); a string of digits stays accepted, as `${VAR}`
  interpolation gives one;
- a bool field takes true or false (not 0/1, not "yes"; the strings "true" and "false" of a `${VAR}` too);
- a float field takes a number, not true/false (a string that reads as a number stays accepted: PyYAML reads
  `1e-3`, without a dot, as a string);
- an integer beyond +-2**53 (what JSON and the parquet columns hold exactly) is out of range everywhere.

Defaults are not re-checked (pydantic does not validate them), so no default value changes.
"""

from __future__ import annotations

import math
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

MAX_INT = 2**53


def _kinds(annotation: Any) -> set[str]:
    """The scalar kinds an annotation accepts: bool, int, float, str, none, list:<kinds> or other."""
    if annotation is bool:
        return {"bool"}
    if annotation is int:
        return {"int"}
    if annotation is float:
        return {"float"}
    if annotation is str:
        return {"str"}
    if annotation is type(None):
        return {"none"}
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return set().union(*(_kinds(a) for a in get_args(annotation)))
    if origin is Annotated:
        return _kinds(get_args(annotation)[0])
    if origin is Literal:
        return {"bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "float" if isinstance(v, float)
                else "str" if isinstance(v, str) else "other" for v in get_args(annotation)}
    if origin in (list, tuple, set, frozenset):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        if len(set(args)) == 1:
            return {"list:" + ",".join(sorted(_kinds(args[0])))}
        return {"other"}
    return {"other"}


def _problem(value: Any, kinds: set[str]) -> str | None:
    """Why `value` does not strictly fit a field of these kinds (None when it does, or when pydantic decides)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "give a finite number (infinity and NaN are not allowed)"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        return f"out of range (at most {MAX_INT:,} in absolute value)"
    if "other" in kinds:
        return None
    lists = [k for k in kinds if k.startswith("list:")]
    if isinstance(value, (list, tuple)) and lists:
        inner = set(lists[0][5:].split(","))
        for i, item in enumerate(value):
            problem = _problem(item, inner)
            if problem:
                return f"item {i} ({item!r}): {problem}"
        return None
    numeric = kinds & {"int", "float"}
    if isinstance(value, bool):
        if "bool" not in kinds and numeric:
            return "give a number, not true/false"
        return None
    if isinstance(value, int):
        if not numeric and "bool" in kinds:
            return "give true or false"
        return None
    if isinstance(value, float):
        if "float" not in kinds and "int" in kinds:
            return "give a whole number (written without a decimal point)"
        if not numeric and "bool" in kinds:
            return "give true or false"
        return None
    if isinstance(value, str) and "str" not in kinds and "bool" in kinds and not numeric and \
            value.strip().lower() not in ("true", "false"):
        return "give true or false"  # pydantic alone would read yes/on/1/y as true
    return None


class ConfigModel(BaseModel):
    """Strict config section (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        kinds = _field_kinds(cls, info.field_name or "")
        problem = _problem(value, kinds) if kinds else None
        if problem:
            raise ValueError(problem)
        return value


_KINDS: dict[tuple[type, str], set[str]] = {}


def _field_kinds(model: type[BaseModel], name: str) -> set[str]:
    """_kinds of a model's field, computed once per model and field (validation runs per trial)."""
    key = (model, name)
    if key not in _KINDS:
        field = model.__pydantic_fields__.get(name)
        _KINDS[key] = _kinds(field.annotation) if field is not None else set()
    return _KINDS[key]


def distinct_seeds(seeds: list[int]) -> list[int]:
    """A seed list names each seed once: a repeated seed would count as one run but expand as many (issue 26)."""
    from collections import Counter

    repeated = [(s, n) for s, n in Counter(seeds).items() if n > 1]
    if repeated:
        shown = ", ".join(f"{s} ({n:,} times)" for s, n in repeated[:5])
        raise ValueError(f"seeds listed more than once: {shown}; list each seed once (each is one run of every cell)")
    return seeds

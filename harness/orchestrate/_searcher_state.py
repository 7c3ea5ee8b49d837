"""A study search's saved state as data: JSON with a schema, never a pickle (issue 26).

The state lies on the storage (`<storage>/tune/search-*/searcher-state-*.json`), which anyone who can write the
runs folder or the bucket can replace: a pickle there would run its code on the driver at the next run. So the
state is plain data, checked before any of it is used:

- the file is at most MAX_BYTES, JSON, `format` and `version` ours, every field typed and bounded (pydantic);
- each unit's points are checked against the unit the study defines now: their knob values are the unit's knobs
  and lie in its distributions, every trial id is recomputed from its values (a planted id is never trusted as a
  path or a record key), indexes run 1..n, an alias points back at an earlier point;
- the sub-searcher is never unpickled: random search restores its numpy generator's documented state (PCG64's
  integers), TPE is rebuilt by replaying the points into a fresh OptunaSearch (each configuration enqueued and
  asked again, each result told again) and then restoring the seeded samplers' Mersenne Twister states, so the
  resumed search suggests what an uninterrupted one would.

Anything that does not pass is a StateError (a ValueError with a short reason): the caller names the file in a
warning and searches afresh (stored results still count).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

FORMAT = "fgvc-harness searcher state"
VERSION = 2
MAX_BYTES = 16 << 20  # a 10,000-trial search's state is ~5 MB
MAX_POINTS = 10_000  # a budget is at most 10,000 trials per cell (harness.study.search_space.Budget)

_ID = r"^[0-9a-f]{12}$"
_U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
Plain = Union[bool, int, float, str, None]


class StateError(ValueError):
    """A saved searcher state that cannot be used (said with the file's name; the search starts afresh)."""


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class PointState(_Data):
    index: int = Field(ge=1, le=MAX_POINTS)
    sub_id: str = Field(pattern=r"^[0-9a-f]{12}-[0-9]{1,5}$")
    values: dict[Annotated[str, Field(max_length=200)], Plain] = Field(max_length=64)
    trial_id: str = Field(pattern=_ID)
    state: Literal["running", "done", "alias"]
    status: Literal["", "finished", "stopped", "failed", "reused", "alias"]
    value: float | None = None
    epochs: int = Field(0, ge=0, le=10_000)
    ok: bool = False
    device_s: float = Field(0.0, ge=0.0, le=1e12)
    alias_of: str | None = Field(None, pattern=_ID)
    told: bool = False


class RandomState(_Data):
    """numpy's PCG64 state as `Generator.bit_generator.state` documents it."""

    kind: Literal["random"]
    bit_generator: Literal["PCG64"]
    state: int = Field(ge=0, lt=2**128)
    inc: int = Field(ge=0, lt=2**128)
    has_uint32: int = Field(ge=0, le=1)
    uinteger: _U32


class TwisterState(_Data):
    """numpy's RandomState (MT19937) state as `RandomState.get_state()` documents it."""

    keys: list[_U32] = Field(min_length=624, max_length=624)
    pos: int = Field(ge=0, le=624)
    has_gauss: int = Field(ge=0, le=1)
    cached_gaussian: float


class TpeState(_Data):
    kind: Literal["tpe"]
    rng: TwisterState | None = None  # the TPE sampler's own generator
    random_rng: TwisterState | None = None  # its random sampler's (the startup trials)


class UnitState(_Data):
    points: list[PointState] = Field(max_length=MAX_POINTS)
    sub: Annotated[Union[RandomState, TpeState], Field(discriminator="kind")]


class SearcherState(_Data):
    format: Literal[FORMAT]
    version: Literal[VERSION]
    units: dict[Annotated[str, Field(pattern=_ID)], UnitState] = Field(max_length=100_000)


# ----------------------------------------------------------------------------- writing

def _twister(rng) -> dict | None:
    try:
        name, keys, pos, has_gauss, cached = rng.rng.get_state()
    except (AttributeError, TypeError, ValueError):  # another Optuna than the one this was written for
        return None
    return {"keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)} if name == "MT19937" else None


def sub_state(searcher) -> dict:
    """A sub-searcher's own state, as data (its observations are the unit's points)."""
    rng = getattr(searcher, "rng", None)
    if isinstance(rng, np.random.Generator):
        state = rng.bit_generator.state
        return {"kind": "random", "bit_generator": state["bit_generator"], "state": int(state["state"]["state"]),
                "inc": int(state["state"]["inc"]), "has_uint32": int(state["has_uint32"]),
                "uinteger": int(state["uinteger"])}
    sampler = getattr(getattr(searcher, "_ot_study", None), "sampler", None)
    random_sampler = getattr(sampler, "_random_sampler", None)
    return {"kind": "tpe", "rng": _twister(getattr(sampler, "_rng", None)),
            "random_rng": _twister(getattr(random_sampler, "_rng", None))}


def dump(units: dict[str, dict]) -> bytes:
    """The file's bytes: `units` maps unit ids to {"points": [...], "sub": sub_state(...)}."""
    return json.dumps({"format": FORMAT, "version": VERSION, "units": units}, allow_nan=False).encode()


# ----------------------------------------------------------------------------- reading

def parse(data: bytes) -> SearcherState:
    """The state in `data`, checked against the schema (StateError with the first problem when it is not)."""
    if len(data) > MAX_BYTES:
        raise StateError(f"{len(data):,} bytes; a searcher state is at most {MAX_BYTES:,}")
    if data[:2] in (b"\x80\x03", b"\x80\x04", b"\x80\x05") or data[:1] == b"\x80":
        raise StateError("a pickle (an older harness's format, or planted): never read, a pickle can run code")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StateError(f"not JSON ({type(e).__name__})") from None
    try:
        return SearcherState.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])[:200]
        raise StateError(f"not a searcher state of this harness ({where}: {first['msg']})") from None


def _contains(dist, value) -> bool:
    if dist.kind == "choice":
        return json.dumps(value, sort_keys=True) in {json.dumps(v, sort_keys=True) for v in dist.values}
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if dist.kind == "randint" and not isinstance(value, int):
        return False
    return dist.low <= value <= dist.high


def identity_of(unit, values: object, what: str) -> str:
    """The trial id of a search trial with these stored knob values, once they are checked to be the unit's knobs
    within its distributions (StateError naming `what` when they are not)."""
    from harness.study.trials import trial_identity

    if not isinstance(values, dict) or set(values) != set(unit.knobs):
        raise StateError(f"unit {unit.unit_id}: {what} does not tune the study's knobs {sorted(unit.knobs)}")
    outside = [k for k, v in values.items() if not _contains(unit.knobs[k], v)]
    if outside:
        raise StateError(f"unit {unit.unit_id}: {what}: {outside[0]} outside its distribution")
    try:
        return trial_identity(unit.search_config(values))
    except (ValueError, TypeError) as e:
        raise StateError(f"unit {unit.unit_id}: {what}: its values do not validate ({type(e).__name__})") from None


def checked_points(unit, state: UnitState) -> list[dict]:
    """The unit's points of a saved state as Point fields, each checked against the unit the study defines now."""
    points, seen = [], set()
    for i, p in enumerate(state.points, start=1):
        if p.index != i:
            raise StateError(f"unit {unit.unit_id}: point {i} says it is #{p.index}")
        if identity_of(unit, p.values, f"point #{i}") != p.trial_id:
            raise StateError(f"unit {unit.unit_id}: point #{i}: trial id {p.trial_id} is not its values' identity")
        if p.sub_id != f"{unit.unit_id}-{i}":
            raise StateError(f"unit {unit.unit_id}: point #{i}: sub id {p.sub_id!r} is not its own")
        if p.state == "alias" and p.alias_of not in seen:
            raise StateError(f"unit {unit.unit_id}: point #{i} repeats no earlier point")
        seen.add(p.trial_id)
        points.append(p.model_dump())
    return points


def checked_summary(unit, found: object) -> dict:
    """A cell's stored search/<unit>.json, its points and best checked as a saved state's are (StateError)."""
    if not isinstance(found, dict) or not isinstance(found.get("points"), list) or len(found["points"]) > MAX_POINTS:
        raise StateError(f"unit {unit.unit_id}: not a search summary")
    ids = set()
    for i, p in enumerate(found["points"], start=1):
        if not isinstance(p, dict) or p.get("index") != i or p.get("state") not in ("running", "done", "alias"):
            raise StateError(f"unit {unit.unit_id}: point {i} of its summary is malformed")
        if identity_of(unit, p.get("values"), f"point #{i}") != p.get("trial_id"):
            raise StateError(f"unit {unit.unit_id}: point #{i}: its trial id is not its values' identity")
        ids.add(p["trial_id"])
    best = found.get("best")
    if best is not None:
        value = best.get("value") if isinstance(best, dict) else None
        values = best.get("values") if isinstance(best, dict) else None
        if (identity_of(unit, values, "the best") != best.get("trial_id") or best["trial_id"] not in ids
                or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise StateError(f"unit {unit.unit_id}: the best of its summary is not one of its points")
    return found


def _set_twister(rng, state: TwisterState | None) -> None:
    if state is None or rng is None:
        return
    rng.rng.set_state(("MT19937", np.array(state.keys, dtype=np.uint32), state.pos, state.has_gauss,
                       state.cached_gaussian))


def replay(searcher, metric: str, sub: RandomState | TpeState, points: list[dict]) -> None:
    """A fresh sub-searcher brought to the saved state: its generator's state, and (TPE) every point asked and
    every told result told again, in their order."""
    if isinstance(sub, RandomState):
        if not isinstance(getattr(searcher, "rng", None), np.random.Generator):
            raise StateError("saved by random search, the study now uses tpe")
        searcher.rng.bit_generator.state = {"bit_generator": "PCG64", "state": {"state": sub.state, "inc": sub.inc},
                                            "has_uint32": sub.has_uint32, "uinteger": sub.uinteger}
        return
    study = getattr(searcher, "_ot_study", None)
    if study is None:
        raise StateError("saved by tpe, the study now uses random search")
    for p in points:
        study.enqueue_trial(p["values"])
        asked = searcher.suggest(p["sub_id"])
        if json.dumps(asked, sort_keys=True) != json.dumps(p["values"], sort_keys=True):
            raise StateError(f"point #{p['index']} cannot be replayed into TPE")
        if p["told"]:
            result = {metric: p["value"], "epoch": p["epochs"]} if p["ok"] else None
            searcher.on_trial_complete(p["sub_id"], result=result, error=not p["ok"])
    sampler = study.sampler
    _set_twister(getattr(sampler, "_rng", None), sub.rng)
    _set_twister(getattr(getattr(sampler, "_random_sampler", None), "_rng", None), sub.random_rng)

"""A study's whole search in one Tune experiment: a searcher and an ASHA per grid cell (a "unit").

Tune runs one search algorithm and one scheduler per experiment; a comparison needs one search per method
(each over its own space, with its own budget) and ASHA's cut-offs computed among a method's own trials, never
across methods. So:

- `StudySearcher` (a Tune Searcher) holds one `UnitSearch` per cell, each with its own sub-searcher: Optuna's
  TPE through Tune's OptunaSearch, or `RandomSearcher` (Tune's own sampling of each distribution, seeded).
  It asks the unit with the fewest trials so far for the next configuration, until every unit's budget is
  spent; when a unit's last search trial ends it picks the unit's best configuration (harness.study.search.choose_best)
  and hands out the unit's final cells (the best retrained on the whole training split for each seed). All of it
  in one experiment, so the slots never wait for the slowest method's search.
- `UnitScheduler` (a Tune scheduler) keeps an ASHAScheduler per unit, fed only that unit's search trials.

Its state (every unit's suggestions, results and sub-searcher) is what Tune saves as the experiment's searcher
state on the storage (`searcher-state-*.json`): data with a schema, never a pickle (harness.orchestrate.
_searcher_state); a rerun restores it (harness.orchestrate._search).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from harness.orchestrate import _searcher_state
from harness.study.search_space import Distribution, SearchConfig
from harness.study.search import SearchUnit, choose_best

STATE_VERSION = _searcher_state.VERSION
STATE_FILE = "searcher-state-{}.json"  # Tune's name for a searcher's file (Searcher.CKPT_FILE_TMPL), as JSON


def tune_domain(dist: Distribution):
    """A knob's distribution as Tune's search space domain."""
    if dist.kind == "uniform":
        return tune.uniform(dist.low, dist.high)
    if dist.kind == "loguniform":
        return tune.loguniform(dist.low, dist.high)
    if dist.kind == "randint":
        return tune.randint(dist.low, dist.high + 1)  # Tune's upper bound is exclusive; the study's included
    return tune.choice(list(dist.values))


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


class RandomSearcher(Searcher):
    """Random search: each knob drawn from its Tune domain with this searcher's own seeded generator."""

    def __init__(self, space: dict, seed: int, metric: str):
        super().__init__(metric=metric, mode="max")
        self.space, self.rng = space, np.random.default_rng(seed)

    def suggest(self, trial_id: str) -> dict:
        return {path: _plain(domain.sample(random_state=self.rng)) for path, domain in self.space.items()}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    CKPT_FILE_TMPL = STATE_FILE

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump(_searcher_state.sub_state(self), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            data = f.read(_searcher_state.MAX_BYTES + 1)
        try:
            sub = _searcher_state.RandomState.model_validate_json(data)
        except ValueError as e:
            raise _searcher_state.StateError(f"not a random searcher's state ({type(e).__name__})") from None
        _searcher_state.replay(self, "", sub, [])


def make_sub_searcher(unit: SearchUnit, search: SearchConfig) -> Searcher:
    space = {path: tune_domain(d) for path, d in unit.knobs.items()}
    if search.searcher == "random":
        return RandomSearcher(space, unit.sampler_seed, search.metric)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = unit.budget.trials
    startup = search.startup_trials or (min(10, max(2, trials // 3)) if trials else 10)
    sampler = optuna.samplers.TPESampler(seed=unit.sampler_seed, n_startup_trials=startup)
    # Optuna's own distributions (Tune's converter): OptunaSearch warns about Tune domains passed as `space`.
    return OptunaSearch(space=OptunaSearch.convert_search_space(space), metric=search.metric, mode="max",
                        sampler=sampler)


@dataclass
class Point:
    """One configuration a unit's searcher suggested."""

    index: int  # its number in the unit's search, from 1
    sub_id: str  # the id its sub-searcher knows it by
    values: dict
    trial_id: str  # the trial's identity (harness.study.trials.trial_identity)
    state: str = "running"  # running | done | alias (the same configuration as an earlier point: not run again)
    status: str = ""  # finished | stopped | failed | reused (a stored result of the same trial)
    value: float | None = None  # the metric at its last epoch
    epochs: int = 0
    ok: bool = False
    device_s: float = 0.0
    alias_of: str | None = None  # the trial_id it repeats
    told: bool = False  # its sub-searcher has its result

    def outcome(self) -> dict:
        return {"index": self.index, "value": self.value, "epochs": self.epochs, "ok": self.ok}


@dataclass
class UnitSearch:
    unit: SearchUnit
    searcher: Searcher
    metric: str
    points: list[Point] = field(default_factory=list)
    done: bool = False
    best: Point | None = None
    running_s: dict[str, float] = field(default_factory=dict)  # Tune trial id -> device-seconds so far
    reissue: list[Point] = field(default_factory=list)  # restored points that were running: run them again

    def spent_s(self) -> float:
        return sum(p.device_s for p in self.points) + sum(self.running_s.values())

    def budget_left(self) -> bool:
        budget = self.unit.budget
        if budget.trials is not None and len(self.points) >= budget.trials:
            return False
        return budget.device_hours is None or self.spent_s() < budget.device_hours * 3600

    def in_flight(self) -> bool:
        return any(p.state == "running" for p in self.points)

    def tell(self, point: Point) -> None:
        """The sub-searcher learns a point's result (its aliases' too: the same configuration asked again)."""
        result = {self.metric: point.value, "epoch": point.epochs} if point.ok else None
        for p in [point] + [a for a in self.points if a.state == "alias" and a.alias_of == point.trial_id]:
            if p.told:
                continue
            self.searcher.on_trial_complete(p.sub_id, result=result, error=not point.ok)
            p.told = True
            if p is not point:
                p.status, p.value, p.epochs, p.ok = "alias", point.value, point.epochs, point.ok

    def state(self) -> dict:
        return {"points": [asdict(p) for p in self.points], "sub": _searcher_state.sub_state(self.searcher)}

    def restore(self, state: _searcher_state.UnitState) -> None:
        """Its points and sub-searcher from a saved state (checked against this unit first; StateError when it
        does not fit: this unit's sub-searcher may then be half replayed, so the caller starts a fresh one)."""
        points = _searcher_state.checked_points(self.unit, state)
        _searcher_state.replay(self.searcher, self.metric, state.sub, points)
        self.points = [Point(**p) for p in points]
        self.reissue = [p for p in self.points if p.state == "running"]


class StudySearcher(Searcher):
    """Every unit's search, then its final cells, through Tune (see the module docstring).

    `make_trial(unit, point)` and `make_final(unit, best)` return Tune configs ({"trial": payload}) and register
    the trials' specs; `make_final` returns the final cells still to run (none when all are stored), or
    records them failed when the unit has no usable trial. `stored(unit, trial_id)`: a stored result of that
    search trial (a Point's status, value and epochs), or None to run it."""

    def __init__(self, units: list[UnitSearch], make_trial, make_final, stored, log=print):
        super().__init__(metric=None, mode=None)  # the metric is each unit's: Tune checks no result for it
        self.units, self.make_trial, self.make_final, self.stored, self.log = units, make_trial, make_final, stored, log
        self.finals: list[dict] = []  # Tune configs of final cells ready to run
        self.running: dict[str, tuple[UnitSearch, Point] | None] = {}  # Tune trial id -> its point (None: final)
        self.reused = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    # --- Tune's calls

    def suggest(self, trial_id: str):
        while True:
            if self.finals:
                self.running[trial_id] = None
                return self.finals.pop(0)
            for unit in sorted((u for u in self.units if not u.done), key=lambda u: len(u.points)):
                if unit.reissue:
                    point = unit.reissue.pop(0)
                    point.state = "running"
                    self.running[trial_id] = (unit, point)
                    return self.make_trial(unit, point)
                suggested = self._next(unit, trial_id)
                if suggested is not None:
                    return suggested
            finishing = [u for u in self.units if not u.done and not u.budget_left() and not u.in_flight()
                         and not u.reissue]
            if not finishing:
                break
            for unit in finishing:
                self._finish(unit)
        if all(u.done for u in self.units) and not self.finals:
            return Searcher.FINISHED
        return None  # wait: the running trials decide what comes next

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        entry = self.running.get(trial_id)
        if entry is not None:  # for a device-hour budget: what the running trial has spent so far
            unit, _ = entry
            unit.running_s[trial_id] = float(result.get("time_total_s", 0.0)) * unit.unit.devices

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        entry = self.running.pop(trial_id, None)
        if entry is None:
            return
        unit, point = entry
        unit.running_s.pop(trial_id, None)
        result = result or {}
        point.device_s = float(result.get("time_total_s", 0.0)) * unit.unit.devices
        failed = error or result.get("status") == "failed" or result.get(unit.metric) is None
        point.state, point.ok = "done", not failed
        point.status = "failed" if failed else ("finished" if result.get("kind") == "final" else "stopped")
        point.value = None if failed else float(result[unit.metric])
        point.epochs = int(result.get("epoch", 0) or 0)
        unit.tell(point)  # a unit whose last trial this was ends at the next suggest (after Tune's callbacks)

    CKPT_FILE_TMPL = STATE_FILE  # Tune's Searcher.save_to_dir names the file after this

    def save(self, checkpoint_path: str) -> None:
        data = _searcher_state.dump({u.unit.unit_id: u.state() for u in self.units})
        with open(checkpoint_path, "wb") as f:
            f.write(data)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.restore_bytes(f.read(_searcher_state.MAX_BYTES + 1))

    # --- resuming

    def restore_bytes(self, data: bytes) -> list[str]:
        """Restore the units this state knows (by unit id); returns their labels. Raises StateError (nothing
        restored, unless a TPE replay failed midway: see UnitSearch.restore) when the state cannot be used."""
        state = _searcher_state.parse(data)
        todo = [u for u in self.units if u.unit.unit_id in state.units and not u.done]
        for unit in todo:  # every unit's points checked before any is restored
            _searcher_state.checked_points(unit.unit, state.units[unit.unit.unit_id])
        for unit in todo:
            unit.restore(state.units[unit.unit.unit_id])
        return [u.unit.label for u in todo]

    def reconcile(self) -> tuple[int, int]:
        """After a restore: points that were running when the state was saved and have a stored result since
        (a trial that ended after the last save) are done; the others run again (and resume from their
        checkpoints). Returns (done from the store, to run again)."""
        from_store = 0
        for unit in self.units:
            for point in list(unit.reissue):
                found = self.stored(unit.unit, point.trial_id)
                if found is not None:
                    unit.reissue.remove(point)
                    point.state = "done"
                    point.status, point.value, point.epochs, point.ok = (found["status"], found["value"],
                                                                          found["epochs"], True)
                    unit.tell(point)
                    from_store += 1
        return from_store, sum(len(u.reissue) for u in self.units)

    # --- inside

    def _next(self, unit: UnitSearch, trial_id: str):
        """The unit's next configuration to train, or None when its budget is spent (points the store already
        holds, or that repeat an earlier point, are told at once and count towards the budget)."""
        while unit.budget_left():
            index = len(unit.points) + 1
            sub_id = f"{unit.unit.unit_id}-{index}"
            values = unit.searcher.suggest(sub_id)
            if values is None or values == Searcher.FINISHED:
                return None
            values = {k: _plain(v) for k, v in values.items()}
            config = unit.unit.search_config(values)
            from harness.study.trials import trial_identity

            point = Point(index=index, sub_id=sub_id, values=values, trial_id=trial_identity(config))
            unit.points.append(point)
            earlier = next((p for p in unit.points[:-1] if p.trial_id == point.trial_id and p.state != "alias"), None)
            if earlier is not None:  # the same configuration again (a small choice space): not trained twice
                point.state, point.alias_of = "alias", earlier.trial_id
                if earlier.state == "done":
                    unit.tell(earlier)
                continue
            found = self.stored(unit.unit, point.trial_id)
            if found is not None:  # trained by an earlier run (its result is stored): told, not trained again
                point.state = "done"
                point.status, point.value, point.epochs = found["status"], found["value"], found["epochs"]
                point.ok = True
                self.reused += 1
                unit.tell(point)
                continue
            self.running[trial_id] = (unit, point)
            return self.make_trial(unit, point)
        return None

    def _finish(self, unit: UnitSearch) -> None:
        unit.done = True
        real = [p for p in unit.points if p.state == "done"]
        best = choose_best([p.outcome() for p in real], unit.unit.epochs)
        unit.best = next((p for p in real if p.index == best["index"]), None) if best else None
        self.finals.extend(self.make_final(unit, unit.best))


class UnitScheduler(FIFOScheduler):
    """ASHA per unit: each unit's search trials are compared with that unit's only; final cells always train to
    the end. A search trial's last epoch is never cut (its final record, with its cost, follows it), so the rungs
    are at grace x reduction^k epochs below `train.epochs`."""

    def __init__(self, search: SearchConfig, epochs: dict[str, int]):
        super().__init__()
        self.config, self.epochs = search.scheduler, epochs
        self.metric_name = search.metric
        self.asha: dict[str, ASHAScheduler] = {}
        for unit_id, n in epochs.items():
            grace = self.config.grace_period
            if self.config.name == "asha" and grace < n:
                self.asha[unit_id] = ASHAScheduler(time_attr="epoch", metric=search.metric, mode="max", max_t=n,
                                                   grace_period=grace, reduction_factor=self.config.reduction_factor)

    def _of(self, trial) -> ASHAScheduler | None:
        spec = trial.config.get("trial", {})
        return self.asha.get(spec.get("unit")) if spec.get("kind") == "search" else None

    def on_trial_add(self, tune_controller, trial) -> None:
        asha = self._of(trial)
        if asha is not None:
            asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        asha = self._of(trial)
        if asha is None or result.get("kind") != "epoch" or result.get("epoch", 0) >= asha._max_t:
            return TrialScheduler.CONTINUE
        return asha.on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        asha = self._of(trial)
        if asha is not None and trial.trial_id in asha._trial_info:
            asha._trial_info.pop(trial.trial_id)

    def on_trial_error(self, tune_controller, trial) -> None:
        self.on_trial_complete(tune_controller, trial, {})

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.on_trial_complete(tune_controller, trial, {})

    def replay(self, unit_id: str, key: str, curve: list[dict]) -> None:
        """A stored search trial's epochs into its unit's rungs (a resumed search keeps the cut-offs it had)."""
        asha = self.asha.get(unit_id)
        if asha is None:
            return
        bracket = asha._brackets[0]
        stand_in = type("StoredTrial", (), {"trial_id": f"stored-{key}"})()
        for epoch in curve:
            if self.metric_name in epoch and epoch.get("epoch", 0) < asha._max_t:
                bracket.on_result(stand_in, epoch["epoch"], float(epoch[self.metric_name]))

    def debug_string(self) -> str:
        return "UnitScheduler: " + ", ".join(f"{u}: {a.debug_string()}" for u, a in self.asha.items())

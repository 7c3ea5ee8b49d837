"""Running a study's search (harness.study.search) through Ray Tune: one experiment for every cell's search trials and,
as each cell's search ends, its final cells (harness.orchestrate._searchers).

Stored (besides results.parquet, where every row says its `kind`: `search` or `final`):

    runs/<study>/<profile>/search/<unit>.json   each cell's search once it ended: every trial with its knob values,
                                                status and validation score, the chosen one, the budget spent
    <storage>/tune/search-<stamp>-<random>/searcher-state-*.json   the saved searcher state (every cell's
                                                suggestions, results and sub-searcher state), restored by the next
                                                run: JSON with a schema, never a pickle (_searcher_state)

Resuming: a rerun restores the newest saved searcher state, takes the trials that ended after it was saved from
the results store, and runs the ones that were running again (from their epoch checkpoints); a cell whose search
ended (its search/<unit>.json, with the same budget) is not searched again, and stored final cells are not
retrained: a finished search reruns nothing and starts no Ray.
"""

from __future__ import annotations

import json
import math
import time

import pyarrow.fs as pafs

from harness.orchestrate._callback import TUNE_KEYS, StoreCallback
from harness.core.escape import printable
from harness.orchestrate._searcher_state import MAX_BYTES as MAX_STATE_BYTES, StateError, checked_summary
from harness.orchestrate._cluster import max_concurrent
from harness.orchestrate._searchers import StudySearcher, UnitScheduler, UnitSearch, make_sub_searcher
from harness.core.paths import inside, name_problem
from harness.orchestrate._tuner import make_tuner
from harness.orchestrate.progress import Progress
from harness.core.atomic import atomic_write_bytes
from harness.results.store import FAILED, FINISHED, STOPPED, ResultStore
from harness.study.search import SearchUnit
from harness.study.trials import TrialSpec, trial_identity

EXPERIMENT_PREFIX = "search-"
SPLIT_KEYS = {"val/images", "val/set_hash", "val/members", "test_split"}  # per trial, not per epoch (no curves)
TPE_MISSING = ("search.searcher: tpe needs Optuna, which is not installed: pip install -e '.[tune]' (or pip install "
               "'optuna>=3'); or use searcher: random")


def check_searcher(searcher: str) -> None:
    """TPE without optuna: a clear error (exit 2) before Ray starts."""
    if searcher == "tpe":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ValueError(TPE_MISSING) from None


class SearchCallback(StoreCallback):
    """The store callback, plus: a search trial that ASHA stopped (it sends no final record) is stored as `stopped`
    with the epochs it trained; every row gets its cell's search columns (unit, knob values)."""

    def __init__(self, *args, extra: dict[str, dict], **kwargs):
        super().__init__(*args, **kwargs)
        self.extra = extra
        self.epochs: dict[str, dict[int, dict]] = {}

    def __getstate__(self) -> dict:
        return {k: v for k, v in super().__getstate__().items() if k != "epochs"}

    def _store(self, trial_id, status, metrics, error="", curves=None):
        super()._store(trial_id, status, {**self.extra.get(trial_id, {}), **metrics}, error, curves)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("kind") == "epoch":  # by epoch: a trial retried from its checkpoint repeats none
            kept = {k: v for k, v in result.items() if k not in TUNE_KEYS}
            self.epochs.setdefault(self._id(trial), {})[int(kept.get("epoch", 0))] = kept
        super().on_trial_result(iteration, trials, trial, result, **info)

    def on_trial_complete(self, iteration, trials, trial, **info):
        trial_id = self._id(trial)
        spec = self.specs.get(trial_id)
        if (spec is not None and spec.kind == "search" and trial_id not in self.summary.finished | self.summary.failed
                and trial_id not in self.timed_out):
            epochs = self.epochs.get(trial_id, {})
            last = dict(epochs[max(epochs)]) if epochs else {}
            history = [{k: v for k, v in epochs[e].items() if k not in SPLIT_KEYS} for e in sorted(epochs)]
            self._store(trial_id, STOPPED, {**last, "stopped_at_epoch": last.get("epoch", 0)}, "", history)
        self.epochs.pop(trial_id, None)
        super().on_trial_complete(iteration, trials, trial, **info)


def summary_path(store: ResultStore, unit: SearchUnit):
    return inside(store.root / "search", f"{unit.unit_id}.json")


def read_unit_summary(store: ResultStore, unit: SearchUnit, log=None) -> dict | None:
    """The stored end of a cell's search, when it ended with the budget the study gives it now (and its points
    are the unit's: their trial ids are recomputed from their values, never taken as they are stored)."""
    from harness.core.bounded import BoundedReadError, read_json

    path = summary_path(store, unit)
    try:
        found = read_json(path, MAX_STATE_BYTES)
    except FileNotFoundError:
        return None
    except BoundedReadError as e:
        found = e
    if isinstance(found, dict) and found.get("budget") != unit.budget.model_dump(mode="json"):
        return None
    try:
        if isinstance(found, Exception):
            raise StateError(str(found))
        return checked_summary(unit, found)
    except StateError as e:
        if log is not None:
            log(f"warning: {printable(path)} is unusable ({printable(str(e))[:300]}); the cell is searched again")
        return None


def run_search(resolved, store: ResultStore, summary, setup, options):
    """The study's search and final cells in one Tune experiment (`options`: harness.orchestrate.RunOptions)."""
    log = options.log
    plan = resolved.search
    search = plan.config
    study = resolved.study
    specs: dict[str, TrialSpec] = {}  # what the callback stores
    extra: dict[str, dict] = {}  # each trial's search columns
    current: list[TrialSpec] = []  # this study's rows (in_grid): the callback rewrites results.parquet from it
    listed: set[str] = set()

    def add(spec: TrialSpec) -> TrialSpec:
        if spec.trial_id not in listed:
            listed.add(spec.trial_id)
            current.append(spec)
        specs.setdefault(spec.trial_id, spec)
        return spec
    finals_todo: list[TrialSpec] = []
    pending: list[SearchUnit] = []

    def columns(unit: SearchUnit, values: dict, **more) -> dict:
        return {"search_unit": unit.unit_id, **{path: values.get(path) for path in unit.knobs}, **more}

    def search_spec(unit: SearchUnit, index: int, values: dict, trial_id: str) -> TrialSpec:
        if trial_id in specs:
            return specs[trial_id]
        spec = TrialSpec(trial_id=trial_id, study=study.name, profile=study.profile,
                         config=unit.search_config(values), axes=dict(unit.axes), kind="search",
                         title=f"{unit.label} search #{index}")
        extra[trial_id] = columns(unit, values, search_index=index)
        return spec

    def final_specs(unit: SearchUnit, best: dict) -> list[TrialSpec]:
        out = []
        for seed in unit.seeds:
            config = unit.final_config(best["values"], seed)
            spec = TrialSpec(trial_id=trial_identity(config), study=study.name, profile=study.profile, config=config,
                             axes=dict(unit.axes), kind="final")
            extra[spec.trial_id] = columns(unit, best["values"], search_best_trial=best["trial_id"],
                                           search_best_value=best["value"])
            out.append(spec)
        return out

    for unit in plan.units:
        ended = read_unit_summary(store, unit, log)
        if ended is None:
            pending.append(unit)
            continue
        for p in ended["points"]:
            if p["state"] != "alias":
                add(search_spec(unit, p["index"], p["values"], p["trial_id"]))
        if ended.get("best"):
            finals = [add(s) for s in final_specs(unit, ended["best"])]
            done = store.finished_ids([s.trial_id for s in finals])
            finals_todo.extend(s for s in finals if s.trial_id not in done)
            summary.skipped += len(done)
    ended_units = len(plan.units) - len(pending)
    if ended_units:
        log(f"search: {ended_units} of {len(plan.units)} cells' searches ended in an earlier run "
            f"({store.root / 'search'}); {len(finals_todo)} of their final cells still to train")
    if not pending and not finals_todo:
        log("search: every cell's search has ended and its final cells are trained: nothing to run")
        store.write_tables(current)
        return summary
    check_searcher(search.searcher)
    untuned = [s for s in resolved.trials if json.dumps(s.axes, sort_keys=True, default=str) in
               {json.dumps(u.axes, sort_keys=True, default=str) for u in pending}]
    env = setup(untuned + finals_todo, f"{len(pending)} cells to search")  # trackers, weights, Ray, storage, datasets
    checkpoints, resources = env.checkpoints, study.resources

    def payload(spec: TrialSpec, kind: str, unit_id: str) -> dict:
        add(spec)
        return {"trial": {"trial_id": spec.trial_id, "config": spec.config, **env.common, "kind": kind, "unit": unit_id,
                          "timeout_marker": checkpoints.timeout_marker(spec.trial_id),
                          "resume_from": checkpoints.earlier_runs(spec.trial_id) if resources.workers == 1 else []}}

    scheduler = UnitScheduler(search, {u.unit_id: u.epochs for u in pending})

    def stored(unit: SearchUnit, trial_id: str) -> dict | None:
        record = store.record(trial_id)
        if record is None or record.get("kind") != "search" or record.get(search.metric) is None:
            return None
        if record["status"] == FINISHED or (record["status"] == STOPPED and record.get("search_unit") == unit.unit_id):
            value = float(record[search.metric])
            if not math.isfinite(value):
                return None
            scheduler.replay(unit.unit_id, trial_id, store.curves(trial_id))
            return {"status": record["status"], "value": value, "epochs": int(record.get("epoch") or 0)}
        return None

    def listed_points() -> None:  # every point with a result (trained now, before, or restored) is a row
        for unit in units:
            for point in unit.points:
                if point.state == "done" and store.record(point.trial_id) is not None:
                    add(search_spec(unit.unit, point.index, point.values, point.trial_id))

    def make_trial(unit: UnitSearch, point) -> dict:
        listed_points()
        return payload(search_spec(unit.unit, point.index, point.values, point.trial_id), "search", unit.unit.unit_id)

    def make_final(unit: UnitSearch, best) -> list[dict]:
        listed_points()
        write_unit_summary(store, unit, best, search)
        cell = unit.unit
        if best is None:
            reason = (f"the search of {cell.label} found no usable configuration: its "
                      f"{sum(p.state == 'done' for p in unit.points)} search trials all failed")
            for spec in final_specs(cell, {"values": {}, "trial_id": None, "value": None}):
                add(spec)
                callback._store(spec.trial_id, FAILED, {}, reason)
            log(reason)
            return []
        finals = final_specs(cell, {"values": best.values, "trial_id": best.trial_id, "value": best.value})
        done = store.finished_ids([s.trial_id for s in finals])
        summary.skipped += len(done)
        knobs = ", ".join(f"{k}={_short(v)}" for k, v in best.values.items())
        log(f"search of {cell.label} ended: best #{best.index} of {len(unit.points)} ({knobs}; {search.metric}="
            f"{best.value:.4f} after {best.epochs} epochs); its final cells: seeds {cell.seeds}"
            + (f" ({len(done)} already trained)" if done else ""))
        out = []
        for spec in map(add, finals):
            if spec.trial_id not in done:
                out.append(payload(spec, "final", cell.unit_id))
        return out

    units = [UnitSearch(u, make_sub_searcher(u, search), search.metric) for u in pending]
    searcher = StudySearcher(units, make_trial, make_final, stored, log)
    restored = _restore(searcher, env, log, search)
    if restored:
        from_store, again = searcher.reconcile()
        for unit in units:  # the restored trials' epochs back into their cell's ASHA rungs
            for point in unit.points:
                if point.state == "done" and point.ok:
                    scheduler.replay(unit.unit.unit_id, point.trial_id, store.curves(point.trial_id))
        listed_points()
        log(f"search resumed from Tune's searcher state ({restored}): {from_store} trials that ended since it was "
            f"saved are taken from the results store, {again} that were running run again from their checkpoints")
    for spec in finals_todo:
        searcher.finals.append(payload(spec, "final", extra[spec.trial_id]["search_unit"]))

    budget = sum(u.budget.trials or 0 for u in pending)
    summary.total = budget + len(finals_todo) + sum(len(u.seeds) for u in pending)
    log(f"search: {len(pending)} cells to search, {plan.describe()}; up to {budget} search trials, then "
        f"{sum(len(u.seeds) for u in pending)} final cells" + (f" (+{len(finals_todo)} from ended searches)"
                                                                if finals_todo else ""))
    # As many trials at once as the cluster has slots, and as many pending (Tune keeps one pending trial for a
    # searcher of its own unless a concurrency limit says more: with one, short trials all reuse one node's actor).
    callback = SearchCallback(store, specs, current, summary, log, checkpoints, resources.workers,
                              options.keep_checkpoints, env.num_classes,
                              Progress(summary.total) if options.progress else None, env.trackers, extra=extra)
    tuner = make_tuner(resources, env.where.uri(checkpoints.tune_root), options.max_retries, callback,
                       name_prefix=EXPERIMENT_PREFIX, search_alg=searcher, scheduler=scheduler, num_samples=-1,
                       max_concurrent_trials=max_concurrent(resolved))
    try:
        tuner.fit()
    except KeyboardInterrupt:
        summary.interrupted = True
    listed_points()
    if searcher.reused:
        log(f"search: {searcher.reused} suggested configurations had a stored result (not trained again)")
    store.write_tables(current)
    return summary


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _restore(searcher: StudySearcher, env, log, search) -> str:
    """The newest searcher state an earlier run of this study saved on the storage (Tune writes it in the
    experiment folder): restored into the units it knows. Returns where it came from, or ''.

    Only our JSON is read (harness.orchestrate._searcher_state), at most its size limit, from experiment folders
    whose names are ours; a pickle (an older harness's `.pkl`, or one planted) is never opened. A state that does
    not pass its checks is named in a warning and the search goes on afresh (stored results still count)."""
    storage, root = env.where, env.checkpoints.tune_root
    runs = [d for d in storage.dirs(root) if _experiment_name(d.rstrip("/").rsplit("/", 1)[-1])]
    pickles = 0
    for run in sorted(runs, reverse=True):
        try:
            infos = [i for i in storage.fs.get_file_info(pafs.FileSelector(run))
                     if i.base_name.startswith("searcher-state-")]
        except OSError:
            continue
        pickles += sum(i.base_name.endswith(".pkl") for i in infos)
        for info in sorted((i for i in infos if i.base_name.endswith(".json")), key=lambda i: i.path, reverse=True):
            name = printable(info.path)
            try:
                if info.type != pafs.FileType.File or (info.size or 0) > MAX_STATE_BYTES:
                    raise StateError(f"not a regular file of at most {MAX_STATE_BYTES:,} bytes")
                with storage.fs.open_input_stream(info.path) as f:
                    labels = searcher.restore_bytes(f.read(MAX_STATE_BYTES + 1))
            except (StateError, OSError, UnicodeError) as e:  # search afresh (stored results still count)
                log(f"warning: searcher state {name} is unusable ({printable(str(e))[:300]}); not restored")
                _fresh(searcher, search)
                continue
            if labels:
                return f"{info.path.rsplit('/', 2)[-2]}: {len(labels)} cells"
    if pickles:
        log(f"warning: {pickles} searcher state file(s) under {printable(root)} are pickles (an older harness, or "
            "planted): never read, a pickle can run code; the search goes on from the results store")
    return ""


def _experiment_name(name: str) -> bool:
    """An experiment folder this harness names (search-<stamp>[-<random>]): nothing else under tune/ is read."""
    return name.startswith(EXPERIMENT_PREFIX) and name_problem(name) is None


def _fresh(searcher: StudySearcher, search) -> None:
    """Every unit back to a fresh sub-searcher and no points (after a state that failed midway)."""
    for unit in searcher.units:
        unit.searcher, unit.points, unit.reissue = make_sub_searcher(unit.unit, search), [], []


def write_unit_summary(store: ResultStore, unit: UnitSearch, best, search) -> None:
    """search/<unit>.json: the cell's search as it ended (the report's "search" section reads it)."""
    cell = unit.unit
    points = [{"index": p.index, "trial_id": p.trial_id, "values": p.values, "state": p.state, "status": p.status,
               "value": p.value, "epochs": p.epochs, "alias_of": p.alias_of, "device_hours": p.device_s / 3600}
              for p in unit.points]
    data = {"unit_id": cell.unit_id, "label": cell.label, "axes": cell.axes,
            "budget": cell.budget.model_dump(mode="json"),
            "knobs": {k: str(v) for k, v in cell.knobs.items()}, "searcher": search.searcher,
            "scheduler": search.scheduler.model_dump(mode="json"), "metric": search.metric,
            "validation": cell.validation, "epochs": cell.epochs, "describe": search.describe(),
            "device_hours": sum(p.device_s for p in unit.points) / 3600, "points": points,
            "best": None if best is None else {"index": best.index, "trial_id": best.trial_id, "values": best.values,
                                                "value": best.value, "epochs": best.epochs},
            "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_bytes(summary_path(store, cell), json.dumps(data, indent=1, default=str).encode())

"""Fair comparisons (harness.study.search): the search: section, the validation split, the sealed test split, the
searchers and schedulers driven directly (no Ray cluster), resume of a half-done search, and a finished search
that reruns nothing. The real-Ray runs are in tests/test_search_run.py (slow)."""

import json
import math
import sys

import numpy as np
import pytest

from harness.run import main
from harness.study.search import choose_best
from harness.study.search_space import parse_distribution
from harness.study.errors import StudyError
from harness.study.load import load_study
from tests.search_studies import SEARCH_STUDY


def write(tmp_path, text, name="tuned.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- the section

@pytest.mark.parametrize("text, kind, corners", [
    ("loguniform(1e-3, 0.1)", "loguniform", [1e-3, 0.1]),
    ("uniform(0, 0.5)", "uniform", [0.0, 0.5]),
    ("randint(1, 5)", "randint", [1, 5]),
    ("choice([2, 3, 5])", "choice", [2, 3, 5]),
    ([True, False], "choice", [True, False]),
])
def test_distributions_parse(text, kind, corners):
    dist = parse_distribution(text)
    assert dist.kind == kind and dist.corners() == corners


@pytest.mark.parametrize("text, message", [
    ("loguniform(0, 1)", "positive"), ("uniform(2, 1)", "below"), ("randint(1, 2.5)", "whole number"),
    ("normal(0, 1)", "unknown distribution"), ("0.1", "give a distribution"), ("uniform(0, inf)", "finite"),
    ("loguniform(nan, 1)", "finite"),
    ("choice([1, 1])", "repeated"), ("choice([[1, 2], [3]])", "plain values"),
])
def test_bad_distributions_say_why(text, message):
    with pytest.raises(ValueError, match=message):
        parse_distribution(text)


def test_a_search_study_plans_one_unit_per_cell_with_the_same_space(tmp_path):
    resolved = load_study(write(tmp_path, SEARCH_STUDY))
    plan = resolved.search
    assert [u.label for u in plan.units] == ["method=baseline", "method=pmg"]
    assert set(plan.units[0].knobs) == {"train.lr"} and set(plan.units[1].knobs) == {"train.lr", "method.stages"}
    assert all(u.budget.trials == 3 for u in plan.units) and plan.max_search_trials() == 6
    assert plan.describe() == ("tuned (budget 3 trials per method, searcher random, scheduler asha (grace 1, "
                               "reduction 2))")
    # A search trial is another computation than the cell with the same settings: its own identity. A final cell
    # is exactly the grid's trial with the chosen values.
    from harness.study.trials import trial_identity
    unit = plan.units[0]
    final = unit.final_config({"train.lr": 0.05}, seed=0)
    assert trial_identity(final) == resolved.trials[0].trial_id  # lr 0.05 is the study's own
    assert trial_identity(unit.search_config({"train.lr": 0.05})) != trial_identity(final)
    # The unit's id does not move with the budget (a larger budget continues the same search).
    again = load_study(write(tmp_path, SEARCH_STUDY), overrides=["search.budget.trials=5"]).search
    assert [u.unit_id for u in again.units] == [u.unit_id for u in plan.units]


@pytest.mark.parametrize("change, message", [
    (("train.lr: loguniform(1.0e-3, 0.3)", "train.lr: uniform(-1.0, 0.3)"),
     r"tuned\.yaml:16: train\.lr: Input should be greater than 0"),
    (("train.lr: loguniform(1.0e-3, 0.3)", "train.lrr: loguniform(1.0e-3, 0.3)"),
     r"tuned\.yaml:16: .*did you mean 'train\.lr'"),
    (("method.stages: choice([1, 2])", "method.stages: choice([1, 9])"),
     r"tuned\.yaml:20: method\.stages: .*less than or equal to 5"),
    (("train.lr: loguniform(1.0e-3, 0.3)", "train.epochs: randint(1, 3)"), r"tuned\.yaml:16: .*time axis"),
    (("    pmg:\n", "    pgm:\n"), r"tuned\.yaml:18: search\.methods\.pgm: .*did you mean 'pmg'"),
    (("  budget: {trials: 3}", "  budget: {}"), r"tuned\.yaml:21: search\.budget: give trials"),
    (("  searcher: random", "  searcher: grid"), r"tuned\.yaml:22: search\.searcher"),
    (("  budget: {trials: 3}", "  budget: {trials: 3}\n  metric: val/acc/concat"),
     r"search\.metric .*baseline has no head 'concat'"),
])
def test_search_errors_name_the_line_and_the_fix(tmp_path, change, message):
    with pytest.raises(StudyError, match=message):
        load_study(write(tmp_path, SEARCH_STUDY.replace(*change)))


def test_a_knob_cannot_also_be_a_grid_axis(tmp_path):
    text = SEARCH_STUDY.replace("grid:\n  method:", "grid:\n  train.lr: [0.1, 0.2]\n  method:")
    with pytest.raises(StudyError, match="also a grid axis"):
        load_study(write(tmp_path, text))


# ----------------------------------------------------------------------------- the data a search trial sees

def test_the_validation_split_is_stratified_seeded_and_disjoint():
    from harness.data.imageset import validation_rows

    labels = np.repeat(np.arange(5), [10, 10, 20, 3, 1])
    held = validation_rows(labels, 0.2, seed=0)
    assert np.array_equal(held, validation_rows(labels, 0.2, seed=0))  # deterministic
    assert not np.array_equal(held, validation_rows(labels, 0.2, seed=1))  # the seed chooses
    per_class = np.bincount(labels[held], minlength=5)
    assert per_class.tolist() == [2, 2, 4, 1, 0]  # round(0.2 n_c), at least 1, a class of one keeps its image
    assert len(set(held.tolist())) == len(held)


def test_carved_splits_share_the_training_images_and_seal_the_test_split():
    from harness.data.imageset import ImageSet, Split, TestSplitSealed, carve_validation

    images = np.arange(12 * 3 * 4 * 4, dtype=np.uint8).reshape(12, 3, 4, 4)
    train = Split(images=images, labels=np.repeat(np.arange(3), 4))
    imageset = ImageSet("x", 3, ["a", "b", "c"], train, Split(images[:2], np.zeros(2, dtype=np.int64)))
    rest, val = carve_validation(imageset, 0.25, seed=3)
    assert rest.train.images is images and val.images is images  # views by row, no copy
    assert sorted(rest.train.rows.tolist() + val.rows.tolist()) == list(range(12))
    assert np.array_equal(val.labels, train.labels[val.rows]) and len(val) == 3
    with pytest.raises(TestSplitSealed):
        rest.test.labels
    with pytest.raises(TestSplitSealed):
        len(rest.test)


class GuardSplit:
    """A test split whose every use raises: the data loader's proof that a trial never read it."""

    reads: list = []

    def __getattr__(self, name):
        GuardSplit.reads.append(name)
        raise AssertionError(f"the test split was read: {name}")

    def __len__(self):
        GuardSplit.reads.append("len")
        raise AssertionError("the test split was read: len")


def _tiny_trial(tmp_path, search: bool):
    from harness.data import load_imageset
    from harness.data.imageset import ImageSet
    from harness.study.trials import TrialConfig

    text = SEARCH_STUDY.replace("epochs: 3", "epochs: 1").replace("image_size: 32, resize: 36",
                                                                 "image_size: 16, resize: 16")
    unit = load_study(write(tmp_path, text)).search.units[0]
    config = unit.search_config({"train.lr": 0.05}) if search else unit.final_config({"train.lr": 0.05}, 0)
    cfg = TrialConfig.parse(config)
    real = load_imageset(cfg.dataset, cfg.stored_size)
    GuardSplit.reads = []
    guarded = ImageSet(real.name, real.num_classes, real.class_names, real.train, GuardSplit(), real.part_names,
                       real.meta)
    return cfg, guarded, real


def test_a_search_trial_never_reads_the_test_split(tmp_path):
    from harness.engine.loop import run_trial

    cfg, guarded, real = _tiny_trial(tmp_path, search=True)
    final = run_trial(cfg, guarded, threads=1)
    assert GuardSplit.reads == []
    assert not any(k.startswith("test") and k != "test_split" for k in final) and final["test_split"] == "sealed"
    held = 8  # 0.2 x 10 images of each of the 4 classes
    assert final["val/images"] == held and 0 <= final["val/acc"] <= 1
    assert all("val/acc" in epoch for epoch in final["history"])  # every epoch scored, for ASHA
    from harness.core.records import unpack_correct
    members = unpack_correct(final["val/members"])
    assert len(members) == len(real.train) and members.sum() == held  # which training images, stored


def test_the_guard_catches_a_trial_that_reads_the_test_split(tmp_path):
    """The control: a final cell does read the test split, and the guard says so."""
    from harness.engine.loop import run_trial

    cfg, guarded, _ = _tiny_trial(tmp_path, search=False)
    with pytest.raises(AssertionError, match="test split was read"):
        run_trial(cfg, guarded, threads=1)
    assert GuardSplit.reads


# ----------------------------------------------------------------------------- the searchers, driven directly

def objective(lr: float) -> float:
    """A constructed validation score with its best at lr = 0.01."""
    return 0.9 - 0.2 * (math.log10(lr) + 2) ** 2


def _searcher(tmp_path, searcher="random", trials=30, stored=None, extra=""):
    from harness.orchestrate._searchers import StudySearcher, UnitSearch, make_sub_searcher

    text = SEARCH_STUDY.replace("budget: {trials: 3}", f"budget: {{trials: {trials}}}{extra}") \
        .replace("searcher: random", f"searcher: {searcher}")
    plan = load_study(write(tmp_path, text)).search
    units = [UnitSearch(u, make_sub_searcher(u, plan.config), plan.config.metric) for u in plan.units[:1]]
    finals = []

    def make_final(unit, best):
        finals.append(best)
        return [{"trial": {"kind": "final", "values": best.values}}]

    return StudySearcher(units, lambda unit, p: {"trial": {"kind": "search", "values": p.values, "id": p.trial_id}},
                         make_final, stored or (lambda unit, trial_id: None)), finals


def _complete(searcher, tune_id, values, epochs=3, seconds=1.0):
    searcher.on_trial_complete(tune_id, {"val/acc": objective(values["train.lr"]), "epoch": epochs, "kind": "final",
                                         "status": "finished", "time_total_s": seconds})


def drive(searcher, in_flight=2, limit=500, seconds=1.0):
    """Tune's part: keep `in_flight` trials running, complete the oldest first; returns the configs run."""
    from ray.tune.search import Searcher

    running, ran, n = [], [], 0
    while n < limit:
        if len(running) < in_flight:
            config = searcher.suggest(f"t{n}")
            if config == Searcher.FINISHED:
                for tune_id, trial in running:  # Tune lets the running trials end
                    searcher.on_trial_complete(tune_id, {"kind": "final", "status": "finished"})
                running = []
                break
            if config is not None:
                running.append((f"t{n}", config["trial"]))
                ran.append(config["trial"])
                n += 1
                continue
        tune_id, trial = running.pop(0)
        if trial["kind"] == "search":
            _complete(searcher, tune_id, trial["values"], seconds=seconds)
        else:
            searcher.on_trial_complete(tune_id, {"kind": "final", "status": "finished"})
    assert not running
    return ran


@pytest.mark.parametrize("kind", ["random", "tpe"])
def test_a_search_finds_the_known_best_of_a_constructed_objective(tmp_path, kind):
    if kind == "tpe":
        pytest.importorskip("optuna")
    searcher, finals = _searcher(tmp_path, kind, trials=30)
    ran = drive(searcher)
    search = [t for t in ran if t["kind"] == "search"]
    assert len(search) == 30 and len({t["id"] for t in search}) == 30  # the budget, each trial once
    best = finals[0]
    assert abs(math.log10(best.values["train.lr"]) + 2) < 0.2, best.values  # lr within a factor 1.6 of 0.01
    assert best.value == max(objective(t["values"]["train.lr"]) for t in search)
    assert ran[-1] == {"kind": "final", "values": best.values}  # then the final cell retrains that configuration


def test_tpe_concentrates_on_the_best_region_more_than_random(tmp_path):
    pytest.importorskip("optuna")
    near = {}
    for kind in ("random", "tpe"):
        searcher, _ = _searcher(tmp_path, kind, trials=40, extra="\n  startup_trials: 8")
        lrs = [t["values"]["train.lr"] for t in drive(searcher, in_flight=1) if t["kind"] == "search"]
        near[kind] = sum(abs(math.log10(lr) + 2) < 0.3 for lr in lrs[8:])
    assert near["tpe"] > near["random"], near


def test_repeated_configurations_count_towards_the_budget_but_train_once(tmp_path):
    text_choice = "\n  startup_trials: 1"
    searcher, finals = _searcher(tmp_path, "random", trials=6, extra=text_choice)
    unit = searcher.units[0]
    unit.searcher.space = {"train.lr": __import__("ray").tune.choice([0.01, 0.1])}  # a two-value space
    ran = [t for t in drive(searcher) if t["kind"] == "search"]
    assert len(unit.points) == 6 and len(ran) == len({t["id"] for t in ran}) <= 2
    assert sum(p.state == "alias" for p in unit.points) == 6 - len(ran)
    assert finals[0].values == {"train.lr": 0.01}


def test_an_unfinished_search_resumes_from_its_saved_state(tmp_path):
    """Half a search, its state saved (as Tune saves it on the storage), one running trial lost and one that
    ended after the save: the restored search takes that one from the store, runs the lost one again, and
    continues to exactly the budget with the suggestions an uninterrupted search makes (random search)."""
    whole, _ = _searcher(tmp_path, "random", trials=8)
    uninterrupted = [t["values"] for t in drive(whole, in_flight=1) if t["kind"] == "search"]

    first, _ = _searcher(tmp_path, "random", trials=8)
    configs = [first.suggest(f"a{i}")["trial"] for i in range(4)]
    for i in range(2):
        _complete(first, f"a{i}", configs[i]["values"])
    state = tmp_path / "searcher-state.json"
    first.save(str(state))  # a{2} and a{3} were running when the state was saved; a{2} finishes after it
    ended_after_save = configs[2]["id"]

    def stored(unit, trial_id):
        if trial_id == ended_after_save:
            return {"status": "finished", "value": objective(configs[2]["values"]["train.lr"]), "epochs": 3}
        return None

    resumed, finals = _searcher(tmp_path, "random", trials=8, stored=stored)
    assert resumed.restore_bytes(state.read_bytes()) == ["method=baseline"]
    assert resumed.reconcile() == (1, 1)  # one from the store, one to run again
    ran = drive(resumed, in_flight=1)
    search = [t for t in ran if t["kind"] == "search"]
    assert search[0]["id"] == configs[3]["id"]  # the lost one first (it resumes from its checkpoint)
    assert len(search) == 8 - 3  # nothing trained twice: 2 told before the save, 1 from the store
    unit = resumed.units[0]
    assert [p.index for p in unit.points] == list(range(1, 9))
    assert [p.values for p in unit.points] == uninterrupted
    assert finals and finals[0].value == max(objective(v["train.lr"]) for v in uninterrupted)


def test_stored_results_are_told_not_trained_again(tmp_path):
    """A search whose state is gone (a fresh searcher) replays its suggestions: those with a stored result are
    told to the searcher at once and count towards the budget."""
    first, _ = _searcher(tmp_path, "random", trials=4)
    done = {t["id"]: objective(t["values"]["train.lr"]) for t in drive(first, in_flight=1) if t["kind"] == "search"}
    again, finals = _searcher(tmp_path, "random", trials=4,
                              stored=lambda unit, t: {"status": "finished", "value": done[t], "epochs": 3}
                              if t in done else None)
    ran = drive(again)
    assert [t["kind"] for t in ran] == ["final"] and again.reused == 4
    assert finals[0].value == max(done.values())


def test_the_best_is_a_trial_that_trained_every_epoch():
    outcomes = [{"index": 1, "value": 0.9, "epochs": 1, "ok": True},  # stopped early by ASHA: not comparable
                {"index": 2, "value": 0.6, "epochs": 4, "ok": True},
                {"index": 3, "value": 0.7, "epochs": 4, "ok": True},
                {"index": 4, "value": 0.7, "epochs": 4, "ok": True},
                {"index": 5, "value": None, "epochs": 2, "ok": False}]
    assert choose_best(outcomes, epochs=4)["index"] == 3  # ties go to the earlier trial
    assert choose_best(outcomes[:1] + outcomes[4:], epochs=4)["index"] == 1  # none complete: the furthest trained
    assert choose_best(outcomes[4:], epochs=4) is None


class FakeTrial:
    def __init__(self, trial_id, unit, kind="search"):
        self.trial_id, self.config = trial_id, {"trial": {"kind": kind, "unit": unit}}


def test_asha_compares_a_method_only_with_itself_and_never_cuts_the_last_epoch(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    from harness.orchestrate._searchers import UnitScheduler

    plan = load_study(write(tmp_path, SEARCH_STUDY)).search
    a, b = (u.unit_id for u in plan.units)
    scheduler = UnitScheduler(plan.config, {a: 3, b: 3})
    trials = {name: FakeTrial(name, unit) for name, unit in [("a1", a), ("a2", a), ("b1", b), ("f", a)]}
    trials["f"] = FakeTrial("f", a, kind="final")
    for t in trials.values():
        scheduler.on_trial_add(None, t)

    def step(name, epoch, value):
        return scheduler.on_trial_result(None, trials[name], {"kind": "epoch", "epoch": epoch, "val/acc": value})

    assert step("a1", 1, 0.9) == TrialScheduler.CONTINUE
    assert step("b1", 1, 0.1) == TrialScheduler.CONTINUE  # b's first trial: a's 0.9 is not its cut-off
    assert step("a2", 1, 0.2) == TrialScheduler.STOP  # below a's rung
    assert step("f", 1, 0.0) == TrialScheduler.CONTINUE  # a final cell always trains to the end
    assert step("a1", 3, 0.0) == TrialScheduler.CONTINUE  # its last epoch: its final record follows


# ----------------------------------------------------------------------------- the command

def test_tpe_without_optuna_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    study = write(tmp_path, SEARCH_STUDY.replace("searcher: random", "searcher: tpe"))
    assert main([str(study), "--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports")]) == 2
    err = capsys.readouterr().err
    assert "tpe needs Optuna" in err and "pip install -e '.[tune]'" in err and "Traceback" not in err


def test_a_finished_search_reruns_nothing_and_starts_no_ray(tmp_path, capsys):
    """Every cell's search ended (search/<unit>.json) and its final cells are stored: nothing runs."""
    from harness.results.store import FINISHED, ResultStore
    from harness.study.trials import TrialSpec, trial_identity

    study = write(tmp_path, SEARCH_STUDY)
    resolved = load_study(study)
    run_dir = tmp_path / "runs" / "tuned" / "default"
    store = ResultStore(run_dir)
    for unit in resolved.search.units:
        values = {path: d.corners()[0] for path, d in unit.knobs.items()}
        search = unit.search_config(values)
        point = {"index": 1, "trial_id": trial_identity(search), "values": values, "state": "done",
                 "status": "finished", "value": 0.5, "epochs": 3}
        store.write_record(TrialSpec(point["trial_id"], "tuned", "default", search, unit.axes, kind="search"),
                           FINISHED, {"val/acc": 0.5, "epoch": 3, "search_unit": unit.unit_id})
        final = unit.final_config(values, 0)
        store.write_record(TrialSpec(trial_identity(final), "tuned", "default", final, unit.axes), FINISHED,
                           {"test/acc": 0.5, "epoch": 3, "search_unit": unit.unit_id})
        (run_dir / "search").mkdir(parents=True, exist_ok=True)
        (run_dir / "search" / f"{unit.unit_id}.json").write_text(json.dumps(
            {"unit_id": unit.unit_id, "label": unit.label, "budget": unit.budget.model_dump(mode="json"),
             "points": [point], "best": point, "knobs": {k: str(v) for k, v in unit.knobs.items()}}))
    assert main([str(study), "--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports")]) == 0
    out = capsys.readouterr().out
    assert "nothing to run" in out and "0 trials trained, 2 skipped" in out and "Ray" not in out
    import pandas as pd
    rows = pd.read_parquet(run_dir / "results.parquet")
    assert sorted(rows["kind"]) == ["final", "final", "search", "search"] and rows["in_grid"].all()
    # The report: the table says how it was tuned, its cells are the final rows only, each search is shown.
    reports = tmp_path / "reports" / "tuned" / "default"
    table = (reports / "table.md").read_text()
    assert "tuned (budget 3 trials per method, searcher random, scheduler asha" in table
    assert "## Search" in table and "Chosen: train.lr = 0.001 (#1, val/acc 50.0% after 3 epochs)" in table
    assert "50.0" in table.split("## Search")[0]  # the final cells' test/acc, not the search rows'
    assert 'id="search"' in (reports / "index.html").read_text()
    # A larger budget reopens the searches (the same units), and would run only what is new.
    bigger = load_study(study, overrides=["search.budget.trials=4"])
    from harness.orchestrate._search import read_unit_summary
    assert all(read_unit_summary(store, u) is None for u in bigger.search.units)


def test_searcher_state_is_json_data(tmp_path):
    searcher, _ = _searcher(tmp_path, "random", trials=3)
    searcher.suggest("x")
    path = tmp_path / "s.json"
    searcher.save(str(path))
    state = json.loads(path.read_bytes())
    assert state["version"] == 2 and state["format"] == "fgvc-harness searcher state"
    assert searcher.CKPT_FILE_TMPL == "searcher-state-{}.json"  # the name Tune saves it under


def test_methods_tuned_tunes_every_method_of_the_comparison_with_one_budget(monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("CUB200_ROOT", "/data/CUB_200_2011")  # only read when a trial starts
    root = Path(__file__).resolve().parents[1]
    compared = load_study(root / "studies/methods_comparison.yaml")
    for profile in (None, "paper"):
        tuned = load_study(root / "studies/methods_tuned.yaml", profile=profile)
        plan = tuned.search
        methods = {s.config["method"]["name"] for s in tuned.trials}
        assert methods == {s.config["method"]["name"] for s in compared.trials}
        assert len(plan.units) == len(methods)  # one search per method
        assert len({json.dumps(u.budget.model_dump()) for u in plan.units}) == 1  # the same budget
        assert len({json.dumps({k: str(d) for k, d in u.knobs.items()}) for u in plan.units}) == 1  # and space
        assert plan.config.searcher == "tpe" and plan.config.scheduler.name == "asha"
    assert plan.units[0].budget.trials >= 20 and plan.units[0].seeds == [0, 1, 2]  # the paper profile's real budget


def test_a_device_hour_budget_ends_the_search_once_spent(tmp_path):
    """device_hours: wall time x the devices a trial holds (1 CPU here); no new trial once spent, running ones
    counted as they report."""
    searcher, finals = _searcher(tmp_path, "random", trials=3)
    unit = searcher.units[0]
    unit.unit.budget = unit.unit.budget.model_copy(update={"trials": None, "device_hours": 1.0})
    ran = [t for t in drive(searcher, in_flight=1, seconds=1000.0) if t["kind"] == "search"]
    assert len(ran) == 4 and unit.spent_s() == 4000.0  # 3 x 1000 s < 1 h <= 4 x 1000 s
    assert finals
    # A running trial's time so far counts before it ends.
    searcher, _ = _searcher(tmp_path, "random", trials=3)
    unit = searcher.units[0]
    unit.unit.budget = unit.unit.budget.model_copy(update={"trials": None, "device_hours": 1.0})
    searcher.suggest("a")
    searcher.on_trial_result("a", {"time_total_s": 3600.0})
    assert not unit.budget_left() and searcher.suggest("b") is None  # spent: wait for it, start nothing

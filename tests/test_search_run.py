"""Searches through a real local Ray (slow): the search machinery on a constructed objective through Tune, and a
tiny search study killed halfway, resumed, and run a third time for nothing."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from harness.study.load import load_study
from tests.search_studies import SEARCH_STUDY

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def objective(lr: float) -> float:
    return 0.9 - 0.2 * (math.log10(lr) + 2) ** 2  # best at lr = 0.01


def constructed_trainable(config):
    """A trial that trains nothing: its validation score rises to objective(lr) over its epochs."""
    from ray import tune

    trial = config["trial"]
    if trial["kind"] == "final":
        tune.report({"kind": "final", "status": "finished"})
        return
    lr, epochs = trial["values"]["train.lr"], trial["epochs"]
    for epoch in range(1, epochs + 1):
        time.sleep(0.05)
        tune.report({"kind": "epoch", "epoch": epoch, "val/acc": objective(lr) * epoch / epochs})
    tune.report({"kind": "final", "epoch": epochs, "val/acc": objective(lr), "status": "finished"})


def test_through_tune_the_search_finds_the_known_best_and_asha_stops_the_weak(tmp_path):
    from ray import tune

    from harness import orchestrate
    from harness.orchestrate._searchers import StudySearcher, UnitScheduler, UnitSearch, make_sub_searcher

    study = tmp_path / "tuned.yaml"
    study.write_text(SEARCH_STUDY.replace("budget: {trials: 3}", "budget: {trials: 16}")
                     .replace("epochs: 3", "epochs: 4"))
    plan = load_study(study).search
    unit = plan.units[0]
    searcher = StudySearcher([UnitSearch(unit, make_sub_searcher(unit, plan.config), "val/acc")],
                             lambda u, p: {"trial": {"kind": "search", "unit": u.unit.unit_id, "values": p.values,
                                                     "epochs": 4, "trial_id": p.trial_id}},
                             lambda u, best: [{"trial": {"kind": "final", "unit": u.unit.unit_id,
                                                         "trial_id": "final", "values": best.values}}],
                             lambda u, t: None)
    orchestrate.start_ray(None, num_cpus=2)
    try:
        tuner = tune.Tuner(tune.with_resources(constructed_trainable, {"cpu": 1}), param_space={},
                           tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, reuse_actors=True,
                                                       max_concurrent_trials=2,
                                                       scheduler=UnitScheduler(plan.config, {unit.unit_id: 4})),
                           run_config=tune.RunConfig(name="constructed", storage_path=str(tmp_path / "ray"), verbose=0))
        grid = tuner.fit()
    finally:
        orchestrate.shutdown()
    results = [r.metrics for r in grid]
    search = [r for r in results if r.get("config", {}).get("trial", {}).get("kind") == "search"]
    assert len(search) == 16 and len(results) == 17  # the budget, then one final cell
    stopped = [r for r in search if r.get("kind") == "epoch"]  # ASHA cut them: no final record
    assert stopped and all(r["epoch"] < 4 for r in stopped)
    best = searcher.units[0].best
    assert best.epochs == 4 and abs(math.log10(best.values["train.lr"]) + 2) < 0.3, best
    final = next(r for r in results if r["config"]["trial"]["kind"] == "final")
    assert final["config"]["trial"]["values"] == best.values


def records(run_dir: Path) -> dict[str, dict]:
    out = {}
    for path in (run_dir / "trials").glob("*/result.json"):
        try:
            out[path.parent.name] = {**json.loads(path.read_text()), "_mtime": path.stat().st_mtime_ns}
        except (ValueError, OSError):
            pass
    return out


def test_a_killed_search_resumes_and_a_finished_one_reruns_nothing(tmp_path):
    pytest.importorskip("optuna")
    study = tmp_path / "tuned.yaml"
    study.write_text(SEARCH_STUDY.replace("searcher: random", "searcher: tpe").replace("budget: {trials: 3}",
                                                                                       "budget: {trials: 4}"))
    cmd = [sys.executable, "-m", "harness.run", str(study), "--runs-dir", str(tmp_path / "runs"), "--reports-dir",
           str(tmp_path / "reports"), "--num-cpus", "2"]
    run_dir = tmp_path / "runs" / "tuned" / "default"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def half_done() -> bool:
        done = [r for r in records(run_dir).values() if r.get("kind") == "search"]
        saved = list((run_dir / "ray" / "tune").glob("search-*/searcher-state-*.json"))
        return len(done) >= 3 and bool(saved)

    deadline = time.time() + 400
    while time.time() < deadline and not half_done() and proc.poll() is None:
        time.sleep(0.3)
    assert half_done(), "the search did not get halfway in time"
    proc.send_signal(signal.SIGKILL)  # no handler runs: what is on disk is all the next run has
    proc.communicate(timeout=60)
    before = {t: r for t, r in records(run_dir).items() if r["status"] in ("finished", "stopped")}
    assert not any(r.get("kind") == "final" for r in before.values()), "killed too late: the search had ended"

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "search resumed from Tune's searcher state" in again.stdout, again.stdout[-3000:]
    after = records(run_dir)
    assert all(after[t]["_mtime"] == r["_mtime"] for t, r in before.items())  # nothing that ended trained again
    rows = pd.read_parquet(run_dir / "results.parquet")
    search, final = rows[rows["kind"] == "search"], rows[rows["kind"] == "final"]
    assert search.groupby("search_unit")["trial_id"].nunique().tolist() == [4, 4]  # exactly the budget, each
    assert sorted(search["search_index"].astype(int).tolist()) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert set(search["status"]) <= {"finished", "stopped"} and (final["status"] == "finished").all()
    assert len(final) == 2 and final["test/acc"].between(0, 1).all()
    # No search trial read the test split: sealed in every search row, no test score among them.
    assert (search["test_split"] == "sealed").all() and search["test/acc"].isna().all()
    assert search["val/acc"].notna().all() and search["val/set_hash"].nunique() == 1  # one validation split
    for unit_id, group in final.groupby("search_unit"):
        ended = json.loads((run_dir / "search" / f"{unit_id}.json").read_text())
        assert ended["best"]["trial_id"] == group["search_best_trial"].iloc[0]
        assert group["train.lr"].iloc[0] == pytest.approx(ended["best"]["values"]["train.lr"])
    page = (tmp_path / "reports" / "tuned" / "default" / "index.html").read_text()
    assert "tuned (budget 4 trials per method, searcher tpe" in page and 'id="search"' in page

    third = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "nothing to run" in third.stdout and "Ray" not in third.stdout, third.stdout
    assert {t: r["_mtime"] for t, r in records(run_dir).items()} == {t: r["_mtime"] for t, r in after.items()}

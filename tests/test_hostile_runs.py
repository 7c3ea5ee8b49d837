"""Hostile input, second pass (issue 26): what a run folder or a storage holds. Anyone who can write them may plant
files there: nothing read back runs code (the searcher state is JSON with a schema, never a pickle), nothing is
written through a planted link or outside its root, a stored name is checked before it is joined to a path, and the
report survives any one bad trial. (Escapers and free text: test_hostile_outputs.py; bounds: test_hostile_bounds.py.)
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import TINY_STUDY
from tests.hostile import fake_run, files_under, run_cli
from tests.search_studies import SEARCH_STUDY


class _Planted:
    """A pickle that runs a shell command when it is loaded (what an attacker would plant)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _search(tmp_path: Path, searcher: str = "random", trials: int = 6):
    from harness.orchestrate._searchers import StudySearcher, UnitSearch, make_sub_searcher
    from harness.study.load import load_study

    study = tmp_path / "tuned.yaml"
    study.write_text(SEARCH_STUDY.replace("searcher: random", f"searcher: {searcher}")
                     .replace("budget: {trials: 3}", f"budget: {{trials: {trials}}}"))
    plan = load_study(study).search
    units = [UnitSearch(u, make_sub_searcher(u, plan.config), plan.config.metric) for u in plan.units]
    make_trial = lambda unit, p: {"trial": {"kind": "search", "values": p.values, "id": p.trial_id}}  # noqa: E731
    return StudySearcher(units, make_trial, lambda unit, best: [], lambda unit, t: None), plan


def _env(tmp_path: Path):
    from harness.orchestrate._storage import CheckpointStore, Storage

    storage = Storage(tmp_path / "ray")
    return SimpleNamespace(where=storage, checkpoints=CheckpointStore(storage))


def _plant(tmp_path: Path, name: str, data: bytes, run: str = "search-20990101-000000-abcdef12") -> Path:
    folder = tmp_path / "ray" / "tune" / run
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder / name


def test_a_planted_pickle_is_never_loaded_and_the_search_starts_afresh(tmp_path):
    from harness.orchestrate._search import _restore

    marker = tmp_path / "owned"
    payload = pickle.dumps(_Planted(marker))
    _plant(tmp_path, "searcher-state-a.pkl", payload)  # an older harness's name
    _plant(tmp_path, "searcher-state-b.json", payload)  # disguised as ours
    searcher, plan = _search(tmp_path)
    said: list[str] = []
    assert _restore(searcher, _env(tmp_path), said.append, plan.config) == ""
    assert not marker.exists()  # no code ran
    text = "\n".join(said)
    assert "searcher-state-b.json is unusable (a pickle" in text and "never read" in text
    assert "1 searcher state file(s)" in text and "are pickles" in text
    assert all(not u.points for u in searcher.units)  # a fresh search


def test_the_searcher_state_is_json_and_restores_exactly(tmp_path):
    from harness.orchestrate._search import _restore

    first, plan = _search(tmp_path)
    configs = [first.suggest(f"a{i}")["trial"] for i in range(3)]
    first.on_trial_complete("a0", {"val/acc": 0.5, "epoch": 3, "kind": "final", "status": "finished"})
    path = _plant(tmp_path, "searcher-state-x.json", b"")
    first.save(str(path))
    assert json.loads(path.read_text())["format"] == "fgvc-harness searcher state"
    again, _ = _search(tmp_path)
    said: list[str] = []
    assert _restore(again, _env(tmp_path), said.append, plan.config).endswith(": 2 cells"), said
    unit = again.units[0]
    assert [p.trial_id for p in unit.points] == [p.trial_id for p in first.units[0].points]
    assert [p.values for p in unit.reissue] == [c["values"] for c in configs[1:] if c["id"] in
                                                {p.trial_id for p in unit.reissue}]
    assert unit.searcher.rng.bit_generator.state == first.units[0].searcher.rng.bit_generator.state


def _state_with(tmp_path: Path, change) -> bytes:
    from harness.orchestrate import _searcher_state

    first, _ = _search(tmp_path)
    first.suggest("a0")
    first.on_trial_complete("a0", {"val/acc": 0.5, "epoch": 3, "kind": "final", "status": "finished"})
    first.suggest("a1")
    state = json.loads(_searcher_state.dump({u.unit.unit_id: u.state() for u in first.units}))
    change(state)
    return json.dumps(state).encode()


def _first_point(state: dict) -> dict:
    return next(iter(state["units"].values()))["points"][0]


@pytest.mark.parametrize("case, change, said", [
    ("a trial id that is a path", lambda s: _first_point(s).update(trial_id="../../../etc"), "trial_id"),
    ("a trial id not of its values", lambda s: _first_point(s).update(trial_id="0123456789ab"),
     "is not its values' identity"),
    ("a value outside the distribution", lambda s: _first_point(s)["values"].update({"train.lr": 1e9}),
     "outside its distribution"),
    ("a knob the study does not tune", lambda s: _first_point(s)["values"].update({"train.momentum": 0.5}),
     "does not tune the study's knobs"),
    ("another version", lambda s: s.update(version=1), "version"),
    ("an unknown field", lambda s: s.update(code="__import__('os')"), "code"),
    ("a generator state of another kind", lambda s: next(iter(s["units"].values()))["sub"].update(
        bit_generator="MT19937"), "bit_generator"),
])
def test_a_state_that_does_not_fit_is_named_and_not_used(tmp_path, case, change, said):
    from harness.orchestrate._search import _restore

    _plant(tmp_path, "searcher-state-x.json", _state_with(tmp_path, change))
    searcher, plan = _search(tmp_path)
    log: list[str] = []
    assert _restore(searcher, _env(tmp_path), log.append, plan.config) == ""
    assert any("is unusable" in line and said in line for line in log), log
    assert all(not u.points for u in searcher.units)


def test_a_huge_or_special_state_file_is_not_read(tmp_path):
    from harness.orchestrate._search import _restore
    from harness.orchestrate._searcher_state import MAX_BYTES

    _plant(tmp_path, "searcher-state-big.json", b" " * (MAX_BYTES + 1))
    os.mkfifo(_plant(tmp_path, "x", b"").parent / "searcher-state-fifo.json")
    searcher, plan = _search(tmp_path)
    log: list[str] = []
    assert _restore(searcher, _env(tmp_path), log.append, plan.config) == ""  # returns: the FIFO is never opened
    assert sum("not a regular file of at most" in line for line in log) == 2


def test_tpe_resumes_exactly_from_its_replayed_state(tmp_path):
    pytest.importorskip("optuna")
    from tests.test_search import _complete, _searcher, drive

    def started():
        s, _ = _searcher(tmp_path, "tpe", trials=9, extra="\n  startup_trials: 3")
        configs = [s.suggest(f"a{i}")["trial"] for i in range(5)]
        for i in range(4):
            _complete(s, f"a{i}", configs[i]["values"])
        return s, configs

    whole, configs = started()
    _complete(whole, "a4", configs[4]["values"])
    drive(whole, in_flight=1)
    first, _ = started()
    saved = tmp_path / "state.json"
    first.save(str(saved))
    resumed, _ = _searcher(tmp_path, "tpe", trials=9, extra="\n  startup_trials: 3")
    assert resumed.restore_bytes(saved.read_bytes()) == ["method=baseline"]
    resumed.reconcile()
    drive(resumed, in_flight=1)
    assert [p.values for p in resumed.units[0].points] == [p.values for p in whole.units[0].points]


def test_tune_experiments_get_fresh_unpredictable_names():
    from harness.orchestrate._storage import experiment_name
    from harness.core.paths import name_problem

    a, b = experiment_name("search-"), experiment_name("search-")
    assert a != b and a.startswith("search-") and name_problem(a) is None and len(a) == len("search-") + 24


# ----------------------------------------------------------------------------- the lock, the lease, the storage


def test_a_lock_planted_as_a_link_is_refused_and_its_target_untouched(tmp_path, monkeypatch, capsys):
    target = tmp_path / "victim.txt"
    target.write_text("precious")
    run_dir = tmp_path / "a" / "b" / "roots" / "runs" / "tiny" / "default"
    run_dir.mkdir(parents=True)
    (run_dir / ".lock").symlink_to(target)
    rc, output, _ = run_cli(tmp_path, TINY_STUDY, [], monkeypatch, capsys)
    assert rc == 2 and "is a symbolic link" in output and "Traceback" not in output
    assert target.read_text() == "precious"


def test_a_lock_that_is_a_fifo_is_refused_at_once(tmp_path):
    from harness.core.paths import UnsafePath
    from harness.results.store import RunLock

    os.mkfifo(tmp_path / ".lock")
    with pytest.raises(UnsafePath, match="not a regular file"):
        RunLock(tmp_path).__enter__()


def test_lock_and_lease_record_the_command_line_without_credentials(tmp_path, monkeypatch):
    from harness.orchestrate._storage import Storage, StorageLease
    from harness.results.store import RunLock, RunLocked

    secret = "s3://AKIAEXAMPLE:wJalrSECRETKEY@bucket/fgvc?session_token=TOKEN123"
    monkeypatch.setattr(sys, "argv", ["harness.run", "s.yaml", "--storage", secret, f"--storage={secret}"])
    with RunLock(tmp_path / "run"):
        stored = (tmp_path / "run" / ".lock").read_text()
        with pytest.raises(RunLocked) as refused:
            RunLock(tmp_path / "run").__enter__()
    lease = StorageLease(Storage(tmp_path / "shared"), "tiny/default", tmp_path / "run", settle_s=0.01).acquire()
    try:
        held = (tmp_path / "shared" / "tiny" / "default" / ".lease").read_text()
        with pytest.raises(RunLocked) as second:
            StorageLease(Storage(tmp_path / "shared"), "tiny/default", tmp_path / "x", settle_s=0.01).acquire()
    finally:
        lease.release()
    for text in (stored, str(refused.value), held, str(second.value)):
        assert "wJalrSECRETKEY" not in text and "AKIAEXAMPLE" not in text and "TOKEN123" not in text, text
    assert "s3://***@bucket/fgvc" in stored and "s3://***@bucket/fgvc" in held


def test_a_planted_lease_cannot_hang_or_break_the_refusal(tmp_path):
    from harness.orchestrate._storage import Storage, StorageLease
    from harness.results.store import RunLocked

    prefix = tmp_path / "p"
    prefix.mkdir()
    os.mkfifo(prefix / ".lease")  # never opened: read as no lease, and replaced by the rename
    StorageLease(Storage(tmp_path), "p", settle_s=0.01).acquire().release()
    planted = {"token": "x", "host": "elsewhere", "pid": "\x1b[2J", "started": "yesterday", "refreshed": 1e300}
    (prefix / ".lease").write_text(json.dumps(planted))
    with pytest.raises(RunLocked, match="on elsewhere since 1970"):
        StorageLease(Storage(tmp_path), "p", settle_s=0.01).acquire()


def test_only_folders_the_harness_names_are_listed_under_tune(tmp_path):
    from harness.orchestrate._storage import CheckpointStore, Storage

    for name in ("20990101-000000-abcdef12", "\x1b]0;owned\x07", "a b"):
        (tmp_path / "tune" / name / "0123456789ab" / "checkpoint_000001").mkdir(parents=True)
    storage = Storage(tmp_path)
    assert [d.rsplit("/", 1)[-1] for d in storage.dirs(storage.path("tune"))] == ["20990101-000000-abcdef12"]
    assert all("\x1b" not in uri for uri in CheckpointStore(storage).earlier_runs("0123456789ab"))


def test_a_storage_file_is_not_written_through_a_link(tmp_path):
    from harness.orchestrate._storage import Storage
    from harness.core.paths import UnsafePath

    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "st" / "timeouts").mkdir(parents=True)
    (tmp_path / "st" / "timeouts" / "0123456789ab").symlink_to(outside / "f")
    (tmp_path / "st" / "linked").symlink_to(outside)
    storage = Storage(tmp_path / "st")
    for path in (storage.path("timeouts", "0123456789ab"), storage.path("linked", "x")):
        with pytest.raises(UnsafePath):
            storage.write_text(path, "reason")
    assert not list(outside.iterdir())


# ----------------------------------------------------------------------------- stored records and the report


def test_stored_records_that_are_not_records_are_not_used(tmp_path, tiny_study, capsys):
    from harness.results.store import ResultStore
    from harness.study.load import load_study

    specs = load_study(tiny_study).trials
    for spec, text in zip(specs, ["[1, 2]", '{"a": 1']):
        (tmp_path / "trials" / spec.trial_id).mkdir(parents=True)
        (tmp_path / "trials" / spec.trial_id / "result.json").write_text(text)
    (tmp_path / "trials" / specs[2].trial_id).mkdir()
    (tmp_path / "trials" / specs[2].trial_id / "result.json").symlink_to("/dev/zero")
    (tmp_path / "trials" / specs[2].trial_id / "curves.json").write_text('{"not": "a list"}')
    (tmp_path / "trials" / "\x1b[2J..").mkdir()  # not an identity: not the store's
    store = ResultStore(tmp_path)
    assert [store.record(s.trial_id) for s in specs[:3]] == [None, None, None]
    assert store.curves(specs[2].trial_id) == []
    assert "\x1b[2J.." not in store.stored_ids()
    store.write_tables(specs)  # survives them all
    assert "a character device" in capsys.readouterr().err


def _search_rows(run: Path, unit: str, trial_id: str) -> None:
    results = pd.read_parquet(run / "results.parquet")
    row = {**results.iloc[0].to_dict(), "trial_id": trial_id, "kind": "search", "search_unit": unit, "in_grid": True,
           "val/acc": 0.5, "search_index": 1}
    pd.concat([results, pd.DataFrame([row])]).to_parquet(run / "results.parquet")
    pd.DataFrame([{"trial_id": trial_id, "seed": 0, "epoch": e, "metric": "val/acc", "value": 0.5}
                  for e in (1, 2)]).to_parquet(run / "curves.parquet")
    study = yaml.safe_load((run / "study.yaml").read_text())
    study["search"] = {"space": {"train.lr": "loguniform(1.0e-3, 0.3)"}, "budget": {"trials": 2}, "searcher": "random"}
    (run / "study.yaml").write_text(yaml.safe_dump(study))


def test_a_search_unit_that_climbs_out_writes_nothing_outside_the_report(tmp_path, tiny_study, capsys):
    from harness.report.build import build_reports

    run = tmp_path / "runs" / "run"
    fake_run(run, tiny_study, [])
    _search_rows(run, "../../outside/x", "0123456789ab")
    before = files_under(tmp_path)
    out = build_reports(run, tmp_path / "reports" / "out")
    written = files_under(tmp_path) - before
    assert written and all(out in p.parents for p in written), sorted(map(str, written))
    assert not (tmp_path / "outside").exists() and not (tmp_path / "reports" / "outside").exists()
    assert "search rows of unit '../../outside/x' left out" in capsys.readouterr().err


def _maps_section(page: str) -> str:
    return page.split('<h2 id="maps">', 1)[1].split("<h2", 1)[0] if '<h2 id="maps">' in page else ""


def test_a_trial_id_that_is_a_path_inlines_nothing_from_outside(tmp_path, tiny_study):
    from harness.report.build import build_reports

    secret = tmp_path / "elsewhere"
    secret.mkdir()
    np.savez(secret / "maps.npz", images=np.full((1, 3, 4, 4), 7, np.uint8))
    run = tmp_path / "run"
    fake_run(run, tiny_study, [])
    results = pd.read_parquet(run / "results.parquet")
    linked = results.loc[1, "trial_id"]
    results.loc[0, "trial_id"] = str(secret)  # an absolute path as an id
    results.to_parquet(run / "results.parquet")
    (run / "trials" / linked).rename(run / "moved")
    (run / "trials" / linked).symlink_to(secret)  # a trial folder linked elsewhere
    maps = _maps_section((build_reports(run, tmp_path / "out") / "index.html").read_text())
    assert "data:image/png" not in maps  # neither is inlined
    assert "maps unreadable: refusing to use" in maps and "outside" in maps


@pytest.mark.parametrize("case, arrays", [
    ("zero-width images", {"images": np.zeros((2, 3, 8, 0), np.uint8)}),
    ("a map that does not fit", {"images": np.zeros((2, 3, 8, 8), np.uint8), "map:x": np.zeros((2, 3, 3))}),
])
def test_a_bad_maps_file_costs_its_maps_and_the_page_is_written(tmp_path, tiny_study, case, arrays):
    from harness.report.build import build_reports

    run = tmp_path / "run"
    specs = fake_run(run, tiny_study, [])
    np.savez(run / "trials" / specs[0].trial_id / "maps.npz", **arrays)
    page = (build_reports(run, tmp_path / "out") / "index.html").read_text()
    assert "maps unreadable: ValueError" in page


def test_a_maps_header_claiming_gigabytes_is_refused_before_loading(tmp_path, tiny_study):
    import io
    import zipfile

    from harness.report.build import build_reports

    run = tmp_path / "run"
    specs = fake_run(run, tiny_study, [])
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, {"descr": "|u1", "fortran_order": False,
                                               "shape": (300_000, 3, 448, 448)})  # 180 GB claimed
    with zipfile.ZipFile(run / "trials" / specs[0].trial_id / "maps.npz", "w") as z:
        z.writestr("images.npy", npy.getvalue() + b"\0" * 192)
    maps = _maps_section((build_reports(run, tmp_path / "out") / "index.html").read_text())
    assert "maps unreadable: images.npy&#39;s header claims a 300000x3x448x448 array" in maps

"""No result is lost (issue 19): a narrower rerun keeps every finished row, a failed record never replaces a finished
one, a column of mixed types is stored; caches are verified and rebuilt, files are flushed before they are renamed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.run import main
from tests.conftest import TINY_STUDY
from tests.hostile import fake_run


def test_a_narrower_grid_keeps_every_finished_result(tiny_study, tmp_path):
    from harness.report.build import build_reports
    from harness.results.store import ResultStore

    wide = fake_run(tmp_path / "run", tiny_study, [])
    narrow = fake_run(tmp_path / "run", tiny_study, ["grid.method.stages=[1]"])  # a later, narrower rerun
    assert len(wide) == 4 and len(narrow) == 2
    stored = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert set(stored["trial_id"]) == {t.trial_id for t in wide}
    assert stored["in_grid"].sum() == 2 and (stored["status"] == "finished").all()
    assert list(stored["trial_id"][:2]) == [t.trial_id for t in narrow]  # the current grid first
    # A fresh store (a new process) keeps them too, and the report says how many it leaves out.
    ResultStore(tmp_path / "run").write_tables(narrow)
    assert len(pd.read_parquet(tmp_path / "run" / "results.parquet")) == 4
    out = build_reports(tmp_path / "run", tmp_path / "report")
    assert "2 more finished trials of this study and profile" in (out / "table.md").read_text()
    assert "outside the grid" in (out / "index.html").read_text()
    assert json.loads((out / "summary.json").read_text())["trials"] == 2


def test_a_failed_record_never_replaces_a_finished_one(tiny_study, tmp_path):
    from harness.results.store import ResultStore
    from harness.study.load import load_study

    spec = load_study(tiny_study).trials[0]
    store = ResultStore(tmp_path)
    store.write_record(spec, "finished", {"test/acc": 0.7})
    kept = store.write_record(spec, "failed", {}, "trial process died: after its final report")
    assert kept["status"] == "finished"
    assert json.loads((tmp_path / "trials" / spec.trial_id / "result.json").read_text())["status"] == "finished"
    assert ResultStore(tmp_path).record(spec.trial_id)["test/acc"] == 0.7


def test_the_driver_callback_keeps_a_finished_trial_whose_process_then_dies(tiny_study, tmp_path):
    from types import SimpleNamespace

    from harness.orchestrate import RunSummary
    from harness.orchestrate._callback import StoreCallback
    from harness.results.store import ResultStore
    from harness.study.load import load_study

    specs = load_study(tiny_study).trials[:1]
    store, summary, said = ResultStore(tmp_path), RunSummary(total=1), []
    callback = StoreCallback(store, {s.trial_id: s for s in specs}, specs, summary, said.append,
                             checkpoints=SimpleNamespace(delete=lambda t: None))
    trial = SimpleNamespace(config={"trial": {"trial_id": specs[0].trial_id}}, error_file=None)
    callback.on_trial_result(0, [], trial, {"kind": "final", "status": "finished", "test/acc": 0.6, "history": "[]"})
    callback.on_trial_error(0, [], trial)
    assert store.record(specs[0].trial_id)["status"] == "finished"
    assert summary.finished == {specs[0].trial_id} and not summary.failed


def test_an_axis_of_mixed_types_is_stored_not_refused(tiny_study, tmp_path):
    from dataclasses import replace

    from harness.results.store import ResultStore
    from harness.study.load import load_study

    specs = load_study(tiny_study).trials[:2]
    specs = [replace(specs[0], axes={"backbone.pretrained": False}),
             replace(specs[1], axes={"backbone.pretrained": "/weights/r18.pth"})]
    store = ResultStore(tmp_path)
    for spec in specs:
        store.write_record(spec, "finished", {"test/acc": 0.5})
    stored = store.write_tables(specs)
    assert len(pd.read_parquet(tmp_path / "results.parquet")) == len(stored) == 2


# ----------------------------------------------------------------------------- node cache, atomic writes


@pytest.mark.parametrize("damage", ["truncated images", "empty labels", "deleted meta.json", "flipped byte",
                                    "meta.json without checksums"])
def test_a_broken_cache_entry_is_named_and_rebuilt(tmp_path, monkeypatch, capsys, damage):
    from harness.data import DATASETS, cache_path, load_imageset, verify_entry

    monkeypatch.setenv("FGVC_HARNESS_CACHE", str(tmp_path))
    params = DATASETS.get("synthfg").Params.model_validate({"name": "synthfg", "classes": 4, "train_per_class": 2,
                                                            "test_per_class": 2})
    first = load_imageset(params, 32)
    expected = np.array(first.train.images)
    path = cache_path(params, 32)
    assert verify_entry(path) is None
    images, labels, meta = path / "train_images.npy", path / "test_labels.npy", path / "meta.json"
    if damage == "truncated images":
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "empty labels":
        labels.write_bytes(b"")
    elif damage == "deleted meta.json":
        meta.unlink()
    elif damage == "flipped byte":
        data = bytearray(images.read_bytes())
        data[-1] ^= 0xFF
        images.write_bytes(data)
        os.utime(images, ns=(1, 1))  # a new stamp: this process re-checks the entry
    else:
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "files"}))
    assert verify_entry(path) not in (None, "not built yet")
    again = load_imageset(params, 32)
    assert f"dataset cache entry {path} is broken" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(again.train.images), expected)
    assert verify_entry(path) is None
    assert not [p for p in tmp_path.iterdir() if ".broken-" in p.name]


def test_the_atomic_writer_flushes_the_file_and_its_folder(tmp_path, monkeypatch):
    from harness.core import atomic as _atomic

    synced = []
    real = os.fsync
    fds: dict[int, str] = {}
    real_open = os.open

    def fake_open(path, flags, *a, **k):
        fd = real_open(path, flags, *a, **k)
        fds[fd] = str(path)
        return fd

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fds.get(fd)), real(fd)))
    _atomic.atomic_write_bytes(tmp_path / "f.json", b"{}")
    assert any(p and Path(p).name.startswith(".f.json.") for p in synced)  # the data, before the rename
    assert str(tmp_path) in synced  # the rename
    synced.clear()
    _atomic.atomic_write(tmp_path / "entry", lambda d: (d / "a.npy").write_bytes(b"x"), directory=True)
    assert any(p and p.endswith("a.npy") for p in synced) and str(tmp_path) in synced
    assert (tmp_path / "entry" / "a.npy").read_bytes() == b"x"


def test_a_narrower_rerun_through_the_cli_keeps_every_finished_row(tiny_run, tmp_path, monkeypatch, capsys):
    """The bar of issue 19 on a real run: tiny_run trained stages 1 and 2; a rerun of stage 1 alone trains nothing
    (no Ray starts) and results.parquet still holds both finished trials."""
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(tiny_run[0] / "runs", runs)
    before = pd.read_parquet(runs / "tiny" / "fast" / "results.parquet")
    assert len(before) == 2 and (before["status"] == "finished").all()
    study = tmp_path / "tiny.yaml"
    study.write_text(TINY_STUDY)
    monkeypatch.setenv("HOME", str(tmp_path))
    rc = main([str(study), "--profile", "fast", "--runs-dir", str(runs), "--reports-dir", str(tmp_path / "reports"),
               "--set", "grid.method.stages=[1]", "--set", "grid.method.jigsaw=[true]"])
    out = capsys.readouterr().out
    assert rc == 0 and "0 trials trained, 1 skipped" in out
    after = pd.read_parquet(runs / "tiny" / "fast" / "results.parquet")
    assert set(after["trial_id"]) == set(before["trial_id"]) and after["in_grid"].sum() == 1
    assert "1 more finished trial of this study and profile" in (tmp_path / "reports" / "tiny" / "fast" /
                                                                 "table.md").read_text()

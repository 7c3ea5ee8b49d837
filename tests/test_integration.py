"""Tiny studies through a real local Ray: results, reports, skipping, failures, interrupts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.run import main

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def run(tiny_study, tmp_path, *extra):
    return main([str(tiny_study), "--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports"),
                 "--num-cpus", "2", *extra])


@pytest.mark.slow
def test_study_with_a_diverging_trial(tiny_study, tmp_path, capsys):
    grid = ["--set", "grid.train.lr=[0.05, 1.0e+30]", "--set", "grid.method.jigsaw=[true]", "--profile", "fast"]
    assert run(tiny_study, tmp_path, *grid) == 3  # finished with failures
    run_dir = tmp_path / "runs" / "tiny" / "fast"
    results = pd.read_parquet(run_dir / "results.parquet")
    assert len(results) == 4
    assert sorted(results["status"]) == ["failed", "failed", "finished", "finished"]
    failed = results[results["status"] == "failed"]
    assert (failed["train.lr"] == 1e30).all() and failed["error"].str.contains("TrialDiverged").all()
    assert (results["num_classes"] == 4).all()
    ok = results[results["status"] == "finished"]
    assert ok["test/acc"].between(0, 1).all() and (ok["num_classes"] == 4).all()
    for column in ("trial_id", "method", "dataset", "backbone", "seed", "method.stages", "method.jigsaw",
                   "test/acc/concat", "test/acc/combined", "wall_time_s", "train/images_per_s", "version/torch"):
        assert column in results.columns, column
    assert set(ok["optimizer_steps"]) == {(32 // 8) * 2, (32 // 8) * 3}  # 4 batches x (S+1)
    curves = pd.read_parquet(run_dir / "curves.parquet")
    assert set(curves["trial_id"]) == set(ok["trial_id"]) and set(curves["epoch"]) == {1}

    reports = tmp_path / "reports" / "tiny" / "fast"
    for name in ("table.md", "table.csv", "table.tex", "learning_curves.png", "test_acc_vs_method_stages.png"):
        assert (reports / name).stat().st_size > 0, name
    assert "(1 failed)" in (reports / "table.md").read_text()

    # Second run: the finished trials are skipped (and untouched), the failed ones are tried again.
    finished_files = {t: (run_dir / "trials" / t / "result.json").stat().st_mtime_ns for t in ok["trial_id"]}
    capsys.readouterr()
    assert run(tiny_study, tmp_path, *grid) == 3
    assert "skipping 2 of 4 trials already finished" in capsys.readouterr().out
    assert {t: (run_dir / "trials" / t / "result.json").stat().st_mtime_ns for t in finished_files} == finished_files


@pytest.mark.slow
def test_rerun_trains_nothing_and_rebuilds_reports(tiny_study, tmp_path, capsys):
    assert run(tiny_study, tmp_path, "--profile", "fast", "--set", "grid.method.stages=[1]") == 0
    capsys.readouterr()
    assert run(tiny_study, tmp_path, "--profile", "fast", "--set", "grid.method.stages=[1]") == 0
    out = capsys.readouterr().out
    assert "0 trials trained, 2 skipped" in out and "Ray" not in out  # no Ray started for nothing to do
    from harness.report.build import main as report_main
    assert report_main([str(tmp_path / "runs" / "tiny" / "fast"), "--out", str(tmp_path / "rebuilt")]) == 0
    assert (tmp_path / "rebuilt" / "table.md").exists()


@pytest.mark.slow
def test_interrupt_keeps_finished_trials_and_resumes(tiny_study, tmp_path):
    """Ctrl-C (SIGINT) after the first trial: exit 130, nothing lost, the next run finishes the rest."""
    cmd = [sys.executable, "-m", "harness.run", str(tiny_study), "--runs-dir", str(tmp_path / "runs"),
           "--reports-dir", str(tmp_path / "reports"), "--num-cpus", "1", "--set", "train.epochs=3"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trials_dir = tmp_path / "runs" / "tiny" / "default" / "trials"
    deadline = time.time() + 240
    while time.time() < deadline and not list(trials_dir.glob("*/result.json")):
        time.sleep(0.5)
    assert list(trials_dir.glob("*/result.json")), "no trial finished in time"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    finished = {p.parent.name for p in trials_dir.glob("*/result.json")
                if json.loads(p.read_text())["status"] == "finished"}
    assert finished
    results = pd.read_parquet(tmp_path / "runs" / "tiny" / "default" / "results.parquet")
    assert finished <= set(results["trial_id"])  # the table written before the interrupt is whole

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"skipping {len(finished)} of 4 trials already finished" in done.stdout
    results = pd.read_parquet(tmp_path / "runs" / "tiny" / "default" / "results.parquet")
    assert len(results) == 4 and (results["status"] == "finished").all()
    assert all(len(json.loads((trials_dir / t / "curves.json").read_text())) == 3 for t in results["trial_id"])


@pytest.mark.slow
def test_every_registered_method_runs_a_tiny_study(tmp_path):
    """Each plugin, with its own defaults, trains and evaluates through real Ray on tiny data."""
    from harness.plugin.method import METHODS

    names = METHODS.names()
    code = run(_study(tmp_path), tmp_path, "--profile", "fast", "--set", "train.lr=0.001",
               "--set", f"grid.method.name={names}")
    results = pd.read_parquet(tmp_path / "runs" / "tiny" / "fast" / "results.parquet")
    assert code == 0, results[["method", "error"]]
    assert sorted(results["method"]) == sorted(names)
    assert results["test/acc"].between(0, 1).all()


def _study(tmp_path):
    from tests.conftest import TINY_STUDY
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_STUDY.replace("grid:\n  method.stages: [1, 2]\n  method.jigsaw: [true, false]\n", "grid: {}\n")
                    .replace("table: {rows: method.stages, columns: method.jigsaw}\n", ""))
    return path


def test_a_stale_ray_current_cluster_does_not_stop_a_local_run(tiny_run):
    """tiny_run wrote Ray's ray_current_cluster naming a dead cluster before it ran: the local run started its own
    Ray (address="local") instead of failing to connect, and left the file as it found it."""
    from tests.conftest import DEAD_CLUSTER, SUITE_RAY_TMPDIR

    tmp, out = tiny_run
    assert (Path(SUITE_RAY_TMPDIR) / "ray" / "ray_current_cluster").read_text() == DEAD_CLUSTER
    assert "Ray started locally" in out.stdout and "2 trials trained" in out.stdout, out.stdout[-2000:]


def test_trials_run_at_the_drivers_priority(tiny_run):
    """Ray would start its workers at niceness 15, where any ordinary process beside a study takes the CPU: a local
    run's trials run at the driver's niceness (tiny_run's driver inherits this process's), and say and record it."""
    import json

    import pandas as pd

    tmp, out = tiny_run
    driver = os.nice(0)
    rows = pd.read_parquet(next((tmp / "runs").glob("*/*/results.parquet")))
    assert set(rows["niceness"]) == {driver}, rows["niceness"]
    assert f"trials run at niceness {driver} (the driver's" in out.stdout
    meta = json.loads(next((tmp / "runs").glob("*/*/run.json")).read_text())
    assert meta["cluster"]["worker_niceness"] == [driver]


RELATIVE_STUDY = """
name: relative
method: {name: baseline}
dataset: {name: imagefolder, root: data, test_dir: val}
backbone: {name: resnet18, pretrained: weights/narrow.pth, kwargs: {channels: [8, 8, 8, 8], stem_width: 8}}
train: {epochs: 1, batch_size: 4, image_size: 32, resize: 36, lr: 0.01, precision: fp32}
seeds: [0]
"""


def test_relative_study_paths_are_read_from_where_the_run_starts(tmp_path):
    """Tune starts each trial in its own trial folder: a study's relative dataset root and weights file must still
    mean the folder harness.run was started in (the smoke study's warm start is such a path)."""
    import timm
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            for k in range(n):
                path = tmp_path / "data" / split / cls / f"{k}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    (tmp_path / "weights").mkdir()
    torch.save(timm.create_model("resnet18", channels=[8, 8, 8, 8], stem_width=8).state_dict(),
               tmp_path / "weights" / "narrow.pth")
    (tmp_path / "relative.yaml").write_text(RELATIVE_STUDY)
    out = subprocess.run([sys.executable, "-m", "harness.run", "relative.yaml", "--runs-dir", "runs",
                          "--reports-dir", "reports"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = pd.read_parquet(tmp_path / "runs" / "relative" / "default" / "results.parquet")
    assert results["status"].tolist() == ["finished"], results["error"].tolist()

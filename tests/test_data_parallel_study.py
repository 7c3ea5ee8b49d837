"""A data-parallel study (resources.workers: 2) through real Ray: Ray Train workers inside Tune trials,
a killed worker resumed from its last epoch checkpoint, results equal to the one-worker trial."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from harness.data import DATASETS, load_imageset
from harness.engine.loop import run_trial

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def _train_workers() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def _registered_checkpoint(train_dir: Path) -> bool:
    """Ray Train has recorded a checkpoint in its run's snapshot (the file it resumes from)."""
    for snapshot in train_dir.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except (OSError, ValueError):
            pass
    return False


def test_two_worker_trial_survives_a_killed_worker_and_matches_one_worker(tiny_study, tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "harness.run", str(tiny_study), "--runs-dir", str(runs), "--reports-dir",
           str(tmp_path / "reports"), "--num-cpus", "2", "--set", "resources.workers=2", "--set", "train.epochs=3",
           "--set", "grid.method.stages=[2]", "--set", "grid.method.jigsaw=[true]"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    train_dir = runs / "tiny" / "default" / "ray" / "train"
    deadline = time.time() + 240
    while time.time() < deadline and not _registered_checkpoint(train_dir):
        time.sleep(0.2)
    assert _registered_checkpoint(train_dir), "no epoch checkpoint was registered in time"
    workers = _train_workers()
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)  # one rank dies mid-trial, after the epoch-1 checkpoint
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]

    results = pd.read_parquet(runs / "tiny" / "default" / "results.parquet")
    row = results.iloc[0]
    assert (row["status"], row["workers"], row["world_size"]) == ("finished", 2, 2)
    assert row["resumed_from_epoch"] >= 1  # Ray Train restarted the group from the checkpoint, not epoch 0
    assert len(json.loads((runs / "tiny" / "default" / "trials" / row["trial_id"] / "curves.json").read_text())) == 3
    assert "2 |" in (tmp_path / "reports" / "tiny" / "default" / "table.md").read_text()  # the table is filled
    assert not list(train_dir.glob("*/checkpoint_*"))  # a finished trial's checkpoints are deleted

    # The same trial in one process (float32, 36 optimizer steps: rounding is amplified, see
    # test_distributed.py for the exact float64 comparison).
    config = json.loads(row["config"])
    params = DATASETS.get("synthfg").Params.model_validate(config["dataset"])
    single = run_trial(config, load_imageset(params, config["train"]["resize"]), threads=2)
    assert single["optimizer_steps"] == row["optimizer_steps"] == 3 * 4 * 3  # epochs x batches x (S+1)
    assert row["train/loss"] == pytest.approx(single["train/loss"], rel=2e-2)
    assert abs(row["test/acc"] - single["test/acc"]) <= 1 / 16 + 1e-9  # at most one of the 16 test images

"""The CI regression gate on stored runs: passes a run against its own baseline, fails (naming the cells) one that
demands more accuracy or throughput than the run has, refuses malformed input."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from harness.gate import main
from harness.stats import pack_correct


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "runs" / "ci_smoke" / "default"
    run.mkdir(parents=True)
    (run / "study.yaml").write_text(yaml.safe_dump({"name": "ci_smoke", "profile": "default",
                                                    "grid": {"method": [{"name": "a"}, {"name": "b"}]}}))
    rng = np.random.default_rng(0)
    rows = []
    for method, p, rel in (("a", 0.8, 0.5), ("b", 0.6, 0.25)):
        correct = rng.random(300) < p
        rows.append({"trial_id": method, "status": "finished", "method": method, "seed": 0,
                     "test/acc": float(correct.mean()), "test/correct": pack_correct(correct),
                     "train/images_per_s": 100.0, "train/images_per_s_rel": rel, "train/loss": 1.2})
    pd.DataFrame(rows).to_parquet(run / "results.parquet")
    return run


def test_a_run_passes_against_its_own_baseline(run_dir, tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    assert main([str(run_dir), "--write-baseline", str(baseline)]) == 0
    cells = json.loads(baseline.read_text())["cells"]
    assert set(cells) == {"method=a", "method=b"} and cells["method=a"]["test_images"] == 300
    assert main([str(run_dir), str(baseline), "--junit", str(tmp_path / "j.xml")]) == 0
    out = capsys.readouterr().out
    assert "no regression in 2 cells" in out and "method=a" in out
    assert 'failures="0"' in (tmp_path / "j.xml").read_text()


def test_a_baseline_twenty_points_higher_fails_and_names_the_cells(run_dir, tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    main([str(run_dir), "--write-baseline", str(baseline)])
    raised = json.loads(baseline.read_text())
    for cell in raised["cells"].values():
        cell["accuracy"] += 0.2
    baseline.write_text(json.dumps(raised))
    capsys.readouterr()
    assert main([str(run_dir), str(baseline), "--junit", str(tmp_path / "j.xml")]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED: method=a, method=b" in out and "accuracy" in out
    junit = (tmp_path / "j.xml").read_text()
    assert 'failures="2"' in junit and 'name="method=a"><failure message="accuracy' in junit


def test_a_small_accuracy_drop_is_noise_and_a_slowdown_is_not(run_dir, tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    main([str(run_dir), "--write-baseline", str(baseline)])
    data = json.loads(baseline.read_text())
    data["cells"]["method=a"]["accuracy"] += 0.04  # inside max(0.05, 3 se)
    data["cells"]["method=b"]["throughput_rel"] *= 2  # the run is at half the baseline's relative speed
    baseline.write_text(json.dumps(data))
    capsys.readouterr()
    assert main([str(run_dir), str(baseline)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED: method=b" in out and "relative throughput 0.50x" in out and "method=a:" not in out



def test_a_method_still_at_chance_is_gated_on_its_training_loss(run_dir, tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    main([str(run_dir), "--write-baseline", str(baseline)])
    data = json.loads(baseline.read_text())
    assert data["cells"]["method=a"]["train_loss"] == 1.2
    data["cells"]["method=a"]["train_loss"] = 1.15  # the run's 1.2 is within 10% of it
    data["cells"]["method=b"]["train_loss"] = 0.9  # the run's 1.2 is a third higher: learning broke
    baseline.write_text(json.dumps(data))
    capsys.readouterr()
    assert main([str(run_dir), str(baseline)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED: method=b" in out and "training loss 1.200 > baseline 0.900 + 0.090" in out
    assert main([str(run_dir), str(baseline), "--loss-tol", "0.5"]) == 0
    del data["cells"]["method=b"]["train_loss"]  # a baseline written before the loss was recorded: not judged on it
    baseline.write_text(json.dumps(data))
    assert main([str(run_dir), str(baseline)]) == 0

def test_bad_input_exits_2_with_the_reason(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"study": "ci_smoke", "profile": "default", "cells": {"m": {"accuracy": 1.5}}}))
    assert main([str(run_dir), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "malformed" in err and "cells.m.accuracy" in err and "cells.m.seeds" in err
    bad.write_text("{not json")
    assert main([str(run_dir), str(bad)]) == 2
    assert main([str(run_dir), str(tmp_path / "none.json")]) == 2
    assert "--write-baseline" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), str(bad)]) == 2

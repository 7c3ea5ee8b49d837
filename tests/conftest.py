import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# As harness.orchestrate does before it imports Ray: test modules that import Ray themselves (and the
# clusters they start) must use the same authentication mode as the harness processes they talk to.
os.environ.setdefault("RAY_AUTH_MODE", "token")

TINY_STUDY = """
name: tiny
method: {name: pmg, stages: 2, feature_size: 16, stage_dim: 32, backbone_lr_scale: 1.0, early_exit: true}
dataset: {name: synthfg, classes: 4, train_per_class: 8, test_per_class: 4}
backbone: {name: resnet18}
train: {epochs: 2, batch_size: 8, image_size: 32, resize: 36, lr: 0.05, precision: fp32}
grid:
  method.stages: [1, 2]
  method.jigsaw: [true, false]
seeds: [0]
table: {rows: method.stages, columns: method.jigsaw}
profiles:
  fast:
    train: {epochs: 1}
"""


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Datasets are cached per test session, never in the user's ~/.cache."""
    os.environ["FGVC_HARNESS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture
def tiny_study(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_STUDY)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One small run through the command line, shared by the report, tracker and progress tests: the tiny
    study's fast profile (two trials, one epoch) with every tracker installed here. Returns its folder
    (runs/, reports/) and the command's output."""
    from harness.trackers import TRACKERS, check_installed

    tmp = tmp_path_factory.mktemp("tiny_run")
    study = tmp / "tiny.yaml"
    study.write_text(TINY_STUDY)
    logs = []
    for name in TRACKERS:
        try:
            check_installed([name])
            logs += ["--log", name]
        except ValueError:
            pass
    out = subprocess.run([sys.executable, "-m", "harness.run", str(study), "--runs-dir", str(tmp / "runs"),
                          "--reports-dir", str(tmp / "reports"), "--profile", "fast", "--set",
                          "grid.method.stages=[1, 2]", "--set", "grid.method.jigsaw=[true]", *logs],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp, out

import atexit
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# As harness.orchestrate does before it imports Ray: test modules that import Ray themselves (and the
# clusters they start) must use the same authentication mode as the harness processes they talk to.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# The suite touches only what it starts: its own Ray temp folder (sessions, sockets, ray_current_cluster), so a
# study running beside it on this machine neither sees its clusters nor has its own disturbed, and its own token
# (nothing written to ~/.ray). Every Ray the suite starts, in-process or in a subprocess, inherits both. The
# folder is short: Ray's socket paths under it must stay within the 107 bytes of a Unix socket name.
SUITE_RAY_TMPDIR = tempfile.mkdtemp(prefix="fgvc-ray-", dir="/tmp")
os.environ["RAY_TMPDIR"] = SUITE_RAY_TMPDIR
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
atexit.register(shutil.rmtree, SUITE_RAY_TMPDIR, ignore_errors=True)

DEAD_CLUSTER = "127.0.0.1:9"  # nothing listens on the discard port

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
    from harness.orchestrate.trackers import TRACKERS, check_installed

    tmp = tmp_path_factory.mktemp("tiny_run")
    # A killed run's leftover: Ray's ray_current_cluster naming a cluster that is gone. A local run must not
    # try to join it (tests/test_integration.py::test_a_stale_ray_current_cluster_does_not_stop_a_local_run).
    stale = Path(SUITE_RAY_TMPDIR) / "ray" / "ray_current_cluster"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text(DEAD_CLUSTER)
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

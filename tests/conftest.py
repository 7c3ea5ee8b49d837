import os

import pytest

# As harness.orchestrate does before it imports Ray: test modules that import Ray themselves (and the
# clusters they start) must use the same authentication mode as the harness processes they talk to.
os.environ.setdefault("RAY_AUTH_MODE", "token")

TINY_STUDY = """
name: tiny
method: {name: pmg, stages: 2, feature_size: 16, stage_dim: 32, backbone_lr_scale: 1.0, early_exit: true}
dataset: {name: synthfg, classes: 4, train_per_class: 8, test_per_class: 4}
backbone: {name: resnet18}
train: {epochs: 2, batch_size: 8, image_size: 32, resize: 36, lr: 0.05}
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

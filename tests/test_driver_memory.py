"""The driver holds no decoded images: its peak memory is the same for a 22 MB and a 430 MB dataset."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]

STUDY = """
name: memory
method: {name: baseline}
dataset: {name: imagefolder, root: "%s"}
backbone: {name: resnet18}
train: {epochs: 1, batch_size: 8, image_size: 32, max_train_batches: 1}
"""


def test_driver_peak_memory_does_not_grow_with_the_dataset(tmp_path):
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 300), ("test", 4)):
        for c in ("a", "b"):
            folder = tmp_path / "tree" / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):  # tiny files: decoding is cheap, the decoded size is set by train.resize
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    study = tmp_path / "memory.yaml"
    study.write_text(STUDY % (tmp_path / "tree"))
    peaks, decoded = {}, {}
    for resize in (112, 490):  # 608 images x 3 x R^2 bytes: 22 MB and 438 MB
        out = subprocess.run([sys.executable, "-m", "harness.run", str(study), "--runs-dir", str(tmp_path / "runs"),
                              "--reports-dir", str(tmp_path / "reports"), "--set", f"train.resize={resize}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        decoded[resize] = float(re.search(r"\((\d+) MB decoded\)", out.stdout).group(1))
        peaks[resize] = json.loads((tmp_path / "runs" / "memory" / "default" / "run.json").read_text())[
            "driver_peak_rss_mb"]
    assert decoded[112] < 30 and decoded[490] > 400
    assert peaks[490] - peaks[112] < 50, peaks  # flat: the 416 MB more went to the node cache, not the driver

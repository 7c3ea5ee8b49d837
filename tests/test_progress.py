"""The progress lines: plain history lines in a log, a block redrawn in place on a terminal, an ETA from the
trials done so far."""

import io
import re

from harness.orchestrate import progress
from harness.orchestrate.progress import Progress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_log_gets_one_plain_line_per_epoch_and_a_line_per_finished_trial(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    p = Progress(total=3, out=out)
    assert p.live is False  # a StringIO is not a terminal
    p.start("a", "stages=1", epochs=4)
    clock.now += 10
    p.epoch("a", {"epoch": 1, "train/loss": 2.5, "test/acc": 0.25})
    clock.now += 30
    p.epoch("a", {"epoch": 2, "train/loss": 2.0})
    clock.now += 40
    p.end("a", "[1/3] finished stages=1")
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue()
    # after one epoch of 10 s, 4 epochs take 40 s: 30 s left for this trial, 2 more trials of 40 s on one lane
    assert lines[0] == "[0/3 trials, 10s, ETA 1m50s] |  stages=1: epoch 1/4 loss 2.500 acc 25.0%, 10s, ~30s left"
    assert lines[1] == "[0/3 trials, 40s, ETA 3m20s] |  stages=1: epoch 2/4 loss 2.000 acc 25.0%, 40s, ~40s left"
    assert lines[2] == "[1/3] finished stages=1"
    assert p.overall() == "[1/3 trials, 1m20s, ETA 2m40s]"  # the finished trial's 80 s, twice


def test_a_terminal_gets_a_block_redrawn_in_place(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    p = Progress(total=2, out=out, live=True)
    p.start("a", "stages=1", epochs=2)
    p.start("b", "stages=2", epochs=2)
    clock.now += 5
    p.epoch("b", {"epoch": 1, "train/loss": 1.0})
    p.end("a", "[1/2] FAILED stages=1: diverged")
    text = out.getvalue()
    # each redraw moves the cursor up over the block it drew (ESC[nF) and clears below (ESC[J)
    assert text.count("\x1b[J") == 3 and "\x1b[2F" in text and "\x1b[3F" in text
    final = re.split(r"\x1b\[\d+F\x1b\[J", text)[-1].splitlines()
    assert final == ["[1/2] FAILED stages=1: diverged", "[1/2 trials, 5s, ETA 5s]",
                     "  stages=2: epoch 1/2 loss 1.000, 5s, ~5s left"]


def test_a_study_run_prints_progress_lines(tiny_run):
    _, out = tiny_run
    epochs = [line for line in out.stdout.splitlines() if re.match(r"\[0/2 trials, \d+s(, ETA \S+)?\] \|  ", line)]
    assert epochs and all("epoch 1/1 loss" in line for line in epochs)
    assert re.search(r"^\[2/2\] finished method\.stages=\d,method\.jigsaw=True,seed=0: test/acc=", out.stdout, re.M)

"""Hostile input, second pass (issue 26): bounds wherever input is read, and the machine's own failures. The seed
list, every YAML read (search spaces, a run's study.yaml for the gate), reference CSVs, dataset files (regular files
only, a decode timeout, 16-bit images scaled), and a full disk, a read-only folder or an unreadable tree: each is an
exit 2 naming the path and the fix, at once, never a traceback or a hang. (Run folders: test_hostile_runs.py;
outputs: test_hostile_outputs.py.)
"""

from __future__ import annotations

import errno
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_STUDY
from tests.hostile import alias_bomb, run_cli, study_text
from tests.search_studies import SEARCH_STUDY


def deep_choice(levels: int) -> str:
    return SEARCH_STUDY.replace("choice([1, 2])", "choice([" + "[" * levels + "1" + "]" * levels + "])")


CASES = [
    ("20,001 duplicate seeds", study_text(seeds=[0] * 20_001), r"seeds: List should have at most 10000 items"),
    ("a seed listed twice", study_text(seeds=[0, 1, 0]), r"seeds listed more than once: 0 \(2 times\)"),
    ("a search space nested 3,000 deep", deep_choice(3000), r"choice\(\.\.\.\):1: nested more than 64 levels deep"),
    ("a key written twice", TINY_STUDY.replace("seeds: [0]", "seeds: [0]\nseeds: [1]"),
     r"s\.yaml:\d+: key 'seeds' is written twice in one mapping \(first at line \d+\)"),
    ("a reference file that never ends", study_text(table={"rows": "method.stages", "reference": {
        "file": "/dev/zero", "cells": []}}), r"reference file /dev/zero: cannot read it .*a character device"),
]


@pytest.mark.parametrize("text, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bounded_input_is_refused_at_once(tmp_path, monkeypatch, capsys, text, message):
    t0 = time.perf_counter()
    rc, output, outside = run_cli(tmp_path, text, ["--dry-run"], monkeypatch, capsys)
    assert rc == 2 and re.search(message, output), output[-2000:]
    assert "Traceback" not in output and not outside
    assert time.perf_counter() - t0 < 30


def test_a_reference_fifo_is_refused_without_opening_it(tmp_path, monkeypatch, capsys):
    fifo = tmp_path / "ref.csv"
    os.mkfifo(fifo)
    text = study_text(table={"rows": "method.stages", "reference": {"file": str(fifo), "cells": []}})
    rc, output, _ = run_cli(tmp_path, text, ["--dry-run"], monkeypatch, capsys)  # would hang if it were opened
    assert rc == 2 and "a FIFO; a reference file must be a regular file" in output


def test_the_gate_reads_a_run_folders_study_within_the_loaders_bounds(tmp_path, tiny_study, capsys):
    from harness.gate.cli import main
    from tests.hostile import fake_run

    fake_run(tmp_path / "run", tiny_study, [])
    (tmp_path / "run" / "study.yaml").write_text(alias_bomb())
    t0 = time.perf_counter()
    assert main([str(tmp_path / "run"), str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert "more than 200,000 values once its aliases" in err and "Traceback" not in err
    assert time.perf_counter() - t0 < 30


# ----------------------------------------------------------------------------- dataset files


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / "a" / "ok.png")
    return root


def test_data_check_names_a_fifo_a_dangling_link_and_an_escape_named_file(tmp_path, capsys):
    from harness.data.__main__ import main

    root = _tree(tmp_path)
    os.mkfifo(root / "train" / "a" / "fifo.png")
    (root / "train" / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "train" / "a" / "\x1b]0;owned\x07x.png").write_bytes(b"not an image")
    t0 = time.perf_counter()
    assert main(["check", "imagefolder", str(root)]) == 2
    err = capsys.readouterr().err
    assert "fifo.png (ValueError: a FIFO, not a regular file)" in err
    assert "missing: " in err and "gone.png (missing (or a link to nothing))" in err
    assert "\x1b" not in err and "\x07" not in err and "x.png" in err
    assert time.perf_counter() - t0 < 30


def test_an_unreadable_file_is_named_not_a_traceback(tmp_path, monkeypatch, capsys):
    from harness.data import _decode
    from harness.data.__main__ import main

    def refuse(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(_decode.Image, "open", refuse)
    assert main(["check", "imagefolder", str(_tree(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "cannot decode: " in err and "PermissionError" in err and "Traceback" not in err


def test_a_decode_that_hangs_is_named_after_its_timeout(tmp_path, monkeypatch):
    from harness.data import _decode

    monkeypatch.setattr(_decode, "DECODE_TIMEOUT_S", 0.3)
    real = _decode.decode_one
    monkeypatch.setattr(_decode, "decode_one", lambda p, *a: time.sleep(30) if p.name == "slow.png" else real(p, *a))
    paths = [tmp_path / "slow.png", *[tmp_path / f"{i}.png" for i in range(3)]]
    for p in paths:
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(p)
    t0 = time.perf_counter()
    with pytest.raises(_decode.DatasetError, match=r"slow\.png \(still reading it after 0\.3 s\)"):
        _decode.decode_all(paths, 4, "d")
    assert time.perf_counter() - t0 < 10


def test_a_16_bit_image_is_scaled_not_clipped(tmp_path):
    from harness.data._decode import decode_one

    for value, expected in ((32768, 128), (65535, 255), (0, 0), (257, 1)):
        Image.fromarray(np.full((6, 6), value, np.uint16)).save(tmp_path / "g.png")
        assert Image.open(tmp_path / "g.png").mode.startswith("I")
        image, size = decode_one(tmp_path / "g.png", 6)
        assert size == (6, 6) and (image == expected).all(), (value, image[:, 0, 0])
    Image.fromarray(np.full((6, 6, 3), 200, np.uint8)).save(tmp_path / "c.png")  # 8-bit: as before
    assert (decode_one(tmp_path / "c.png", 6)[0] == 200).all()


# ----------------------------------------------------------------------------- a full disk, a read-only folder


def _failing(kind: int, text: str):
    def fail(path, *a, **k):
        raise OSError(kind, text, str(path))
    return fail


def test_a_full_disk_under_the_runs_folder_is_exit_2_with_the_path_and_the_fix(tmp_path, monkeypatch, capsys):
    from harness.results import store as results

    monkeypatch.setattr(results, "atomic_write_bytes", _failing(errno.ENOSPC, "No space left on device"))
    rc, output, _ = run_cli(tmp_path, TINY_STUDY, [], monkeypatch, capsys)
    assert rc == 2 and "Traceback" not in output
    assert re.search(r"cannot run: .*study\.yaml: no space left on the device; free space there, or give "
                     r"--runs-dir a folder on another disk", output), output


def test_a_full_disk_while_trials_are_stored_is_exit_2(tmp_path, monkeypatch, capsys):
    from harness import orchestrate

    def run_study(resolved, run_dir, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(run_dir) / "trials" / "x" / "result.json"))

    monkeypatch.setattr(orchestrate, "run_study", run_study)
    rc, output, _ = run_cli(tmp_path, TINY_STUDY, [], monkeypatch, capsys)
    assert rc == 2 and "result.json: no space left on the device" in output and "Traceback" not in output


def test_a_read_only_runs_folder_is_exit_2_with_the_fix(tmp_path, monkeypatch, capsys):
    real = Path.mkdir

    def mkdir(self, *a, **k):
        if "roots" in self.parts:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    rc, output, _ = run_cli(tmp_path, TINY_STUDY, [], monkeypatch, capsys)
    assert rc == 2 and "a read-only file system; give --runs-dir a folder you can write" in output
    assert "Traceback" not in output


def test_an_unwritable_report_folder_is_exit_2_naming_out(tmp_path, tiny_study, monkeypatch, capsys):
    from harness.report import build as report
    from tests.hostile import fake_run

    fake_run(tmp_path / "run", tiny_study, [])
    monkeypatch.setattr(report, "atomic_write_bytes", _failing(errno.EACCES, "Permission denied"))
    assert report.main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "permission denied; give --out a folder you can write" in err and "Traceback" not in err


def test_a_dataset_listing_that_is_a_fifo_is_never_opened(tmp_path, capsys):
    from harness.data.__main__ import main

    root = tmp_path / "CUB_200_2011"
    (root / "images").mkdir(parents=True)
    for name in ("classes.txt", "image_class_labels.txt", "train_test_split.txt"):
        (root / name).write_text("1 1\n")
    os.mkfifo(root / "images.txt")
    t0 = time.perf_counter()
    assert main(["check", "cub200", str(root)]) == 2  # would hang reading the FIFO
    assert "images.txt is a FIFO, not a regular file" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 30

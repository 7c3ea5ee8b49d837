"""What keeps a run safe without a cluster: one driver per study, checkpoints that are never trusted
code and never fail a trial, datasets decoded once per node however many trials start together."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from ray.train import Checkpoint

from harness.data import cache_dir, load_imageset
from harness.data.synthfg import SynthFGParams
from harness.engine.loop import LocalCheckpoints, load_checkpoint, run_trial, save_checkpoint
from harness.orchestrate._storage import CheckpointStore, Storage
from harness.orchestrate._trial import CHECKPOINT_FILE, _candidates, read_checkpoint
from harness.results.store import RunLock, RunLocked

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_driver_is_refused_and_names_the_first(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLocked, match=rf"pid {os.getpid()} on .* since .*: .*it holds {tmp_path}/.lock"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released: the next run goes ahead
        pass


def test_a_killed_driver_leaves_no_stuck_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from harness.results.store import RunLock; "
                               f"lock = RunLock({str(tmp_path)!r}).__enter__(); print('held', flush=True); "
                               "time.sleep(600)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
        RunLock(tmp_path).__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with RunLock(tmp_path):
        pass


def test_cli_refuses_a_second_run_of_the_same_study(tiny_study, tmp_path, capsys):
    from harness.run import main

    with RunLock(tmp_path / "runs" / "tiny" / "default"):
        code = main([str(tiny_study), "--runs-dir", str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "rep")])
    assert code == 2
    assert "another run of this study and profile is in progress" in capsys.readouterr().err


def _checkpoint(root: Path, name: str, epoch: int, state: dict | None = None, raw: bytes | None = None) -> Checkpoint:
    directory = root / name
    directory.mkdir(parents=True)
    if raw is not None:
        (directory / CHECKPOINT_FILE).write_bytes(raw)
    else:
        save_checkpoint(state or {"epoch": epoch - 1}, directory / CHECKPOINT_FILE)
    checkpoint = Checkpoint.from_directory(str(directory))
    checkpoint.set_metadata({"epoch": epoch})
    return checkpoint


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    _checkpoint(tmp_path, "checkpoint_000000", 1)
    _checkpoint(tmp_path, "checkpoint_000001", 2)
    good = (tmp_path / "checkpoint_000001" / CHECKPOINT_FILE).read_bytes()
    latest = _checkpoint(tmp_path, "checkpoint_000002", 3, raw=good[: len(good) // 2])  # a crash mid-write
    lines = []
    state = read_checkpoint(_candidates(latest), log=lines.append)
    assert state == {"epoch": 1}  # epoch 2's checkpoint: the newest readable one
    assert len(lines) == 1 and "checkpoint_000002 is unreadable" in lines[0] and "trying the previous one" in lines[0]


def test_checkpoints_are_data_not_code(tmp_path):
    """A checkpoint that would run code when unpickled is refused (torch.load(weights_only=True)), and the
    trial starts from scratch with a line saying so instead of failing."""
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"model": Payload()}, evil / "checkpoint.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(evil / "checkpoint.pt")
    lines = []
    latest = Checkpoint.from_directory(str(evil))
    assert read_checkpoint([latest], log=lines.append) is None
    assert "starting from scratch" in lines[0] and not (tmp_path / "pwned").exists()


def test_every_engine_checkpoint_loads_with_weights_only(tmp_path):
    data = SynthFGParams(classes=4, train_per_class=8, test_per_class=4)
    for method in ({"name": "wsdan", "attention_maps": 2, "stage": -3}, {"name": "pmg", "stages": 2}):
        config = {"method": method, "dataset": data.model_dump(), "backbone": {"name": "resnet18"},
                  "train": {"epochs": 1, "batch_size": 8, "image_size": 32, "resize": 36, "max_train_batches": 1},
                  "seed": 0}
        run_trial(config, load_imageset(data, 36), LocalCheckpoints(tmp_path / method["name"]), threads=1)
        state = load_checkpoint(tmp_path / method["name"] / "checkpoint.pt")
        assert state["epoch"] == 0 and state["model"]


def test_earlier_runs_are_found_newest_first_and_deleted_after(tmp_path):
    store = CheckpointStore(Storage(tmp_path / "ray"))
    for run, epochs in (("20260101-000000", (1, 2)), ("20260102-000000", (3,))):
        for e in epochs:
            _checkpoint(Path(store.tune_root) / run / "abc", f"checkpoint_00000{e}", e)
    assert [Path(p).parts[-2:] for p in store.earlier_runs("abc")] == [
        ("abc", "checkpoint_000003"), ("abc", "checkpoint_000002"), ("abc", "checkpoint_000001")]
    store.delete("abc")
    assert store.earlier_runs("abc") == []


def _decode(rank: int, cache: str, params: dict, out: str) -> None:
    os.environ["FGVC_HARNESS_CACHE"] = cache
    import harness.data.synthfg as synthfg

    original = synthfg.SynthFG.build.__func__

    def counted(cls, p, size):
        with open(out, "a") as f:
            f.write(f"{rank}\n")
        time.sleep(1.0)  # a slow decode: the others arrive while it runs
        return original(cls, p, size)

    synthfg.SynthFG.build = classmethod(counted)
    imageset = load_imageset(SynthFGParams(**params), 24)
    assert isinstance(imageset.train.images, np.memmap)


@pytest.mark.slow
def test_trials_starting_together_on_a_node_decode_once(tmp_path):
    params = SynthFGParams(classes=3, train_per_class=4, test_per_class=2).model_dump()
    out = tmp_path / "builds"
    mp.spawn(_decode, args=(str(tmp_path / "cache"), params, str(out)), nprocs=3, join=True)
    assert len(out.read_text().split()) == 1  # one decode; the other two waited on the lock and mapped it
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and json.loads((entries[0] / "meta.json").read_text())["num_classes"] == 3
    assert cache_dir() != tmp_path / "cache"  # the session's own cache was not touched

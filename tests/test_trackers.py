"""`--log tensorboard|mlflow|wandb`: each trial's epochs, config and final metrics reach the tracker's own
files, read back with the tracker's own formats (TensorBoard event records, MLflow's client, W&B's records),
and agree with the results store; a tracker that breaks never fails the study."""

import glob
import struct

import pandas as pd
import pytest

from harness.orchestrate import trackers
from harness.orchestrate.trackers import TrackerMissing, Trackers, check_installed
from harness.study.trials import TrialSpec


def installed(name: str) -> bool:
    try:
        check_installed([name])
        return True
    except TrackerMissing:
        return False


def run_dir(tiny_run):
    return tiny_run[0] / "runs" / "tiny" / "fast"


def results(tiny_run) -> pd.DataFrame:
    """The stored results, with each trial's label (its grid values and seed) as the trackers name it."""
    table = pd.read_parquet(run_dir(tiny_run) / "results.parquet")
    table["label"] = [f"method.stages={s},method.jigsaw={j},seed={seed}"
                      for s, j, seed in zip(table["method.stages"], table["method.jigsaw"], table["seed"])]
    return table


def tfrecords(path):
    """TensorBoard's event file: records of (length u64, crc u32, data, crc u32)."""
    data, pos = open(path, "rb").read(), 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        yield data[pos + 12:pos + 12 + length]
        pos += 12 + length + 4


@pytest.mark.skipif(not installed("tensorboard"), reason="tensorboardX not installed")
def test_tensorboard_has_every_epoch_and_the_hparams_of_each_trial(tiny_run):
    from tensorboardX.proto.event_pb2 import Event

    folders = sorted(glob.glob(str(run_dir(tiny_run) / "tensorboard" / "*")))
    table = results(tiny_run)
    assert len(folders) == len(table) == 2
    for folder in folders:
        scalars = {}
        for path in glob.glob(folder + "/events.out.tfevents.*"):
            for record in tfrecords(path):
                event = Event.FromString(record)
                for value in event.summary.value:
                    if value.HasField("simple_value"):
                        scalars[(value.tag, event.step)] = value.simple_value
        label = folder.rsplit("/", 1)[1]
        row = table[table["label"] == label].iloc[0]
        assert scalars[("test/acc", 1)] == pytest.approx(row["test/acc"])
        assert ("train/loss", 1) in scalars and ("lr", 1) in scalars
        assert glob.glob(folder + "/hparams/events.out.tfevents.*")  # the HParams tab's entry


@pytest.mark.skipif(not installed("mlflow"), reason="mlflow not installed")
def test_mlflow_has_a_finished_run_per_trial_with_config_and_metrics(tiny_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir(tiny_run) / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    table = results(tiny_run).set_index("label")
    assert sorted(r.info.run_name for r in runs) == sorted(table.index)
    for run in runs:
        row = table.loc[run.info.run_name]
        assert run.info.status == "FINISHED"
        assert run.data.tags["trial_id"] == row["trial_id"] and run.data.tags["profile"] == "fast"
        assert run.data.params["method.stages"] == str(row["method.stages"])
        # a file store cannot hold 'train/loss' beside 'train/loss/concat': there names use '.' for '/'
        assert run.data.metrics["final.test.acc"] == pytest.approx(row["test/acc"])
        history = client.get_metric_history(run.info.run_id, "test.acc")
        assert [m.step for m in history] == [1] and history[0].value == pytest.approx(row["test/acc"])
        assert "train.loss" in run.data.metrics and "train.loss.concat" in run.data.metrics


def wandb_records(path):
    """A W&B offline run file: a 7-byte header, then LevelDB-log records (crc u32, length u16, type u8) in
    32 KiB blocks, each a wandb_internal Record."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, part = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        part += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # a full record, or the last piece of one
            yield part
            part = b""


@pytest.mark.skipif(not installed("wandb"), reason="wandb not installed")
def test_wandb_writes_an_offline_run_per_trial(tiny_run):
    from wandb.proto import wandb_internal_pb2

    files = glob.glob(str(run_dir(tiny_run) / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    table = results(tiny_run).set_index("label")
    assert len(files) == len(table)
    for path in files:
        name, history, summary, exit_code = None, {}, {}, None
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record.FromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                name = record.run.display_name
            elif kind == "history":
                history.update({i.key or "/".join(i.nested_key): float(i.value_json) for i in record.history.item})
            elif kind == "summary":
                summary.update({i.key or "/".join(i.nested_key): i.value_json for i in record.summary.update})
            elif kind == "exit":
                exit_code = record.exit.exit_code
        row = table.loc[name]
        assert history["test/acc"] == pytest.approx(row["test/acc"]) and history["_step"] == 1
        assert float(summary["final/test/acc"]) == pytest.approx(row["test/acc"]) and exit_code == 0


def spec() -> TrialSpec:
    return TrialSpec("abc123", "s", "default", {"method": {"name": "pmg"}, "seed": 0}, axes={"method.stages": 2})


def test_a_tracker_that_breaks_is_dropped_with_a_warning_and_the_others_go_on(monkeypatch, tmp_path):
    calls = []

    class Broken:
        def __init__(self, run_dir, study):
            pass

        def start(self, spec):
            raise ConnectionError("server went away")

    class Fine:
        def __init__(self, run_dir, study):
            pass

        def start(self, spec):
            calls.append(("start", spec.trial_id))

        def epoch(self, spec, step, metrics):
            calls.append(("epoch", step, metrics))

        def end(self, spec, finished, metrics):
            calls.append(("end", finished, metrics))

    monkeypatch.setattr(trackers, "_BACKENDS", {"mlflow": Broken, "tensorboard": Fine})
    monkeypatch.setattr(trackers, "check_installed", lambda names: None)
    said = []
    t = Trackers(["mlflow", "tensorboard"], tmp_path, "s", log=said.append)
    t.start(spec())
    t.epoch(spec(), {"epoch": 3, "train/loss": 1.5, "kind": "epoch", "note": "text", "diverged": True,
                     "test/acc": float("nan")})
    t.end(spec(), True, {"test/acc": 0.5})
    assert said == ["warning: --log mlflow stopped logging (ConnectionError: server went away)"]
    assert calls == [("start", "abc123"), ("epoch", 3, {"train/loss": 1.5}), ("end", True, {"test/acc": 0.5})]


def test_an_unknown_or_missing_tracker_stops_before_any_trial_with_the_fix(monkeypatch, tmp_path):
    with pytest.raises(TrackerMissing, match="unknown tracker; choose one of tensorboard, mlflow, wandb"):
        Trackers(["neptune"], tmp_path, "s")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(TrackerMissing, match="pip install mlflow-skinny"):
        check_installed(["mlflow"])


def test_config_is_flattened_to_dotted_parameters():
    flat = trackers.flat_config({"method": {"name": "pmg", "stages": 3}, "train": {"lr": 0.1, "milestones": [1, 2]},
                                 "seed": 0})
    assert flat == {"method.name": "pmg", "method.stages": 3, "train.lr": 0.1, "train.milestones": "[1, 2]",
                    "seed": 0}

"""What runs inside a Tune trial (and inside each Ray Train worker of a data-parallel trial).

A trial's payload (`spec`) carries its config and how to run it: `workers`, `cpu`, `gpu` per worker,
`max_retries`, where Ray Train persists its runs (`train_storage`), the checkpoints of earlier runs
of the study (`resume_from`, newest first) and its timeout marker. Its dataset comes from the
node-local cache (harness.data.load_imageset): decoded once per node, memory-mapped by every trial
there; the driver never holds it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import traceback
from pathlib import Path

import ray
from ray import tune

from harness.core.escape import printable
from harness.orchestrate._storage import checkpoint_dirs, read_marker
from harness.results.store import FAILED, FINISHED
from harness.study.trials import TrialConfig, stored_size

CHECKPOINT_FILE = "checkpoint.pt"


def dataset_key(config: dict) -> str:
    return json.dumps({"dataset": config["dataset"], "size": stored_size(config)}, sort_keys=True)


def _imageset(cfg: TrialConfig):
    from harness.data import load_imageset

    return load_imageset(cfg.dataset, cfg.stored_size)


def in_driver_dir(cwd: str | None) -> None:
    """Relative paths of a study (backbone.pretrained, a dataset's root) mean in a trial what they mean where the
    driver runs (its working directory): Tune starts each trial in its own trial directory, so change back there
    when this node has that directory (a cluster node without it keeps Tune's, and such paths must be absolute)."""
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)


@ray.remote(num_cpus=1)
def prepare_dataset(config: dict, cwd: str | None = None) -> dict:
    """Decode a trial's dataset into this node's cache before any trial starts (errors are reported with
    nothing trained); returns its size and class count, not its images."""
    from harness.data._decode import DatasetError

    in_driver_dir(cwd)
    import torch

    threads = torch.get_num_threads()
    # No trial runs yet (the pre-pass comes first): the node's cores all render (synthfg on 2 cores: 5.5 s -> 3.1 s
    # wall, the same pixels whatever the thread count), then the worker goes back to its one thread.
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        imageset = _imageset(TrialConfig.parse(config))
    except (DatasetError, ValueError) as e:
        return {"error": printable(e)}
    except OSError as e:  # an unreadable tree, a dangling link, a full cache disk: said, not a Ray traceback
        return {"error": printable(f"{config['dataset']['name']}: {e.filename or 'the dataset'}: "
                                   f"{e.strerror or type(e).__name__}; check dataset.root (python -m harness.data "
                                   f"check {config['dataset']['name']} ROOT) and the cache folder")}
    finally:
        torch.set_num_threads(threads)
    return {"num_classes": imageset.num_classes, "train": len(imageset.train),
            "bytes": imageset.train.images.nbytes + imageset.test.images.nbytes, "niceness": os.nice(0)}


def _where() -> dict:
    """The node a trial ran on (its rank 0 for a data-parallel trial)."""
    return {"node_id": ray.get_runtime_context().get_node_id(), "node_address": ray.util.get_node_ip_address()}


# ----------------------------------------------------------------------------- checkpoints

def _candidates(latest, earlier: list[str] | None = None) -> list:
    """Checkpoints to resume from, best first: Ray's latest, the older ones beside it, those of earlier runs."""
    found = []
    if latest is not None:
        found.append(latest)
        parent = latest.path.rstrip("/").rsplit("/", 1)[0]
        found += [type(latest)(path=p, filesystem=latest.filesystem) for p in checkpoint_dirs(latest.filesystem, parent)
                  if p.rstrip("/") != latest.path.rstrip("/")]
    found += [tune.Checkpoint(path=uri) for uri in earlier or []]
    return found


def read_checkpoint(candidates: list, log=print) -> dict | None:
    """The state of the first readable checkpoint. One that cannot be read (truncated, corrupt, or holding
    anything but tensors and plain data: it is read with torch.load(weights_only=True)) is skipped with a line
    saying so; with none readable the trial starts from scratch."""
    from harness.engine.loop import load_checkpoint

    for i, checkpoint in enumerate(candidates):
        try:
            with checkpoint.as_directory() as directory:
                return load_checkpoint(Path(directory) / CHECKPOINT_FILE)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back, never fail the trial
            then = "trying the previous one" if i + 1 < len(candidates) else "starting from scratch"
            log(printable(f"checkpoint {checkpoint.path} is unreadable ({type(e).__name__}: {str(e)[:200]}); {then}"))
    return None


def _report(report, checkpoint_cls, metrics: dict, state: dict | None) -> None:
    from harness.engine.loop import save_checkpoint

    metrics = {**metrics, "kind": "epoch"}
    if state is None:
        report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(state, Path(directory) / CHECKPOINT_FILE)
        checkpoint = checkpoint_cls.from_directory(directory)
        checkpoint.set_metadata({"epoch": state["epoch"] + 1})
        report(metrics, checkpoint=checkpoint)


class _TuneIO:
    """The engine's TrialIO inside a single-process Tune trial: epoch metrics and Tune checkpoints."""

    def __init__(self, earlier: list[str]):
        self.earlier = earlier

    def restore(self) -> dict | None:
        # Tune's latest is set when Tune retries this trial (a dead process or node); `earlier` are the
        # checkpoints of an earlier run of the study (an interrupted or killed driver).
        return read_checkpoint(_candidates(tune.get_checkpoint(), self.earlier))

    def report(self, metrics: dict, state: dict | None = None) -> None:
        # Where each epoch ran: a search trial that its scheduler stops sends no final record to say it.
        _report(tune.report, tune.Checkpoint, {**metrics, **_where()}, state)


class _TrainIO:
    """The engine's TrialIO inside a Ray Train worker: every rank reports (a barrier), rank 0 the checkpoint."""

    def restore(self) -> dict | None:
        return read_checkpoint(_candidates(ray.train.get_checkpoint()))

    def report(self, metrics: dict, state: dict | None = None) -> None:
        _report(ray.train.report, ray.train.Checkpoint, metrics, state)


# ----------------------------------------------------------------------------- the trial

def final_record(final: dict) -> dict:
    history = final.pop("history")
    return {**final, "history": json.dumps(history), "kind": "final", "status": FINISHED}


def failed_record(e: BaseException | str, trace: str | None = None) -> dict:
    error = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    return {"kind": "final", "status": FAILED, "error": error, "traceback": (trace or traceback.format_exc())[-4000:]}


def _quiet() -> None:
    # Tune and Train log every checkpoint and report at INFO; keep warnings.
    for name in ("", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def trainable(config: dict) -> None:
    """One Tune trial: the engine on the trial's config; every exception becomes a failed record."""
    _quiet()
    spec = config["trial"]
    in_driver_dir(spec.get("cwd"))
    timed_out = read_marker(spec["timeout_marker"])
    if timed_out:  # stopped earlier for exceeding train.timeout_s; Tune retried it after its process was killed
        tune.report(failed_record(timed_out, trace=""))
        return
    try:
        if spec["workers"] == 1:
            started = time.perf_counter()
            from harness.engine.loop import run_trial

            cfg = TrialConfig.parse(spec["config"])
            imageset = _imageset(cfg)
            setup = time.perf_counter() - started  # the engine's import (a fresh worker's) and the dataset's mapping
            final = run_trial(cfg, imageset, _TuneIO(spec["resume_from"]), threads=max(1, int(spec["cpu"])))
            final["time/start_s"] = final.get("time/start_s", 0.0) + setup
            tune.report({**final_record(final), **_where()})
        else:
            _run_data_parallel(spec)
    except Exception as e:  # noqa: BLE001 - a trial failure is data, not a crash of the study
        tune.report(failed_record(e))


def _run_data_parallel(spec: dict) -> None:
    """The Tune trial as a thin driver of a Ray Train run; rank 0's records reach Tune through the callback."""
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    per_worker = {"CPU": spec["cpu"], **({"GPU": spec["gpu"]} if spec["gpu"] else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"trial": spec},
        scaling_config=ray.train.ScalingConfig(num_workers=spec["workers"], use_gpu=spec["gpu"] > 0,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=spec["trial_id"], storage_path=spec["train_storage"],  # stable name: a rerun resumes
            failure_config=ray.train.FailureConfig(max_failures=spec["max_retries"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2), callbacks=[TuneReportCallback()],
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    trainer.fit()  # a worker group that fails more than max_retries times raises TrainingFailedError


def _train_worker(loop_config: dict) -> None:
    """One Ray Train worker: the engine on its shard, gradients averaged with the other workers."""
    from harness.plugin.distributed import ProcessGroupCollective
    from harness.engine.loop import run_trial
    from harness.plugin.method import TrialDiverged

    _quiet()
    spec = loop_config["trial"]
    in_driver_dir(spec.get("cwd"))
    try:
        cfg = TrialConfig.parse(spec["config"])
        final = run_trial(cfg, _imageset(cfg), _TrainIO(), ProcessGroupCollective(), threads=max(1, int(spec["cpu"])))
        record = {**final_record(final), **_where()}
    except TrialDiverged as e:  # seen by every rank at the same step (the loss is all-reduced): a result
        record = failed_record(e)
    ray.train.report(record)

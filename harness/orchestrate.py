"""Orchestration with Ray Tune and Ray Train: the ONLY module that imports Ray.

- Starts a local Ray in-process (the default) or joins a cluster (`address="auto"` or HOST:PORT).
- Skips trials whose identity already has a finished result, and says so.
- Decodes each dataset once in the driver and puts it in the object store once; every trial on a
  node maps the same read-only memory (zero copy).
- Runs one Tune trial per TrialSpec (a function trainable), with the study's resources:
  - `resources.workers: 1`: the trial is one process with `cpu`/`gpu` (fractional GPUs allowed),
    the engine runs inside the Tune trial, and its epoch checkpoints are Tune checkpoints;
  - `workers > 1`: the Tune trial is a thin driver (it reserves no CPU) that runs a Ray Train V2
    `TorchTrainer` of `workers` processes with `cpu`/`gpu` each in the trainer's own placement
    group (gloo on CPU, nccl on GPU), epoch checkpoints are Train checkpoints written by rank 0,
    rank 0's metrics reach Tune through TuneReportCallback, and `max_concurrent_trials` keeps the
    trials' worker groups within the cluster.
- Checkpoints live under `<run>/ray/`: `tune/<run stamp>/<trial>/checkpoint_*` and
  `train/<trial>/checkpoint_*` (a Train run is named after its trial, so a restarted one resumes).
  A trial resumes from its newest checkpoint when its worker group fails (Train retries it), when
  its process dies (Tune retries it), and when the whole study is run again after an interrupt.
- A trial that raises (or whose loss diverges) reports a `failed` record with its error and the
  others go on; a trial whose workers keep dying is retried (`max_retries`), then recorded failed.
- Finished trials are written by a driver-side callback the moment they end, so an interrupt
  (Ctrl-C, a killed process) loses no finished trial; their checkpoints are then deleted (unless
  `keep_checkpoints`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from harness.data import DATASETS, load_imageset
from harness.results import FAILED, FINISHED, ResultStore
from harness.trials import ResolvedStudy, TrialSpec

# Before Ray is imported: no usage stats, no per-trial CSV/TensorBoard loggers (the store keeps the
# results), and Ctrl-C reaches us as KeyboardInterrupt instead of Tune's own graceful-stop handler.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1000")
# Token authentication stays on (Ray's default since 2.59), said explicitly so Ray does not warn at every
# start; a multi-node cluster needs the same token on every node (README, "Running on a cluster").
os.environ.setdefault("RAY_AUTH_MODE", "token")

import logging  # noqa: E402

import ray  # noqa: E402
from ray import tune  # noqa: E402

# Tune's ResultGrid looks for the per-trial CSV/JSON loggers we turned off; the store has the results.
logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)


@dataclass
class RunSummary:
    skipped: int = 0
    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    interrupted: bool = False


def stored_size(config: dict) -> int:
    """The size a trial's dataset is decoded at (train.resize, else the crop size)."""
    return config["train"]["resize"] or config["train"]["image_size"]


def dataset_key(config: dict) -> str:
    return json.dumps({"dataset": config["dataset"], "size": stored_size(config)}, sort_keys=True)


CHECKPOINT_FILE = "checkpoint.pt"


def _trial_threads(cpus: float) -> int:
    return max(1, int(cpus))


class _TuneIO:
    """The engine's TrialIO inside a single-process Tune trial: epoch metrics and Tune checkpoints."""

    def __init__(self, resume_from: str | None):
        self.resume_from = resume_from

    def restore(self) -> dict | None:
        checkpoint = tune.get_checkpoint()  # set when Tune retries this trial
        if checkpoint is None and self.resume_from:  # a checkpoint of an earlier run of the study
            checkpoint = tune.Checkpoint(self.resume_from)
        return _read_checkpoint(checkpoint)

    def report(self, metrics: dict, state: dict | None = None) -> None:
        _report(tune.report, tune.Checkpoint, metrics, state)


class _TrainIO:
    """The engine's TrialIO inside a Ray Train worker: every rank reports (a barrier), rank 0 the checkpoint."""

    def restore(self) -> dict | None:
        return _read_checkpoint(ray.train.get_checkpoint())

    def report(self, metrics: dict, state: dict | None = None) -> None:
        _report(ray.train.report, ray.train.Checkpoint, metrics, state)


def _read_checkpoint(checkpoint) -> dict | None:
    from harness.engine import load_checkpoint

    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return load_checkpoint(Path(directory) / CHECKPOINT_FILE)


def _report(report, checkpoint_cls, metrics: dict, state: dict | None) -> None:
    from harness.engine import save_checkpoint

    metrics = {**metrics, "kind": "epoch"}
    if state is None:
        report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(state, Path(directory) / CHECKPOINT_FILE)
        checkpoint = checkpoint_cls.from_directory(directory)
        checkpoint.set_metadata({"epoch": state["epoch"] + 1})
        report(metrics, checkpoint=checkpoint)


def _final_record(final: dict) -> dict:
    history = final.pop("history")
    return {**final, "history": json.dumps(history), "kind": "final", "status": FINISHED}


def _failed_record(e: BaseException, trace: str | None = None) -> dict:
    return {"kind": "final", "status": FAILED, "error": f"{type(e).__name__}: {e}",
            "traceback": (trace or traceback.format_exc())[-4000:]}


def _trainable(config: dict, datasets: dict) -> None:
    """One Tune trial: the engine on the trial's config; every exception becomes a failed record."""
    spec = config["trial"]
    try:
        if spec["workers"] == 1:
            from harness.engine import run_trial

            imageset = ray.get(datasets[dataset_key(spec["config"])])
            final = run_trial(spec["config"], imageset, _TuneIO(spec.get("resume_from")),
                              threads=_trial_threads(spec["cpu"]))
            tune.report(_final_record(final))
        else:
            _run_data_parallel(spec, datasets[dataset_key(spec["config"])])
    except Exception as e:  # noqa: BLE001 - a trial failure is data, not a crash of the study
        tune.report(_failed_record(e))


def _run_data_parallel(spec: dict, dataset_ref) -> None:
    """The Tune trial as a thin driver of a Ray Train run; rank 0's records reach Tune through the callback."""
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    per_worker = {"CPU": spec["cpu"], **({"GPU": spec["gpu"]} if spec["gpu"] else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"trial": spec, "dataset": dataset_ref},
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
    from harness.distributed import ProcessGroupCollective
    from harness.engine import run_trial
    from harness.plugin import TrialDiverged

    # Ray Train logs every report (the whole record) at INFO through the root logger; keep warnings only.
    logging.getLogger().setLevel(logging.WARNING)
    spec = loop_config["trial"]
    imageset = ray.get(loop_config["dataset"])
    try:
        final = run_trial(spec["config"], imageset, _TrainIO(), ProcessGroupCollective(),
                          threads=_trial_threads(spec["cpu"]))
        record = _final_record(final)
    except TrialDiverged as e:  # seen by every rank at the same step (the loss is all-reduced): a result
        record = _failed_record(e)
    ray.train.report(record)


class _StoreCallback(tune.Callback):
    """Driver side: writes each trial's record the moment it ends and rebuilds the tables."""

    def __init__(self, store: ResultStore, specs: dict[str, TrialSpec], all_trials: list[TrialSpec],
                 summary: RunSummary, total: int, log, checkpoints: "CheckpointStore", workers: int = 1,
                 keep_checkpoints: bool = False, num_classes: dict[str, int] | None = None):
        self.keep_checkpoints, self.num_classes = keep_checkpoints, num_classes or {}
        self.checkpoints, self.workers = checkpoints, workers
        self.store, self.specs, self.all_trials, self.summary = store, specs, all_trials, summary
        self.total, self.log = total, log

    def __getstate__(self) -> dict:  # Tune pickles callbacks with its experiment state; a logger need not travel
        return {k: v for k, v in self.__dict__.items() if k != "log"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, log=print)

    def _id(self, trial) -> str:
        return trial.config["trial"]["trial_id"]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("kind") != "final":
            return  # per-epoch results only feed Tune; the final one carries the whole history
        trial_id = self._id(trial)
        spec = self.specs[trial_id]
        keep = {"num_classes": self.num_classes.get(dataset_key(spec.config))}
        keep.update({k: v for k, v in result.items() if k not in _TUNE_KEYS})
        curves = json.loads(keep.pop("history", "[]"))
        keep["workers"] = self.workers
        self.store.write_record(spec, result["status"], keep, result.get("error", ""), curves)
        self.store.write_tables(self.all_trials)
        done = len(self.summary.finished) + len(self.summary.failed) + 1
        if result["status"] == FINISHED:
            self.summary.finished.append(trial_id)
            self.log(f"[{done}/{self.total}] finished {spec.label}: test/acc={result.get('test/acc', float('nan')):.4f}"
                     f" ({result.get('wall_time_s', 0):.0f} s, {result.get('train/images_per_s', 0):.0f} img/s)")
        else:
            self.summary.failed.append(trial_id)
            self.log(f"[{done}/{self.total}] FAILED {spec.label}: {result.get('error')}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        trial_id = self._id(trial)
        if trial_id in self.summary.finished and not self.keep_checkpoints:
            self.checkpoints.delete(trial_id)  # only needed to resume; the result is on disk

    def on_trial_error(self, iteration, trials, trial, **info):
        """The worker died (not a Python exception: those are reported as failed results)."""
        trial_id = self._id(trial)
        error = "trial process died: " + (str(trial.error_file) if getattr(trial, "error_file", None) else "no error file")
        spec = self.specs[trial_id]
        self.store.write_record(spec, FAILED, {"num_classes": self.num_classes.get(dataset_key(spec.config))}, error)
        self.store.write_tables(self.all_trials)
        self.summary.failed.append(trial_id)
        self.log(f"FAILED {self.specs[trial_id].label}: {error}")


_TUNE_KEYS = {"kind", "timestamp", "checkpoint_dir_name", "should_checkpoint", "done",
              "training_iteration", "trial_id", "date", "time_this_iter_s", "time_total_s", "pid", "hostname",
              "node_ip", "config", "time_since_restore", "iterations_since_restore", "experiment_tag"}


def start_ray(address: str | None, num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Join a cluster, or start a local Ray. `dashboard`: its state API, which Ray Train's placement-group
    cleaner polls (data-parallel trials); 0.8 s more at start here, so single-process studies go without."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=dashboard, logging_level="WARNING",
                 log_to_driver=True, configure_logging=True)


def check_resources(resolved: ResolvedStudy) -> str | None:
    """A study that asks for more than the cluster has would wait forever: say so instead."""
    need = resolved.study.resources
    have = ray.cluster_resources()
    cpus, gpus = need.workers * need.cpu, need.workers * need.gpu
    per = f" ({need.workers} workers x {need.cpu} CPU, {need.gpu} GPU)" if need.workers > 1 else ""
    if gpus > have.get("GPU", 0):
        return (f"a trial needs {gpus} GPUs{per} but the Ray cluster has {have.get('GPU', 0)}; set resources.gpu: 0 "
                "(e.g. --set resources.gpu=0), fewer resources.workers, or join a GPU cluster with --address")
    if cpus > have.get("CPU", 0):
        return (f"a trial needs {cpus} CPUs{per} but the Ray cluster has {have.get('CPU', 0)}; "
                "lower resources.cpu or resources.workers")
    return None


def max_concurrent(resolved: ResolvedStudy) -> int:
    """Trials whose worker groups fit in the cluster at once. Tune cannot see a Train run's placement
    group (the Tune trial reserves none of it), so without this cap it would start every trial's
    driver and the worker groups would queue behind each other's placement groups."""
    need = resolved.study.resources
    have = ray.cluster_resources()
    fits = have.get("CPU", 0) // (need.workers * need.cpu)
    if need.gpu:
        fits = min(fits, have.get("GPU", 0) // (need.workers * need.gpu))
    return max(1, int(fits))


class CheckpointStore:
    """Trial checkpoints under one root: `tune/<run stamp>/<trial>/checkpoint_*` (single-process trials, one
    experiment per run of the study) and `train/<trial>/checkpoint_*` (data-parallel trials, one Train
    run per trial, named after it so a rerun resumes). Each checkpoint's metadata holds its epoch."""

    def __init__(self, root: str | os.PathLike):
        from pyarrow import fs

        self.root = str(Path(root).resolve())
        self.fs = fs.LocalFileSystem()
        self.tune_root, self.train_root = f"{self.root}/tune", f"{self.root}/train"

    def _dirs(self, path: str) -> list[str]:
        from pyarrow import fs

        try:
            infos = self.fs.get_file_info(fs.FileSelector(path, allow_not_found=True))
        except OSError:
            return []
        return sorted(i.path for i in infos if i.type == fs.FileType.Directory)

    def _epoch(self, checkpoint_dir: str) -> int:
        try:
            with self.fs.open_input_stream(f"{checkpoint_dir}/.metadata.json") as f:
                return int(json.loads(f.read()).get("epoch", -1))
        except (OSError, ValueError):
            return -1

    def latest_tune(self, trial_id: str) -> str | None:
        """The newest (highest epoch) Tune checkpoint of a trial from any earlier run of the study."""
        candidates = [c for run in self._dirs(self.tune_root) for c in self._dirs(f"{run}/{trial_id}")
                      if c.rsplit("/", 1)[-1].startswith("checkpoint_")]
        best = max(candidates, key=self._epoch, default=None)
        return best if best is not None and self._epoch(best) > 0 else None

    def delete(self, trial_id: str) -> None:
        for run in self._dirs(self.tune_root):
            for c in self._dirs(f"{run}/{trial_id}"):
                if c.rsplit("/", 1)[-1].startswith("checkpoint_"):
                    self.fs.delete_dir(c)
        from pyarrow import fs

        if self.fs.get_file_info(f"{self.train_root}/{trial_id}").type == fs.FileType.Directory:
            self.fs.delete_dir(f"{self.train_root}/{trial_id}")


def run_study(resolved: ResolvedStudy, run_dir: str | os.PathLike, address: str | None = None,
              max_retries: int = 1, num_cpus: int | None = None, log=print,
              keep_checkpoints: bool = False) -> RunSummary:
    store = ResultStore(run_dir)
    summary = RunSummary()
    done = store.finished_ids([t.trial_id for t in resolved.trials])
    todo = [t for t in resolved.trials if t.trial_id not in done]
    summary.skipped = len(done)
    if done:
        log(f"skipping {len(done)} of {len(resolved.trials)} trials already finished "
            f"(their identities have results in {store.trials_dir})")
    if not todo:
        store.write_tables(resolved.trials)
        return summary

    # Decode each dataset once, before Ray starts: a broken tree fails here with nothing started.
    imagesets = {}
    for spec in todo:
        key = dataset_key(spec.config)
        if key not in imagesets:
            params = DATASETS.get(spec.config["dataset"]["name"]).Params.model_validate(spec.config["dataset"])
            imagesets[key] = load_imageset(params, stored_size(spec.config))

    t0 = time.perf_counter()
    start_ray(address, num_cpus, dashboard=resolved.study.resources.workers > 1)
    problem = check_resources(resolved)
    if problem:
        raise ValueError(problem)
    resources = resolved.study.resources
    log(f"Ray {'joined at ' + address if address else 'started locally'} in {time.perf_counter() - t0:.1f} s; "
        f"{len(todo)} trials to run, resources per trial: {resources.model_dump()}")
    refs = {key: ray.put(imageset) for key, imageset in imagesets.items()}  # shared, zero-copy, once per node
    num_classes = {key: imageset.num_classes for key, imageset in imagesets.items()}
    del imagesets

    checkpoints = CheckpointStore(Path(run_dir) / "ray")
    common = {"workers": resources.workers, "cpu": resources.cpu, "gpu": resources.gpu, "max_retries": max_retries,
              "train_storage": checkpoints.train_root}
    payload = [{"trial_id": s.trial_id, "config": s.config, **common,
                "resume_from": checkpoints.latest_tune(s.trial_id) if resources.workers == 1 else None}
               for s in todo]
    resumed = sum(p["resume_from"] is not None for p in payload)
    if resumed:
        log(f"{resumed} unfinished trials resume from their last epoch checkpoint")
    if resources.workers == 1:
        trial_resources = {"cpu": resources.cpu, "gpu": resources.gpu}
        concurrency = None  # Tune packs trials by their own resources
    else:
        # The Tune trial only drives its Train run: it reserves a token of memory, no CPU, so the
        # workers' bundles are the only CPUs and GPUs reserved for the trial.
        trial_resources = {"cpu": 0, "memory": 2**20}
        concurrency = max_concurrent(resolved)
    trainable = tune.with_resources(tune.with_parameters(_trainable, datasets=refs), trial_resources)
    callback = _StoreCallback(store, {s.trial_id: s for s in todo}, resolved.trials, summary, len(todo), log,
                              checkpoints, resources.workers, keep_checkpoints, num_classes)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(payload)},
        # reuse_actors: one worker process runs trial after trial, instead of a fresh process (and a
        # fresh torch/timm import) per trial.
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=concurrency,
                                    trial_name_creator=lambda t: t.config["trial"]["trial_id"],
                                    trial_dirname_creator=lambda t: t.config["trial"]["trial_id"]),
        run_config=tune.RunConfig(name=time.strftime("%Y%m%d-%H%M%S"), storage_path=checkpoints.tune_root,
                                  failure_config=tune.FailureConfig(max_failures=max_retries),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  callbacks=[callback], verbose=0),
    )
    try:
        tuner.fit()
    except KeyboardInterrupt:
        summary.interrupted = True
    store.write_tables(resolved.trials)
    return summary


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()

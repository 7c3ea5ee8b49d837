"""Orchestration with Ray Tune: the ONLY module that imports Ray.

- Starts a local Ray in-process (the default) or joins a cluster (`address="auto"` or HOST:PORT).
- Skips trials whose identity already has a finished result, and says so.
- Decodes each dataset once in the driver and puts it in the object store once; every trial on a
  node maps the same read-only memory (zero copy).
- Runs one Tune trial per TrialSpec (a function trainable with `tune.report`), with the study's
  CPU/GPU resources per trial (fractional GPUs allowed).
- A trial that raises (or whose loss diverges) reports a `failed` record with its error and the
  others go on; a trial whose worker dies is retried by Tune (`max_retries`), then recorded failed.
- Finished trials are written by a driver-side callback the moment they end, so an interrupt
  (Ctrl-C, a killed process) loses no finished trial; unfinished ones resume from their last
  epoch checkpoint on the next run.
"""

from __future__ import annotations

import json
import os
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


def _trainable(config: dict, datasets: dict) -> None:
    """One Tune trial: the engine on the trial's config; every exception becomes a failed record."""
    from harness.engine import run_trial

    spec = config["trial"]
    context = tune.get_context()
    cpus = context.get_trial_resources().required_resources.get("CPU", 1)
    try:
        imageset = ray.get(datasets[dataset_key(spec["config"])])
        final = run_trial(spec["config"], imageset, report=lambda m: tune.report({**m, "kind": "epoch"}),
                          checkpoint_dir=spec["checkpoint_dir"], threads=max(1, int(cpus)))
        history = final.pop("history")
        tune.report({**final, "history": json.dumps(history), "kind": "final", "status": FINISHED})
    except Exception as e:  # noqa: BLE001 - a trial failure is data, not a crash of the study
        tune.report({"kind": "final", "status": FAILED, "error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc()[-4000:]})


class _StoreCallback(tune.Callback):
    """Driver side: writes each trial's record the moment it ends and rebuilds the tables."""

    def __init__(self, store: ResultStore, specs: dict[str, TrialSpec], all_trials: list[TrialSpec],
                 summary: RunSummary, total: int, log, keep_checkpoints: bool = False,
                 num_classes: dict[str, int] | None = None):
        self.keep_checkpoints, self.num_classes = keep_checkpoints, num_classes or {}
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
        self.store.write_record(spec, result["status"], keep, result.get("error", ""), curves)
        self.store.write_tables(self.all_trials)
        done = len(self.summary.finished) + len(self.summary.failed) + 1
        if result["status"] == FINISHED:
            if not self.keep_checkpoints:  # only needed to resume; the result is now on disk
                (self.store.trial_dir(trial_id) / "checkpoint.pt").unlink(missing_ok=True)
            self.summary.finished.append(trial_id)
            self.log(f"[{done}/{self.total}] finished {spec.label}: test/acc={result.get('test/acc', float('nan')):.4f}"
                     f" ({result.get('wall_time_s', 0):.0f} s, {result.get('train/images_per_s', 0):.0f} img/s)")
        else:
            self.summary.failed.append(trial_id)
            self.log(f"[{done}/{self.total}] FAILED {spec.label}: {result.get('error')}")

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


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, logging_level="WARNING",
                 log_to_driver=True, configure_logging=True)


def check_resources(resolved: ResolvedStudy) -> str | None:
    """A study that asks for more than the cluster has would wait forever: say so instead."""
    need = resolved.study.resources
    have = ray.cluster_resources()
    if need.gpu > have.get("GPU", 0):
        return (f"resources.gpu={need.gpu} but the Ray cluster has {have.get('GPU', 0)} GPUs; set resources.gpu: 0 "
                "(e.g. --set resources.gpu=0) or join a GPU cluster with --address")
    if need.cpu > have.get("CPU", 0):
        return f"resources.cpu={need.cpu} but the Ray cluster has {have.get('CPU', 0)} CPUs; lower resources.cpu"
    return None


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
    start_ray(address, num_cpus)
    problem = check_resources(resolved)
    if problem:
        raise ValueError(problem)
    log(f"Ray {'joined at ' + address if address else 'started locally'} in {time.perf_counter() - t0:.1f} s; "
        f"{len(todo)} trials to run, resources per trial: {resolved.study.resources.model_dump()}")
    refs = {key: ray.put(imageset) for key, imageset in imagesets.items()}  # shared, zero-copy, once per node
    num_classes = {key: imageset.num_classes for key, imageset in imagesets.items()}
    del imagesets

    payload = [{"trial_id": s.trial_id, "config": s.config, "checkpoint_dir": str(store.trial_dir(s.trial_id).resolve())}
               for s in todo]
    resources = resolved.study.resources
    trainable = tune.with_resources(tune.with_parameters(_trainable, datasets=refs),
                                    {"cpu": resources.cpu, "gpu": resources.gpu})
    callback = _StoreCallback(store, {s.trial_id: s for s in todo}, resolved.trials, summary, len(todo), log,
                              keep_checkpoints, num_classes)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(payload)},
        # reuse_actors: one worker process runs trial after trial, instead of a fresh process (and a
        # fresh torch/timm import) per trial.
        tune_config=tune.TuneConfig(reuse_actors=True, trial_name_creator=lambda t: t.config["trial"]["trial_id"],
                                    trial_dirname_creator=lambda t: t.config["trial"]["trial_id"]),
        run_config=tune.RunConfig(name=time.strftime("%Y%m%d-%H%M%S"), storage_path=str((Path(run_dir) / "ray").resolve()),
                                  failure_config=tune.FailureConfig(max_failures=max_retries),
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

"""The driver's side of a run: each trial's record is stored the moment it ends, and trials that run
past their `train.timeout_s` are stopped."""

from __future__ import annotations

import json
import time

import ray
from ray import tune

from harness.orchestrate._storage import CheckpointStore
from harness.orchestrate._trial import dataset_key
from harness.core.escape import printable
from harness.orchestrate.progress import Progress
from harness.orchestrate.trackers import Trackers
from harness.results.store import FAILED, FINISHED, ResultStore
from harness.study.trials import TrialSpec

# What Tune adds to every result; none of it belongs in a results row.
TUNE_KEYS = {"kind", "timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "training_iteration",
             "trial_id", "date", "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip", "config",
             "time_since_restore", "iterations_since_restore", "experiment_tag", "checkpoint_path"}


class StoreCallback(tune.Callback):
    def __init__(self, store: ResultStore, specs: dict[str, TrialSpec], all_trials: list[TrialSpec], summary,
                 log, checkpoints: CheckpointStore, workers: int = 1, keep_checkpoints: bool = False,
                 num_classes: dict[str, int] | None = None, progress: Progress | None = None,
                 trackers: Trackers | None = None):
        self.store, self.specs, self.all_trials, self.summary, self.log = store, specs, all_trials, summary, log
        self.progress, self.trackers = progress, trackers
        self.checkpoints, self.workers, self.keep_checkpoints = checkpoints, workers, keep_checkpoints
        self.num_classes = num_classes or {}
        self.started: dict[str, float] = {}
        self.timed_out: set[str] = set()

    def __getstate__(self) -> dict:  # Tune pickles callbacks with its experiment state; terminal and trackers stay
        return {k: v for k, v in self.__dict__.items() if k not in ("log", "progress", "trackers")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, log=print, progress=None, trackers=None)

    def _say(self, trial_id: str, message: str) -> None:
        message = printable(message)  # labels and errors come from the study file and the trial
        if self.progress is not None:
            self.progress.end(trial_id, message)
        else:
            self.log(message)

    @staticmethod
    def _id(trial) -> str:
        return trial.config["trial"]["trial_id"]

    def _store(self, trial_id: str, status: str, metrics: dict, error: str = "", curves: list | None = None) -> None:
        spec = self.specs[trial_id]
        metrics = {"num_classes": self.num_classes.get(dataset_key(spec.config)), "workers": self.workers, **metrics}
        stored = self.store.write_record(spec, status, metrics, error, curves)
        if stored.get("status") != status:  # a failure reported after the trial finished: the finished record stays
            self.log(f"{spec.label}: {printable(error)} (after it finished: its finished result is kept)")
            return
        if self.trackers:
            self.trackers.end(spec, status == FINISHED, metrics)
        self.store.write_tables_soon(self.all_trials)  # throttled; the run's end writes it whatever happens
        done = self.summary.finished | self.summary.failed
        if trial_id not in done:
            (self.summary.failed if status == FAILED else self.summary.finished).add(trial_id)
        count = f"[{len(self.summary.finished | self.summary.failed)}/{self.summary.total}]"
        if status != FAILED:  # finished, or a search trial its scheduler stopped early (STOPPED)
            metric = "val/acc" if spec.kind == "search" else "test/acc"  # a search trial never sees the test split
            acc, wall = metrics.get(metric, float("nan")), metrics.get("wall_time_s", 0) or 0
            verb = "finished" if status == FINISHED else f"stopped after epoch {metrics.get('epoch', '?')}"
            self._say(trial_id, f"{count} {verb} {spec.label}: {metric}={acc:.4f} "
                                f"({wall:.0f} s, {metrics.get('train/images_per_s', 0):.0f} img/s)")
        else:
            self._say(trial_id, f"{count} FAILED {spec.label}: {error}")

    def on_trial_start(self, iteration, trials, trial, **info):
        trial_id = self._id(trial)
        self.started[trial_id] = time.monotonic()
        if self.progress is not None:
            epochs = trial.config["trial"]["config"]["train"]["epochs"]
            self.progress.start(trial_id, self.specs[trial_id].label, epochs)
        if self.trackers:
            self.trackers.start(self.specs[trial_id])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("kind") != "final":  # an epoch: it feeds Tune, the progress lines and the trackers
            if self.progress is not None:
                self.progress.epoch(self._id(trial), result)
            if self.trackers:
                self.trackers.epoch(self.specs[self._id(trial)], result)
            return
        trial_id = self._id(trial)
        if trial_id in self.timed_out:
            return  # already stored as failed; this is the retried attempt saying so again
        keep = {k: v for k, v in result.items() if k not in TUNE_KEYS}
        curves = json.loads(keep.pop("history", "[]"))
        maps = keep.pop("maps", None)
        if maps:  # the report's maps of this trial: a file beside its record, not a column
            self.store.write_maps(self.specs[trial_id], maps)
        self._store(trial_id, result["status"], keep, result.get("error", ""), curves)

    def on_trial_complete(self, iteration, trials, trial, **info):
        trial_id = self._id(trial)
        self.started.pop(trial_id, None)
        if trial_id in self.summary.finished and not self.keep_checkpoints:
            self.checkpoints.delete(trial_id)  # only needed to resume; the result is on disk

    def on_trial_error(self, iteration, trials, trial, **info):
        """Its process died more often than max_retries (a Python exception is a failed result instead)."""
        trial_id = self._id(trial)
        self.started.pop(trial_id, None)
        if trial_id in self.timed_out or trial_id in self.summary.finished:
            return  # a process that died after its final report: the trial is finished
        error = "trial process died: " + (str(trial.error_file) if getattr(trial, "error_file", None)
                                          else "no error file")
        self._store(trial_id, FAILED, {}, error)

    def on_step_begin(self, iteration, trials, **info):
        """Stop every running trial past its train.timeout_s, however it is stuck (a hung collective, a stalled
        read, a stopped process): its record says why, its process is killed, and a retry of it only repeats
        the reason (the marker on storage) instead of training again."""
        now = time.monotonic()
        for trial in trials:
            trial_id = self._id(trial)
            limit = trial.config["trial"]["config"]["train"].get("timeout_s")
            if (not limit or trial.status != trial.RUNNING or trial_id in self.timed_out
                    or trial_id in self.summary.finished or now - self.started.get(trial_id, now) <= limit):
                continue
            reason = (f"TrialTimeout: still running after train.timeout_s={limit:g} s (hung, or slower than the "
                      "limit allows); its processes were stopped. Raise train.timeout_s if it was only slow.")
            self.timed_out.add(trial_id)
            self.checkpoints.mark_timeout(trial_id, reason)
            self._store(trial_id, FAILED, {}, reason)
            actor = getattr(getattr(trial, "temporary_state", None), "ray_actor", None)
            if actor is not None:  # a data-parallel trial's Train controller and workers go with it
                ray.kill(actor, no_restart=True)

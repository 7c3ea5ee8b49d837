"""The one place a Tune experiment is set up (a grid's trials, or a study's search and final cells)."""

from __future__ import annotations

from ray import tune

from harness.orchestrate._storage import experiment_name
from harness.orchestrate._trial import trainable
from harness.study.config import Resources


def trial_resources(resources: Resources) -> dict:
    """What one Tune trial reserves: its process's CPUs and GPUs, or, for a data-parallel trial (workers > 1), a
    token of memory and no CPU: the trial only drives its Ray Train run, whose workers' bundles are the trial's
    resources (reserving them twice could hang the run)."""
    if resources.workers == 1:
        return {"cpu": resources.cpu, "gpu": resources.gpu}
    return {"cpu": 0, "memory": 2**20}


def make_tuner(resources: Resources, storage_path: str, max_retries: int, callback, param_space: dict | None = None,
               name_prefix: str = "", **tune_config) -> tune.Tuner:
    """A Tuner of harness trials: named by their identity, one worker process reused trial after trial (instead of a
    fresh process and a fresh torch/timm import per trial), the two newest epoch checkpoints kept, `max_retries`
    reruns of a trial whose worker died, the driver's callback storing every result; `tune_config`: the rest of
    Tune's TuneConfig (a searcher, a scheduler, the concurrency)."""
    return tune.Tuner(
        tune.with_resources(trainable, trial_resources(resources)),
        param_space=param_space or {},
        tune_config=tune.TuneConfig(reuse_actors=True, trial_name_creator=_trial_id, trial_dirname_creator=_trial_id,
                                    **tune_config),
        run_config=tune.RunConfig(name=experiment_name(name_prefix),
                                  storage_path=storage_path,
                                  failure_config=tune.FailureConfig(max_failures=max_retries),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2), callbacks=[callback],
                                  verbose=0),
    )


def _trial_id(trial) -> str:
    return trial.config["trial"]["trial_id"]

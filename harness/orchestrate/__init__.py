"""Orchestration with Ray Tune and Ray Train: the ONLY package that imports Ray.

- Starts a local Ray in-process (the default) or joins a cluster (`address="auto"` or HOST:PORT).
- Skips trials whose identity already has a finished result, and says so.
- Data without the driver: before any trial starts, each dataset the study needs is decoded by a
  Ray task into the node-local cache of the node it lands on (a broken tree is reported there,
  with nothing trained); every trial then memory-maps its node's copy, decoding it first if it is
  the first on its node (harness.data.load_imageset). The driver holds no images.
- Storage (`--storage`: a local path, an NFS mount, s3:// or gs://) for everything Ray persists;
  on a cluster, a pre-flight check proves that every node that can run trials reads and writes it.
- Runs one Tune trial per TrialSpec (a function trainable, harness.orchestrate._trial):
  - `resources.workers: 1`: the trial is one process with `cpu`/`gpu` (fractional GPUs allowed),
    the engine runs inside the Tune trial, and its epoch checkpoints are Tune checkpoints;
  - `workers > 1`: the Tune trial is a thin driver (it reserves no CPU) that runs a Ray Train V2
    `TorchTrainer` of `workers` processes with `cpu`/`gpu` each in the trainer's own placement
    group (gloo on CPU, nccl on GPU); rank 0 writes the epoch checkpoints and its metrics reach Tune
    through TuneReportCallback; `max_concurrent_trials` keeps the worker groups within the cluster.
- Failures: a trial resumes from its newest readable checkpoint when its worker group fails (Train
  retries it), when its process or node dies (Tune retries it elsewhere), and when the study is run
  again after the driver was interrupted or killed. A trial that raises (or whose loss diverges)
  reports a `failed` record with its error; a trial past `train.timeout_s` is stopped and recorded
  failed with the reason (harness.orchestrate._callback).
- Finished trials are written by a driver-side callback the moment they end; their checkpoints are
  then deleted (unless `keep_checkpoints`).
- A study with `search:` (harness.study.search) runs its cells' searches and then their final cells in one Tune
  experiment instead (harness.orchestrate._search, _searchers).
"""

from __future__ import annotations

import os

# Before Ray is imported: no usage stats, no per-trial CSV/TensorBoard loggers (the store keeps the
# results), and Ctrl-C reaches us as KeyboardInterrupt instead of Tune's own graceful-stop handler.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Tune snapshots its experiment state whenever a checkpoint is registered with num_to_keep set, and warns
# each time; once per epoch per trial is what we ask for.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# Token authentication stays on (Ray's default since 2.59), said explicitly so Ray does not warn at every
# start; a multi-node cluster needs the same token on every node (docs/cluster.md).
os.environ.setdefault("RAY_AUTH_MODE", "token")

import logging  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402

from ray import tune  # noqa: E402

from harness.engine.precision import describe_here  # noqa: E402
from harness.orchestrate._callback import StoreCallback  # noqa: E402
from harness.orchestrate._cluster import (check_resources, cluster_description, max_concurrent,  # noqa: E402
                                          prepare_datasets, shutdown, start_ray, worker_priority_line)
from harness.orchestrate._storage import CheckpointStore, Storage, StorageLease, check_storage_reachable  # noqa: E402
from harness.orchestrate._tuner import make_tuner  # noqa: E402
from harness.orchestrate.progress import Progress  # noqa: E402
from harness.orchestrate.trackers import Trackers  # noqa: E402
from harness.plugin.weights import ensure_weights  # noqa: E402
from harness.results.store import ResultStore  # noqa: E402
from harness.study.trials import ResolvedStudy, estimated_cost  # noqa: E402

# Tune's ResultGrid looks for the per-trial CSV/JSON loggers we turned off; the store has the results.
logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)

__all__ = ["RunOptions", "RunSummary", "run_study", "start_ray", "shutdown", "cluster_description"]


@dataclass
class RunSummary:
    total: int = 0
    skipped: int = 0
    finished: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    interrupted: bool = False
    cluster: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunOptions:
    """How a study runs: what `python -m harness.run` takes besides the study, and `harness.run_study`'s keywords.

    `address`: join a Ray cluster (auto or HOST:PORT; default a local Ray). `storage`: where Ray persists
    checkpoints (default `<run_dir>/ray`; a shared path or s3:// / gs:// URI on a multi-node cluster), held by this
    driver alone while it runs (harness.orchestrate._storage.StorageLease; RunLocked when another driver holds it).
    `loggers`: trackers (tensorboard, mlflow, wandb). `progress`: the live lines (harness.orchestrate.progress).
    `connect_timeout`: seconds to reach `address` before giving up (ConnectionError). `log`: where lines go."""

    address: str | None = None
    max_retries: int = 1
    num_cpus: int | None = None
    keep_checkpoints: bool = False
    storage: str | None = None
    loggers: tuple[str, ...] = ()
    progress: bool = True
    connect_timeout: float = 60.0
    log: Callable[..., None] = print


def run_study(resolved: ResolvedStudy, run_dir: str | os.PathLike, options: RunOptions | None = None,
              **overrides) -> RunSummary:
    """Run every unfinished trial of the study (`overrides`: RunOptions fields, e.g. `address="auto"`)."""
    options = replace(options or RunOptions(), **{k: tuple(v) if k == "loggers" else v for k, v in overrides.items()})
    lease = None
    if options.storage:  # the default storage is inside the run folder, which RunLock already holds
        lease = StorageLease(Storage(options.storage), f"{resolved.name}/{resolved.profile}", run_dir,
                             log=options.log).acquire()
    try:
        return _run_study(resolved, run_dir, options)
    finally:
        if lease is not None:
            lease.release()


def _run_study(resolved: ResolvedStudy, run_dir: str | os.PathLike, options: RunOptions) -> RunSummary:
    store = ResultStore(run_dir)
    summary = RunSummary(total=len(resolved.trials))
    log = options.log
    if resolved.search is not None:  # tune every cell, then retrain each one's best (harness.study.search)
        from harness.orchestrate._search import run_search

        def setup(todo, planned=""):
            return _setup(resolved, run_dir, todo, options, summary, planned)

        return run_search(resolved, store, summary, setup, options)
    done = store.finished_ids([t.trial_id for t in resolved.trials])
    # Longest first (stable): on a few slots the last trial to start is a short one, so the table is done soonest.
    todo = sorted((t for t in resolved.trials if t.trial_id not in done), key=lambda t: -estimated_cost(t.config))
    summary.skipped, summary.total = len(done), len(todo)
    if done:
        log(f"skipping {len(done)} of {len(resolved.trials)} trials already finished "
            f"(their identities have results in {store.trials_dir})")
    if not todo:
        store.write_tables(resolved.trials)
        return summary
    env = _setup(resolved, run_dir, todo, options, summary)
    return _run_grid(resolved, todo, summary, store, env, options)


@dataclass
class _Setup:
    """What a run's Tune experiments need: trackers, the storage and its checkpoints, class counts, trial settings."""

    trackers: Trackers
    where: Storage
    checkpoints: CheckpointStore
    num_classes: dict
    common: dict


def _setup(resolved: ResolvedStudy, run_dir, todo, options: RunOptions, summary: RunSummary,
           planned: str = "") -> _Setup:
    """Before the first trial: trackers, pretrained weights, Ray, the storage, each dataset decoded on a node."""
    log, address = options.log, options.address
    trackers = Trackers(list(options.loggers), run_dir, resolved.name, log)  # a missing tracker package fails here
    # Pretrained weights on this machine before anything starts: offline, a missing tag fails here (exit 2).
    for name, pretrained in {(s.config["backbone"]["name"], s.config["backbone"]["pretrained"]) for s in todo}:
        where = ensure_weights(name, pretrained)
        if where:
            log(f"weights {name}: {where}")
    resources = resolved.study.resources
    if not address and os.environ.get("RAY_ADDRESS"):  # `ray job submit` and users say where the cluster is so
        address = os.environ["RAY_ADDRESS"]
        log(f"joining the Ray cluster of RAY_ADDRESS={address} (unset it for a local run)")
    t0 = time.perf_counter()
    start_ray(address, options.num_cpus, dashboard=resources.workers > 1, connect_timeout=options.connect_timeout,
              log=log)
    summary.cluster = cluster_description()
    problem = check_resources(resolved)
    if problem:
        raise ValueError(problem)
    where = Storage(options.storage) if options.storage else Storage(Path(run_dir) / "ray")
    checkpoints = CheckpointStore(where, f"{resolved.name}/{resolved.profile}" if options.storage else "")
    if address:  # a cluster: every node that may run (or resume) a trial must see the checkpoints
        problem = check_storage_reachable(where)
        if problem:
            raise ValueError(problem)
    log(f"Ray {'joined at ' + address if address else 'started locally'} in {time.perf_counter() - t0:.1f} s; "
        f"{planned or f'{len(todo)} trials to run'}, resources per trial: {resources.model_dump()}; storage: {where}")
    requested = sorted({s.config["train"]["precision"] for s in todo})
    log("; ".join(describe_here(r, gpu=resources.gpu > 0) for r in requested) +
        f"; torch threads per trial: {max(1, int(resources.cpu))} (resources.cpu)")
    num_classes, niceness = prepare_datasets(todo, log)
    summary.cluster["worker_niceness"] = niceness
    log(worker_priority_line(address, niceness))
    common = {"workers": resources.workers, "cpu": resources.cpu, "gpu": resources.gpu,
              "max_retries": options.max_retries, "train_storage": where.uri(checkpoints.train_root),
              "cwd": os.getcwd()}  # the directory relative study paths are read from (harness.orchestrate._trial)
    return _Setup(trackers, where, checkpoints, num_classes, common)


def _run_grid(resolved: ResolvedStudy, todo, summary: RunSummary, store: ResultStore, env: _Setup,
              options: RunOptions) -> RunSummary:
    """The grid's unfinished trials in one Tune experiment."""
    checkpoints, log = env.checkpoints, options.log
    resources = resolved.study.resources
    checkpoints.clear_timeouts([s.trial_id for s in todo])  # a rerun gets a fresh limit (it may have been raised)
    payload = [{"trial_id": spec.trial_id, "config": spec.config, **env.common,
                "timeout_marker": checkpoints.timeout_marker(spec.trial_id),
                "resume_from": checkpoints.earlier_runs(spec.trial_id) if resources.workers == 1 else []}
               for spec in todo]
    resumed = sum(bool(p["resume_from"]) for p in payload)
    if resumed:
        log(f"{resumed} unfinished trials resume from their last epoch checkpoint")
    callback = StoreCallback(store, {s.trial_id: s for s in todo}, resolved.trials, summary, log, checkpoints,
                             resources.workers, options.keep_checkpoints, env.num_classes,
                             Progress(len(todo)) if options.progress else None, env.trackers)
    # Worker groups of data-parallel trials must fit in the cluster at once (Tune cannot see their placement groups).
    tuner = make_tuner(resources, env.where.uri(checkpoints.tune_root), options.max_retries, callback,
                       param_space={"trial": tune.grid_search(payload)},
                       max_concurrent_trials=max_concurrent(resolved) if resources.workers > 1 else None)
    try:
        tuner.fit()
    except KeyboardInterrupt:
        summary.interrupted = True
    store.write_tables(resolved.trials)
    return summary

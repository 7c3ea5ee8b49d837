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
# start; a multi-node cluster needs the same token on every node (README, "Running on a cluster").
os.environ.setdefault("RAY_AUTH_MODE", "token")

import logging  # noqa: E402
import secrets  # noqa: E402
import socket  # noqa: E402
import stat  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import ray  # noqa: E402
from ray import tune  # noqa: E402

from harness.data._decode import DatasetError  # noqa: E402
from harness.engine.precision import describe_here  # noqa: E402
from harness.orchestrate._callback import StoreCallback  # noqa: E402
from harness.orchestrate._storage import (CheckpointStore, Storage, StorageLease, check_storage_reachable,  # noqa: E402
                                        experiment_name)
from harness.orchestrate._trial import dataset_key, prepare_dataset, trainable  # noqa: E402
from harness.orchestrate.progress import Progress  # noqa: E402
from harness.results.store import ResultStore  # noqa: E402
from harness.orchestrate.trackers import Trackers  # noqa: E402
from harness.study.trials import ResolvedStudy, estimated_cost  # noqa: E402
from harness.plugin.weights import ensure_weights  # noqa: E402

# Tune's ResultGrid looks for the per-trial CSV/JSON loggers we turned off; the store has the results.
logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)

__all__ = ["RunSummary", "run_study", "start_ray", "shutdown", "cluster_description"]


@dataclass
class RunSummary:
    total: int = 0
    skipped: int = 0
    finished: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    interrupted: bool = False
    cluster: dict = field(default_factory=dict)


def start_ray(address: str | None, num_cpus: int | None = None, dashboard: bool = False,
              connect_timeout: float = 60.0, log=print) -> None:
    """Join a cluster, or start a local Ray. `dashboard`: its state API, which Ray Train's placement-group
    cleaner polls (data-parallel trials); 0.8 s more at start here, so single-process studies go without.

    Safety (README, "Safety"): a local Ray listens on 127.0.0.1 only and authenticates with a token of this
    process's own (RAY_AUTH_TOKEN, never written to disk) unless the environment names one; RAY_AUTH_MODE=disabled
    is honoured with a warning; joining a cluster gives up after `connect_timeout` seconds, naming the address."""
    if ray.is_initialized():
        return
    _check_authentication(address, log)
    if address:
        _wait_reachable(address, connect_timeout)
        with _environ(RAY_gcs_server_port_wait_time_s=str(max(1, round(connect_timeout)))):  # Ray's own retries
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
    else:
        _local_token()
        # address="local": always a new local Ray, whatever a killed run left in Ray's temp folder
        # (ray_current_cluster naming a dead cluster would otherwise turn this into a failed connection).
        # Ray starts its workers at niceness 15 by default (RAY_worker_niceness): beside any ordinary process (an
        # editor, a browser, another experiment) every trial would get a few percent of the CPU. A local run's
        # workers run at the driver's own priority (the raylet adds this to the niceness it inherits from us).
        with _loopback_only(), _environ(RAY_worker_niceness="0"):
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=dashboard,
                     logging_level="WARNING", log_to_driver=True, configure_logging=True,
                     _node_ip_address="127.0.0.1")


@contextmanager
def _environ(**values: str):
    """Environment variables set for a block, unless the user set them."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextmanager
def _loopback_only():
    """Ray's own switch for a single-machine cluster (what it does on macOS and Windows): the node's address is
    127.0.0.1, so the GCS, raylet, object manager, workers, dashboard and its agents listen on loopback only
    (Ray turns a plain `_node_ip_address="127.0.0.1"` into the machine's routable address). Read only while the
    node starts: a later cluster join in the same process is unaffected."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def _local_token() -> None:
    """A local Ray authenticates with a random token of this process (every Ray process it starts inherits it),
    so Ray does not write one to ~/.ray/auth_token (which it does with mode 0644)."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() == "token" and not (
            os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def _check_authentication(address: str | None, log) -> None:
    """Say when authentication is off, and keep Ray's token file private (it may have written it 0644)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        reach = f"the cluster at {address}" if address else "this machine's loopback Ray ports"
        print(f"warning: RAY_AUTH_MODE=disabled: Ray's token authentication is OFF for this run; anyone who can "
              f"reach {reach} can run code as you. Unset RAY_AUTH_MODE to keep it on.", file=sys.stderr)
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        mode = token_file.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO) and token_file.owner() == Path.home().owner():
            token_file.chmod(0o600)
            log(f"{token_file} was readable by other users (mode {stat.S_IMODE(mode):o}); made it 0600")
    except (OSError, KeyError):
        pass


def _wait_reachable(address: str, timeout: float) -> None:
    """Raise ConnectionError (naming the address) unless the cluster's GCS port accepts a TCP connection within
    `timeout` seconds (Ray itself retries silently for minutes)."""
    from ray._private.services import canonicalize_bootstrap_address

    try:  # HOST:PORT as given (Ray would turn 127.0.0.1 into this machine's address); auto as Ray finds it
        target = address.removeprefix("ray://") if ":" in address else canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as e:
        raise ConnectionError(f"--address {address}: {e}") from None
    if not target:
        raise ConnectionError(f"--address {address}: no running Ray cluster found (start one with ray start --head, "
                              "or give HOST:PORT)")
    host, _, port = target.rpartition(":")
    if not port.isdigit() or not host or not 0 < int(port) < 65536:
        raise ConnectionError(f"--address {address}: expected HOST:PORT (e.g. 10.0.0.5:6379) or auto")
    deadline, last = time.monotonic() + timeout, None
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.1, min(5.0, timeout))):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            break
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    shown = address if target == address else f"{address} ({target})"
    raise ConnectionError(f"cannot reach the Ray cluster at {shown} within {timeout:g} s: "
                          f"{getattr(last, 'strerror', None) or last}. Is Ray running there (ray start --head)? Check "
                          "the address and the firewall, or raise --connect-timeout.")


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


def cluster_description() -> dict:
    """Nodes, CPUs and GPUs of the Ray cluster this driver is connected to (for the run's metadata)."""
    if not ray.is_initialized():
        return {}
    nodes = [n for n in ray.nodes() if n["Alive"]]
    total = ray.cluster_resources()
    return {"nodes": len(nodes), "cpus": total.get("CPU", 0), "gpus": total.get("GPU", 0),
            "gpu_types": sorted({k.removeprefix("accelerator_type:") for n in nodes for k in n["Resources"]
                                 if k.startswith("accelerator_type:")})}


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


def worker_priority_line(address: str | None, niceness: list[int]) -> str:
    """What priority the trials run at: the niceness Ray's worker processes reported (the dataset tasks')."""
    driver = os.nice(0)
    seen = ", ".join(map(str, niceness)) or "?"
    if not address:
        how = "the driver's" if niceness == [driver] else f"not the driver's {driver}: RAY_worker_niceness is set"
        return f"trials run at niceness {seen} ({how}; Ray's own default is 15, which any other process outruns)"
    return (f"the cluster's workers run at niceness {seen} (each node's `ray start` decides: Ray's default 15 "
            "unless RAY_worker_niceness=0 is in its environment); each row records its trial's (`niceness`)")


def prepare_datasets(todo, log) -> tuple[dict[str, int], list[int]]:
    """Each dataset decoded once on a node (not in the driver) before any trial starts; its class count, and the
    niceness of the worker processes that decoded them (what the trials will run at).
    A trial whose training split is smaller than one batch would train nothing: that is an error too."""
    configs = {dataset_key(spec.config): spec.config for spec in todo}
    t0 = time.perf_counter()
    try:
        outcomes = dict(zip(configs, ray.get([prepare_dataset.remote(c, os.getcwd()) for c in configs.values()])))
    except ray.exceptions.RayTaskError as e:  # decoding died (out of memory, a crash in a reader): nothing trained
        cause = getattr(e, "cause", None)  # its error, not the task's 20-line traceback
        said = f"{type(cause).__name__}: {cause}" if cause is not None else str(e).strip().splitlines()[-1]
        raise DatasetError(f"decoding a dataset failed on its node: {said}") from None
    errors = [o["error"] for o in outcomes.values() if "error" in o]
    if errors:
        raise DatasetError("\n".join(errors))
    small = [f"{spec.label}: the training split of {spec.config['dataset']['name']} has "
             f"{outcomes[dataset_key(spec.config)]['train']} images, fewer than one batch of train.batch_size="
             f"{spec.config['train']['batch_size']}" for spec in todo
             if outcomes[dataset_key(spec.config)]["train"] < spec.config["train"]["batch_size"]]
    if small:
        raise ValueError("nothing would be trained: " + "; ".join(small[:5]) +
                         "; lower train.batch_size or use more training images")
    size = sum(o["bytes"] for o in outcomes.values()) / 2**20
    log(f"{len(outcomes)} dataset(s) ready in the node cache ({size:.0f} MB decoded) in {time.perf_counter() - t0:.1f} s")
    niceness = sorted({o["niceness"] for o in outcomes.values() if "niceness" in o})
    return {key: o["num_classes"] for key, o in outcomes.items()}, niceness


def run_study(resolved: ResolvedStudy, run_dir: str | os.PathLike, address: str | None = None,
              max_retries: int = 1, num_cpus: int | None = None, log=print, keep_checkpoints: bool = False,
              storage: str | None = None, loggers: list[str] = (), progress: bool = True,
              connect_timeout: float = 60.0) -> RunSummary:
    """Run every unfinished trial of the study. `storage`: where Ray persists checkpoints (default
    `<run_dir>/ray`; a shared path or s3:// / gs:// URI on a multi-node cluster), held by this driver alone
    while it runs (harness.orchestrate._storage.StorageLease; raises RunLocked when another driver holds it).
    `loggers`: trackers (tensorboard, mlflow, wandb). `progress`: the live lines (harness.orchestrate.progress).
    `connect_timeout`: seconds to reach a cluster's `address` before giving up (ConnectionError)."""
    lease = None
    if storage:  # the default storage is inside the run folder, which RunLock already holds
        lease = StorageLease(Storage(storage), f"{resolved.name}/{resolved.profile}", run_dir, log=log).acquire()
    try:
        return _run_study(resolved, run_dir, address, max_retries, num_cpus, log, keep_checkpoints, storage, loggers,
                          progress, connect_timeout)
    finally:
        if lease is not None:
            lease.release()


def _run_study(resolved: ResolvedStudy, run_dir: str | os.PathLike, address: str | None, max_retries: int,
               num_cpus: int | None, log, keep_checkpoints: bool, storage: str | None, loggers: list[str],
               progress: bool, connect_timeout: float) -> RunSummary:
    store = ResultStore(run_dir)
    summary = RunSummary(total=len(resolved.trials))
    if resolved.search is not None:  # tune every cell, then retrain each one's best (harness.study.search)
        from harness.orchestrate._search import run_search

        def setup(todo, planned=""):
            return _setup(resolved, run_dir, todo, address, num_cpus, log, storage, loggers, connect_timeout,
                          max_retries, summary, planned)

        return run_search(resolved, store, summary, setup, log, max_retries, keep_checkpoints, progress)
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
    env = _setup(resolved, run_dir, todo, address, num_cpus, log, storage, loggers, connect_timeout, max_retries,
                 summary)
    return _run_grid(resolved, todo, summary, store, env, log, max_retries, keep_checkpoints, progress)


@dataclass
class _Setup:
    """What a run's Tune experiments need: trackers, the storage and its checkpoints, class counts, trial settings."""

    trackers: Trackers
    where: Storage
    checkpoints: CheckpointStore
    num_classes: dict
    common: dict


def _setup(resolved: ResolvedStudy, run_dir, todo, address: str | None, num_cpus: int | None, log, storage: str | None,
           loggers, connect_timeout: float, max_retries: int, summary: RunSummary, planned: str = "") -> _Setup:
    """Before the first trial: trackers, pretrained weights, Ray, the storage, each dataset decoded on a node."""
    trackers = Trackers(list(loggers), run_dir, resolved.name, log)  # a missing tracker package fails here
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
    start_ray(address, num_cpus, dashboard=resources.workers > 1, connect_timeout=connect_timeout, log=log)
    summary.cluster = cluster_description()
    problem = check_resources(resolved)
    if problem:
        raise ValueError(problem)
    where = Storage(storage) if storage else Storage(Path(run_dir) / "ray")
    checkpoints = CheckpointStore(where, f"{resolved.name}/{resolved.profile}" if storage else "")
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
    common = {"workers": resources.workers, "cpu": resources.cpu, "gpu": resources.gpu, "max_retries": max_retries,
              "train_storage": where.uri(checkpoints.train_root),
              "cwd": os.getcwd()}  # the directory relative study paths are read from (harness.orchestrate._trial)
    return _Setup(trackers, where, checkpoints, num_classes, common)


def _run_grid(resolved: ResolvedStudy, todo, summary: RunSummary, store: ResultStore, env: "_Setup", log,
              max_retries: int, keep_checkpoints: bool, progress: bool) -> RunSummary:
    """The grid's unfinished trials in one Tune experiment."""
    trackers, where, checkpoints, num_classes, common = (env.trackers, env.where, env.checkpoints, env.num_classes,
                                                         env.common)
    resources = resolved.study.resources
    checkpoints.clear_timeouts([s.trial_id for s in todo])  # a rerun gets a fresh limit (it may have been raised)
    payload = [{"trial_id": spec.trial_id, "config": spec.config, **common,
                "timeout_marker": checkpoints.timeout_marker(spec.trial_id),
                "resume_from": checkpoints.earlier_runs(spec.trial_id) if resources.workers == 1 else []}
               for spec in todo]
    resumed = sum(bool(p["resume_from"]) for p in payload)
    if resumed:
        log(f"{resumed} unfinished trials resume from their last epoch checkpoint")
    if resources.workers == 1:
        trial_resources, concurrency = {"cpu": resources.cpu, "gpu": resources.gpu}, None
    else:
        # The Tune trial only drives its Train run: it reserves a token of memory, no CPU, so the
        # workers' bundles are the only CPUs and GPUs reserved for the trial.
        trial_resources, concurrency = {"cpu": 0, "memory": 2**20}, max_concurrent(resolved)
    callback = StoreCallback(store, {s.trial_id: s for s in todo}, resolved.trials, summary, log, checkpoints,
                             resources.workers, keep_checkpoints, num_classes,
                             Progress(len(todo)) if progress else None, trackers)
    tuner = tune.Tuner(
        tune.with_resources(trainable, trial_resources),
        param_space={"trial": tune.grid_search(payload)},
        # reuse_actors: one worker process runs trial after trial, instead of a fresh process (and a
        # fresh torch/timm import) per trial.
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=concurrency,
                                    trial_name_creator=lambda t: t.config["trial"]["trial_id"],
                                    trial_dirname_creator=lambda t: t.config["trial"]["trial_id"]),
        run_config=tune.RunConfig(name=experiment_name(), storage_path=where.uri(checkpoints.tune_root),
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

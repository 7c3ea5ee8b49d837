"""The Ray cluster a run uses: start a local Ray (loopback only, its own token, workers at the driver's priority) or
join one (within a time limit), describe it, check that it can hold a trial, and decode each dataset on a node before
any trial starts. Imported through harness.orchestrate, which sets Ray's environment first."""

from __future__ import annotations

import os
import secrets
import socket
import stat
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import ray

from harness.data._decode import DatasetError
from harness.orchestrate._trial import dataset_key, prepare_dataset
from harness.study.trials import ResolvedStudy


def start_ray(address: str | None, num_cpus: int | None = None, dashboard: bool = False,
              connect_timeout: float = 60.0, log=print) -> None:
    """Join a cluster, or start a local Ray. `dashboard`: its state API, which Ray Train's placement-group
    cleaner polls (data-parallel trials); 0.8 s more at start here, so single-process studies go without.

    Safety (docs/safety.md): a local Ray listens on 127.0.0.1 only and authenticates with a token of this
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
    log(f"{len(outcomes)} dataset(s) ready in the node cache ({size:.0f} MB decoded) "
        f"in {time.perf_counter() - t0:.1f} s")
    niceness = sorted({o["niceness"] for o in outcomes.values() if "niceness" in o})
    return {key: o["num_classes"] for key, o in outcomes.items()}, niceness

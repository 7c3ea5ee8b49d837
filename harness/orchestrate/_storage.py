"""Where Ray persists what a run needs to resume: a local path, an NFS mount, or an object store.

`Storage("runs/x/ray")`, `Storage("/mnt/nfs/fgvc")` or `Storage("s3://bucket/fgvc")`: Ray gets its
URI as `storage_path`; the harness reads and deletes checkpoints through the same pyarrow file
system. Layout under a study's prefix (`<study>/<profile>` on shared storage; none under the
default `runs/<study>/<profile>/ray`):

    tune/<run stamp>/<trial>/checkpoint_*   Tune checkpoints of single-process trials (one experiment per run)
    train/<trial>/checkpoint_*              Ray Train checkpoints of data-parallel trials (a run per trial)
    timeouts/<trial>                        why a trial was stopped for exceeding train.timeout_s
    .lease                                  the driver using this prefix (StorageLease): one at a time

A URI is shown and stored only without its credentials (`str(storage)` is redacted: harness.core.escape.redact_uri;
the lease records the command line without them too). Anyone who can write the storage may plant files there, so
what is read back is bounded (a lease is at most MAX_READ bytes, read from a regular file), only folders with the
harness's own names are listed (nothing with an escape sequence in its name reaches a log), and a local file the
harness writes is never written through a symbolic link.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from harness.core.escape import redact_argv, redact_uri
from harness.core.paths import name_problem, own_path, refuse_link
from harness.results.store import RunLocked

METADATA_FILE = ".metadata.json"  # written by ray.train.Checkpoint.set_metadata: {"epoch": n}
MAX_READ = 64 << 10  # a lease, a timeout marker or checkpoint metadata is a few hundred bytes


def experiment_name(prefix: str = "") -> str:
    """A fresh Tune experiment's folder name: its stamp (so the newest sorts last) and a random part, so that no
    folder planted on the storage beforehand is the one Tune writes its own state in and reads back."""
    return f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


class Storage:
    def __init__(self, location: str | os.PathLike):
        text = str(location)
        if "://" in text and not text.startswith("file://"):
            self.fs, root = pafs.FileSystem.from_uri(text)
            self.scheme, self.local = text.split("://", 1)[0], False
        else:
            root = str(Path(text.removeprefix("file://")).expanduser().resolve())
            self.fs, self.scheme, self.local = pafs.LocalFileSystem(), "", True
        self.root = root.rstrip("/")

    def path(self, *parts: str) -> str:
        """A path for the pyarrow file system."""
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def uri(self, path: str) -> str:
        """What Ray takes as a storage path or a checkpoint location."""
        return path if self.local else f"{self.scheme}://{path}"

    def __str__(self) -> str:
        return redact_uri(self.uri(self.root))

    def dirs(self, path: str) -> list[str]:
        """The folders in `path` whose names the harness could have made (harness.core.paths' safe-name rule)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except OSError:
            return []
        return sorted(i.path for i in infos if i.type == pafs.FileType.Directory and name_problem(i.base_name) is None)

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def read_text(self, path: str, max_bytes: int = MAX_READ) -> str | None:
        """A small file's text (None when it is absent, unreadable, larger than `max_bytes`, or, on a local
        storage, not a regular file: a FIFO is never opened)."""
        from harness.core.bounded import read_bytes

        try:
            if self.local:
                return read_bytes(path, max_bytes, "storage file").decode()
            with self.fs.open_input_stream(path) as f:
                data = f.read(max_bytes + 1)
            return data.decode() if len(data) <= max_bytes else None
        except (OSError, ValueError):  # UnicodeDecodeError and BoundedReadError are ValueErrors
            return None

    def remove(self, path: str) -> None:
        """Delete a file if it is there."""
        try:
            self.fs.delete_file(path)
        except (OSError, FileNotFoundError):
            pass

    def write_text(self, path: str, text: str) -> None:
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if self.local:  # under the storage's own folder, through links too, and never through a link
            own_path(self.root, os.path.relpath(path.rsplit("/", 1)[0], self.root))
            refuse_link(path, "storage file")
        with self.fs.open_output_stream(path) as f:
            f.write(text.encode())

    def delete_dir(self, path: str) -> None:
        if self.fs.get_file_info(path).type == pafs.FileType.Directory:
            self.fs.delete_dir(path)

    def delete_file(self, path: str) -> None:
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            self.fs.delete_file(path)


class StorageLease:
    """One driver per storage prefix, also across machines and `--runs-dir`s (the run folder's flock cannot see
    another machine's driver, nor one writing to another runs folder): a lease file `<prefix>/.lease` naming
    its holder (host, pid, start time, run folder), refreshed every `refresh_s` while the run lasts and
    deleted at its end. Another driver refuses to start while the lease is fresh; it takes it over only when
    it is stale: not refreshed for `stale_s` (a driver that died without deleting it), or, on the same host,
    its process is gone. Taking it is write, wait `settle_s`, read back: of two drivers starting together,
    the one whose write landed last keeps it and the other refuses. Staleness compares the holder's clock
    with ours: machines sharing storage must agree on the time within `stale_s` (docs/cluster.md, NFS caveats)."""

    def __init__(self, storage: Storage, prefix: str, run_dir: str | os.PathLike = "", refresh_s: float = 30.0,
                 stale_s: float = 120.0, settle_s: float = 1.0, log=print):
        self.storage, self.path = storage, storage.path(prefix, ".lease")
        self.refresh_s, self.stale_s, self.settle_s, self.log = refresh_s, stale_s, settle_s, log
        self.token = uuid.uuid4().hex
        self.holder = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.time(), "run_dir": str(Path(run_dir).resolve()) if run_dir else "",
                       "command": redact_argv(sys.argv)}  # an s3:// URI may carry its keys
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def read(self) -> dict | None:
        text = self.storage.read_text(self.path)
        try:
            held = json.loads(text) if text else None
        except ValueError:
            return None  # half written by a crash (object stores write whole, NFS may not): stale
        return held if isinstance(held, dict) else None

    def _write(self) -> None:
        """Whole or not at all: a reader never sees half a lease (a temporary beside it, then a rename)."""
        tmp = f"{self.path}.{self.token}.tmp"
        self.storage.write_text(tmp, json.dumps({**self.holder, "refreshed": time.time()}))
        self.storage.fs.move(tmp, self.path)

    def stale(self, held: dict) -> bool:
        """Whether another driver's lease may be taken over."""
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
            try:
                os.kill(held["pid"], 0)
            except ProcessLookupError:
                return True  # its driver is gone
            except OSError:
                pass  # alive, another user's
        refreshed = held.get("refreshed")
        return not isinstance(refreshed, (int, float)) or time.time() - refreshed > self.stale_s

    def _refusal(self, held: dict) -> RunLocked:
        age = time.time() - held.get("refreshed", 0) if isinstance(held.get("refreshed"), (int, float)) else 0
        started = held.get("started")  # a lease is stored data: any value may be in it
        started = started if isinstance(started, (int, float)) and 0 <= started < 2**33 else 0
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        return RunLocked(f"another driver uses the storage prefix {redact_uri(self.storage.uri(self.path))}: pid "
                         f"{held.get('pid')} on {held.get('host')} since {since} (run folder {held.get('run_dir')}), "
                         f"its lease refreshed {age:.0f} s ago. Two drivers on one prefix would delete each other's "
                         "checkpoints: wait for it to finish, or stop it; a lease not refreshed for "
                         f"{self.stale_s:g} s is taken over.")

    def acquire(self) -> "StorageLease":
        held = self.read()
        if held and held.get("token") != self.token and not self.stale(held):
            raise self._refusal(held)
        if held and held.get("token") != self.token:
            self.log(f"taking over the stale storage lease of pid {held.get('pid')} on {held.get('host')}")
        self._write()
        time.sleep(self.settle_s)
        held = self.read()
        if not held or held.get("token") != self.token:  # another driver wrote after us: it keeps the lease
            raise self._refusal(held or {})
        self._thread = threading.Thread(target=self._refresh, name="storage-lease", daemon=True)
        self._thread.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            held = self.read()
            if held and held.get("token") != self.token:
                self.lost = True
                self.log(f"warning: the storage lease {redact_uri(self.storage.uri(self.path))} was taken over by "
                         f"pid {held.get('pid')} on {held.get('host')} (this driver did not refresh it for "
                         f"{self.stale_s:g} s); stop one of the two drivers")
                return
            try:
                self._write()
            except OSError as e:  # a storage hiccup: try again at the next refresh
                self.log(f"warning: cannot refresh the storage lease ({e})")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        held = self.read()
        if held and held.get("token") == self.token:
            self.storage.remove(self.path)

    def __enter__(self) -> "StorageLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def checkpoint_epoch(fs: pafs.FileSystem, checkpoint_dir: str) -> int:
    """The epoch a checkpoint directory holds (its Ray metadata), -1 when unknown."""
    try:
        return int(json.loads(read_small(fs, f"{checkpoint_dir}/{METADATA_FILE}")).get("epoch", -1))
    except (OSError, ValueError, AttributeError):
        return -1


def checkpoint_dirs(fs: pafs.FileSystem, parent: str) -> list[str]:
    """The `checkpoint_*` directories in `parent`, newest epoch first."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    except OSError:
        return []
    found = [i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]
    return sorted(found, key=lambda d: checkpoint_epoch(fs, d), reverse=True)


class CheckpointStore:
    """The trial checkpoints of one study and profile (see the module docstring for the layout)."""

    def __init__(self, storage: Storage, prefix: str = ""):
        self.storage = storage
        self.tune_root, self.train_root = storage.path(prefix, "tune"), storage.path(prefix, "train")
        self.timeouts = storage.path(prefix, "timeouts")

    def earlier_runs(self, trial_id: str) -> list[str]:
        """URIs of a trial's Tune checkpoints from earlier runs of the study, newest epoch first."""
        fs = self.storage.fs
        found = [c for run in self.storage.dirs(self.tune_root) for c in checkpoint_dirs(fs, f"{run}/{trial_id}")]
        return [self.storage.uri(c) for c in sorted(found, key=lambda d: checkpoint_epoch(fs, d), reverse=True)]

    def delete(self, trial_id: str) -> None:
        """Every checkpoint of a trial (once its result is stored)."""
        for run in self.storage.dirs(self.tune_root):
            for c in checkpoint_dirs(self.storage.fs, f"{run}/{trial_id}"):
                self.storage.delete_dir(c)
        self.storage.delete_dir(f"{self.train_root}/{trial_id}")

    def timeout_marker(self, trial_id: str) -> str:
        return self.storage.uri(f"{self.timeouts}/{trial_id}")

    def mark_timeout(self, trial_id: str, reason: str) -> None:
        self.storage.write_text(f"{self.timeouts}/{trial_id}", reason)

    def clear_timeouts(self, trial_ids: list[str]) -> None:
        """Forget the timeouts of trials about to run again (their limit may have been raised)."""
        try:
            marked = {i.base_name for i in self.storage.fs.get_file_info(
                pafs.FileSelector(self.timeouts, allow_not_found=True))}
        except OSError:
            return
        for trial_id in marked.intersection(trial_ids):
            self.storage.delete_file(f"{self.timeouts}/{trial_id}")


def read_small(fs: pafs.FileSystem, path: str) -> bytes:
    """A small file on the storage: at most MAX_READ bytes (ValueError beyond), and on a local file system a
    regular file (a FIFO or a device planted there is never opened: harness.core.bounded)."""
    if fs.type_name == "local":
        from harness.core.bounded import read_bytes

        return read_bytes(path, MAX_READ, "storage file")
    with fs.open_input_stream(path) as f:
        data = f.read(MAX_READ + 1)
    if len(data) > MAX_READ:
        raise ValueError(f"{path}: more than {MAX_READ:,} bytes")
    return data


def read_marker(uri: str) -> str | None:
    """The text of a marker file at a URI or local path, None when there is none (or it is not a small regular
    file)."""
    fs, path = pafs.FileSystem.from_uri(uri if "://" in uri else str(Path(uri).resolve()))
    try:
        return read_small(fs, path).decode()
    except (OSError, ValueError):
        return None


@ray.remote(num_cpus=0)
def _probe_storage(marker_uri: str, token: str) -> str | None:
    """On one node: can it read the driver's marker, and write beside it? None when it can."""
    fs, path = pafs.FileSystem.from_uri(marker_uri)
    try:
        with fs.open_input_stream(path) as f:
            if f.read().decode() != token:
                return f"{redact_uri(marker_uri)} holds another run's token"
    except (OSError, FileNotFoundError) as e:
        return f"cannot read {redact_uri(marker_uri)} written by the driver ({type(e).__name__})"
    probe = f"{path}.{ray.get_runtime_context().get_node_id()[:12]}"
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except OSError as e:
        return f"cannot write there ({type(e).__name__}: {e})"
    return None


def check_storage_reachable(storage: Storage) -> str | None:
    """Before any trial starts on a multi-node cluster: every node that can run trials must read and write
    the storage (a local path on the head is invisible to the other nodes, and Ray would only notice when
    a trial there saves its first checkpoint). Returns what is wrong, or None."""
    nodes = [n for n in ray.nodes() if n["Alive"] and (n["Resources"].get("CPU", 0) or n["Resources"].get("GPU", 0))]
    token = uuid.uuid4().hex
    marker = storage.path(f".preflight-{token}")
    storage.write_text(marker, token)
    try:
        refs = [_probe_storage.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(storage.uri(marker), token) for n in nodes]
        problems = [(n, p) for n, p in zip(nodes, ray.get(refs, timeout=300)) if p]
    finally:
        storage.delete_file(marker)
    if not problems:
        return None
    listing = "\n  ".join(f"node {n['NodeManagerAddress']} ({n['NodeID'][:12]}): {p}" for n, p in problems)
    return (f"--storage {storage} is not reachable from {len(problems)} of the {len(nodes)} nodes that can run "
            f"trials:\n  {listing}\nCheckpoints must be readable wherever a trial may resume: pass --storage a "
            "shared file system mounted at the same path on every node (e.g. --storage /mnt/nfs/fgvc) or an "
            "object store (--storage s3://bucket/fgvc, --storage gs://bucket/fgvc).")

"""The results store of one study and profile: runs/<study>/<profile>/.

    trials/<identity>/result.json   one record per trial, written atomically when the trial ends
    trials/<identity>/curves.json   its per-epoch metrics
    results.parquet                 one row per trial of the current study (rewritten after each trial), then
                                    every other finished trial of this study and profile still stored here
                                    (a narrower rerun drops nothing): `in_grid` tells them apart
    curves.parquet                  per-epoch metrics in long form (written at the end of a run)
    study.yaml                      the fully resolved study as it was run
    run.json                        how the last run went: wall time, driver memory, cluster, versions
    .lock                           held by the driver that is running the study (RunLock)
    ray/                            what Ray persists (checkpoints), unless --storage puts it elsewhere

Every file is written to a temporary name, flushed to disk and renamed into place, so a reader (or a crash,
or a power loss) never sees a half-written file; finished trials stay finished whatever happens to the run
after them: a failed record never replaces a finished one.
"""

from __future__ import annotations

import json
import os
import time
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from harness.core.versions import MATH_VERSION, __version__
from harness.core.atomic import atomic_write, atomic_write_bytes  # noqa: F401 - re-exported
from harness.core.escape import printable, scrub
from harness.core.paths import UnsafePath, identity_problem, inside, own_path  # noqa: F401
from harness.study.trials import TrialSpec

FINISHED, FAILED = "finished", "failed"
STOPPED = "stopped"  # a search trial its scheduler (ASHA) stopped early: done, with the epochs it trained


def atomic_write_parquet(df: pd.DataFrame, path: Path) -> None:
    import pyarrow as pa

    try:
        atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
    except (pa.ArrowException, TypeError, ValueError, OverflowError):  # mixed types in a column: see parquet_safe
        safe = parquet_safe(df.copy())
        atomic_write(path, lambda tmp: safe.to_parquet(tmp, index=False))


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"version/harness": __version__, "version/math": str(MATH_VERSION),
            **{f"version/{pkg}": version(pkg) for pkg in ("torch", "timm", "ray")},
            "version/python": platform.python_version(), "git_commit": git_commit()}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


MAX_RECORD_BYTES = 64 << 20  # a record with every test image's outcome packed is a few kB; curves alike


def _read_stored(path: Path) -> Any:
    """A stored JSON file of the run folder (None when absent or unusable, said on stderr unless absent)."""
    from harness.core.bounded import BoundedReadError, read_json

    try:
        return read_json(path, MAX_RECORD_BYTES, "trial record")
    except FileNotFoundError:
        return None
    except BoundedReadError as e:
        print(printable(f"warning: {e}; it is not used"), file=sys.stderr)
        return None


def _plain(value: Any) -> Any:
    """JSON-safe scalars for parquet columns: lists and dicts become JSON strings."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


class ResultStore:
    """Records are read from disk at most once per process and kept in memory, so storing a trial's
    result and refreshing results.parquet costs the same whether the study has 10 trials or 2,000;
    curves.parquet (the largest table: epochs x metrics per trial) is rebuilt only at the end of a run."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir)
        self.trials_dir = self.root / "trials"
        self._versions: dict[str, str] | None = None
        self._tables_due = 0.0  # write_tables_soon: when results.parquet may be rewritten next
        self._records: dict[str, dict | None] = {}
        self._curves: dict[str, list[dict]] = {}
        self._stored: list[str] | None = None

    def trial_dir(self, trial_id: str) -> Path:
        """trials/<id>: an identity is a hash (checked), and the folder is the store's own (no link out of it)."""
        problem = identity_problem(trial_id)
        if problem:
            raise UnsafePath(f"refusing to use a trial folder: {problem}")
        return own_path(self.root, "trials", trial_id)

    def record(self, trial_id: str) -> dict | None:
        """The trial's stored record; None when there is none, or when it is not one (not a regular file, over
        MAX_RECORD_BYTES, not a JSON mapping): such a trial is trained again, its file replaced."""
        if trial_id not in self._records:
            found = _read_stored(self.trial_dir(trial_id) / "result.json")
            self._records[trial_id] = found if isinstance(found, dict) else None
        return self._records[trial_id]

    def curves(self, trial_id: str) -> list[dict]:
        """Its per-epoch metrics (a list of mappings; anything else reads as none, said on stderr)."""
        if trial_id not in self._curves:
            path = self.trial_dir(trial_id) / "curves.json"
            found = _read_stored(path)
            if found is not None and not (isinstance(found, list) and all(isinstance(e, dict) for e in found)):
                print(printable(f"warning: {path}: not a list of epochs; its curves are left out"), file=sys.stderr)
                found = None
            self._curves[trial_id] = found or []
        return self._curves[trial_id]

    def stored_ids(self) -> list[str]:
        """Every trial with a record folder here (read once per process; this store adds the ones it writes): only
        folders named by an identity (anything else in trials/ is not the store's)."""
        if self._stored is None:
            try:
                self._stored = sorted(d.name for d in os.scandir(self.trials_dir)
                                      if identity_problem(d.name) is None and d.is_dir(follow_symlinks=False))
            except OSError:
                self._stored = []
        return self._stored

    def finished_ids(self, trial_ids: list[str]) -> set[str]:
        return {t for t in trial_ids if (r := self.record(t)) is not None and r.get("status") == FINISHED}

    def write_record(self, spec: TrialSpec, status: str, metrics: dict, error: str = "",
                     curves: list[dict] | None = None) -> dict:
        """Store a trial's record (and curves). A FAILED record never replaces a FINISHED one (a process that dies
        after its final report, a late timeout): the finished record is kept and returned."""
        existing = self.record(spec.trial_id)
        if status != FINISHED and existing is not None and existing.get("status") == FINISHED:
            return existing
        if self._versions is None:
            self._versions = versions()
        cfg = spec.config
        if isinstance(metrics.get("traceback"), str):  # an error may quote a URI with its keys, or a secret
            metrics = {**metrics, "traceback": scrub(metrics["traceback"])}
        error = scrub(error)
        row = {"trial_id": spec.trial_id, "kind": spec.kind, "status": status, "error": error, "study": spec.study,
               "profile": spec.profile, "method": cfg["method"]["name"], "dataset": cfg["dataset"]["name"],
               "backbone": cfg["backbone"]["name"], "seed": cfg["seed"], "grids": json.dumps(spec.grids),
               **{axis: _plain(value) for axis, value in spec.axes.items()},
               **{k: v for k, v in metrics.items() if k not in ("status", "error", "kind", "trial_id")},
               **self._versions, "config": json.dumps(cfg, sort_keys=True)}
        atomic_write_bytes(self.trial_dir(spec.trial_id) / "result.json", json.dumps(row, default=str).encode())
        self._records[spec.trial_id] = json.loads(json.dumps(row, default=str))
        if self._stored is not None and spec.trial_id not in self._stored:
            self._stored.append(spec.trial_id)
        if curves is not None:
            atomic_write_bytes(self.trial_dir(spec.trial_id) / "curves.json", json.dumps(curves).encode())
            self._curves[spec.trial_id] = curves
        return row

    def write_maps(self, spec: TrialSpec, packed: str) -> None:
        """trials/<id>/maps.npz: the trial's maps on the study's fixed test images (harness.engine.explain)."""
        import base64

        atomic_write_bytes(self.trial_dir(spec.trial_id) / "maps.npz", base64.b64decode(packed))

    def kept_outside(self, trials: list[TrialSpec]) -> list[dict]:
        """Finished records of this study and profile that the current grid no longer holds (a narrower rerun,
        an older MATH_VERSION): results.parquet keeps them, the tables show the current grid."""
        if not trials:
            return []
        current = {spec.trial_id for spec in trials}
        study, profile = trials[0].study, trials[0].profile
        return [r for t in self.stored_ids() if t not in current and (r := self.record(t)) is not None
                and r.get("status") in (FINISHED, STOPPED) and r.get("study") == study and r.get("profile") == profile]

    def write_tables_soon(self, trials: list[TrialSpec]) -> bool:
        """results.parquet rewritten after a trial ends, unless the last rewrite was so recent that rewriting after
        every trial would spend more than about 5% of the run on it (a rewrite grows with the stored trials: at
        10,000 it takes a large part of a second). Every record is already on disk (result.json, fsynced) and the
        run's end rewrites the table whatever happened (write_tables), so nothing is lost by waiting. True when
        it was written now."""
        now = time.monotonic()
        if now < self._tables_due:
            return False
        self.write_tables(trials, curves=False)
        self._tables_due = time.monotonic() + 20 * (time.monotonic() - now)
        return True

    def write_tables(self, trials: list[TrialSpec], curves: bool = True) -> pd.DataFrame:
        """results.parquet (and curves.parquet, unless `curves=False`): the study's current trials (`in_grid`
        true), then every other finished trial of the study and profile stored here (`in_grid` false)."""
        rows = [{**r, "in_grid": True} for spec in trials if (r := self.record(spec.trial_id)) is not None]
        outside = self.kept_outside(trials)
        results = pd.DataFrame(rows + [{**r, "in_grid": False} for r in outside])
        atomic_write_parquet(results, self.root / "results.parquet")
        if curves:
            rows = []
            kept = [(spec.trial_id, spec.config["seed"], spec.axes) for spec in trials
                    if self.record(spec.trial_id) is not None]
            kept += [(r["trial_id"], r.get("seed"), {a: r.get(a) for a in (trials[0].axes if trials else {})})
                     for r in outside]
            for trial_id, seed, trial_axes in kept:
                axes = {a: _plain(v) for a, v in trial_axes.items()}
                for epoch_metrics in self.curves(trial_id):
                    epoch = epoch_metrics.get("epoch")
                    rows.extend({"trial_id": trial_id, "seed": seed, **axes, "epoch": epoch,
                                 "metric": metric, "value": float(value)}
                                for metric, value in epoch_metrics.items()
                                if metric != "epoch" and isinstance(value, (int, float))
                                and not isinstance(value, bool))
            atomic_write_parquet(pd.DataFrame(rows), self.root / "curves.parquet")
        return results


def parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """A column whose values mix types parquet cannot hold together (an axis of false and "/path/weights.pth",
    or an axis that was a number in older records and is text now) is stored as text, not refused mid-run."""
    import pyarrow as pa

    for column in df.columns[df.dtypes == object]:
        try:
            pa.array(df[column].tolist(), from_pandas=True)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            df[column] = df[column].map(lambda v: v if v is None or (isinstance(v, float) and v != v) else
                                        (json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else str(v)))
    return df


class RunLocked(RuntimeError):
    """Another driver is running the same study and profile."""


class RunLock:
    """One driver per study and profile: an exclusive lock on `<run_dir>/.lock`, held while the run lasts.

    The kernel releases it when its process ends however it ends (SIGKILL included), so a crashed driver
    never leaves it stuck. The file names its holder (its command line without credentials), so the refusal can
    say who that is. It is opened without following a symbolic link and must be a regular file: a `.lock`
    planted as a link to a file elsewhere is refused (UnsafePath), never written through."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / ".lock"
        self._file = None

    def __enter__(self) -> "RunLock":
        import fcntl
        import socket
        import sys
        import time

        from harness.core.escape import printable, redact_argv
        from harness.core.paths import open_own

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = os.fdopen(open_own(self.path, "run lock"), "r+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = printable(f.read(4096).strip()) or "a process that has not written its name yet"
            f.close()
            raise RunLocked(f"another run of this study and profile is in progress ({holder}); it holds "
                            f"{self.path}. Wait for it to finish (the next run skips what it finished) or stop it; "
                            "the lock goes with its process.") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{redact_argv(sys.argv)}")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

"""The results store of one study and profile: runs/<study>/<profile>/.

    trials/<identity>/result.json   one record per trial, written atomically when the trial ends
    trials/<identity>/curves.json   its per-epoch metrics
    trials/<identity>/checkpoint.pt the engine's latest epoch checkpoint (resume after an interrupt)
    results.parquet                 one row per trial of the current study (rebuilt after each trial)
    curves.parquet                  per-epoch metrics in long form
    study.yaml                      the fully resolved study as it was run

Every file is written to a temporary name and renamed into place, so a reader (or a crash) never
sees a half-written file; finished trials stay finished whatever happens to the run after them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

import harness
from harness.trials import TrialSpec

FINISHED, FAILED = "finished", "failed"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_parquet(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".parquet")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"version/harness": harness.__version__, "version/math": str(harness.MATH_VERSION),
            **{f"version/{pkg}": version(pkg) for pkg in ("torch", "timm", "ray")},
            "version/python": platform.python_version(), "git_commit": git_commit()}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(harness.__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(harness.__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _plain(value: Any) -> Any:
    """JSON-safe scalars for parquet columns: lists and dicts become JSON strings."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


class ResultStore:
    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir)
        self.trials_dir = self.root / "trials"
        self._versions: dict[str, str] | None = None

    def trial_dir(self, trial_id: str) -> Path:
        return self.trials_dir / trial_id

    def record(self, trial_id: str) -> dict | None:
        path = self.trial_dir(trial_id) / "result.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def finished_ids(self, trial_ids: list[str]) -> set[str]:
        return {t for t in trial_ids if (r := self.record(t)) is not None and r.get("status") == FINISHED}

    def write_record(self, spec: TrialSpec, status: str, metrics: dict, error: str = "",
                     curves: list[dict] | None = None) -> dict:
        if self._versions is None:
            self._versions = versions()
        cfg = spec.config
        row = {"trial_id": spec.trial_id, "status": status, "error": error, "study": spec.study,
               "profile": spec.profile, "method": cfg["method"]["name"], "dataset": cfg["dataset"]["name"],
               "backbone": cfg["backbone"]["name"], "seed": cfg["seed"], "grids": json.dumps(spec.grids),
               **{axis: _plain(value) for axis, value in spec.axes.items()},
               **{k: v for k, v in metrics.items() if k not in ("status", "error", "kind", "trial_id")},
               **self._versions, "config": json.dumps(cfg, sort_keys=True)}
        atomic_write_bytes(self.trial_dir(spec.trial_id) / "result.json", json.dumps(row, default=str).encode())
        if curves is not None:
            atomic_write_bytes(self.trial_dir(spec.trial_id) / "curves.json", json.dumps(curves).encode())
        return row

    def write_tables(self, trials: list[TrialSpec]) -> pd.DataFrame:
        """Rebuild results.parquet and curves.parquet from the records of the study's current trials."""
        rows, curves = [], []
        for spec in trials:
            record = self.record(spec.trial_id)
            if record is None:
                continue
            rows.append(record)
            curve_path = self.trial_dir(spec.trial_id) / "curves.json"
            if curve_path.exists():
                for epoch_metrics in json.loads(curve_path.read_text()):
                    epoch = epoch_metrics.get("epoch")
                    for metric, value in epoch_metrics.items():
                        if metric != "epoch" and isinstance(value, (int, float)):
                            curves.append({"trial_id": spec.trial_id, "seed": spec.config["seed"],
                                           **{a: _plain(v) for a, v in spec.axes.items()},
                                           "epoch": epoch, "metric": metric, "value": float(value)})
        results = pd.DataFrame(rows)
        atomic_write_parquet(results, self.root / "results.parquet")
        atomic_write_parquet(pd.DataFrame(curves), self.root / "curves.parquet")
        return results

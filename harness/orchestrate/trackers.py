"""Each trial's epochs, config and final metrics sent to the experiment trackers people already use
(`python -m harness.run study.yaml --log tensorboard --log mlflow --log wandb`), from the driver as results
arrive, so a tracker sees exactly what the results store sees and nothing is sent from the workers.

One tracker run per trial, named by its label (grid values and seed), with the study, profile and trial id
as tags and the trial's flattened config as parameters; each epoch's numeric metrics at step = epoch; the
final test metrics at the end, and the run closed as finished or failed.

- tensorboard: event files under <run>/tensorboard/<label>/ (tensorboardX), with an HParams entry per trial
  so an ablation reads as one table in TensorBoard's HParams tab.
- mlflow: to $MLFLOW_TRACKING_URI when set (a server or a database), else a file store in <run>/mlruns
  (where metric names use '.' for '/', as a file store keeps each metric as a file at its name's path).
- wandb: offline under <run>/wandb unless WANDB_MODE says otherwise (`wandb sync` uploads it later).

The trackers are optional dependencies: asking for one that is not installed stops the run before any trial
starts, with the pip command that installs it.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from harness.study.trials import TrialSpec

TRACKERS = ("tensorboard", "mlflow", "wandb")
_PACKAGES = {"tensorboard": ("tensorboardX", "tensorboardX"), "mlflow": ("mlflow", "mlflow-skinny"),
             "wandb": ("wandb", "wandb")}
_SKIP = {"epoch", "kind", "status", "error", "traceback", "history", "maps", "trial_id", "training_iteration",
         "time_this_iter_s", "time_total_s", "timestamp", "time_since_restore", "iterations_since_restore",
         "timesteps_total", "episodes_total", "pid", "date", "node_ip", "hostname", "checkpoint_dir_name",
         "should_checkpoint", "done", "config", "experiment_tag", "timesteps_since_restore"}


class TrackerMissing(ValueError):
    pass


def numeric(metrics: dict) -> dict[str, float]:
    """The metrics a tracker can plot: finite numbers, not the bookkeeping keys."""
    out = {}
    for key, value in metrics.items():
        if key in _SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def flat_config(config: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        else:
            out[name] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return out


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", label)[:200]


class _TensorBoard:
    def __init__(self, run_dir: Path, study: str):
        self.root, self.writers = run_dir / "tensorboard", {}

    def start(self, spec: TrialSpec) -> None:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(logdir=str(self.root / _safe(spec.label)))
        writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flat_config(spec.config).items()))
        self.writers[spec.trial_id] = writer

    def epoch(self, spec: TrialSpec, step: int, metrics: dict[str, float]) -> None:
        writer = self.writers.get(spec.trial_id)
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)

    def end(self, spec: TrialSpec, finished: bool, metrics: dict[str, float]) -> None:
        writer = self.writers.pop(spec.trial_id, None)
        if writer is None:
            return
        if finished:
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in spec.axes.items()}
            hparams["seed"] = spec.config["seed"]
            finals = {f"final/{k}": v for k, v in metrics.items() if k.startswith("test/")}
            writer.add_hparams(hparams, finals or {"final/none": 0.0}, name="hparams")
        writer.close()


class _MLflow:
    def __init__(self, run_dir: Path, study: str):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.file_store = not uri
        if self.file_store:  # MLflow 3 keeps file stores working when asked to
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(study)
        self.experiment = experiment.experiment_id if experiment else self.client.create_experiment(study)
        self.runs = {}

    def _names(self, metrics: dict[str, float]) -> dict[str, float]:
        """A file store keeps each metric as a file at its name's path, so 'train/loss' cannot sit beside
        'train/loss/concat': there the names use '.' ('train.loss', 'train.loss.concat')."""
        return {k.replace("/", "."): v for k, v in metrics.items()} if self.file_store else metrics

    def start(self, spec: TrialSpec) -> None:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment, run_name=spec.label,
                                     tags={"study": spec.study, "profile": spec.profile, "trial_id": spec.trial_id})
        params = [Param(k, str(v)[:6000]) for k, v in flat_config(spec.config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[i:i + 100])
        self.runs[spec.trial_id] = run.info.run_id

    def epoch(self, spec: TrialSpec, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        run_id, now = self.runs.get(spec.trial_id), _now_ms()
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in self._names(metrics).items()])

    def end(self, spec: TrialSpec, finished: bool, metrics: dict[str, float]) -> None:
        run_id = self.runs.pop(spec.trial_id, None)
        if run_id is None:
            return
        from mlflow.entities import Metric

        finals = self._names({f"final/{k}": v for k, v in metrics.items() if k.startswith("test/")})
        if finals:
            self.client.log_batch(run_id, metrics=[Metric(k, v, _now_ms(), 0) for k, v in finals.items()])
        self.client.set_terminated(run_id, status="FINISHED" if finished else "FAILED")


class _WandB:
    def __init__(self, run_dir: Path, study: str):
        self.dir, self.project, self.runs = run_dir / "wandb", study, {}
        self.dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")

    def start(self, spec: TrialSpec) -> None:
        import wandb

        self.runs[spec.trial_id] = wandb.init(project=self.project, name=spec.label, dir=str(self.dir),
                                              group=spec.profile, config=flat_config(spec.config),
                                              tags=[spec.profile], reinit="create_new")

    def epoch(self, spec: TrialSpec, step: int, metrics: dict[str, float]) -> None:
        self.runs[spec.trial_id].log(metrics, step=step)

    def end(self, spec: TrialSpec, finished: bool, metrics: dict[str, float]) -> None:
        run = self.runs.pop(spec.trial_id, None)
        if run is None:
            return
        run.summary.update({f"final/{k}": v for k, v in metrics.items() if k.startswith("test/")})
        run.finish(exit_code=0 if finished else 1)


_BACKENDS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def check_installed(names: list[str]) -> None:
    """Fail before any trial starts when a tracker asked for is unknown or not installed."""
    import importlib.util

    for name in names:
        if name not in _BACKENDS:
            raise TrackerMissing(f"--log {name}: unknown tracker; choose one of {', '.join(TRACKERS)}")
        module, package = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerMissing(f"--log {name} needs the {module} package: pip install {package}")


class Trackers:
    """The trackers of one run; a tracker that fails while logging is reported once and dropped, never the
    trial with it (the results store stays the record)."""

    def __init__(self, names: list[str], run_dir: str | os.PathLike, study: str, log=print):
        names = list(dict.fromkeys(names))
        check_installed(names)
        self.log = log
        self.backends = {name: _BACKENDS[name](Path(run_dir), study) for name in names}

    def __bool__(self) -> bool:
        return bool(self.backends)

    def _each(self, what: str, *args) -> None:
        for name, backend in list(self.backends.items()):
            try:
                getattr(backend, what)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker's trouble must not fail the study
                self.log(f"warning: --log {name} stopped logging ({type(e).__name__}: {str(e)[:300]})")
                del self.backends[name]

    def start(self, spec: TrialSpec) -> None:
        self._each("start", spec)

    def epoch(self, spec: TrialSpec, metrics: dict) -> None:
        step = int(metrics.get("epoch", 0))
        self._each("epoch", spec, step, numeric(metrics))

    def end(self, spec: TrialSpec, finished: bool, metrics: dict) -> None:
        self._each("end", spec, finished, numeric(metrics))

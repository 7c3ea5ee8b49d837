"""Progress while a study runs: a line per running trial (epoch, loss, accuracy so far, elapsed and estimated
remaining time) and an overall count with an ETA.

On a terminal the block of lines is redrawn in place (ANSI: cursor up, clear to the end); in a Jupyter notebook
(harness.run_study) the block is one output that is updated in place (IPython's display handle); elsewhere (CI,
a log file) each update is printed as one plain line when a trial finishes an epoch, so a log reads as a
history. Finished and failed trials are printed as permanent lines above the block. Labels and messages come
from study files and trials: their control characters are dropped (harness.core.escape.printable), only the block's
own cursor codes reach the terminal, and a running trial's line is one line (its label's newlines are spaces).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from harness.core.escape import one_line, printable


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class _Running:
    label: str
    started: float
    epochs: int
    epoch: int = 0
    loss: float | None = None
    acc: float | None = None

    def left(self, now: float) -> float:
        """Seconds to its last epoch at its pace so far (call once it has an epoch)."""
        return (now - self.started) / self.epoch * (self.epochs - self.epoch)

    def line(self, now: float) -> str:
        elapsed = now - self.started
        left = f", ~{_duration(self.left(now))} left" if self.epoch else ""
        loss = f" loss {self.loss:.3f}" if self.loss is not None else ""
        acc = f" acc {100 * self.acc:.1f}%" if self.acc is not None else ""
        return f"  {self.label}: epoch {self.epoch}/{self.epochs}{loss}{acc}, {_duration(elapsed)}{left}"


@dataclass
class Progress:
    total: int
    out: object = field(default_factory=lambda: sys.stdout)
    live: bool | None = None  # None: a terminal gets the live block
    running: dict[str, _Running] = field(default_factory=dict)
    durations: list[float] = field(default_factory=list)
    done: int = 0
    _drawn: int = 0
    _start: float = field(default_factory=lambda: time.monotonic())

    _handle: object = None  # a notebook's display handle

    def __post_init__(self):
        if self.live is None:
            self.live = bool(getattr(self.out, "isatty", lambda: False)()) or in_notebook()
        if self.live and in_notebook():
            from IPython.display import display

            self._handle = display({"text/plain": self.overall()}, raw=True, display_id=True)

    def start(self, trial_id: str, label: str, epochs: int) -> None:
        # A label is study text: no control characters, and one line (a newline would break the block's redraw).
        self.running[trial_id] = _Running(one_line(label), time.monotonic(), epochs)
        self._draw()

    def epoch(self, trial_id: str, metrics: dict) -> None:
        trial = self.running.get(trial_id)
        if trial is None:
            return
        trial.epoch = int(metrics.get("epoch", trial.epoch + 1))
        trial.loss = metrics.get("train/loss", trial.loss)
        trial.acc = metrics.get("test/acc", trial.acc)
        if self.live:
            self._draw()
        else:
            self._print(f"{self.overall()} |{trial.line(time.monotonic())}")

    def end(self, trial_id: str, message: str) -> None:
        """A trial ended (finished or failed): its permanent line, and the ETA learns its duration."""
        trial = self.running.pop(trial_id, None)
        if trial is not None:
            self.durations.append(time.monotonic() - trial.started)
        self.done += 1
        self._clear()
        self._print(message)
        self._draw()

    def overall(self) -> str:
        """[done/total], elapsed, and an ETA from the trials done so far (or the running ones' estimates)."""
        now = time.monotonic()
        remaining = self.total - self.done
        eta = ""
        if remaining and (self.durations or any(t.epoch for t in self.running.values())):
            estimates = self.durations or [(now - t.started) / t.epoch * t.epochs
                                           for t in self.running.values() if t.epoch]
            per_trial = sum(estimates) / len(estimates)
            lanes = max(1, len(self.running))
            in_flight = sum(t.left(now) if t.epoch else max(0.0, per_trial - (now - t.started))
                            for t in self.running.values())
            waiting = max(0, remaining - len(self.running)) * per_trial
            eta = f", ETA {_duration((in_flight + waiting) / lanes)}"
        return f"[{self.done}/{self.total} trials, {_duration(now - self._start)}{eta}]"

    def _print(self, text: str) -> None:
        print(printable(text), file=self.out, flush=True)

    def _clear(self) -> None:
        if self._handle is not None:
            return
        if self.live and self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        if not self.live:
            return
        self._clear()
        now = time.monotonic()
        lines = [self.overall()] + [t.line(now) for t in self.running.values()]
        if self._handle is not None:  # one output cell, updated in place
            self._handle.update({"text/plain": printable("\n".join(lines))}, raw=True)
            return
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()
        self._drawn = len(lines)


def in_notebook() -> bool:
    """Inside a Jupyter kernel (IPython's ZMQ shell), where the terminal's cursor codes would print as text."""
    import sys

    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        return type(ipython.get_ipython()).__name__ == "ZMQInteractiveShell"
    except Exception:  # noqa: BLE001 - any doubt: not a notebook
        return False

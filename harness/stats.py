"""Honest statistics for the tables: spread over seeds, confidence intervals, and which differences are real.

- `summarize`: mean, sample standard deviation and the number of seeds; with 3 or more seeds, the
  95% confidence interval of the mean (Student's t, n - 1 degrees of freedom).
- `compare_cells`: is the difference between two cells of a table significant? With two or more seeds
  that both cells ran, a paired t-test over those seeds (the same seed gives both cells the same
  data order: the harness draws it from its own generator); with one seed, a paired bootstrap over
  the test images (both cells are scored on the same test set, image by image: `test/correct`).
- `pack_correct` / `unpack_correct`: the per-image correctness of a trial's primary head on the test
  set, stored compactly (one bit per image) in its results row.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05  # a difference is "significant" when p < ALPHA (two-sided)
BOOTSTRAP_ITERATIONS = 2000


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample standard deviation over seeds (0 with one seed)
    n: int
    ci95: tuple[float, float] | None  # with n >= 3


def summarize(values) -> Summary:
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if not len(x):
        return Summary(float("nan"), float("nan"), 0, None)
    std = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    ci = None
    if len(x) >= 3:
        from scipy.stats import t

        half = float(t.ppf(0.975, len(x) - 1)) * std / math.sqrt(len(x))
        ci = (float(x.mean()) - half, float(x.mean()) + half)
    return Summary(float(x.mean()), std, len(x), ci)


def paired_seed_test(a: dict[int, float], b: dict[int, float]) -> float | None:
    """Two-sided paired t-test over the seeds both cells ran; None with fewer than 2 such seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = np.array([a[s] - b[s] for s in seeds])
    if np.allclose(d, d[0]):  # no spread: identical differences every time
        return 0.0 if abs(d[0]) > 0 else 1.0
    from scipy.stats import ttest_rel

    return float(ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, iterations: int = BOOTSTRAP_ITERATIONS,
                     seed: int = 0) -> float:
    """Two-sided p-value of accuracy(a) != accuracy(b) on the same test images: resample the images (the
    same indices for both), and double the share of resampled differences on the far side of zero."""
    a, b = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    if a.shape != b.shape or not len(a):
        raise ValueError("paired bootstrap needs per-image results on the same test images")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (iterations, len(a)))
    diffs = (a[idx] - b[idx]).mean(1)
    below, above = (diffs <= 0).mean(), (diffs >= 0).mean()
    return float(min(1.0, 2 * min(below, above)))


def compare_cells(a_by_seed: dict[int, float], b_by_seed: dict[int, float],
                  a_correct: dict[int, np.ndarray] | None = None,
                  b_correct: dict[int, np.ndarray] | None = None) -> tuple[float | None, str]:
    """(p-value, test name) for cell a vs cell b: paired over seeds when 2+ are shared, else a paired
    bootstrap over the test images of their one shared seed; (None, "") when neither is possible."""
    p = paired_seed_test(a_by_seed, b_by_seed)
    if p is not None:
        return p, "paired t over seeds"
    shared = sorted(set(a_correct or {}) & set(b_correct or {}))
    if shared and a_correct[shared[0]].shape == b_correct[shared[0]].shape:
        return paired_bootstrap(a_correct[shared[0]], b_correct[shared[0]]), "bootstrap over test images"
    return None, ""


def pack_correct(correct: np.ndarray) -> str:
    """(n,) bools -> "n:base64 of the packed bits"."""
    correct = np.asarray(correct, dtype=bool)
    return f"{len(correct)}:" + base64.b64encode(np.packbits(correct).tobytes()).decode()


def unpack_correct(packed: str) -> np.ndarray:
    n, data = packed.split(":", 1)
    return np.unpackbits(np.frombuffer(base64.b64decode(data), dtype=np.uint8))[:int(n)].astype(bool)

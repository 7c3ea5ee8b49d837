"""Honest statistics for the tables: spread over seeds, confidence intervals, and which differences are real.

- `summarize`: mean, sample standard deviation and the number of seeds; with 3 or more seeds, the
  95% confidence interval of the mean (Student's t, n - 1 degrees of freedom).
- `compare_column`: which cells of one table column are significantly worse than its best. The best is
  chosen on the seeds every cell of the column ran (the shared seeds) and every other cell is compared
  with it on those seeds, one-sided (is the best better?):
  - 2 or more shared seeds: a t-test on the difference of the two cells' means, paired by seed (the same
    seed gives every cell the same data order), with the error variance pooled over the column (the
    residual of cell + seed effects: (k - 1)(n - 1) degrees of freedom; with two cells exactly the
    paired t-test);
  - 1 shared seed: an exact McNemar test on the per-image outcomes (`test/correct`) of the same test
    images, which the test-set hash stored beside them (`test/set_hash`) must confirm.
  The error over the column is held by Holm's step-down over its tests, after each raw p is multiplied
  by k - 1 for the choice of the best among the k cells (see `holm_after_selection` for why).
- `ColumnResult.mde`: the minimum detectable effect, the smallest difference from the best that the column's
  tests find 80% of the time at the level its most-behind cell must reach (`mcnemar_mde` for one seed).
- `pack_correct` / `unpack_correct` / `split_hash`: the per-image correctness of a trial's primary head on
  the test set, stored compactly (one bit per image) in its results row, and the identity of that test set.
"""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass, field
from typing import Hashable

import numpy as np

ALPHA = 0.05  # the column's family-wise error: P(any cell falsely marked worse) <= ALPHA
POWER = 0.8  # the power at which the minimum detectable effect is stated

T_POOLED = "paired t over seeds (pooled)"
MCNEMAR = "exact McNemar over test images"
MCNEMAR_POOLED = "exact McNemar over test images, pooled over seeds"
CORRECTION = "Holm after selection of the best"


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


def mcnemar_exact(best_correct, other_correct) -> float:
    """One-sided exact McNemar p of "best is more accurate than other" on the same test images: of the images
    exactly one of the two gets right (the discordant ones), b are the best's and c the other's; under equal
    accuracy b ~ Binomial(b + c, 1/2), and p = P(X >= b). Lists of arrays (one per seed) pool the discordant
    counts of independent runs. 1.0 when no image is discordant."""
    pooled = isinstance(best_correct, list)
    pairs = list(zip(best_correct, other_correct)) if pooled else [(best_correct, other_correct)]
    b = c = 0
    for x, y in pairs:
        x, y = np.asarray(x, dtype=bool), np.asarray(y, dtype=bool)
        if x.shape != y.shape or x.ndim != 1:
            raise ValueError(f"McNemar needs per-image outcomes on the same test images ({x.shape} vs {y.shape})")
        b += int((x & ~y).sum())
        c += int((~x & y).sum())
    if b + c == 0:
        return 1.0
    from scipy.stats import binom

    return float(binom.sf(b - 1, b + c, 0.5))


def holm_after_selection(p_raw: dict[Hashable, float], k: int) -> dict[Hashable, float]:
    """Adjusted p-values of the comparisons with a best chosen from the data among k cells.

    Why not Holm over the k - 1 raw p-values alone: the best is the cell that came out highest, so under
    equal cells the gap to it is biased upwards, and a column of 5 (8) equal cells shows a false "worse"
    13% (15-18%) of the time even after Holm (simulated, 3-5 seeds). Why not Hsu's MCB: it guarantees that
    the true best is not declared worse, but when several cells tie for best (all cells equal, the case
    a reader most needs protected) it lets the others be: 17% of columns of 5 equal cells, 25-27% of 8.
    Here, for the hypothesis "cell i is a best", (k - 1) x p(best vs i) is a valid p-value (Bonferroni over the k - 1
    cells i could have been compared with, whichever the data picked), and Holm's step-down over the
    column's hypotheses, the best's own with p = 1 included (family size = tested cells + 1), holds
    P(any true best marked worse) <= ALPHA for any configuration, ties included (2-3% with all equal).
    With two cells it is the two-sided p."""
    q = {key: min(1.0, (k - 1) * p) for key, p in p_raw.items()}
    m = len(q) + 1
    adjusted, running = {}, 0.0
    for rank, key in enumerate(sorted(q, key=q.get)):
        running = max(running, min(1.0, (m - rank) * q[key]))
        adjusted[key] = running
    return adjusted


@dataclass(frozen=True)
class Comparison:
    """One cell of a column against the column's best."""

    mark: str  # "*" best, "≈" not shown different from the best, "" significantly worse, "?" no test applies
    p_raw: float | None = None  # one-sided p of "the best is better"
    p_adjusted: float | None = None  # after Holm over the column (see holm_after_selection)
    test: str = ""  # which test, or why none applies
    shared_mean: float | None = None  # the cell's mean on the column's shared seeds

    @property
    def worse(self) -> bool:
        return self.p_adjusted is not None and self.p_adjusted < ALPHA


@dataclass
class ColumnResult:
    best: Hashable | None
    seeds: tuple[int, ...]  # the shared seeds the column was compared on
    cells: dict[Hashable, Comparison] = field(default_factory=dict)
    mde: float | None = None  # minimum detectable effect (fraction for accuracies), see minimum_detectable_effect
    mde_test: str = ""  # the test the MDE is of
    test_images: int | None = None


Outcome = tuple[np.ndarray, str | None]  # (per-image correctness, hash of the test set's identities)


def compare_column(by_seed: dict[Hashable, dict[int, float]],
                   outcomes: dict[Hashable, dict[int, Outcome]] | None = None, alpha: float = ALPHA) -> ColumnResult:
    """Marks for the cells of one column (see the module docstring). `by_seed`: cell -> {seed: value} of its
    finished trials; `outcomes`: cell -> {seed: (correct, test-set hash)} where per-image outcomes exist."""
    outcomes = outcomes or {}
    cells = {key: runs for key, runs in by_seed.items() if runs}
    if len(cells) < 2:
        return ColumnResult(best=next(iter(cells), None), seeds=(), cells={key: Comparison("") for key in cells})
    seeds = set.intersection(*(set(runs) for runs in cells.values()))
    if not seeds:  # no seed every cell ran: compare the cells that share the seed most of them ran
        counts = {}
        for runs in cells.values():
            for s in runs:
                counts[s] = counts.get(s, 0) + 1
        seeds = {min(counts, key=lambda s: (-counts[s], s))}
    shared = tuple(sorted(seeds))
    inside = [key for key in cells if seeds <= set(cells[key])]
    result = ColumnResult(best=None, seeds=shared)
    for key in cells:
        if key not in inside:
            result.cells[key] = Comparison("?", test=f"no test: did not run the column's shared seed(s) {list(shared)}")
    y = np.array([[cells[key][s] for s in shared] for key in inside])  # (k, n)
    means = y.mean(1)
    best_index = int(np.argmax(means))  # ties: the first in table order
    best = inside[best_index]
    result.best = best
    k, n = len(inside), len(shared)
    raw: dict[Hashable, float] = {}
    tests: dict[Hashable, str] = {}
    if k >= 2:
        raw, tests, result.mde, result.mde_test, result.test_images = _tests(inside, best_index, y, outcomes, shared,
                                                                            alpha)
    adjusted = holm_after_selection(raw, k) if raw else {}
    for index, key in enumerate(inside):
        if key == best:
            result.cells[key] = Comparison("*", shared_mean=float(means[index]))
        elif key in raw:
            mark = "" if adjusted[key] < alpha else "≈"
            result.cells[key] = Comparison(mark, raw[key], adjusted[key], tests[key], float(means[index]))
        else:
            result.cells[key] = Comparison("?", test=tests.get(key, "no test"), shared_mean=float(means[index]))
    return result


def _tests(inside: list, b: int, y: np.ndarray, outcomes: dict, shared: tuple[int, ...], alpha: float):
    """Raw one-sided p of every cell against the best (index b), the test used, and the column's MDE."""
    from scipy.stats import t as student

    k, n = y.shape
    raw, tests = {}, {}
    mde, mde_test, images = None, "", None
    first_level = alpha / (k * (k - 1))  # what the cell most behind the best must reach (Holm's first step)
    spread = 0.0
    if n >= 2:
        residual = y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + y.mean()  # cell + seed effects removed
        df = (k - 1) * (n - 1)
        spread = math.sqrt(float((residual ** 2).sum()) / df)
        if spread > 1e-12:
            se = spread * math.sqrt(2 / n)  # of the difference of two cells' means over the n shared seeds
            for i, key in enumerate(inside):
                if i != b:
                    raw[key] = float(student.sf((y[b].mean() - y[i].mean()) / se, df))
                    tests[key] = T_POOLED
            mde = (student.ppf(1 - first_level, df) + student.ppf(POWER, df)) * se
            return raw, tests, mde, T_POOLED, images
    # one shared seed, or no spread at all over seeds: the per-image outcomes of the same test images
    best_key = inside[b]
    discordant = []
    for i, key in enumerate(inside):
        if i == b:
            continue
        if n >= 2 and y[b].mean() == y[i].mean():  # no spread and no difference: nothing to find
            raw[key], tests[key] = 1.0, "identical on every shared seed"
            continue
        pairs, why = _paired_outcomes(outcomes.get(best_key, {}), outcomes.get(key, {}), shared)
        if pairs is None:
            tests[key] = why if n == 1 else f"no test: no spread over seeds and {why.removeprefix('no test: ')}"
            continue
        raw[key] = mcnemar_exact([p[0] for p in pairs], [p[1] for p in pairs])
        tests[key] = MCNEMAR if n == 1 else MCNEMAR_POOLED
        images = len(pairs[0][0])
        discordant.append(np.mean([np.mean(p[0] != p[1]) for p in pairs]))
    if discordant:
        mde = mcnemar_mde(float(np.median(discordant)), images * len(shared), first_level)
        mde_test = MCNEMAR if n == 1 else MCNEMAR_POOLED
    return raw, tests, mde, mde_test, images


def _paired_outcomes(best: dict[int, Outcome], other: dict[int, Outcome], seeds: tuple[int, ...]):
    """[(best correct, other correct)] per shared seed when both are on the same test images, else (None, why)."""
    pairs = []
    for s in seeds:
        if s not in best or s not in other:
            return None, "no test: no per-image outcomes (one seed; e.g. a non-primary head)"
        (x, hx), (y, hy) = best[s], other[s]
        if hx is None or hy is None:
            return None, "no test: per-image outcomes without a test-set hash (rerun the trials)"
        if hx != hy or len(x) != len(y):
            return None, "no test: the two cells were tested on different test images"
        pairs.append((x, y))
    return pairs, ""


def mcnemar_mde(discordant_share: float, images: int, level: float, power: float = POWER) -> float:
    """The accuracy difference a one-sided McNemar test at `level` finds with `power` on `images` paired test
    images whose share `discordant_share` is discordant (Connor 1987's normal approximation:
    delta = (z_a sqrt(psi) + z_b sqrt(psi - delta^2)) / sqrt(N), solved by iteration)."""
    from scipy.stats import norm

    psi = max(discordant_share, 1.0 / images)
    za, zb = norm.ppf(1 - level), norm.ppf(power)
    delta = (za + zb) * math.sqrt(psi / images)
    for _ in range(50):
        delta = (za * math.sqrt(psi) + zb * math.sqrt(max(psi - delta ** 2, 0.0))) / math.sqrt(images)
    return min(delta, psi)


def pack_correct(correct: np.ndarray) -> str:
    """(n,) bools -> "n:base64 of the packed bits"."""
    correct = np.asarray(correct, dtype=bool)
    return f"{len(correct)}:" + base64.b64encode(np.packbits(correct).tobytes()).decode()


def unpack_correct(packed: str) -> np.ndarray:
    n, data = packed.split(":", 1)
    return np.unpackbits(np.frombuffer(base64.b64decode(data), dtype=np.uint8))[:int(n)].astype(bool)


def split_hash(labels: np.ndarray, images: np.ndarray) -> str:
    """The identity of a test set, stored beside its per-image outcomes (`test/set_hash`): a hash of its
    labels and image bytes in test order (the stored images, memory-mapped: read once, not copied). Two trials
    with the same hash were scored on the same images in the same order, so their outcomes pair image by image."""
    h = hashlib.blake2b(digest_size=8)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    h.update(f"{labels.shape}:{np.asarray(images).shape}:".encode())
    h.update(memoryview(labels).cast("B"))
    images = np.asarray(images)
    for start in range(0, len(images), 256):  # in chunks: a large test set is never copied whole
        h.update(memoryview(np.ascontiguousarray(images[start:start + 256])).cast("B"))
    return h.hexdigest()

"""Honest statistics for the tables: spread over seeds, confidence intervals, and which differences are real.

- `summarize`: mean, sample standard deviation and the number of seeds; with 3 or more seeds, the
  95% confidence interval of the mean (Student's t, n - 1 degrees of freedom).
- `compare_column`: which cells of one table column are significantly worse than its best: a statement about
  two *settings*, so the test must include the variation between training runs. The best is chosen on the seeds
  every cell of the column ran (the shared seeds) and every other cell is compared with it on those seeds,
  one-sided (is the best better?):
  - 2 or more shared seeds: a t-test on the difference of the two cells' means, paired by seed (the same
    seed gives every cell the same data order), with the error variance pooled over the column (the
    residual of cell + seed effects: (k - 1)(n - 1) degrees of freedom; with two cells exactly the
    paired t-test). The residual is the spread between training runs of the same setting (image-level noise
    included), which is what a claim about settings must be judged against;
  - 1 shared seed: no test. One training run per cell cannot tell a worse setting from an unlucky run (on the
    smoke study the spread between seeds is about 2x what image-level disagreement implies; an exact McNemar
    test over the test images, which asks "do these two trained networks differ?", falsely marks a cell of
    equal settings worse in 17-75% of columns). The cells get `?` and the power note says why.
  The error over the column is held by Holm's step-down over its tests, after each raw p is multiplied
  by k - 1 for the choice of the best among the k cells (see `holm_after_selection` for why).
  A column with a single finished cell gets `-` (nothing to compare).
- `compare_models` (a table's `model_comparison: true`): the exact McNemar test of each one-seed cell's trained
  model against the column's best model on the same test images (`test/correct`, checked by `test/set_hash`),
  under its own name and mark (`†`): a statement about two networks, not about their settings.
- `ColumnResult.mde`: the minimum detectable effect, the smallest difference from the best that the column's
  test finds 80% of the time at the level its most-behind cell must reach: exact for both tests (the noncentral t
  for the t-test, `t_test_mde`; the discrete binomial for McNemar, `mcnemar_mde`).
- `pack_correct` / `unpack_correct` / `split_hash`: the per-image correctness of a trial's primary head on
  the test set, stored compactly (one bit per image) in its results row, and the identity of that test set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable

import numpy as np

ALPHA = 0.05  # the column's family-wise error: P(any cell falsely marked worse) <= ALPHA
POWER = 0.8  # the power at which the minimum detectable effect is stated

T_POOLED = "paired t over seeds (pooled)"
MCNEMAR = "exact McNemar over test images (trained models, not settings)"
CORRECTION = "Holm after selection of the best"
ONE_RUN = ("one training run per cell: differences between settings cannot be tested (they need the spread "
           "between training runs: n >= 2 seeds)")
NO_SPREAD = "no test: the seeds show no spread (the t-test has no variance to judge with)"
LONE = "nothing to compare: the only finished cell of its column"


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
    """One-sided exact McNemar p of "model best is more accurate than model other" on the same test images: of the
    images exactly one of the two gets right (the discordant ones), b are the best's and c the other's; under equal
    accuracy b ~ Binomial(b + c, 1/2), and p = P(X >= b). 1.0 when no image is discordant."""
    x, y = np.asarray(best_correct, dtype=bool), np.asarray(other_correct, dtype=bool)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"McNemar needs per-image outcomes on the same test images ({x.shape} vs {y.shape})")
    b, c = int((x & ~y).sum()), int((~x & y).sum())
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

    mark: str  # "*" best, "≈" not shown different, "" significantly worse, "?" no test applies, "-" nothing to compare
    p_raw: float | None = None  # one-sided p of "the best setting is better"
    p_adjusted: float | None = None  # after Holm over the column (see holm_after_selection)
    test: str = ""  # which test, or why none applies
    shared_mean: float | None = None  # the cell's mean on the column's shared seeds
    model_p_raw: float | None = None  # compare_models: exact McNemar of its trained model against the best model
    model_p_adjusted: float | None = None

    @property
    def worse(self) -> bool:
        return self.p_adjusted is not None and self.p_adjusted < ALPHA

    @property
    def model_worse(self) -> bool:
        return self.model_p_adjusted is not None and self.model_p_adjusted < ALPHA


@dataclass
class ColumnResult:
    best: Hashable | None
    seeds: tuple[int, ...]  # the shared seeds the column was compared on
    cells: dict[Hashable, Comparison] = field(default_factory=dict)
    mde: float | None = None  # minimum detectable effect (fraction for accuracies): t_test_mde
    mde_test: str = ""  # the test the MDE is of
    test_images: int | None = None
    model_mde: float | None = None  # compare_models: the gap between trained models McNemar finds (mcnemar_mde)

    @property
    def one_run(self) -> bool:
        """One shared seed: nothing said about the settings (see ONE_RUN)."""
        return len(self.seeds) == 1 and len(self.cells) > 1


Outcome = tuple[np.ndarray, str | None]  # (per-image correctness, hash of the test set's identities)


def compare_column(by_seed: dict[Hashable, dict[int, float]],
                   outcomes: dict[Hashable, dict[int, Outcome]] | None = None, alpha: float = ALPHA,
                   models: bool = False) -> ColumnResult:
    """Marks for the cells of one column (see the module docstring). `by_seed`: cell -> {seed: value} of its
    finished trials; `outcomes`: cell -> {seed: (correct, test-set hash)} where per-image outcomes exist;
    `models`: also compare one-seed cells' trained models by McNemar (compare_models)."""
    cells = {key: runs for key, runs in by_seed.items() if runs}
    if len(cells) < 2:
        return ColumnResult(best=next(iter(cells), None), seeds=(), cells={key: Comparison("-", test=LONE)
                                                                            for key in cells})
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
    if k >= 2 and n >= 2:
        raw, tests, result.mde = _t_tests(inside, best_index, y, alpha)
        result.mde_test = T_POOLED if result.mde is not None else ""
    elif k >= 2:
        tests = {key: ONE_RUN for key in inside}
    adjusted = holm_after_selection(raw, k) if raw else {}
    model_raw, model_adjusted = {}, {}
    if models and k >= 2 and n == 1:
        model_raw, result.model_mde, result.test_images = compare_models(inside, best_index, outcomes or {},
                                                                         shared[0], alpha)
        model_adjusted = holm_after_selection(model_raw, k) if model_raw else {}
    if k == 1:
        result.cells[best] = Comparison("-", test=LONE, shared_mean=float(means[0]))
        return result
    for index, key in enumerate(inside):
        extra = {"model_p_raw": model_raw.get(key), "model_p_adjusted": model_adjusted.get(key)}
        if key == best:
            result.cells[key] = Comparison("*", test=tests.get(key, "") if n == 1 else "",
                                           shared_mean=float(means[index]))
        elif key in raw:
            mark = "" if adjusted[key] < alpha else "≈"
            result.cells[key] = Comparison(mark, raw[key], adjusted[key], tests[key], float(means[index]), **extra)
        else:
            result.cells[key] = Comparison("?", test=tests.get(key, "no test"), shared_mean=float(means[index]),
                                           **extra)
    return result


def first_level(k: int, alpha: float = ALPHA) -> float:
    """The raw level the cell most behind the best must reach: Holm's first step over k hypotheses (the k - 1
    compared cells and the best's own) after the (k - 1) x for the choice of the best."""
    return alpha / (k * (k - 1))


def _t_tests(inside: list, b: int, y: np.ndarray, alpha: float):
    """Raw one-sided p of every cell against the best (index b) by the pooled paired t-test, and its MDE."""
    from scipy.stats import t as student

    k, n = y.shape
    raw, tests = {}, {}
    residual = y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + y.mean()  # cell + seed effects removed
    df = (k - 1) * (n - 1)
    spread = math.sqrt(float((residual ** 2).sum()) / df)
    if spread <= 1e-12:  # every difference identical on every seed (discrete accuracies can do that)
        for i, key in enumerate(inside):
            if i != b:
                if y[b].mean() == y[i].mean():
                    raw[key], tests[key] = 1.0, "identical on every shared seed"
                else:
                    tests[key] = NO_SPREAD
        return raw, tests, None
    se = spread * math.sqrt(2 / n)  # of the difference of two cells' means over the n shared seeds
    for i, key in enumerate(inside):
        if i != b:
            raw[key] = float(student.sf((y[b].mean() - y[i].mean()) / se, df))
            tests[key] = T_POOLED
    return raw, tests, t_test_mde(se, df, first_level(k, alpha))


def t_test_mde(se: float, df: int, level: float, power: float = POWER) -> float:
    """The true difference of means a one-sided t-test at `level` (df degrees of freedom, standard error se) finds
    with `power`: exact, from the noncentral t (P(T'(df, delta / se) > t_crit) = power)."""
    from scipy.optimize import brentq
    from scipy.stats import nct
    from scipy.stats import t as student

    critical = float(student.ppf(1 - level, df))
    ncp = brentq(lambda d: float(nct.sf(critical, df, d)) - power, 0.0, 1e4)
    return ncp * se


def compare_models(inside: list, b: int, outcomes: dict, seed: int, alpha: float):
    """Exact McNemar p of each cell's trained model against the best cell's (index b) on the same test images, the
    gap between models it finds 80% of the time (mcnemar_mde), and the number of test images. A statement about two
    networks: nothing in it measures how another training run of the same setting would do."""
    best_key = inside[b]
    raw, discordant, images = {}, [], None
    for i, key in enumerate(inside):
        if i == b:
            continue
        pair = _paired_outcomes(outcomes.get(best_key, {}), outcomes.get(key, {}), seed)
        if pair is None:
            continue
        raw[key] = mcnemar_exact(*pair)
        images = len(pair[0])
        discordant.append(float(np.mean(pair[0] != pair[1])))
    mde = mcnemar_mde(float(np.median(discordant)), images, first_level(len(inside), alpha)) if discordant else None
    return raw, mde, images


def _paired_outcomes(best: dict[int, Outcome], other: dict[int, Outcome], seed: int):
    """(best correct, other correct) on one seed when both were scored on the same test images, else None."""
    if seed not in best or seed not in other:
        return None
    (x, hx), (y, hy) = best[seed], other[seed]
    if hx is None or hy is None or hx != hy or len(x) != len(y):
        return None
    return x, y


def _mcnemar_rejection(discordant_share: float, images: int, level: float):
    """The discordant counts D worth summing over, their probabilities (D ~ Binomial(images, share)), and for each the
    smallest count b of the best's with P(Binomial(D, 1/2) >= b) < level (the exact test's rejection region)."""
    from scipy.stats import binom

    psi = discordant_share
    sd = math.sqrt(images * psi * (1 - psi))
    d = np.arange(max(0, int(images * psi - 10 * sd) - 1), min(images, int(images * psi + 10 * sd) + 2) + 1)
    critical = np.asarray(binom.isf(level, d, 0.5), dtype=float) + 1  # about the smallest b with P(X >= b) <= level
    for _ in range(3):  # step onto the exact boundary: P(X >= c) < level <= P(X >= c - 1)
        critical = np.where(binom.sf(critical - 1, d, 0.5) >= level, critical + 1, critical)
        critical = np.where((critical > 0) & (binom.sf(critical - 2, d, 0.5) < level), critical - 1, critical)
    return d, binom.pmf(d, images, psi), critical


def mcnemar_power(delta: float, discordant_share: float, images: int, level: float, _region=None) -> float:
    """The exact power of the one-sided McNemar test at `level` on `images` paired test images, a share
    `discordant_share` of them discordant on average, when the best model is `delta` more accurate: the discordant
    count D ~ Binomial(images, share), the best's count among them b | D ~ Binomial(D, (share + delta) / (2 share)),
    and the test rejects when P(Binomial(D, 1/2) >= b) < level."""
    from scipy.stats import binom

    d, weights, critical = _region or _mcnemar_rejection(discordant_share, images, level)
    share = min(1.0, (discordant_share + delta) / (2 * discordant_share))
    return float(np.sum(weights * binom.sf(critical - 1, d, share)))


def mcnemar_mde(discordant_share: float, images: int, level: float, power: float = POWER) -> float | None:
    """The accuracy difference between two models the one-sided exact McNemar test at `level` finds with `power`
    (mcnemar_power, solved by bisection to 0.001 points); None when even a difference as large as the discordant
    share (every discordant image the best's) is not found that often: the test is discrete and small counts cannot
    reach the level at all."""
    psi = min(max(discordant_share, 1.0 / images), 1.0)
    region = _mcnemar_rejection(psi, images, level)
    if mcnemar_power(psi, psi, images, level, region) < power:
        return None
    low, high = 0.0, psi
    while high - low > 1e-5:
        mid = (low + high) / 2
        low, high = (mid, high) if mcnemar_power(mid, psi, images, level, region) < power else (low, mid)
    return high


